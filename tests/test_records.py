"""The records' JSON forms: run directories written before batchinfer/records.py stay
readable, and what is written now keeps their layout (plus a manifest version, minus the
`won` flag that leaked into manifests).

tests/data/legacy_run is a run directory made by the code before records.py (commit
f08bc89: 3 sample prompts, max_tokens 2, one shard) with its `_batchinfer/driver.json`
left out; its manifest has a shard summary with `"won": true`.
"""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchinfer.cli import main
from batchinfer.errors import describe
from batchinfer.records import (
    MANIFEST_VERSION,
    Manifest,
    RunStatus,
    ShardAttempt,
    ShardSummary,
    WorkerInfo,
    WorkerProgress,
    now_iso,
)
from batchinfer.run_store import RunStore

LEGACY = Path(__file__).parent / "data" / "legacy_run"
META = LEGACY / "_batchinfer"


def test_a_manifest_written_before_records_parses_as_version_1():
    m = Manifest.from_json((META / "manifest.json").read_text())
    assert m.version == 1 and m.status == "completed"
    assert (m.rows.total, m.rows.ok, m.shards.committed, m.tokens.completion) == (3, 3, 1, 6)
    assert m.this_run.workers == 1 and m.failed_shards == []
    [s] = m.shard_summaries
    assert (s.part, s.rows_ok, s.generation, s.fingerprint) == ("part-000000.parquet", 3, 1, m.fingerprint)
    assert "won" not in json.loads(m.to_json())["shard_summaries"][0]  # the leak is dropped


def test_what_is_written_now_keeps_the_old_layout_plus_a_version():
    old = json.loads((META / "manifest.json").read_text())
    new = json.loads(Manifest.from_json(json.dumps(old)).to_json())
    assert new.pop("version") == MANIFEST_VERSION
    # fields added since (issue 11): empty for a run that did not record them
    assert new["this_run"].pop("tail_s") is None and new["this_run"].pop("engines") == []
    # and since issue 13: the timeline, cost and settings; the lifecycle's state names
    this_run = new["this_run"]
    assert [this_run.pop(k) for k in ("started_at", "workers_started_at", "attempts", "worker_restarts",
                                      "engine_restarts", "row_retries", "busy_s")] == [None, None, [], [], 0, 0, None]
    assert (new.pop("cost"), new.pop("settings")) == (None, {})
    summary = new["shard_summaries"][0]
    assert (summary.pop("started_at"), summary.pop("row_retries")) == (None, 0)
    assert (old["status"], new["status"]) == ("complete", "completed")
    old["status"] = "completed"
    del old["shard_summaries"][0]["won"]
    assert new == old
    for name, kind in (("status.json", RunStatus), ("commits/part-000000.json", ShardSummary)):
        text = (META / name).read_text()
        before = json.loads(text)
        after = json.loads(kind.from_json(text).to_json(indent=None))
        if "state" in before:  # the lifecycle's name for it
            assert (before["state"], after["state"]) == ("complete", "completed")
            before["state"] = "completed"
        assert _keeps(after, before), (after, before)
    status = RunStatus.from_json((META / "status.json").read_text())
    assert status.workers == [WorkerInfo(worker=0, host=status.host, pid=status.workers[0].pid)]


def _keeps(new, old) -> bool:
    """`new` holds everything `old` does (it may add fields)."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _keeps(new[k], v) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(new) == len(old) and all(map(_keeps, new, old))
    return new == old


def test_a_legacy_run_directory_reads_whole(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    store = RunStore(str(run))
    plan = store.read_plan()
    committed = store.committed()
    manifest = store.read_manifest()
    assert manifest.describes(plan.fingerprint, len(committed))
    assert committed[0] == store.summary_from_part("part-000000.parquet")  # record and part metadata agree
    assert store.read_status().state == "completed"
    result = CliRunner().invoke(main, ["status", str(run), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["state"], info["rows"]) == ("completed", {"done": 3, "total": 3, "ok": 3, "failed": 0})


def test_a_torn_or_foreign_record_reads_as_absent(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    (run / "_batchinfer" / "manifest.json").write_text('{"status": "comp')
    (run / "_batchinfer" / "status.json").write_text('{"no": "state"}')
    store = RunStore(str(run))
    assert store.read_manifest() is None and store.read_status() is None


def test_a_manifest_is_current_only_for_its_plan_and_its_commits():
    m = Manifest.from_json((META / "manifest.json").read_text())
    assert m.describes(m.fingerprint, 1)
    assert not m.describes("sha256:other", 1)
    assert not m.describes(m.fingerprint, 2)  # a shard committed after it was written


def test_records_are_immutable_and_cross_ray_by_pickle():
    import pickle

    summary = ShardSummary.from_json((META / "commits" / "part-000000.json").read_text())
    attempt = ShardAttempt(summary=summary, won=True)
    assert pickle.loads(pickle.dumps(attempt)) == attempt
    with pytest.raises(ValueError):
        summary.rows = 4  # frozen
    progress = WorkerProgress(rows=1, completion_tokens=2, heartbeat=3)
    assert progress.busy == {} and progress.max_model_len == 0


def test_now_iso_is_utc_to_the_second():
    stamp = now_iso()
    assert stamp.endswith("+00:00") and len(stamp) == len("2026-11-29T11:56:07+00:00")


class _RayLike(Exception):
    """Stands in for a Ray task error: the worker's own exception rides as `cause`."""

    def __init__(self, cause):
        super().__init__("ray::ShardWorker.process()\nTraceback ...\nValueError: bad")
        self.cause = cause


@pytest.mark.parametrize(("error", "expected"), [
    (ValueError("bad value\nmore detail"), "ValueError: bad value"),
    (KeyboardInterrupt(), "KeyboardInterrupt"),
    (_RayLike(OSError("No space left on device")), "OSError: No space left on device"),
    (asyncio.TimeoutError(), "TimeoutError"),
])
def test_describe_puts_an_error_on_one_line(error, expected):
    assert describe(error) == expected


def test_describe_takes_the_last_line_of_a_ray_error():
    from ray.exceptions import RayActorError

    error = RayActorError(error_msg="The actor died unexpectedly.\n\tpid: 7\nKilled by SIGKILL")
    assert describe(error) == "Killed by SIGKILL"
