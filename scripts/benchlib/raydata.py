"""The peer baseline: plain Ray Data pipelines around the same batchinfer engine.

`read_parquet -> map_batches(actor holding one Engine and a PromptBuilder) -> write_parquet`,
with the same chat template, tokenizer, per-row seeds and engine class as batchinfer, so
the comparison is the framework and nothing else. Two actor styles:

- "sync": what a plain Ray Data user writes. `__call__(batch)` renders and tokenizes the
  batch, then runs it through the engine in one call (`generate_batch` for a static
  `BatchEngine`; for a continuous-batching engine, every row of the batch submitted at once
  on the actor's own event loop) and returns when all are done. One batch at a time.
- "async": how Ray Data LLM drives vLLM (ray `llm/_internal/batch/stages/vllm_engine_stage.py`
  and `processor/vllm_engine_proc.py`): an async actor whose `__call__` submits every row as
  its own `engine.generate` task and yields the batch once all are done, with several
  batches running at once per actor (`max_concurrency`: Ray 2.60 spells it
  `ActorPoolStrategy(max_concurrent_calls_per_actor=...)`, with
  `max_tasks_in_flight_per_actor=2 * max_concurrency` so Ray Data keeps that many calls
  queued, as Ray Data LLM does), so the engine sees about `batch_size * max_concurrency`
  requests. Ray Data LLM templates and tokenizes in separate CPU stages; here the actor
  does it in a thread (as batchinfer's worker does), so the event loop that feeds the
  engine is never blocked by it.

Every actor records when its first batch started and its last ended (and its engine's
`stats()`, where the engine has one) as `<stats_dir>/<pid>.json` after each batch: the
generation span excludes actor start-up and model load, as batchinfer's does.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STYLES = ("sync", "async")
DEFAULT_BATCH_SIZE = 64
"""Rows per Ray Data batch in the async style (Ray Data LLM's processors default to 32-64)."""
ACTOR_START_TIMEOUT_S = 1800


class _EngineActor:
    """What both styles share: the engine, the prompt builder, the output table, the stats."""

    def __init__(self, *, config: dict[str, Any], stats_dir: str):
        from batchinfer.config_loader import config_from_dict
        from batchinfer.engines import get_engine_class
        from batchinfer.prompts import PromptBuilder, load_tokenizer

        self.created = time.time()
        started = time.perf_counter()
        self.cfg = config_from_dict(config)
        self.engine = get_engine_class(self.cfg.engine.backend)(config=self.cfg)
        self.prompts = PromptBuilder(load_tokenizer(self.cfg.engine), self.cfg.input)
        self.load_s = time.perf_counter() - started
        self.column = self.cfg.input.prompt_column or self.cfg.input.messages_column
        self.stats_path = Path(stats_dir) / f"{os.getpid()}.json"
        self.first: float | None = None
        self.last: float | None = None
        self.batches = self.rows = self.tokens = 0
        self._encode_lock = threading.Lock()  # one HF fast tokenizer is not safe to share across threads

    def _encode(self, batch: pa.Table) -> list:
        """The batch's requests, or for a row that cannot become one, its error as a Result."""
        from batchinfer.engines import Request, row_seed
        from batchinfer.prompts import RowError

        with self._encode_lock:
            encoded = self.prompts.encode(batch.column(self.column).to_pylist())
        ids = batch.column(self.cfg.input.id_column).to_pylist()
        seed = self.cfg.sampling.seed
        return [_failed(e) if isinstance(e, RowError) else Request(i, e, row_seed(seed, ids[i]))
                for i, e in enumerate(encoded)]

    def _table(self, batch: pa.Table, results: list) -> pa.Table:
        return pa.table({
            "id": batch.column(self.cfg.input.id_column),
            "output": pa.array([r.text for r in results], pa.string()),
            "finish_reason": pa.array([r.finish_reason for r in results], pa.string()),
            "prompt_tokens": pa.array([r.prompt_tokens for r in results], pa.int64()),
            "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int64()),
            "error": pa.array([r.error for r in results], pa.string()),
        })

    def _started(self) -> None:
        if self.first is None:
            self.first = time.time()

    def _done(self, results: list) -> None:
        self.last = time.time()
        self.batches += 1
        self.rows += len(results)
        self.tokens += sum(r.completion_tokens or 0 for r in results)
        record = {"pid": os.getpid(), "created": self.created, "load_s": round(self.load_s, 3),
                  "first": self.first, "last": self.last, "batches": self.batches, "rows": self.rows,
                  "output_tokens": self.tokens}
        stats = getattr(self.engine, "stats", None)
        engine_stats = stats() if callable(stats) else None
        if engine_stats:  # an engine that keeps no accounting reports {}
            record["engine"] = engine_stats
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.stats_path)


