"""The failed-rows file (`OUT/_errors/`) and retries of retryable row errors
(`run.row_retries`): runs on the session's local Ray cluster with the real model, the
requests that fail coming from a FAILING TEST ENGINE (tests/fault_engines.py)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from batchinfer import runner
from batchinfer.cli import main
from batchinfer.run_store import ERRORS_DIR, RunStore
from tests.conftest import make_config

FLAKY = "tests.fault_engines:FlakyRequestEngine"


def write_prompts(folder, n: int, flaky: set[int], null: set[int]) -> list[str]:
    """n rows with ids r00..; rows in `flaky` hold the word FLAKY, rows in `null` no prompt."""
    folder.mkdir(parents=True)
    ids = [f"r{i:02d}" for i in range(n)]
    prompts = [None if i in null else f"Say one word about {'FLAKY ' if i in flaky else ''}number {i}."
               for i in range(n)]
    pq.write_table(pa.table({"id": ids, "prompt": pa.array(prompts, pa.string())}),
                   folder / "p.parquet", row_group_size=4)
    return ids


def failed_rows(out) -> pd.DataFrame:
    files = sorted((out / ERRORS_DIR).glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def test_a_request_that_fails_once_is_retried_within_its_shard_attempt(tmp_path, ray_cluster):
    write_prompts(tmp_path / "prompts", 12, flaky={1, 6, 7}, null={10})
    cfg = make_config(tmp_path, engine={"backend": FLAKY},
                      run={"rows_per_shard": 4, "row_retries": 1})
    report = runner.run(cfg, progress=False)
    m = report.manifest
    # the FLAKY rows failed once each (request_failed, retryable) and then succeeded; the
    # null prompt is not retryable and stays that row's error
    assert (report.status, m.rows.ok, m.rows.failed, m.errors) == ("partial", 11, 1, {"empty_prompt": 1})
    assert m.this_run.row_retries == 3
    assert {s.shard: s.row_retries for s in m.shard_summaries} == {0: 1, 1: 2, 2: 0}
    assert all(a.attempt == 1 for a in m.this_run.attempts)  # retried inside the attempt
    rows = failed_rows(tmp_path / "out")
    assert rows[["id", "error_code", "shard", "attempt"]].values.tolist() == [["r10", "empty_prompt", 2, 1]]
    assert rows["error_message"].tolist() == ["prompt is null"]


def test_rows_still_failing_after_their_retries_are_listed_in_the_failed_rows_file(tmp_path, ray_cluster):
    ids = write_prompts(tmp_path / "prompts", 12, flaky={1, 6, 7}, null={10})
    cfg = make_config(tmp_path, engine={"backend": FLAKY},
                      run={"rows_per_shard": 4, "row_retries": 0})
    report = runner.run(cfg, progress=False)
    out = tmp_path / "out"
    m = report.manifest
    assert (report.status, m.rows.failed, m.errors) == ("partial", 4, {"request_failed": 3, "empty_prompt": 1})
    assert m.this_run.row_retries == 0
    status = CliRunner().invoke(main, ["status", str(tmp_path / "out"), "--json"])
    info = json.loads(status.output)
    assert (status.exit_code, info["state"], info["exit_code"], info["terminal"]) == (3, "partial", 3, True)
    assert info["rows"] == {"done": 12, "total": 12, "ok": 8, "failed": 4}

    # one file per shard with failed rows, named as its part; the row's code, message,
    # shard and attempt; exactly the rows the parts hold as failed
    summaries = {s.part: s for s in m.shard_summaries}
    names = sorted(p.name for p in (out / ERRORS_DIR).iterdir())
    assert names == sorted(p for p, s in summaries.items() if s.rows_failed) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    rows = failed_rows(out).sort_values("id")
    assert list(rows.columns) == ["id", "error_code", "error_message", "shard", "attempt"]
    assert rows[["id", "error_code", "shard"]].values.tolist() == [
        ["r01", "request_failed", 0], ["r06", "request_failed", 1], ["r07", "request_failed", 1],
        ["r10", "empty_prompt", 2]]
    assert rows["error_message"].str.contains("executor dropped the request").sum() == 3
    assert rows["attempt"].tolist() == [summaries[f"part-{s:06d}.parquet"].attempt for s in rows["shard"]]
    results = pd.read_parquet(out)  # readers of the output skip _errors/
    assert sorted(results["id"]) == ids
    assert sorted(results.loc[results["error"].notna(), "id"]) == rows["id"].tolist()


def test_a_failed_rows_file_lost_to_a_crash_is_written_again_from_its_part(tmp_path, ray_cluster):
    write_prompts(tmp_path / "prompts", 8, flaky={2}, null={5})
    cfg = make_config(tmp_path, engine={"backend": FLAKY}, run={"rows_per_shard": 4, "row_retries": 0})
    runner.run(cfg, progress=False)
    out = tmp_path / "out"
    before = {p.name: pd.read_parquet(p) for p in (out / ERRORS_DIR).iterdir()}
    assert sorted(before) == ["part-000000.parquet", "part-000001.parquet"]
    # the winner of shard 1 died between its part and its failed-rows file
    (out / ERRORS_DIR / "part-000001.parquet").unlink()
    again = runner.run(cfg, progress=False)
    assert again.did_work is False
    after = {p.name: pd.read_parquet(p) for p in (out / ERRORS_DIR).iterdir()}
    assert sorted(after) == sorted(before)
    for name in before:
        pd.testing.assert_frame_equal(after[name], before[name])
    # and the repair is idempotent: a file that exists is left alone
    assert RunStore(str(out)).repair_error_files(RunStore(str(out)).committed()) == 0
