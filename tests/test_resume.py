"""Crash and resume: `batchinfer run` SIGKILLed mid-run, rerun, every input row exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pandas as pd
import pytest

from batchinfer.samples import write_sample_prompts
from tests.conftest import make_config, write_yaml

pytestmark = pytest.mark.slow


def committed_parts(out) -> dict[str, tuple[int, int, str]]:
    """part name -> (inode, mtime_ns, sha256) of every visible part."""
    found = {}
    for name in sorted(os.listdir(out)) if out.exists() else []:
        if name.startswith("part-"):
            st = os.stat(out / name)
            found[name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256((out / name).read_bytes()).hexdigest())
    return found


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_sigkill_then_rerun_answers_every_row_exactly_once(tmp_path, driver):
    write_sample_prompts(str(tmp_path / "prompts"), files=3, rows_per_file=100, row_group_size=10)
    cfg = make_config(tmp_path, run={"num_workers": 2, "rows_per_shard": 10},
                      sampling={"max_tokens": 4})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))
    out = tmp_path / "out"

    first = driver("run", config)
    wait_for(lambda: len(committed_parts(out)) >= 6, 300, "6 committed shards", first.proc)
    first.kill_group()  # SIGKILL the whole process group: no handler, no cleanup
    first.wait(timeout=30)
    survived = committed_parts(out)
    assert 6 <= len(survived) < 30, f"{len(survived)} parts at kill time"
    assert not (out / "_SUCCESS").exists()

    second = driver("run", config, "--no-progress")
    assert second.wait(timeout=600) == 0, second.output()
    assert "batchinfer: complete" in second.output()

    df = pd.read_parquet(out)
    expected = sorted(f"q{i:06d}" for i in range(300))
    assert sorted(df.id) == expected, "every input id exactly once"
    assert df.output.str.len().min() > 0

    after = committed_parts(out)
    assert len(after) == 30
    for name, stat in survived.items():  # committed before the kill: never recomputed
        assert after[name] == stat, f"{name} was rewritten"

    manifest = json.loads((out / "_batchinfer" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["rows"] == {"total": 300, "ok": 300, "failed": 0, "missing": 0}
    assert manifest["shards"] == {"total": 30, "committed": 30, "failed": 0}
    assert manifest["tokens"]["completion"] == df.completion_tokens.sum()
    assert manifest["this_run"]["shards"] <= 30 - len(survived)
    summaries = {s["part"]: s for s in manifest["shard_summaries"]}
    assert sum(s["rows"] for s in summaries.values()) == 300
