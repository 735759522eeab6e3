"""The worker: a Ray actor that owns one engine and turns shards into committed parts.

It is an async actor, and the driver keeps `run.shards_per_worker` shards on it at once.
While the engine generates for one shard the next is already read, tokenized and queued
(all rows of all held shards share one window of `engine.max_in_flight` requests), and
the previous one is written and committed in a thread. So the engine never waits on
storage and never drains at a shard boundary. Prompts and results go between storage
and the worker directly; the driver only sees shard indexes and summaries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from batchinfer import storage
from batchinfer.config import Config
from batchinfer.engines import Request, Result, get_engine_class
from batchinfer.plan import InputFile, Plan, Shard
from batchinfer.prompts import PromptBuilder, RowError, load_tokenizer
from batchinfer.results import RowOutcome, build_table, output_schema, summarize, to_parquet
from batchinfer.store import RunStore

log = logging.getLogger(__name__)


class ShardWorker:
    def __init__(self, *, config: Config, plan: Plan, worker_index: int):
        self.cfg = config
        self.plan = plan
        self.worker_index = worker_index
        self.store = RunStore(config.output.path, config.storage)
        self.input_schema = plan.schema()
        self.schema = output_schema(self.input_schema, config)
        started = time.perf_counter()
        engine_cls = get_engine_class(config.engine.backend)
        self.engine = engine_cls(config=config)
        self.prompts = PromptBuilder(load_tokenizer(config.engine), config.input)
        self.load_s = time.perf_counter() - started
        self._window: asyncio.Semaphore | None = None
        self._turns: asyncio.Condition | None = None
        self._tickets = self._serving = 0
        self._finished_turns: set[int] = set()
        self.rows_done = 0
        self.tokens_out = 0

    async def ready(self) -> dict[str, Any]:
        """Called once by the driver: the engine is loaded when this returns."""
        return {"worker": self.worker_index, "pid": os.getpid(), "host": socket.gethostname(),
                "load_s": round(self.load_s, 2), "max_model_len": self.engine.max_model_len,
                "engine_source": getattr(self.engine, "engine_source", None)}

    async def progress(self) -> dict[str, int]:
        return {"rows": self.rows_done, "completion_tokens": self.tokens_out}

    async def process(self, shard_index: int, attempt: int) -> dict[str, Any]:
        """Read, generate, write and commit one shard; return its summary."""
        shard = self.plan.shards[shard_index]
        file = self.plan.files[shard.file]
        started = time.perf_counter()
        ticket = self._tickets
        self._tickets += 1
        try:
            table = await asyncio.to_thread(self._read, file, shard)
            column = self.cfg.input.prompt_column or self.cfg.input.messages_column
            encoded = await asyncio.to_thread(self.prompts.encode, table.column(column).to_pylist())
            # Shards queue their rows at the engine in the order they arrived, whichever was
            # read first, so the current shard drains (and commits) before the next one.
            async with self.turns:
                await self.turns.wait_for(lambda: self._serving == ticket)
            tasks = [asyncio.ensure_future(self._generate(i, e)) for i, e in enumerate(encoded)]
        finally:
            await self._end_turn(ticket)
        rows = await _all(tasks)
        generate_s = time.perf_counter() - started
        summary = {
            "shard": shard.index, "part": f"{shard.name}.parquet", "attempt": attempt,
            "worker": self.worker_index, **summarize(rows), "generate_s": round(generate_s, 3),
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        out = build_table(self.schema, self._ids(table, file, shard),
                          {c: table.column(c) for c in self.cfg.input.passthrough_columns}, rows)
        data = await asyncio.to_thread(to_parquet, out, summary, self.cfg.output.compression)
        won = await asyncio.to_thread(self.store.commit, shard.name, data, summary)
        if not won:  # another attempt committed first; its result is the one that counts
            summary = await asyncio.to_thread(self.store.summary_from_part, shard.name)
        return {**summary, "won": won}

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------ internals

    @property
    def window(self) -> asyncio.Semaphore:
        if self._window is None:  # made on first use so it belongs to the actor's event loop
            self._window = asyncio.Semaphore(self.engine.max_in_flight)
        return self._window

    @property
    def turns(self) -> asyncio.Condition:
        if self._turns is None:
            self._turns = asyncio.Condition()
        return self._turns

    async def _end_turn(self, ticket: int) -> None:
        """Let the next shard queue its rows (also when this one failed before its turn)."""
        async with self.turns:
            self._finished_turns.add(ticket)
            while self._serving in self._finished_turns:
                self._finished_turns.discard(self._serving)
                self._serving += 1
            self.turns.notify_all()

    async def _generate(self, row: int, encoded: list[int] | RowError) -> RowOutcome:
        if isinstance(encoded, RowError):
            return RowOutcome(Result.failed(encoded.code, encoded.message), None)
        async with self.window:
            started = time.perf_counter()
            result = await self.engine.generate(Request(row, encoded))
            latency = time.perf_counter() - started
        self.rows_done += 1
        self.tokens_out += result.completion_tokens or 0
        return RowOutcome(result, round(latency, 4))

    def _read(self, file: InputFile, shard: Shard) -> pa.Table:
        groups, skip = file.row_groups_for(shard.row_start, shard.num_rows)
        with storage.open_parquet(file.url, self.cfg.storage) as pf:
            table = pf.read_row_groups(groups, columns=list(self.input_schema.names))
        table = table.slice(skip, shard.num_rows)
        if table.num_rows != shard.num_rows:
            raise RuntimeError(
                f"input file {file.url!r} has {table.num_rows} rows where shard {shard.name} "
                f"expects {shard.num_rows}; did the file change during the run?"
            )
        return table.cast(self.input_schema)

    def _ids(self, table: pa.Table, file: InputFile, shard: Shard) -> pa.Array:
        if self.cfg.input.id_column:
            return table.column(self.cfg.input.id_column)
        return pa.array([f"{file.name}:{shard.row_start + i}" for i in range(shard.num_rows)])


async def _all(tasks: list[asyncio.Future]) -> list:
    """Gather, but cancel the rest as soon as one fails (the engine broke; the shard is retried)."""
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