def _failed(error) -> Any:
    """A RowError (the row cannot become a request) as that row's Result."""
    from batchinfer.engines import Result

    return Result.failed(error.code, error.message)


class SyncActor(_EngineActor):
    """One batch at a time, run through the engine in one call."""

    def __init__(self, *, config: dict[str, Any], stats_dir: str):
        super().__init__(config=config, stats_dir=stats_dir)
        self._loop = asyncio.new_event_loop()  # for engines that only have `generate`

    def __call__(self, batch: pa.Table) -> pa.Table:
        from batchinfer.engines import BatchEngine, Request

        self._started()
        requests = self._encode(batch)
        results: list = [r if not isinstance(r, Request) else None for r in requests]
        batched = isinstance(self.engine, BatchEngine)
        for i, r in enumerate(requests):  # a static batch is only what the engine can take
            if batched and results[i] is None:
                results[i] = self.engine.check_length(r)
        todo = [i for i, r in enumerate(results) if r is None]
        if batched:
            done = self.engine.generate_batch([requests[i] for i in todo]) if todo else []
        else:
            done = self._loop.run_until_complete(_all(self.engine, [requests[i] for i in todo]))
        for i, result in zip(todo, done, strict=True):
            results[i] = result
        self._done(results)
        return self._table(batch, results)


class AsyncActor(_EngineActor):
    """Every row its own `generate` task; several batches at once (Ray Data LLM's way)."""

    def __init__(self, *, config: dict[str, Any], stats_dir: str, max_pending: int | None = None):
        super().__init__(config=config, stats_dir=stats_dir)
        self.max_pending = max_pending
        self._semaphore: asyncio.Semaphore | None = None

    async def __call__(self, batch: pa.Table):
        from batchinfer.engines import Request

        self._started()
        requests = await asyncio.to_thread(self._encode, batch)
        results = await asyncio.gather(*(self._one(r) if isinstance(r, Request) else _ready(r)
                                         for r in requests))
        self._done(results)
        yield self._table(batch, results)

    async def _one(self, request):
        if self.max_pending is None:
            return await self.engine.generate(request)
        if self._semaphore is None:  # made here so that it belongs to the actor's event loop
            self._semaphore = asyncio.Semaphore(self.max_pending)
        async with self._semaphore:
            return await self.engine.generate(request)


async def _ready(value):
    return value


async def _all(engine, requests: list) -> list:
    return await asyncio.gather(*(engine.generate(r) for r in requests))


def default_concurrency(max_batch_size: int, batch_size: int) -> int:
    """Batches per actor so that about 2 x max_batch_size requests are in flight (at least 2)."""
    return max(2, math.ceil(2 * max_batch_size / batch_size))


