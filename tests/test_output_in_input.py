"""An output folder inside, or equal to, the input folder (issue 8, item 3).

Run directories (folders holding `_batchinfer/`) are never read as input, so an output
inside the input folder works on every rerun, resume and --new-run; an output that IS the
input is refused before anything starts (exit 2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner, storage
from batchinfer.config import ConfigError
from batchinfer.plan import make_plan
from batchinfer.readers.parquet import ParquetReader
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import (
    BUCKET,
    REPO,
    assert_exactly_once,
    ids_of,
    make_config,
    part_stats,
    wait_for,
    write_yaml,
)


def fake_run_dir(folder, ids=("r1", "r2")):
    """A folder laid out like a finished run: a part with id/prompt columns, and _batchinfer/."""
    os.makedirs(folder / "_batchinfer" / "commits", exist_ok=True)
    pq.write_table(pa.table({"id": list(ids), "prompt": ["result"] * len(ids)}), folder / "part-000000.parquet")
    (folder / "_batchinfer" / "plan.json").write_text("{}")
    (folder / "_batchinfer" / "commits" / "part-000000.json").write_text("{}")
    (folder / "_SUCCESS").write_text("")


def list_parquet(url, cfg=None):
    """The Parquet reader's listing (storage.list_files with Parquet's suffixes)."""
    return ParquetReader(storage=cfg).list_files(url)


def relatives(url):
    return [f["relative"] for f in list_parquet(url)[1]]


# --------------------------------------------------------------------------- the listing rule


def test_run_directories_inside_the_input_are_never_listed(tmp_path):
    prompts = tmp_path / "prompts"
    write_sample_prompts(str(prompts), files=1, rows_per_file=2)
    write_sample_prompts(str(prompts / "more"), files=1, rows_per_file=2)
    fake_run_dir(prompts / "out")                       # this run's own output
    fake_run_dir(prompts / "more" / "old-run")          # another run's, deeper
    os.makedirs(prompts / "out" / "sub")                # anything under a run directory
    pq.write_table(pa.table({"id": ["s"], "prompt": ["p"]}), prompts / "out" / "sub" / "x.parquet")
    pq.write_table(pa.table({"id": ["o"], "prompt": ["p"]}), prompts / "outside.parquet")  # a sibling name

    real = ["more/prompts-000.parquet", "outside.parquet", "prompts-000.parquet"]
    assert relatives(str(prompts)) == real
    assert relatives(f"{prompts}/**/*.parquet") == real
    assert relatives(f"{prompts}/**") == real
    assert relatives(f"{prompts}/*/*.parquet") == ["more/prompts-000.parquet"]
    assert relatives(f"{prompts}/*.parquet") == ["outside.parquet", "prompts-000.parquet"]
    # A file named on its own is read as named.
    assert relatives(str(prompts / "out" / "part-000000.parquet")) == ["part-000000.parquet"]


def test_run_directory_helpers():
    listing = ["b/in/a.parquet", "b/in/out/part-000000.parquet", "b/in/out/_batchinfer/plan.json",
               "b/in/x/y/_batchinfer/commits/part-000001.json", "b/in/_batchinfer.parquet"]
    dirs = storage.run_directories(listing)
    assert dirs == {"b/in/out", "b/in/x/y"}
    assert storage.in_run_directory("b/in/out/part-000000.parquet", dirs)
    assert storage.in_run_directory("b/in/x/y/z/deep.parquet", dirs)
    assert not storage.in_run_directory("b/in/outx/part-000000.parquet", dirs)
    assert not storage.in_run_directory("b/in/a.parquet", dirs)


@pytest.mark.parametrize("suffix", ["", "/*.parquet", "/**/*.parquet"])
def test_an_input_that_is_a_run_directory_is_refused(tmp_path, suffix):
    fake_run_dir(tmp_path / "run")
    with pytest.raises(storage.StorageError) as e:
        list_parquet(f"{tmp_path / 'run'}{suffix}")
    assert str(e.value) == (
        f"input.path '{tmp_path / 'run'}{suffix}' reads a batchinfer run directory "
        f"('{tmp_path / 'run'}' holds _batchinfer/): its part files are results, not prompts; "
        "expected a folder (or glob) of prompt Parquet files")


def test_the_plan_lists_only_real_inputs(tmp_path):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=5)
    fake_run_dir(tmp_path / "prompts" / "yesterday", ids=("q000000", "q000001"))  # would be duplicates
    plan = make_plan(make_config(tmp_path))
    assert [f.name for f in plan.files] == ["prompts-000.parquet", "prompts-001.parquet"]
    assert plan.total_rows == 10


# --------------------------------------------------------------------------- input == output


@pytest.mark.parametrize("inp, out", [
    ("{t}/in", "{t}/in"),
    ("{t}/in/", "{t}/in"),
    ("{t}/in", "{t}/x/../in/"),
    ("{t}/in/*.parquet", "{t}/in"),
    ("{t}/in/**/*.parquet", "{t}/in/"),
    ("s3://b/in/", "s3a://b/in"),
    ("s3://b/in/**/*.parquet", "s3://b/in"),
])
def test_output_equal_to_input_is_a_config_error(tmp_path, inp, out):
    inp, out = inp.format(t=tmp_path), out.format(t=tmp_path)
    message = storage.input_output_clash(inp, out)
    assert message is not None and message.startswith(f"output.path {out!r} is where input.path {inp!r} reads from")
    assert "results would land among the prompts" in message
    with pytest.raises(ConfigError, match="is where input.path"):
        runner.preflight(make_config(tmp_path, input={"path": inp}, output={"path": out}))


@pytest.mark.parametrize("inp, out", [
    ("{t}/in", "{t}/in/out"),                 # output inside the input: fine
    ("{t}/out/prompts.parquet", "{t}/out"),   # an input file inside the output folder: fine
    ("{t}/in", "{t}/inside"),
    ("s3://b/in/", "s3://b/in/out/"),
    ("s3://b/in/", "s3://c/in/"),
    ("s3://b/in", "{t}/b/in"),
])
def test_output_apart_from_input_is_accepted(tmp_path, inp, out):
    assert storage.input_output_clash(inp.format(t=tmp_path), out.format(t=tmp_path)) is None


def test_run_with_output_equal_to_input_exits_2_before_anything_starts(tmp_path):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=3)
    before = sorted(os.listdir(tmp_path / "prompts"))
    folder = str(tmp_path / "prompts")
    cfg = make_config(tmp_path, input={"path": folder}, output={"path": folder + "/"})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "batchinfer.cli", "run", config, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (f"error: output.path '{folder}/' is where input.path '{folder}' reads from (both "
            f"'{folder}'): results would land among the prompts") in done.stderr
    assert "Started a local Ray instance" not in done.stderr and "workers ready" not in done.stderr
    assert sorted(os.listdir(tmp_path / "prompts")) == before  # nothing written
    assert time.monotonic() - started < 60


# --------------------------------------------------------------------------- S3


def test_s3_output_prefix_inside_the_input_prefix(tmp_path, s3, ray_cluster):
    write_sample_prompts(str(tmp_path / "local"), files=1, rows_per_file=4, row_group_size=4)
    s3.upload_dir(tmp_path / "local", "in/")
    cfg = make_config(tmp_path, input={"path": s3.url("in/")}, output={"path": s3.url("in/out/")},
                      storage={"endpoint_url": s3.endpoint}, sampling={"max_tokens": 2})
    assert runner.run(cfg, progress=False).exit_code == 0
    assert "in/out/part-000000.parquet" in s3.keys("in/")
    assert sorted(s3.read("in/out/").id) == ids_of(4)
    for path in (s3.url("in/"), s3.url("in/**/*.parquet")):
        assert [f["relative"] for f in list_parquet(path, cfg.storage)[1]] == ["prompts-000.parquet"]
    again = runner.run(cfg, progress=False)
    assert (again.exit_code, again.did_work) == (0, False)
    with pytest.raises(storage.StorageError, match=f"'s3://{BUCKET}/in/out' holds _batchinfer/"):
        list_parquet(s3.url("in/out/"), cfg.storage)
    with pytest.raises(ConfigError, match="is where input.path"):
        runner.preflight(make_config(tmp_path, input={"path": s3.url("in/")}, output={"path": s3.url("in")},
                                     storage={"endpoint_url": s3.endpoint}))


# --------------------------------------------------------------------------- end to end


def read_three_ways(out, n):
    """The results hold each of n ids once, as pandas, DuckDB and pyarrow.dataset read them."""
    import duckdb
    import pyarrow.dataset as ds

    assert_exactly_once(out, n)
    assert sorted(duckdb.sql(f"SELECT id FROM read_parquet('{out}/*.parquet')").fetchnumpy()["id"]) == ids_of(n)
    assert sorted(ds.dataset(str(out), format="parquet").to_table(columns=["id"]).column("id").to_pylist()) \
        == ids_of(n)


@pytest.mark.slow
def test_output_inside_input_interrupt_resume_rerun_and_new_run(tmp_path, driver):
    prompts = tmp_path / "prompts"
    write_sample_prompts(str(prompts), files=1, rows_per_file=24, row_group_size=4)
    out = prompts / "out"
    cfg = make_config(tmp_path, output={"path": str(out)}, sampling={"max_tokens": 2},
                      run={"num_workers": 1, "rows_per_shard": 4, "shards_per_worker": 1})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))

    first = driver("run", config, "--no-progress")
    wait_for(lambda: len(part_stats(out)) >= 1, 300, "a first commit", first.proc, first.output)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 1, first.output()
    assert "batchinfer: interrupted" in first.output()
    assert 1 <= len(part_stats(out)) < 6

    resumed = driver("run", config, "--no-progress")
    assert resumed.wait(timeout=300) == 0, resumed.output()
    assert "6/6 committed" in resumed.output()
    read_three_ways(out, 24)

    before = part_stats(out)
    rerun = driver("run", config, "--no-progress")
    assert rerun.wait(timeout=120) == 0, rerun.output()
    assert "batchinfer: completed (already done; nothing to do)" in rerun.output()
    assert part_stats(out) == before
    status = subprocess.run([sys.executable, "-m", "batchinfer.cli", "status", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "state    completed" in status.stdout, status.stdout + status.stderr

    fresh = driver("run", config, "--no-progress", "--new-run")
    assert fresh.wait(timeout=300) == 0, fresh.output()
    assert "24 ok, 0 failed" in fresh.output()
    read_three_ways(out, 24)
    assert part_stats(out).keys() == before.keys() and part_stats(out) != before  # rewritten
