"""The worker: a Ray actor that owns one engine and turns shards into committed parts.

It is an async actor, and the driver keeps two or more shards on it at once (lease_book.py).
While the engine generates for one shard the next is already read, tokenized and queued
(all rows of all held shards share one window of `engine.max_in_flight` requests), and
the previous one is written and committed in a thread. So the engine never waits on
storage and never drains at a shard boundary. Prompts and results go between storage
and the worker directly; the driver only sees shard indexes and summaries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass

import pyarrow as pa

from batchinfer import logs, storage
from batchinfer.config import Config
from batchinfer.engines import Engine, Request, Result, get_engine_class, row_seed
from batchinfer.errors import describe, split_error
from batchinfer.lease import LeaseStale
from batchinfer.metrics import WorkerMetrics, run_label
from batchinfer.plan import Plan, Shard, id_column, input_reader
from batchinfer.prompts import PromptBuilder, RowError, load_tokenizer
from batchinfer.records import ShardAttempt, ShardSummary, WorkerInfo, WorkerProgress, now_iso
from batchinfer.results import EncodedPart, RowOutcome, part_writer, summarize
from batchinfer.rows import RowRequestBuilder, RowRequests
from batchinfer.run_store import RunStore
from batchinfer.sampling import output_problem

log = logging.getLogger(__name__)


@dataclass
class ShardInput:
    """One shard's rows as the worker holds them while they run."""

    table: pa.Table
    """The input columns the run reads."""
    ids: pa.Array
    requests: RowRequests
    encoded: list
    """Per row: prompt token ids, or the RowError that row is."""
    seeds: list[int]
    """Per row: the seed it samples with."""
    order: list[int]
    """The rows to submit, in submission order (`ShardWorker._order`)."""


class EngineFailed(RuntimeError):
    """The engine kept failing after restarts in place; the shard attempt is given back."""