def run_ray_data(cfg_dict: dict[str, Any], *, workers: int, style: str = "async",
                 batch_size: int | None = None, max_concurrency: int | None = None,
                 max_pending: int | None = None, blocks: int | None = None,
                 stats_dir: Path | None = None) -> dict[str, Any]:
    """Run the pipeline on the benchmark's Ray over `cfg_dict`'s input, writing Parquet to
    `output.path` (emptied first), and return its measurements.

    `workers` actors with `run.cpus_per_worker` CPUs each. batch_size defaults to
    engine.max_batch_size (sync) or DEFAULT_BATCH_SIZE (async); max_concurrency (async
    only) to `default_concurrency`; max_pending caps requests in flight per actor (Ray Data
    LLM's semaphore; default none beyond batch_size x max_concurrency). `blocks` is how
    many blocks the input is cut into before the actors (`repartition`, no shuffle), default
    one per input file: Ray Data 2.60 reads a small input as one block (even with
    override_num_blocks), which only one actor can take. Every input row must
    come back exactly once (RuntimeError otherwise).

    Returns total_s (the whole pipeline, actor start-up included), generate_s (first batch
    started to last batch done, over all actors), before_actors_s (until the first actor
    was constructed), before_first_batch_s and after_last_batch_s (the rest of total_s), rows, rows_failed, output_tokens,
    tokens_per_s and rows_per_s (over generate_s), load_s per actor, and `engines`: each
    actor's last engine `stats()` where the engine has them.
    """
    import ray.data

    from batchinfer.config_loader import config_from_dict

    if style not in STYLES:
        raise ValueError(f"style: got {style!r}, expected one of {STYLES}")
    cfg = config_from_dict(cfg_dict)
    if not cfg.input.id_column:
        raise ValueError("the Ray Data baseline needs input.id_column (to check every row came back once)")
    batch_size = batch_size or (cfg.engine.max_batch_size if style == "sync" else DEFAULT_BATCH_SIZE)
    concurrency = max_concurrency or default_concurrency(cfg.engine.max_batch_size, batch_size)
    out = Path(cfg.output.path)
    shutil.rmtree(out, ignore_errors=True)
    own_stats = stats_dir is None
    stats = Path(tempfile.mkdtemp(prefix="raydata-stats-")) if own_stats else Path(stats_dir)
    stats.mkdir(parents=True, exist_ok=True)
    column = cfg.input.prompt_column or cfg.input.messages_column
    kwargs: dict[str, Any] = {"config": cfg_dict, "stats_dir": str(stats)}
    remote: dict[str, Any] = {"num_cpus": cfg.run.cpus_per_worker}
    if style == "async":
        kwargs["max_pending"] = max_pending
        compute = ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=concurrency,
                                             max_tasks_in_flight_per_actor=2 * concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(size=workers)
    if cfg.run.runtime_env:
        remote["runtime_env"] = cfg.run.runtime_env
    ctx = ray.data.DataContext.get_current()
    waited = ctx.wait_for_min_actors_s
    # Start handing out batches once every actor is up, as batchinfer hands out shards once
    # every worker has loaded; by default Ray Data starts with the first actor ready, and
    # on a small input the others may never get a batch.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:
        started, wall_started = time.perf_counter(), time.time()
        ds = ray.data.read_parquet(cfg.input.path, columns=[cfg.input.id_column, column])
        ds = ds.repartition(blocks or _files(cfg.input.path))
        ds = ds.map_batches(SyncActor if style == "sync" else AsyncActor, batch_size=batch_size,
                            batch_format="pyarrow", compute=compute, fn_constructor_kwargs=kwargs,
                            zero_copy_batch=True, **remote)
        ds.write_parquet(str(out))
        total_s, wall_ended = time.perf_counter() - started, time.time()
        actors = [json.loads(p.read_text()) for p in sorted(stats.glob("*.json"))]
    finally:
        ctx.wait_for_min_actors_s = waited
        if own_stats:
            shutil.rmtree(stats, ignore_errors=True)
    result = _check_output(cfg, out)
    first, last = min(a["first"] for a in actors), max(a["last"] for a in actors)
    generate_s = last - first
    return {
        "total_s": round(total_s, 3), "generate_s": round(generate_s, 3),
        "before_actors_s": round(min(a["created"] for a in actors) - wall_started, 3),
        "before_first_batch_s": round(first - wall_started, 3), "after_last_batch_s": round(wall_ended - last, 3),
        **result,
        "tokens_per_s": round(result["output_tokens"] / generate_s, 2),
        "rows_per_s": round(result["rows"] / generate_s, 2),
        "workers": workers, "style": style, "batch_size": batch_size,
        "max_concurrency": concurrency if style == "async" else 1, "blocks": blocks or _files(cfg.input.path),
        "load_s": [a["load_s"] for a in actors], "actors": len(actors),
        "engines": [a["engine"] for a in actors if "engine" in a],
    }


def startup_note(run: dict[str, Any]) -> str:
    """What Ray Data did before its first batch, from a `run_ray_data` result."""
    return (f"Ray Data ({run['workers']} actor{'s' if run['workers'] > 1 else ''}) took "
            f"{run['before_first_batch_s']:.1f} s from the start of the pipeline to its first batch: its first "
            f"actor was constructed after {run['before_actors_s']:.1f} s and loaded the engine in "
            f"{max(run['load_s']):.1f} s; the rest is Ray Data's own start (reading, repartitioning, "
            "scheduling the actors' first tasks).")


def _files(path: str) -> int:
    folder = Path(path)
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 1


def _check_output(cfg, out: Path) -> dict[str, int]:
    """Rows, failed rows and output tokens written; every input id exactly once."""
    import pyarrow.compute as pc

    wanted = pq.read_table(cfg.input.path, columns=[cfg.input.id_column]).column(0)
    got = pq.read_table(str(out), columns=["id", "completion_tokens", "error"])
    ids = got.column("id")
    if len(ids) != len(wanted) or pc.count_distinct(ids).as_py() != len(ids) \
            or set(ids.to_pylist()) != set(wanted.to_pylist()):
        raise RuntimeError(f"Ray Data wrote {len(ids)} rows ({pc.count_distinct(ids).as_py()} distinct ids) "
                           f"for {len(wanted)} input rows; expected every input id exactly once")
    return {"rows": len(ids), "rows_failed": len(ids) - got.column("error").null_count,
            "output_tokens": int(pc.sum(got.column("completion_tokens")).as_py() or 0)}
