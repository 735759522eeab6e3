"""Fault injection: workers and drivers killed, engines that hang, crash or fail on one row,
shards that always fail, signals. Real local Ray, real subprocesses, the real small model
(with one fault added by the failing test engines in tests/fault_engines.py).

Every test ends by checking the output holds every input row exactly once, and the
status or exit code the run reported.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import (
    REPO,
    assert_exactly_once,
    ids_of,
    make_config,
    part_stats,
    wait_for,
    write_yaml,
)
from tests.fault_engines import MARKER_ENV

pytestmark = pytest.mark.slow


def engine_config(tmp_path, backend: str, marker=None, **sections):
    run = {"num_workers": 1, "rows_per_shard": 5,
           "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO),
                                        **({MARKER_ENV: str(marker)} if marker else {})}}}
    run.update(sections.pop("run", {}))
    engine = {"backend": backend, **sections.pop("engine", {})}
    return make_config(tmp_path, engine=engine, run=run, sampling={"max_tokens": 3}, **sections)


def assert_read_exactly_once(out, n: int):
    """Each of n ids once, as pandas, DuckDB and pyarrow.dataset read the output folder
    (none may pick up metadata, temp or duplicate files); returns the pandas DataFrame."""
    import duckdb
    import pyarrow.dataset as ds

    df = assert_exactly_once(out, n)
    assert sorted(ds.dataset(str(out), format="parquet").to_table(columns=["id"])["id"].to_pylist()) == ids_of(n)
    assert [r[0] for r in duckdb.sql(f"SELECT id FROM '{out}/*.parquet' ORDER BY id").fetchall()] == ids_of(n)
    return df


def long_prompt(tokens: int) -> str:
    """A legal prompt of about `tokens` tokens (the chat template adds ~30)."""
    return "The quick brown fox jumps over the lazy dog. " * (tokens // 10)


def prompts_with(tmp_path, special: dict[int, str], n: int = 20, group: int = 5) -> None:
    """n sample prompts, some replaced by `special` texts (by row number)."""
    from scripts.sample_prompts import prompt

    os.makedirs(tmp_path / "prompts", exist_ok=True)
    texts = [special.get(i, prompt(i)) for i in range(n)]
    pq.write_table(pa.table({"id": ids_of(n), "prompt": texts}), tmp_path / "prompts" / "p.parquet",
                   row_group_size=group)


# --------------------------------------------------------------------------- workers and engines


def test_worker_sigkilled_mid_shard(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=20, row_group_size=5)
    cfg = make_config(tmp_path, run={"num_workers": 2, "rows_per_shard": 5}, sampling={"max_tokens": 2})
    result = []
    thread = threading.Thread(target=lambda: result.append(runner.run(cfg, progress=False)))
    thread.start()
    status = tmp_path / "out" / "_batchinfer" / "status.json"
    wait_for(lambda: status.exists() and json.loads(status.read_text())["workers"], 300, "workers")
    workers = json.loads(status.read_text())["workers"]  # pids the driver recorded, this run's own
    wait_for(lambda: len(part_stats(tmp_path / "out")) >= 1, 300, "a first commit")
    os.kill(workers[0]["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    report = result[0]
    assert (report.status, report.exit_code) == ("completed", 0)
    assert_exactly_once(tmp_path / "out", 40)
    assert max(s.attempt for s in report.manifest.shard_summaries) >= 2  # the killed worker's shards


def test_engine_that_hangs_is_detected_and_the_run_completes(tmp_path, ray_cluster, caplog):
    marker = tmp_path / "hang-once"
    marker.touch()
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=5)
    cfg = engine_config(tmp_path, "tests.fault_engines:HangOnceEngine", marker,
                        run={"hang_timeout_s": 8})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="batchinfer.scheduler"):
        report = runner.run(cfg, progress=False)
    assert report.exit_code == 0, report.manifest
    assert "its engine made no progress for" in caplog.text
    assert time.monotonic() - started < 240
    assert not marker.exists()  # the hang was armed and happened
    assert_exactly_once(tmp_path / "out", 10)


# Prefill on this CPU (one thread, SmolLM2-135M): 2k tokens ~7 s, 4k ~17 s, 7k ~40 s. The
# decoder layers beat as they finish, and a step's time limit grows with its prompt tokens,
# so a long prompt is legal work, not a hang (issue 8, item 7).


def test_long_prompt_whose_prefill_outlasts_hang_timeout_is_not_a_hang(tmp_path, ray_cluster, caplog):
    prompts_with(tmp_path, {1: long_prompt(6000)}, n=5)
    cfg = engine_config(tmp_path, "transformers", run={"hang_timeout_s": 15}, engine={"max_batch_size": 1})
    with caplog.at_level(logging.WARNING, logger="batchinfer.scheduler"):
        report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("completed", 0), report.manifest
    assert "starting a replacement" not in caplog.text
    assert [s.attempt for s in report.manifest.shard_summaries] == [1]
    df = assert_read_exactly_once(tmp_path / "out", 5).set_index("id")
    assert df.error.isna().all() and (df.output.str.len() > 0).all()
    assert df.loc["q000001", "prompt_tokens"] > 5500


def test_static_batch_of_long_prompts_outlasting_hang_timeout_is_not_a_hang(tmp_path, ray_cluster, caplog):
    # Each row alone prefills in ~11 s, under the limit; the batch of three takes ~35 s.
    prompts_with(tmp_path, {i: long_prompt(2600) for i in range(3)}, n=5)
    cfg = engine_config(tmp_path, "transformers", run={"hang_timeout_s": 15}, engine={"max_batch_size": 3})
    with caplog.at_level(logging.WARNING, logger="batchinfer.scheduler"):
        report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("completed", 0), report.manifest
    assert "starting a replacement" not in caplog.text
    df = assert_read_exactly_once(tmp_path / "out", 5)
    assert df.error.isna().all() and (df.output.str.len() > 0).all()


def test_row_that_kills_its_worker_is_narrowed_to_a_row_error(tmp_path, ray_cluster, caplog):
    prompts_with(tmp_path, {2: "Repeat after me: KILLER"}, n=5)
    cfg = engine_config(tmp_path, "tests.fault_engines:KillerRowEngine")
    with caplog.at_level(logging.WARNING, logger="batchinfer.scheduler"):
        report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3), report.manifest
    assert "probing its rows" in caplog.text
    df = assert_read_exactly_once(tmp_path / "out", 5).set_index("id")
    poison = df.loc["q000002"]
    assert poison.error.startswith("worker_died: ") and poison.finish_reason == "error"
    assert pd.isna(poison.output)
    others = df.drop(index="q000002")
    assert others.error.isna().all() and (others.output.str.len() > 0).all()
    assert report.manifest.errors == {"worker_died": 1}
    assert report.manifest.failed_shards == [] and report.manifest.rows.missing == 0


def test_poison_rows_in_one_row_shards_are_narrowed_and_their_neighbours_survive(tmp_path, ray_cluster):
    # Four one-row shards, two of them poison; a worker holds two shards at a time, so
    # innocent shards die with the poison ones and must not be taken for poison.
    prompts_with(tmp_path, {1: "Please say KILLER.", 2: "KILLER again"}, n=4, group=1)
    cfg = engine_config(tmp_path, "tests.fault_engines:KillerRowEngine", run={"rows_per_shard": 1})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3), report.manifest
    df = assert_read_exactly_once(tmp_path / "out", 4).set_index("id")
    assert df.loc[["q000001", "q000002"]].error.str.startswith("worker_died: ").all()
    assert df.loc[["q000000", "q000003"]].error.isna().all()
    assert (df.loc[["q000000", "q000003"]].output.str.len() > 0).all()
    assert report.manifest.errors == {"worker_died": 2}
    assert len(report.manifest.shard_summaries) == 4 and report.manifest.failed_shards == []


def test_engine_that_fails_on_one_row_isolates_that_row(tmp_path, ray_cluster):
    prompts_with(tmp_path, {7: "Repeat after me: POISON"}, n=10)
    cfg = engine_config(tmp_path, "tests.fault_engines:PoisonRowEngine")
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3)
    df = assert_exactly_once(tmp_path / "out", 10).set_index("id")
    assert df.loc["q000007", "error"] == ("engine_error: RuntimeError: CUDA error: an illegal memory "
                                          "access was encountered (test engine)")
    others = df.drop(index="q000007")
    assert others.error.isna().all() and (others.output.str.len() > 0).all()
    assert report.manifest.errors == {"engine_error": 1}


def test_engine_that_breaks_is_restarted_in_place(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=5)
    cfg = engine_config(tmp_path, "tests.fault_engines:BrokenUntilRestartEngine")
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("completed", 0)
    assert_exactly_once(tmp_path / "out", 10)
    summaries = report.manifest.shard_summaries
    # One restart in place, seen by the shards in flight at the time; no shard went back.
    assert max(s.engine_restarts for s in summaries) == 1
    assert all(s.attempt == 1 for s in summaries)


def test_request_past_its_deadline_is_a_row_error(tmp_path, ray_cluster):
    prompts_with(tmp_path, {3: "Say something SLOW."}, n=10)
    cfg = engine_config(tmp_path, "tests.fault_engines:SlowRowEngine", run={"request_timeout_s": 5})
    report = runner.run(cfg, progress=False)
    assert report.exit_code == 3
    df = assert_exactly_once(tmp_path / "out", 10).set_index("id")
    assert df.loc["q000003", "error"] == "timeout: no result within run.request_timeout_s"
    assert df.drop(index="q000003").error.isna().all()


def test_straggler_shard_is_raced_and_the_first_commit_wins(tmp_path, ray_cluster, caplog):
    marker = tmp_path / "slow-once"
    marker.touch()
    prompts_with(tmp_path, {17: "Say something SLOW."}, n=20)
    cfg = engine_config(tmp_path, "tests.fault_engines:SlowOnceRowEngine", marker,
                        run={"num_workers": 2, "speculate_after_s": 3, "shards_per_worker": 1})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="batchinfer.scheduler"):
        report = runner.run(cfg, progress=False)
    assert report.exit_code == 0, report.manifest
    assert "racing a copy on worker" in caplog.text
    assert time.monotonic() - started < 55  # did not wait for the 60 s straggler
    assert_exactly_once(tmp_path / "out", 20)


def test_shard_that_always_fails_ends_partial_and_a_rerun_retries_only_it(tmp_path, ray_cluster):
    marker = tmp_path / "crash"
    marker.touch()
    prompts_with(tmp_path, {12: "Please CRASH now."}, n=20)
    cfg = engine_config(tmp_path, "tests.fault_engines:CrashOnRowEngine", marker,
                        run={"num_workers": 2, "shards_per_worker": 1, "max_attempts": 2})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3)
    assert [f.part for f in report.manifest.failed_shards] == ["part-000002.parquet"]
    assert "died" in report.manifest.failed_shards[0].reason
    assert report.manifest.rows.missing == 5
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    before = part_stats(tmp_path / "out")
    assert len(before) == 3

    marker.unlink()  # the cause is fixed
    rerun = runner.run(cfg, progress=False)
    assert (rerun.status, rerun.exit_code) == ("completed", 0)
    assert rerun.manifest.this_run.shards == 1
    after = part_stats(tmp_path / "out")
    assert {k: after[k] for k in before} == before
    assert_exactly_once(tmp_path / "out", 20)


# --------------------------------------------------------------------------- the driver


@pytest.mark.parametrize("point", ["planning", "first-shard", "committed#2", "part-committed", "manifest"])
def test_driver_sigkilled_at_any_point_then_rerun_is_exactly_once(tmp_path, driver, point):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=20, row_group_size=5)
    worker_env = {"PYTHONPATH": str(REPO)}
    if point == "part-committed":  # hold a worker between its part and its commit record
        worker_env["BATCHINFER_FAULT"] = "part-committed#2:pause=8"
    cfg = make_config(tmp_path, run={"num_workers": 1, "rows_per_shard": 5,
                                     "runtime_env": {"env_vars": worker_env}},
                      sampling={"max_tokens": 2})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))
    out, records = tmp_path / "out", tmp_path / "out" / "_batchinfer" / "commits"

    first = driver("run", config, "--no-progress",
                   env={} if point == "part-committed" else {"BATCHINFER_FAULT": point})
    if point == "part-committed":
        def held():
            done = {r.name.removesuffix(".json") for r in records.iterdir()} if records.exists() else set()
            return any(p.removesuffix(".parquet") not in done for p in part_stats(out))
        wait_for(held, 300, "a part without its commit record", first.proc, first.output)
        first.kill_group()
    code = first.wait(timeout=300)
    assert code == -signal.SIGKILL, first.output()
    survived = part_stats(out)
    if point == "planning":
        assert not (out / "_batchinfer" / "plan.json").exists() and not survived
    if point == "manifest":
        assert len(survived) == 4 and not (out / "_batchinfer" / "manifest.json").exists()

    second = driver("run", config, "--no-progress")
    assert second.wait(timeout=300) == 0, second.output()
    assert_exactly_once(out, 20)
    after = part_stats(out)
    assert {k: after[k] for k in survived} == survived  # committed before the kill: untouched
    manifest = json.loads((out / "_batchinfer" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["rows"]["ok"] == 20
    assert len(list(records.iterdir())) == 4  # a record lost to the kill was rebuilt from its part


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path, driver):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=40, row_group_size=5)
    cfg = make_config(tmp_path, run={"num_workers": 1, "rows_per_shard": 5, "shards_per_worker": 1},
                      sampling={"max_tokens": 2})
    config = str(write_yaml(tmp_path / "job.yaml", cfg))
    out = tmp_path / "out"
    first = driver("run", config, "--no-progress")
    wait_for(lambda: len(part_stats(out)) >= 1, 300, "a first commit", first.proc, first.output)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 1, first.output()
    assert "SIGTERM received: finishing shards in flight" in first.output()
    assert "batchinfer: interrupted" in first.output()
    status = json.loads((out / "_batchinfer" / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert 1 <= len(part_stats(out)) < 8

    second = driver("run", config, "--no-progress")
    assert second.wait(timeout=300) == 0, second.output()
    assert_exactly_once(out, 40)
