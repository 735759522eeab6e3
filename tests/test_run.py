"""End-to-end runs on the session's local Ray cluster with the real small model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import runner
from batchinfer.plan import InputError
from batchinfer.records import RowTotals, ShardTotals
from batchinfer.run_store import RunStore
from batchinfer.runner import RunRefused
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import (
    REPO,
    assert_exactly_once,
    hold_run,
    ids_of,
    make_config,
    part_stats,
    write_yaml,
)

RESULT_COLUMNS = ["output", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error"]


def test_run_end_to_end_then_rerun_does_nothing(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=30, row_group_size=10)
    cfg = make_config(tmp_path, input={"passthrough_columns": ["category"]},
                      run={"num_workers": 2, "rows_per_shard": 20})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code, report.did_work) == ("completed", 0, True)

    out = tmp_path / "out"
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "category", *RESULT_COLUMNS]
    inputs = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "prompts").iterdir())])
    assert sorted(df.id) == sorted(inputs.id) and df.id.is_unique
    assert df.output.str.len().min() > 0 and df.error.isna().all()
    assert set(df.finish_reason) <= {"stop", "length"}
    assert (df.completion_tokens.between(1, 4)).all() and (df.prompt_tokens > 10).all()
    assert (df.set_index("id").category == inputs.set_index("id").category).all()
    assert (out / "_SUCCESS").exists()

    m = report.manifest
    assert m.rows == RowTotals(total=60, ok=60, failed=0, missing=0)
    assert m.shards == ShardTotals(total=3, committed=3, failed=0)  # the middle one spans both files
    assert m.tokens.completion == df.completion_tokens.sum()
    assert m.tokens.prompt == df.prompt_tokens.sum()
    assert json.loads((out / "_batchinfer" / "manifest.json").read_text())["status"] == "completed"

    before = part_stats(out)
    again = runner.run(cfg, progress=False)
    assert (again.status, again.exit_code, again.did_work) == ("completed", 0, False)
    assert part_stats(out) == before


def test_too_long_prompt_is_a_row_error_and_the_job_continues(tmp_path, ray_cluster):
    os.makedirs(tmp_path / "prompts")
    prompts = ["Say hi.", "Name a color.", "word " * 300, "Count to three."]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(4)], "prompt": prompts}),
                   tmp_path / "prompts" / "p.parquet")
    cfg = make_config(tmp_path, engine={"max_model_len": 128})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("partial", 3)
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert df.loc["r2", "finish_reason"] == "error"
    assert df.loc["r2", "error"].startswith("prompt_too_long: ") and df.loc["r2", "error"].endswith(" tokens > 127")
    assert pd.isna(df.loc["r2", "output"])
    ok = df.drop(index="r2")
    assert ok.error.isna().all() and (ok.output.str.len() > 0).all()
    assert report.manifest.rows == RowTotals(total=4, ok=3, failed=1, missing=0)
    assert report.manifest.errors == {"prompt_too_long": 1}


def test_messages_column_and_synthesized_ids(tmp_path, ray_cluster):
    os.makedirs(tmp_path / "prompts")
    messages = [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "prompts" / "chats.parquet")
    cfg = make_config(tmp_path, input={"id_column": None, "prompt_column": None,
                                       "messages_column": "messages"})
    report = runner.run(cfg, progress=False)
    assert report.exit_code == 3
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert sorted(df.index) == ["chats.parquet:0", "chats.parquet:1", "chats.parquet:2"]
    assert df.loc["chats.parquet:2", "error"].startswith("bad_messages: the last message is from the assistant")
    assert df.loc[["chats.parquet:0", "chats.parquet:1"], "output"].str.len().min() > 0


def test_fingerprint_change_is_refused_unless_a_new_run_is_asked_for(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=10)
    assert runner.run(make_config(tmp_path), progress=False).exit_code == 0
    before = part_stats(tmp_path / "out")
    changed = make_config(tmp_path, sampling={"max_tokens": 2})
    with pytest.raises(RunRefused, match=r"other settings \(sampling.max_tokens: 4 -> 2\)"):
        runner.run(changed, progress=False)
    assert part_stats(tmp_path / "out") == before
    report = runner.run(changed, new_run=True, progress=False)
    assert report.exit_code == 0 and report.did_work
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 10 and df.completion_tokens.max() <= 2


def test_changed_input_is_refused_on_resume(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=10, row_group_size=10)
    cfg = make_config(tmp_path)
    assert runner.run(cfg, progress=False).exit_code == 0
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=12, start=500)
    with pytest.raises(InputError, match="input file 'prompts-000.parquet' changed since the plan was made"):
        runner.run(cfg, progress=False)


def test_many_small_files_make_few_parts_and_resume(tmp_path, ray_cluster):
    """Issue 9, item 6: 12 one-row files and an 8-row file were 13 shards and 13 part files."""
    os.makedirs(tmp_path / "prompts")
    names = [f"one-{i:02d}.parquet" for i in range(12)]
    for i, name in enumerate(names):
        pq.write_table(pa.table({"prompt": [f"Say the number {i}."]}), tmp_path / "prompts" / name)
    pq.write_table(pa.table({"prompt": [f"Count to {i}." for i in range(8)]}),
                   tmp_path / "prompts" / "wide.parquet", row_group_size=3)
    cfg = make_config(tmp_path, input={"id_column": None}, sampling={"max_tokens": 2},
                      run={"rows_per_shard": 6})
    report = runner.run(cfg, progress=False)
    assert report.exit_code == 0, report.manifest
    assert sorted(part_stats(tmp_path / "out")) == [f"part-{i:06d}.parquet" for i in range(4)]
    expected = [f"{name}:0" for name in names] + [f"wide.parquet:{r}" for r in range(8)]
    df = assert_exactly_once(tmp_path / "out", expected)
    assert df.output.str.len().min() > 0 and df.error.isna().all()
    before = part_stats(tmp_path / "out")

    again = runner.run(cfg, progress=False)
    assert (again.exit_code, again.did_work) == (0, False)
    assert part_stats(tmp_path / "out") == before

    pq.write_table(pa.table({"prompt": ["Something else.", "And more."]}), tmp_path / "prompts" / names[7])
    with pytest.raises(InputError, match="input file 'one-07.parquet' changed since the plan was made"):
        runner.run(cfg, progress=False)


def test_two_workers_commit_the_same_shard_concurrently_one_wins(tmp_path, ray_cluster):
    import ray

    from batchinfer.worker import ShardWorker

    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=6, row_group_size=6)
    cfg = make_config(tmp_path, sampling={"max_tokens": 2})
    store = RunStore(cfg.output.path)
    plan = store.write_plan(runner.planning.make_plan(cfg))
    generation = hold_run(cfg.output.path)
    actor = ray.remote(ShardWorker).options(num_cpus=1)
    workers = [actor.remote(config=cfg, plan=plan, worker_index=i, generation=generation)
               for i in range(2)]
    try:
        attempts = ray.get([w.process.remote(0, 1) for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    assert sorted(a.won for a in attempts) == [False, True]
    winner = next(a.summary for a in attempts if a.won)
    assert all(a.summary.worker == winner.worker for a in attempts)  # the loser reports the winner's part
    df = pd.read_parquet(tmp_path / "out")
    assert sorted(df.id) == ids_of(6)
    assert os.listdir(tmp_path / "out" / "_batchinfer" / "staging") == []


def test_missing_prompt_column_fails_before_any_engine_starts(tmp_path):
    os.makedirs(tmp_path / "prompts")
    pq.write_table(pa.table({"id": ["a"], "question": ["hi"]}), tmp_path / "prompts" / "q.parquet")
    cfg = make_config(tmp_path)
    # An unreachable Ray address: reaching Ray (or any engine) would fail differently.
    config_path = write_yaml(tmp_path / "c.yaml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "batchinfer.cli", "run", str(config_path),
         "--set", "run.ray_address=127.0.0.1:1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "has no column 'prompt' (columns found: id, question)" in proc.stderr
    assert not (tmp_path / "out" / "_batchinfer" / "plan.json").exists()


def test_cli_plan_and_status(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=5)
    cfg = make_config(tmp_path, run={"rows_per_shard": 5})
    config_path = write_yaml(tmp_path / "c.yaml", cfg)
    cli = [sys.executable, "-m", "batchinfer.cli"]
    plan = subprocess.run([*cli, "plan", str(config_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "inputs   1 files, 10 rows" in plan.stdout and "shards   2" in plan.stdout
    assert "<|im_start|>user\n  Write one sentence about the ocean.<|im_end|>" in plan.stdout
    assert not (tmp_path / "out").exists()  # plan writes nothing

    status = subprocess.run([*cli, "status", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 2 and "no run at" in status.stderr

    runner.run(cfg, progress=False)
    status = subprocess.run([*cli, "status", str(tmp_path / "out"), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["state"] == "completed"
    assert info["shards"] == {"done": 2, "total": 2, "failed": 0}
    assert info["rows"] == {"done": 10, "total": 10, "ok": 10, "failed": 0}


def test_the_cost_of_a_run_is_its_workers_gpu_hours_at_the_configured_price(tmp_path):
    from batchinfer.cli import format_cost
    from batchinfer.runner import run_cost

    cfg = make_config(tmp_path, run={"gpus_per_worker": 1, "gpu_hour_cost": 2.0})
    # 4 GPU workers held 30 minutes, engines busy 5,400 worker-seconds, 3.6M output tokens
    c = run_cost(cfg, workers=4, wall_s=1800, busy_s=5400, output_tokens=3_600_000)
    assert (c.gpu_hours, c.busy_gpu_hours, c.tokens_per_gpu_hour) == (2.0, 1.5, 1_800_000.0)
    assert (c.total, c.per_million_output_tokens) == (4.0, pytest.approx(4.0 / 3.6))
    assert format_cost(c) == ("2 GPU-hours (1.5 busy), 1,800,000 output tokens per GPU-hour; "
                              "4 at 2 per GPU-hour, 1.111 per 1M output tokens")
    # a CPU worker counts as one GPU; without a price, no money figures
    cpu = run_cost(make_config(tmp_path), workers=2, wall_s=3600, busy_s=None, output_tokens=0)
    assert (cpu.gpu_hours, cpu.busy_gpu_hours, cpu.tokens_per_gpu_hour, cpu.total,
            cpu.per_million_output_tokens) == (2.0, None, 0.0, None, None)
    assert format_cost(cpu).endswith("(set run.gpu_hour_cost for the price)")
    # workers sharing GPUs count their share
    shared = run_cost(make_config(tmp_path, run={"gpus_per_worker": 0.25}), workers=4, wall_s=3600,
                      busy_s=None, output_tokens=0)
    assert shared.gpu_hours == 1.0
