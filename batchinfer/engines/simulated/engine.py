"""The simulated engine: continuous batching on a modelled GPU, no model and no GPU.

`generate` hands a request to one background thread that runs the performance model
(model.py) one iteration at a time, sleeps each iteration's modelled duration divided by
`speed`, and resolves the requests that iteration finished. A thread rather than a task on
the worker's event loop: a real engine runs beside the framework, so a busy event loop
must show up as a starved engine, never as a slow one.

Rows carry no real text ("[simulated: N tokens]"), only true token counts and timing.
The engine keeps its own accounting (`accounting()`) of how well the framework keeps it fed.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from batchinfer.config import Config
from batchinfer.engines.base import Engine, Request, Result, settle_from_thread
from batchinfer.engines.simulated import profiles
from batchinfer.engines.simulated.model import Simulator
from batchinfer.engines.simulated.options import SimulatedOptions

JITTER_S = 0.002
"""A late wake-up up to this long is made up in the next iterations, so sleep granularity
does not slow a fast simulation down; longer delays are real lost time."""


SNAPSHOT_EVERY_S = 0.05
"""The accounting keeps its running totals this often (wall time), so a report can end at
any earlier moment (e.g. the last shard handed out) to within this much."""

_KINDS = ("full_s", "kv_limited_s", "starved_s", "idle_s")


@dataclass
class _Accounting:
    """Wall time since the first request, split by what the engine was doing."""

    first: float | None = None
    last: float | None = None
    full_s: float = 0.0
    starved_s: float = 0.0
    kv_limited_s: float = 0.0
    idle_s: float = 0.0
    iterations: int = 0
    occupancy_sum: float = 0.0
    occupancy_time: float = 0.0
    snapshots: list[tuple[float, ...]] = field(default_factory=list)
    """(monotonic time, full, kv_limited, starved, idle, iterations, occupancy sum, occupancy
    time) every SNAPSHOT_EVERY_S."""

    def idle_until(self, now: float) -> None:
        if self.last is not None:
            self.idle_s += now - self.last
            self.last = now

    def iteration(self, now: float, occupancy: float, kind: str) -> None:
        span = now - self.last
        setattr(self, kind, getattr(self, kind) + span)
        self.iterations += 1
        self.occupancy_sum += occupancy
        self.occupancy_time += occupancy * span
        self.last = now
        if not self.snapshots or now - self.snapshots[-1][0] >= SNAPSHOT_EVERY_S:
            self.snapshots.append(self.totals())

    def totals(self) -> tuple[float, ...]:
        return (self.last, *(getattr(self, k) for k in _KINDS), self.iterations, self.occupancy_sum,
                self.occupancy_time)

    def until(self, t: float | None) -> tuple[float, ...]:
        """The running totals as they were at monotonic time `t` (the last snapshot before
        it), or now if `t` is None or later than the last iteration."""
        if t is None or self.last is None or t >= self.last:
            return self.totals()
        i = bisect.bisect_right(self.snapshots, (t, math.inf)) - 1
        return self.snapshots[i] if i >= 0 else (self.first, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)


class SimulatedEngine(Engine):
    name = "simulated"
    Options = SimulatedOptions

    @classmethod
    def check_config(cls, config: Config) -> list[str]:
        options = config.engine.options
        try:
            profile = profiles.get(options.profile)
        except ValueError as e:
            return [f"engine.options.profile: {e}"]
        kv = options.kv_cache_tokens or profile.kv_cache_tokens
        longest = config.engine.max_model_len or profile.max_model_len
        if kv < longest:
            return [f"engine.options.kv_cache_tokens: got {kv}; expected at least max_model_len ({longest}), "
                    "so that one request of the longest length fits"]
        return []

    def __init__(self, *, config: Config):
        super().__init__(config=config)
        problems = self.check_config(config)
        if problems:
            raise ValueError("; ".join(problems))
        options = config.engine.options
        self.options = options
        self.profile = profiles.get(options.profile)
        self._max_model_len = self.config.max_model_len or self.profile.max_model_len
        self.sim = Simulator(self.profile, max_batch_size=self.config.max_batch_size,
                             kv_cache_tokens=options.kv_cache_tokens, max_num_tokens=options.max_num_tokens)
        self._cond = threading.Condition()
        self._inbox: list[tuple[int, Request, int, Result, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._pending: dict[int, tuple[Result, asyncio.Future, asyncio.AbstractEventLoop]] = {}
        self._keys = 0
        self._aborted: list[int] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._acct = _Accounting()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, request: Request) -> Result:
        refused = self.check_length(request)
        if refused is not None:
            return refused
        result = self._result(request)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._keys += 1
            key = self._keys
            self._inbox.append((key, request, result.completion_tokens, result, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="simulated-gpu", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            return await future
        except asyncio.CancelledError:  # past its deadline, or its shard was given up: abort it
            with self._cond:
                self._aborted.append(key)
                self._cond.notify()
            raise

    def _result(self, request: Request) -> Result:
        """The row's synthetic answer: its length decides everything; the text says what it is."""
        n = len(request.prompt_token_ids)
        limit = self.max_new_tokens(request)
        seed = self.seed_of(request)
        length = limit
        if self.options.output_lengths == "seeded":
            length = random.Random(seed).randint(1, limit)
        text = f"[simulated: {length} tokens]"
        if not self.sampling_of(request).greedy:  # sampled rows differ by row, as a real model's would
            text = f"[simulated: {length} tokens, sample {seed % 16 ** 6:06x}]"
        finish = "stop" if length < limit else "length"
        return Result(text=text, finish_reason=finish, prompt_tokens=n, completion_tokens=length)

    def _loop(self) -> None:
        due: float | None = None  # when the previous iteration ended in simulated real time
        while True:
            work = self._wait_for_work()
            if work is None:
                return
            arrivals, aborted = work
            now = time.monotonic()
            if self._acct.last is None:
                self._acct.first = self._acct.last = now
            for key, request, length, result, future, loop in arrivals:
                ids = request.prompt_token_ids if self.options.prefix_caching else None
                self.sim.submit(key, len(ids or request.prompt_token_ids), length, ids)
                self._pending[key] = (result, future, loop)
            for key in aborted:
                if self._pending.pop(key, None) is not None:
                    self.sim.abort(key)
            if self.sim.idle():
                due = None
                continue
            duration, finished = self.sim.step()
            start = now if due is None else max(due, now - JITTER_S)
            due = start + duration / self.options.speed
            with self.step(self.sim.last_cost.prefill_tokens):
                time.sleep(max(0.0, due - time.monotonic()))
            self._account(len(finished))
            self.beat()  # before the results: whoever sees them sees this iteration counted
            done = [self._pending.pop(key) for key in finished]
            settle_from_thread([(future, loop, result) for result, future, loop in done])
            if self.sim.idle():
                due = None

    def _wait_for_work(self) -> tuple[list, list[int]] | None:
        """The requests submitted and the keys of those aborted since the last iteration
        (waiting while there is nothing to run, which is idle time); None once shut down."""
        with self._cond:
            waited = False
            while not self._inbox and not self._aborted and self.sim.idle() and not self._stop:
                waited = True
                self._cond.wait()
            if self._stop:
                return None
            arrivals, self._inbox = self._inbox, []
            aborted, self._aborted = self._aborted, []
        if waited:
            self._acct.idle_until(time.monotonic())
        return arrivals, aborted

    def _account(self, finished: int) -> None:
        batch = self.sim.running + finished
        full = batch >= self.sim.max_batch_size or self.sim.last_cost.budget_full
        kind = ("full_s" if full
                else "kv_limited_s" if self.sim.waiting else "starved_s")
        self._acct.iteration(time.monotonic(), batch / self.sim.max_batch_size, kind)

    def accounting(self, until: float | None = None) -> dict[str, Any]:
        """How the engine spent wall time from its first request to its last iteration (or to
        `until`, a time.time(), if earlier): `full_s` (every batch slot taken),
        `kv_limited_s` (free slots, but the requests waiting in the engine do not fit the KV
        cache), `starved_s` (free slots and nothing waiting: the framework did not submit
        enough), `idle_s` (nothing running at all); `busy_fraction` = 1 - (starved + idle) /
        wall; occupancy = running / max_batch_size, mean per iteration and weighted by
        iteration time. The counters of simulated work (`virtual_s`, tokens) cover the
        whole run."""
        a, c = self._acct, self.sim.counters
        cutoff = None if until is None else until - (time.time() - time.monotonic())
        last, full, kv, starved, idle, iterations, occ_sum, occ_time = a.until(cutoff)
        wall = (last - a.first) if a.first is not None else 0.0
        return {
            "wall_s": wall, "full_s": full, "kv_limited_s": kv, "starved_s": starved, "idle_s": idle,
            "busy_fraction": 1 - (starved + idle) / wall if wall > 0 else 0.0,
            "iterations": iterations, "mean_occupancy": occ_sum / iterations if iterations else 0.0,
            "time_weighted_occupancy": occ_time / wall if wall > 0 else 0.0,
            "virtual_s": c.virtual_s, "speed": self.options.speed, "output_tokens": c.output_tokens,
            "prompt_tokens": c.prompt_tokens, "prefill_tokens": c.prefill_tokens, "reused_tokens": c.reused_tokens,
        }

    def stats(self, until: float | None = None) -> dict[str, Any]:
        return self.accounting(until)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        left = [(f, lp) for _, f, lp in self._pending.values()] + [(f, lp) for *_, f, lp in self._inbox]
        settle_from_thread([(future, loop, RuntimeError("the simulated engine was shut down"))
                            for future, loop in left])
        self._pending.clear()
        self._inbox.clear()