class ShardWorker:
    def __init__(self, *, config: Config, plan: Plan, worker_index: int, generation: int):
        run = run_label(config.output.path, config.run.name)
        # before the engine loads, so its lines are in the run's format too
        logs.setup_from_env(run=run, worker=worker_index)
        self.cfg = config
        self.plan = plan
        self.worker_index = worker_index
        self.generation = generation
        """The driver lease generation this worker commits for (see lease.py)."""
        self.store = RunStore(config.output.path, config.storage)
        self.input_schema = plan.schema()
        self.reader = input_reader(config)
        self.writer = part_writer(config, self.input_schema, plan.fingerprint)
        self.requests = RowRequestBuilder(config)
        started = time.perf_counter()
        self.engine_cls = get_engine_class(config.engine.backend)
        self.engine = self.engine_cls(config=config)
        self.prompts = PromptBuilder(load_tokenizer(config.engine), config.input)
        self.load_s = time.perf_counter() - started
        self._window: asyncio.Semaphore | None = None
        self._turns: asyncio.Condition | None = None
        self._restart_lock: asyncio.Lock | None = None
        self._load_lock: asyncio.Lock | None = None
        self._tickets = self._serving = 0
        self._finished_turns: set[int] = set()
        self._canary: list[int] | None = None  # a prompt this worker's engine answered
        self.rows_done = 0
        self.tokens_out = 0
        self.in_flight = 0
        self._busy_s = 0.0  # seconds with at least one request in the engine, until _busy_since
        self._busy_since: float | None = None
        self.metrics = WorkerMetrics(run, worker_index)
        self._busy_reported = 0.0  # busy seconds already added to the metrics
        self.engine_restarts = 0
        self._beats_before = 0  # heartbeats of engines replaced by restarts

    async def ready(self) -> WorkerInfo:
        """Called once by the driver: the engine is loaded when this returns."""
        return WorkerInfo(worker=self.worker_index, pid=os.getpid(), host=socket.gethostname(),
                          load_s=round(self.load_s, 2),
                          engine_source=getattr(self.engine, "engine_source", None),
                          window=self.engine.max_in_flight)

    async def progress(self) -> WorkerProgress:
        """What the driver polls every few seconds; also when the live metrics move."""
        busy = self.busy_s
        self.metrics.in_flight(self.in_flight)
        self.metrics.engine_busy(busy - self._busy_reported)
        self._busy_reported = busy
        return WorkerProgress(rows=self.rows_done, completion_tokens=self.tokens_out,
                              heartbeat=self._beats_before + self.engine.heartbeat,
                              busy=self.engine.busy(), max_model_len=self.engine.max_model_len,
                              window=self.engine.max_in_flight, in_flight=self.in_flight,
                              busy_s=round(busy, 3), engine_restarts=self.engine_restarts)

    @property
    def busy_s(self) -> float:
        """Seconds the engine held at least one request (this worker's own accounting, the
        same for every backend)."""
        since = self._busy_since
        return self._busy_s + (time.perf_counter() - since if since is not None else 0.0)

    async def stats(self, until: float | None = None) -> dict:
        """The engine's own accounting (`Engine.stats`), up to `until` (a time.time())."""
        return self.engine.stats(until)

    @logs.contextual(shard="shard_index")
    async def process(self, shard_index: int, attempt: int,
                      skip: dict[int, str] | None = None) -> ShardAttempt:
        """Read, generate, write and commit one shard; return its summary (the winner's, if
        another attempt committed first) and whether this attempt won. Rows in `skip`
        (row in shard -> reason) killed a worker on their own: they are not run but recorded
        as `worker_died` row errors."""
        shard = self.plan.shards[shard_index]
        started, started_at = time.perf_counter(), time.time()
        restarts_before = self.engine_restarts
        ticket = self._tickets
        self._tickets += 1
        try:
            shard_in = await self._load(shard_index)
            for i, reason in (skip or {}).items():
                shard_in.encoded[i] = RowError("worker_died", reason)
            # Shards queue their rows at the engine in the order they arrived, whichever was
            # read first, so the current shard drains (and commits) before the next one.
            async with self.turns:
                await self.turns.wait_for(lambda: self._serving == ticket)
            first = await self._submit(shard_in, [i for i in shard_in.order
                                                  if not isinstance(shard_in.encoded[i], RowError)])
        finally:
            await self._end_turn(ticket)
        rows, retried = await self._finish(shard_in, first)
        generate_s = time.perf_counter() - started
        summary = ShardSummary(
            shard=shard.index, part=f"{shard.name}{self.writer.suffix}", attempt=attempt,
            worker=self.worker_index, **summarize(rows).model_dump(),
            generate_s=round(generate_s, 3), engine_restarts=self.engine_restarts - restarts_before,
            committed_at=now_iso(), fingerprint=self.plan.fingerprint, generation=self.generation,
            started_at=round(started_at, 3), row_retries=retried,
        )
        part = await asyncio.to_thread(self.writer.encode, shard_in.table, shard_in.ids, shard_in.requests,
                                       rows, summary)
        won = await asyncio.to_thread(self._commit, part, summary)
        if not won:  # another attempt committed first; its result is the one that counts
            summary = await asyncio.to_thread(self.store.summary_of, summary.part)
        return ShardAttempt(summary=summary, won=won)

    def _commit(self, part: EncodedPart, summary: ShardSummary) -> bool:
        """Commit, turning errors no retry can fix (no space, read-only, permission) into a
        StorageError that names the path; the driver stops the run on it.

        A lease that is still ours but was not renewed lately (a driver held up by slow
        storage) is waited for, up to one lease length, rather than throwing the shard away
        (and less than the hang watchdog allows an idle engine holding work).
        """
        run = self.cfg.run
        deadline = time.monotonic() + min(run.driver_lease_s, run.hang_timeout_s / 2)
        while True:
            try:
                with storage.errors(self.cfg.output.path, "output.path", permanent_only=True):
                    return self.store.commit(summary.part, part.data, summary, self.generation,
                                             errors=part.errors)
            except LeaseStale:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    @logs.contextual(shard="shard_index")
    async def probe(self, shard_index: int, rows: list[int]) -> int:
        """Run some rows of a shard and keep nothing; the driver is looking for rows that
        kill the worker (it calls this alone on a worker). Returns how many rows ran."""
        shard_in = await self._load(shard_index)
        tasks = await self._submit(shard_in, [i for i in rows if not isinstance(shard_in.encoded[i], RowError)])
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return len(tasks)

    async def _load(self, shard_index: int) -> ShardInput:
        """A shard's input rows as requests: `ShardInput`. A row's seed is its own (a
        sampling column, an OpenAI body's seed), else made from sampling.seed and the row's id
        only, so it samples the same text whatever shard, batch, worker or attempt runs it.

        Shards are loaded one at a time, in the order they arrived (asyncio.Lock wakes its
        waiters first come, first served): when a run starts each worker gets several shards
        together, and reading and encoding them side by side on a few cores would keep the
        engine waiting for all of them, not just the first (issue 11: 2-4 s at the start of
        a few-shot run, where one shard of long prompts takes 0.35 s to encode)."""
        shard = self.plan.shards[shard_index]
        async with self.load_lock:
            table = await asyncio.to_thread(self._read, shard)
            requests, encoded, order = await asyncio.to_thread(self._encode, table)
        ids = self._ids(table, shard)
        seeds = [row_seed(self.cfg.sampling.seed, i) if s.seed is None else s.seed
                 for i, s in zip(ids.to_pylist(), requests.sampling, strict=True)]
        return ShardInput(table, ids, requests, encoded, seeds, order)

    def _encode(self, table: pa.Table) -> tuple[RowRequests, list, list[int]]:
        requests = self.requests.build(table)
        encoded = [requests.at_line(e, i) if isinstance(e, RowError) else e
                   for i, e in enumerate(self.prompts.encode(requests.cells))]
        return requests, encoded, self._order(encoded)

    # ------------------------------------------------------------------ rows through the engine

    def _order(self, encoded: list) -> list[int]:
        """The rows to submit (those that encoded), sorted by their token ids when
        run.prefix_order is on: rows sharing a prefix then reach the engine back to back and
        hit its KV cache block reuse (TensorRT-LLM's enable_block_reuse, the simulated
        engine's LRU blocks) while the blocks are still cached. Rows keep their index, so
        results are written in input order either way."""
        rows = [i for i, e in enumerate(encoded) if not isinstance(e, RowError)]
        if self.cfg.run.prefix_order:
            rows.sort(key=encoded.__getitem__)
        return rows

    async def _submit(self, shard_in: ShardInput, rows: list[int]) -> dict[int, asyncio.Task]:
        """Hand `rows` to the engine in order, each as soon as the in-flight window has room;
        returns when all are submitted. One waiter per shard on the window, not one per row:
        asyncio.Semaphore scans its waiters on every acquire, and a worker holding many
        shards would otherwise pay for thousands of them on every row."""
        tasks: dict[int, asyncio.Task] = {}
        try:
            for i in rows:
                await self.window.acquire()
                request = Request(i, shard_in.encoded[i], shard_in.seeds[i], shard_in.requests.sampling[i])
                tasks[i] = asyncio.ensure_future(self._generate(request))
                # released however the task ends, also when cancelled before it ever ran
                tasks[i].add_done_callback(self._release_slot)
        except BaseException:
            for t in tasks.values():
                t.cancel()
            raise
        return tasks

    async def _finish(self, shard_in: ShardInput,
                      tasks: dict[int, asyncio.Task]) -> tuple[list[RowOutcome], int]:
        """Every row's outcome, and how many requests ran again (`run.row_retries`).

        A row whose request ends in a retryable error (RETRYABLE: a timeout, an engine
        error, a request the engine failed) runs again, up to run.row_retries times, within
        this shard attempt, before its error is recorded. Each round is settled by
        `_settle`, which restarts a broken engine."""
        encoded = shard_in.encoded
        outcomes: dict[int, RowOutcome] = {
            i: RowOutcome(Result.failed(e.code, e.message), None)
            for i, e in enumerate(encoded) if isinstance(e, RowError)}
        tries: dict[int, int] = {}
        restarts, retry = 0, False
        while tasks:
            settled, restarts = await self._settle(shard_in, tasks, restarts, retry)
            outcomes.update(settled)
            again = [i for i, o in settled.items()
                     if _retryable(o) and tries.get(i, 0) < self.cfg.run.row_retries]
            for i in again:
                tries[i] = tries.get(i, 0) + 1
            if again:
                log.info("worker %d: %d request(s) failed with a retryable error; running them "
                         "again", self.worker_index, len(again))
                self.metrics.row_retried(len(again))
            tasks, retry = (await self._submit(shard_in, again) if again else {}), True
        return [outcomes[i] for i in range(len(encoded))], sum(tries.values())

    async def _settle(self, shard_in: ShardInput, tasks: dict[int, asyncio.Task], restarts: int,
                      retry: bool) -> tuple[dict[int, RowOutcome], int]:
        """The outcomes of `tasks`, and the engine restarts so far this attempt. Rows that
        make the engine raise are retried or isolated:

        - some rows of a round succeed and others raise: the engine works, so the ones
          that raise are rows it cannot take (poison rows) and become row errors;
        - nothing succeeds: the engine itself may be broken. In a round of retried rows it
          is first asked a prompt it answered before (a poison row retried alone must not
          cost an engine restart); if it fails that, or in a first round, it is restarted in
          place and checked with that prompt; rows that still fail on an engine that passes
          the check are poison rows; an engine that keeps failing after `run.engine_restarts`
          restarts gives the shard attempt back (EngineFailed).
        """
        encoded = shard_in.encoded
        outcomes: dict[int, RowOutcome] = {}
        verified = False
        try:
            while tasks:
                done = await asyncio.gather(*tasks.values(), return_exceptions=True)
                failed = {}
                for i, result in zip(tasks, done, strict=True):
                    if isinstance(result, BaseException):
                        failed[i] = result
                    else:
                        outcomes[i] = result
                if not failed:
                    break
                if not verified and retry and len(failed) == len(tasks):
                    verified = await self._engine_answers(self.engine)
                if len(failed) < len(tasks) or verified:
                    outcomes.update({i: _row_failure(e, len(encoded[i])) for i, e in failed.items()})
                    break
                first_error = _describe(next(iter(failed.values())))
                if restarts >= self.cfg.run.engine_restarts:
                    raise EngineFailed(f"the engine failed on every request after {restarts} "
                                       f"restarts in place: {first_error}")
                restarts += 1
                verified = await self._restart_engine(self.engine, first_error)
                tasks = await self._submit(shard_in, list(failed))
        except BaseException:
            for t in tasks.values():
                t.cancel()
            raise
        return outcomes, restarts

    async def _generate(self, request: Request) -> RowOutcome:
        """One row through the engine, holding one slot of the window while it runs."""
        started = time.perf_counter()
        timeout = self.cfg.run.request_timeout_s
        self._request_in(started)
        try:
            if timeout is None:
                result = await self.engine.generate(request)
            else:
                result = await asyncio.wait_for(self.engine.generate(request), timeout)
        finally:
            self._request_out()
        latency = time.perf_counter() - started
        fmt = request.sampling.response_format if request.sampling else None
        if fmt is not None and result.error is None:
            problem = output_problem(result.text, result.finish_reason, result.completion_tokens, fmt)
            if problem is not None:
                result = dataclasses.replace(result, error=problem)
        if result.error is None:
            self._canary = request.prompt_token_ids
            self.rows_done += 1
            self.tokens_out += result.completion_tokens or 0
        return RowOutcome(result, round(latency, 4))

    def _request_in(self, now: float) -> None:
        if self.in_flight == 0:
            self._busy_since = now
        self.in_flight += 1

    def _request_out(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy_s += time.perf_counter() - self._busy_since
            self._busy_since = None

    async def _restart_engine(self, failed: Engine, reason: str) -> bool:
        """Replace a failed engine with a fresh one (once, however many shards saw it fail),
        then check it on a prompt the old one answered; True if that check passed."""
        async with self.restart_lock:
            if self.engine is failed:
                log.warning("worker %d: restarting its engine in place after: %s", self.worker_index, reason)
                self.engine_restarts += 1
                self.metrics.engine_restarted()
                self._beats_before += failed.heartbeat
                await asyncio.to_thread(_shutdown_quietly, failed)
                self.engine = await asyncio.to_thread(self.engine_cls, config=self.cfg)
        return await self._engine_answers(self.engine)

    async def _engine_answers(self, engine: Engine) -> bool:
        """Whether `engine` answers a prompt this worker's engine answered before (False when
        there is none yet)."""
        if self._canary is None:
            return False
        try:
            check = await asyncio.wait_for(engine.generate(Request(-1, self._canary)),
                                           self.cfg.run.request_timeout_s)
            return check.error is None
        except Exception as e:
            log.warning("worker %d: its engine failed a check on a prompt it answered before: %s",
                        self.worker_index, _describe(e))
            return False

    # ------------------------------------------------------------------ internals

    @property
    def window(self) -> asyncio.Semaphore:
        if self._window is None:  # made on first use so it belongs to the actor's event loop
            self._window = asyncio.Semaphore(self.engine.max_in_flight)
        return self._window

    def _release_slot(self, _: asyncio.Future) -> None:
        self.window.release()

    @property
    def turns(self) -> asyncio.Condition:
        if self._turns is None:
            self._turns = asyncio.Condition()
        return self._turns

    @property
    def restart_lock(self) -> asyncio.Lock:
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        return self._restart_lock

    @property
    def load_lock(self) -> asyncio.Lock:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        return self._load_lock

    async def _end_turn(self, ticket: int) -> None:
        """Let the next shard queue its rows (also when this one failed before its turn)."""
        async with self.turns:
            self._finished_turns.add(ticket)
            while self._serving in self._finished_turns:
                self._finished_turns.discard(self._serving)
                self._serving += 1
            self.turns.notify_all()

    def _read(self, shard: Shard) -> pa.Table:
        """The shard's rows, each file read at exactly the version the plan recorded
        (storage.InputChanged otherwise, which stops the run)."""
        return self.reader.read_shard(self.plan.files, shard, self.input_schema)

    def _ids(self, table: pa.Table, shard: Shard) -> pa.Array:
        column = id_column(self.cfg)
        if column:
            return table.column(column)
        return pa.array([f"{self.plan.files[p.file].name}:{p.row_start + i}"
                         for p in shard.pieces for i in range(p.num_rows)])


def _describe(error: BaseException) -> str:
    """A failed request's error; a timeout is this worker's own, so it names the setting."""
    if isinstance(error, asyncio.TimeoutError):
        return "no result within run.request_timeout_s"
    return describe(error)


RETRYABLE = ("timeout", "engine_error", "request_failed")
"""Row error codes a second try may fix (run.row_retries): the request, not the row, failed."""


def _retryable(outcome: RowOutcome) -> bool:
    error = outcome.result.error
    return error is not None and split_error(error)[0] in RETRYABLE


def _row_failure(error: BaseException, prompt_tokens: int) -> RowOutcome:
    code = "timeout" if isinstance(error, asyncio.TimeoutError) else "engine_error"
    return RowOutcome(Result.failed(code, _describe(error), prompt_tokens), None)


def _shutdown_quietly(engine: Engine) -> None:
    try:
        engine.shutdown()
    except Exception as e:  # a broken engine may not even shut down cleanly
        log.warning("shutting down the failed engine raised %s", _describe(e))
