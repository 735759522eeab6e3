"""The worker outside Ray: shards overlap in the engine, and bad rows stay row errors."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer.engines import Request
from batchinfer.plan import make_plan
from batchinfer.run_store import RunStore
from batchinfer.worker import ShardWorker
from tests.conftest import hold_run, make_config


@pytest.fixture
def worker_for(tmp_path, model_folder):
    made = []

    def make(cfg):
        plan = RunStore(cfg.output.path).write_plan(make_plan(cfg))
        w = ShardWorker(config=cfg, plan=plan, worker_index=0, generation=hold_run(cfg.output.path))
        made.append(w)
        return w, plan

    yield make
    for w in made:
        w.engine.shutdown()


def test_the_next_shard_fills_the_batch_before_the_current_one_drains(tmp_path, worker_for):
    os.makedirs(tmp_path / "prompts")
    prompts = [f"Say the number {i}." for i in range(10)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "prompt": prompts}),
                   tmp_path / "prompts" / "p.parquet", row_group_size=5)
    cfg = make_config(tmp_path, engine={"max_batch_size": 8}, sampling={"max_tokens": 2},
                      run={"rows_per_shard": 5})
    worker, plan = worker_for(cfg)
    assert [s.num_rows for s in plan.shards] == [5, 5]

    shard_of = {tuple(ids): shard for shard in (0, 1)
                for ids in worker.prompts.encode(prompts[5 * shard: 5 * shard + 5])}
    batches: list[list[int]] = []
    original = worker.engine.generate_batch
    busy_entered = threading.Event()

    def recording(requests):
        if not batches:  # hold the engine busy until both shards have queued every row
            busy_entered.set()
            deadline = time.monotonic() + 60
            while worker.engine._pending.qsize() < 10 and time.monotonic() < deadline:
                time.sleep(0.01)
        batches.append([shard_of.get(tuple(r.prompt_token_ids), -1) for r in requests])
        return original(requests)

    worker.engine.generate_batch = recording
    busy = worker.prompts.encode(["Count to three."])[0]

    async def both():
        busy_request = asyncio.ensure_future(worker.engine.generate(Request(-1, busy)))
        while not busy_entered.is_set():  # the engine is running a batch of just that one
            await asyncio.sleep(0.01)
        return await asyncio.gather(busy_request, worker.process(0, 1), worker.process(1, 1))

    _, *summaries = asyncio.run(both())
    assert [a.summary.rows_ok for a in summaries] == [5, 5]
    # Once the engine is free, a batch of 8 takes the rest of shard 0 and the start of
    # shard 1, rather than running shard 0 alone (an engine drained at the boundary).
    assert batches == [[-1], [0] * 5 + [1] * 3, [1] * 2], batches
    assert sorted(pd.read_parquet(tmp_path / "out").id) == sorted(f"r{i}" for i in range(10))


def test_bad_rows_are_row_errors_and_the_rest_of_the_shard_succeeds(tmp_path, worker_for):
    os.makedirs(tmp_path / "prompts")
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": ["Say hi.", None, "", "Say bye."]}),
                   tmp_path / "prompts" / "p.parquet")
    worker, _ = worker_for(make_config(tmp_path))
    summary = asyncio.run(worker.process(0, 1)).summary
    assert (summary.rows_ok, summary.rows_failed) == (2, 2)
    assert summary.errors == {"empty_prompt": 2}
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert df.loc["b", "error"] == "empty_prompt: prompt is null"
    assert df.loc["c", "error"] == "empty_prompt: prompt is empty"
    assert list(df.loc[["b", "c"], "finish_reason"]) == ["error", "error"]
    assert df.loc[["b", "c"], "prompt_tokens"].isna().all()
    assert df.loc[["a", "d"], "output"].str.len().min() > 0


@pytest.mark.parametrize("prefix_order", [True, False])
def test_rows_sharing_a_prefix_reach_the_engine_back_to_back_and_results_keep_input_order(
        tmp_path, worker_for, prefix_order):
    """run.prefix_order: two few-shot contexts interleaved in the input are submitted as two
    runs of rows (so the engine's KV cache reuses each context's blocks), and the part is
    still written in input order, each row's output its own."""
    os.makedirs(tmp_path / "prompts")
    contexts = ["Examples: cat -> animal, rose -> plant, oak -> plant. Classify:",
                "Translate to French. dog -> chien, house -> maison. Now:"]
    prompts = [f"{contexts[i % 2]} word {i}" for i in range(8)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "prompt": prompts}),
                   tmp_path / "prompts" / "p.parquet")
    cfg = make_config(tmp_path, sampling={"max_tokens": 1}, run={"prefix_order": prefix_order})
    worker, _ = worker_for(cfg)
    submitted: list[int] = []
    original = worker.engine.generate

    async def recording(request):
        submitted.append(request.id)
        return await original(request)

    worker.engine.generate = recording
    asyncio.run(worker.process(0, 1))
    by_context = [i % 2 for i in submitted]
    if prefix_order:
        assert sorted(submitted) == list(range(8)) and by_context in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)
    else:
        assert submitted == list(range(8))
    part = pd.read_parquet(tmp_path / "out")
    assert list(part.id) == [f"r{i}" for i in range(8)]
    assert part.error.isna().all()
