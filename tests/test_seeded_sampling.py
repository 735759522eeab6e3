"""Sampling with a seed gives each row the same text, whatever the batching (issue 9, item 5).

Whole runs on local Ray with the real small model at temperature 1.0: a row's output
depends on the config, the model and the row (its id and prompt), not on batch
composition, worker count, shard size or an interruption and resume. Prompts repeat
under different ids, the case where outputs used to swap between rows.
"""

from __future__ import annotations

import json
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner
from batchinfer.engines import row_seed
from tests.conftest import REPO, assert_exactly_once, ids_of, make_config, part_stats, write_yaml

ROWS = 12
PROMPTS = ["Write a poem about the sea.", "Name three colors and say why you like them.",
           "Invent a name for a new city.", "Describe your favourite meal."]


def seeded_config(tmp_path, prompts, **run):
    return make_config(tmp_path, input={"path": str(prompts)}, engine={"max_batch_size": 4},
                       sampling={"temperature": 1.0, "seed": 7, "max_tokens": 6},
                       run={"num_workers": 1, "rows_per_shard": 4, **run})


def texts(out) -> dict[str, str]:
    df = assert_exactly_once(out, ROWS)
    assert (df.finish_reason != "error").all(), df.error.dropna().tolist()
    return dict(zip(df.id, df.output, strict=True))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeded") / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"id": ids_of(ROWS), "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(ROWS)]}),
                   folder / "p.parquet", row_group_size=2)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompts, ray_cluster):
    """Each row's text from one plain run: one worker, shards of 4 rows."""
    folder = tmp_path_factory.mktemp("reference")
    result = runner.run(seeded_config(folder, prompts), progress=False)
    assert (result.status, result.exit_code) == ("completed", 0)
    out = texts(folder / "out")
    same_prompt = [{out[k] for k in ids_of(ROWS)[i::len(PROMPTS)]} for i in range(len(PROMPTS))]
    assert all(len(s) == ROWS // len(PROMPTS) for s in same_prompt), same_prompt  # ids differ: texts differ
    return out


def test_a_row_seed_is_a_stable_63_bit_hash_of_the_seed_and_the_row_id():
    assert row_seed(7, "q000001") == 0x5706F31A9FAE6A29  # sha256("7:q000001"), first 8 bytes >> 1
    seeds = {row_seed(s, i) for s in (0, 7) for i in ("q000001", "q000002", "p.parquet:1", 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(7, 1) == row_seed(7, "1")  # ids are hashed as text


@pytest.mark.slow
@pytest.mark.parametrize("run", [
    pytest.param({}, id="same-config-again"),
    pytest.param({"rows_per_shard": 2, "shards_per_worker": 1}, id="other-shards-and-batches"),
    pytest.param({"num_workers": 2, "rows_per_shard": 6}, id="two-workers"),
])
def test_a_fresh_run_samples_the_same_text_per_row(tmp_path, prompts, reference, run):
    result = runner.run(seeded_config(tmp_path, prompts, **run), progress=False)
    assert (result.status, result.exit_code) == ("completed", 0)
    got = texts(tmp_path / "out")
    assert {k for k in got if got[k] != reference[k]} == set()


@pytest.mark.slow
def test_a_killed_and_resumed_run_samples_the_same_text_per_row(tmp_path, prompts, reference, driver):
    cfg = seeded_config(tmp_path, prompts, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))
    first = driver("run", config, "--no-progress", env={"BATCHINFER_FAULT": "committed#1:kill"})
    assert first.wait(timeout=300) == -signal.SIGKILL, first.output()
    survived = part_stats(tmp_path / "out")
    assert 1 <= len(survived) < 3  # killed after its first commit, before the last
    second = driver("run", config, "--no-progress")
    assert second.wait(timeout=300) == 0, second.output()
    manifest = json.loads((tmp_path / "out" / "_batchinfer" / "manifest.json").read_text())
    assert manifest["this_run"]["rows"] > 0  # the resumed run generated rows itself
    got = texts(tmp_path / "out")
    assert {k for k in got if got[k] != reference[k]} == set()
