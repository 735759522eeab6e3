"""The scheduler's bookkeeping, without Ray: which worker slot holds which shard, attempts,
failures, narrowing probes, speculative copies, the hang watchdog and the drain on stop.

Pure and deterministic: no Ray, no I/O, the clock passed in as a number. Each method
returns decisions (start this lease, replace that slot, shard 4 failed: why) that
batchinfer/scheduler.py carries out on Ray actors and logs, in order. The leases live in
one place, `LeaseBook.leases`; what a slot holds is read from there, never kept beside it.

The rules it keeps:
- a worker holds `shards_per_worker` shards if set; else 2, or more while they hold fewer
  rows than its engine's window plus one shard, or while those queued behind its current
  one hold less than `prefetch_s` of its work, but never more than an even share of the
  shards left;
  shards go out one per worker per round, the emptiest first; when one ends it gets the next;
- a shard whose lease ended without a commit is tried again, up to `max_attempts`, then
  recorded as failed; a retry after its worker died runs alone on a worker (solo), so
  that another death is its own and not a neighbour's;
- a shard whose worker died twice, with an attempt left, is narrowed
  (batchinfer/narrowing.py): probes of its rows, each alone on a worker, find the rows
  that kill a worker alone; the shard then runs once more with those rows skipped;
- with nothing left to hand out, an idle worker races a copy of a shard queued behind
  another on a busy worker, else of the oldest straggler
  (running longer than `speculate_after_s` and twice the median shard time); the first
  commit wins and the other copies are cancelled; a late result of a cancelled copy is
  ignored;
- a ready worker holding work whose engine made no progress for its `hang_limit` is
  replaced, and the shards it held end as deaths.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from batchinfer.narrowing import Narrowing
from batchinfer.records import ShardSummary

MIN_HELD = 2
"""Shards a worker holds at least (unless run.shards_per_worker says otherwise): the next
is read and queued while the current one generates."""
MAX_HELD = 16
"""Most shards one worker holds, however fast it is (each is read and tokenized in memory)."""
RATE_WINDOW_S = 5.0
"""A worker's rate is measured over at least this long between progress reports."""


@dataclass(frozen=True)
class Rules:
    """The run.* settings the book decides by (RunConfig's fields of the same names)."""

    max_attempts: int = 3
    shards_per_worker: int | None = None
    prefetch_s: float = 10
    speculative: bool = True
    speculate_after_s: float = 120
    hang_timeout_s: float = 600
    worker_start_timeout_s: float = 1800
    stop_grace_s: float = 60

    @classmethod
    def from_run(cls, run: Any) -> Rules:
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls)})


@dataclass
class Lease:
    """One shard attempt (or narrowing probe) running on one slot."""

    id: int
    shard: int
    attempt: int
    slot: int
    incarnation: int
    """The slot's actor when leased: a death replaces the slot only once per actor."""
    started: float
    speculative: bool = False
    probe: list[int] | None = None
    """For a narrowing probe: the shard's rows it runs (nothing is committed)."""
    skip: dict[int, str] | None = None
    """Rows of a narrowed shard that killed a worker alone: recorded as row errors, not run."""
    solo: bool = False
    """Runs alone on its worker: a probe, or a retry after its worker died."""
    killed: str | None = None
    """Why the watchdog replaced its worker (a hang), if it did."""
    ticket: Any = None
    """The caller's handle on the running call (a Ray ObjectRef); the book never reads it."""


@dataclass
class SlotState:
    """What the book knows of one worker position; its actor is replaced when it dies or hangs."""

    index: int
    created: float
    last_progress: float
    """When the engine last moved (or got work while idle); the watchdog reads this."""
    ready: bool = True
    incarnation: int = 0
    replacements: int = 0
    heartbeat: Any = None
    busy: dict[str, Any] = field(default_factory=dict)
    """The engine's last `busy()` report: whether it is inside a step, and its prompt tokens."""
    context: int = 0
    """The engine's max_model_len, the unit of prompt tokens one hang_timeout_s allows."""
    rows_done: tuple[float, int] | None = None
    """(when, rows) of the worker's last progress report that moved the rate."""
    rows_per_s: float = 0.0
    """The worker's recent rate (smoothed); it decides how many shards the worker holds."""
    window: int = 0
    """Requests the worker keeps submitted to its engine; it holds at least that many rows."""


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Start:
    """Run `lease` on its slot's actor: process the shard, or probe `lease.probe`'s rows."""

    lease: Lease


@dataclass(frozen=True)
class Race:
    """Start a speculative copy of a straggler that has run `ran_s` (median `median_s`),
    or of a shard queued behind another on a busy worker while this one is idle."""

    lease: Lease
    ran_s: float
    median_s: float
    queued: bool = False
    """The original still waits behind another shard on a busy worker (not a straggler)."""


@dataclass(frozen=True)
class Commit:
    """The shard's first commit: this summary is the one that counts."""

    shard: int
    summary: ShardSummary


@dataclass(frozen=True)
class Cancel:
    """A copy lost the race to commit: stop it; the book has already dropped it."""

    lease: Lease


@dataclass(frozen=True)
class Replace:
    """Kill the slot's actor and start a fresh one; `replacements` so far (if `counted`)."""

    slot: int
    reason: str
    counted: bool
    replacements: int


@dataclass(frozen=True)
class GiveUp:
    """No worker can be kept alive (a crash loop, or a replacement never ready): fail the run."""

    message: str


@dataclass(frozen=True)
class Retry:
    """Queue the shard again for `attempt` (the previous one failed for `reason`)."""

    shard: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class Fail:
    """The shard used up its attempts; `reason` is the last one."""

    shard: int
    attempts: int
    reason: str


@dataclass(frozen=True)
class Narrow:
    """The shard's worker died `deaths` times: its rows are probed for the poison ones."""

    shard: int
    deaths: int
    cause: str


@dataclass(frozen=True)
class Poisoned:
    """Narrowing ended: `rows` kill a worker alone; the shard runs once more without them."""

    shard: int
    rows: dict[int, str]


Decision = Start | Race | Commit | Cancel | Replace | GiveUp | Retry | Fail | Narrow | Poisoned


def hang_limit(timeout_s: float, busy: dict[str, Any], context: int) -> float:
    """Seconds without progress before a worker is called hung: run.hang_timeout_s per
    context's worth of prompt tokens in the engine's current step, and at least once. A
    step that prefills N full-length prompts is legal work that may take N times as long."""
    if not busy.get("in_step") or not context:
        return timeout_s
    return timeout_s * max(1.0, busy["step_tokens"] / context)


class LeaseBook:
    """Shards to do, who holds them, and how each ended. `rows[i]` is shard i's row count."""

    def __init__(self, *, rules: Rules, rows: Sequence[int], pending: Iterable[int],
                 slots: int, now: float):
        self.rules = rules
        self.rows = rows
        self.queue: deque[int] = deque(pending)
        self.attempts: dict[int, int] = {}
        self.leases: dict[int, Lease] = {}
        self.committed: dict[int, ShardSummary] = {}
        self.failed: dict[int, str] = {}
        self.slots = [SlotState(i, created=now, last_progress=now) for i in range(slots)]
        self.deaths: dict[int, int] = {}
        self.narrowings: dict[int, Narrowing] = {}
        self.solo: deque[tuple[int, list[int] | None]] = deque()
        """Work that runs alone on a worker: (shard, None) retries a shard whose worker
        died, (shard, rows) probes some of its rows."""
        self.skips: dict[int, dict[int, str]] = {}
        """Rows of a narrowed shard that killed a worker alone, for its next attempt."""
        self.stop_deadline: float | None = None
        self._ids = itertools.count()
        self._median: tuple[int, float] = (0, 0.0)  # (commits it was taken over, median)
        self._mean_rows = max(1.0, sum(rows) / len(rows)) if rows else 1.0  # fill() runs every loop

    @property
    def unfinished(self) -> bool:
        return bool(self.queue or self.leases or self.solo)

    def held(self, slot: int) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.slot == slot]

    # ------------------------------------------------------------------ handing out

    def fill(self, now: float) -> list[Decision]:
        """Leases for workers with room: solo work first, each on an idle worker."""
        if self.stop_deadline is not None:
            return []
        out: list[Decision] = []
        # Nothing joins solo work on its worker, so that its death is its own; while some
        # waits, the least busy worker not already running solo work takes no new shards
        # until it is idle.
        for slot in self.slots:
            if self.solo and not self.held(slot.index):
                shard, rows = self.solo.popleft()
                if rows is None:
                    self.attempts[shard] += 1
                out.append(Start(self._lease(slot, shard, self.attempts[shard], now,
                                             probe=rows, solo=True)))
        held = {slot.index: self.held(slot.index) for slot in self.slots}
        sharing = [slot for slot in self.slots if not any(lease.solo for lease in held[slot.index])]
        draining = min(sharing, key=lambda s: len(held[s.index]), default=None) if self.solo else None
        room = {slot.index: self.capacity(slot) - len(held[slot.index]) for slot in sharing if slot is not draining}
        # One shard per worker per round, the emptiest first: a queue shorter than the
        # workers' room is spread evenly, not taken whole by the first worker asked.
        while self.queue and any(n > 0 for n in room.values()):
            for index in sorted(room, key=lambda i: len(held[i])):
                if not self.queue or room[index] <= 0:
                    continue
                shard = self.queue.popleft()
                self.attempts[shard] = self.attempts.get(shard, 0) + 1
                lease = self._lease(self.slots[index], shard, self.attempts[shard], now)
                held[index].append(lease)
                room[index] -= 1
                out.append(Start(lease))
        return out

    def capacity(self, slot: SlotState) -> int:
        """Shards `slot` may hold: `shards_per_worker` when the config sets it; else at least
        MIN_HELD, and more (up to MAX_HELD) while they hold fewer rows than its engine's
        window plus one shard, or while the shards queued behind its current one hold less
        than `prefetch_s` of its work at its recent rate. A fast worker (a short-prompt
        workload, a fast GPU) then never drains its engine while a committed shard's
        replacement is read and tokenized. As the queue runs out this tapers back, and
        (left automatic) it is never more than `_fair_share`."""
        if self.rules.shards_per_worker is not None:
            return self.rules.shards_per_worker
        if not self.rows:
            return MIN_HELD
        shard_rows = self._mean_rows
        # Rows enough to keep the engine's window full, and one shard more behind them:
        # shards smaller than the batch must not leave the batch part empty.
        floor = max(MIN_HELD, min(MAX_HELD, 1 + math.ceil(slot.window / shard_rows)))
        if not slot.rows_per_s:
            return min(floor, self._fair_share())
        wanted = 1 + math.ceil(slot.rows_per_s * self.rules.prefetch_s / shard_rows)
        # No deeper than a quarter of the queue shared out: a worker's backlog when the last
        # shard goes out is what the run's tail waits on, and a deep one at the start would
        # take shards a worker that turns out faster could have had.
        wanted = min(wanted, MIN_HELD + len(self.queue) // (4 * len(self.slots)))
        return min(max(floor, min(MAX_HELD, wanted)), self._fair_share())

    def _fair_share(self) -> int:
        """The most shards one worker may hold while others could take them: the work not
        yet done (shards queued, leases held, copies not counted, and solo work waiting)
        shared out evenly, and at least MIN_HELD. Near the start and the end of a run the
        window floor would otherwise let the first workers asked take everything, and the
        others idle or race copies."""
        held = sum(1 for lease in self.leases.values() if not lease.speculative)
        outstanding = len(self.queue) + held + len(self.solo)
        return max(MIN_HELD, math.ceil(outstanding / len(self.slots)))

    def speculate(self, now: float) -> list[Decision]:
        """With nothing left to hand out, let idle workers race copies: first of shards
        still queued behind another on a busy worker (taken at once, so the end of the run
        does not wait on one worker's backlog), then of stragglers."""
        if not self.rules.speculative or self.queue or self.stop_deadline is not None:
            return []
        idle = [s for s in self.slots if s.ready and not self.held(s.index)]
        if not idle:
            return []
        median = self._median_shard_s()
        threshold = max(self.rules.speculate_after_s, 2 * median)
        copies = {lease.shard for lease in self.leases.values() if lease.speculative}
        candidates = [lease for lease in self.leases.values() if not lease.solo and lease.shard not in copies]
        behind = {lease.id for lease in candidates if self._queued(lease)}
        queued = sorted((lease for lease in candidates if lease.id in behind), key=lambda lease: -lease.started)
        stragglers = sorted((lease for lease in candidates
                             if now - lease.started > threshold and lease.id not in behind),
                            key=lambda lease: lease.started)
        return [Race(self._lease(slot, lease.shard, lease.attempt, now, speculative=True),
                     now - lease.started, median, queued=lease.id in behind)
                for slot, lease in zip(idle, queued + stragglers, strict=False)]

    def _median_shard_s(self) -> float:
        """The median generate_s of committed shards, sorted again only after new commits
        (speculate runs on every scheduler loop once the queue is empty)."""
        if self._median[0] != len(self.committed):
            durations = sorted(s.generate_s for s in self.committed.values())
            self._median = (len(durations), durations[len(durations) // 2] if durations else 0.0)
        return self._median[1]

    def _queued(self, lease: Lease) -> bool:
        """Whether the lease waits behind an older lease on its worker."""
        return any(other.started < lease.started or (other.started == lease.started and other.id < lease.id)
                   for other in self.held(lease.slot) if other is not lease)

    def _lease(self, slot: SlotState, shard: int, attempt: int, now: float, *,
               speculative: bool = False, probe: list[int] | None = None, solo: bool = False) -> Lease:
        if not self.held(slot.index):  # an idle worker's clock starts with its new work
            slot.last_progress = now
        lease = Lease(next(self._ids), shard, attempt, slot.index, slot.incarnation, now,
                      speculative=speculative, probe=probe, solo=solo,
                      skip=self.skips.get(shard) if probe is None else None)
        self.leases[lease.id] = lease
        return lease

    # ------------------------------------------------------------------ how a lease ended

    def succeeded(self, lease_id: int, summary: ShardSummary | None) -> list[Decision]:
        """The call returned: a shard's summary (committed, by this or an earlier attempt),
        or a probe that did not kill its worker. Unknown ids (cancelled copies) are ignored."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return []
        if lease.probe is not None:
            return self._probed(lease, None)
        if lease.shard in self.committed:
            return []
        self.committed[lease.shard] = summary
        out: list[Decision] = [Commit(lease.shard, summary)]
        for other in list(self.leases.values()):  # a raced copy lost: stop it
            if other.shard == lease.shard and other.probe is None:
                del self.leases[other.id]
                out.append(Cancel(other))
        return out

    def errored(self, lease_id: int, reason: str) -> list[Decision]:
        """The call raised in a live worker (an error a retry may fix)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return []
        if lease.probe is not None:  # only a death counts against a probe's rows
            return self._probed(lease, None)
        return self._ended(lease, reason, None)

    def died(self, lease_id: int, error: str, now: float) -> list[Decision]:
        """The lease's worker died (`error`: what Ray said) or was replaced by the watchdog."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return []
        cause = lease.killed or error
        reason = f"worker {lease.slot} {'was replaced' if lease.killed else 'died'}: {cause}"
        out: list[Decision] = []
        if self.slots[lease.slot].incarnation == lease.incarnation:  # the first of its shards
            out.append(self.replace(lease.slot, "died", now, counted=lease.probe is None))
        if lease.probe is not None:
            return out + self._probed(lease, cause)
        return out + self._ended(lease, reason, cause)

    def drop(self, lease_id: int) -> None:
        """Forget a lease whose error no retry can fix (the caller stops the run)."""
        self.leases.pop(lease_id, None)

    def _ended(self, lease: Lease, reason: str, cause: str | None) -> list[Decision]:
        if lease.shard in self.committed or any(o.shard == lease.shard for o in self.leases.values()):
            return []  # another copy of this shard committed or is still running
        return self._retry_or_fail(lease.shard, reason, cause)

    def _retry_or_fail(self, shard: int, reason: str, cause: str | None) -> list[Decision]:
        """A shard attempt ended without a commit (`cause`: why its worker died, if it did):
        narrow it, queue it again, or record it as failed once out of attempts."""
        if cause is not None:
            self.deaths[shard] = self.deaths.get(shard, 0) + 1
            narrowed = self._narrow(shard, cause)
            if narrowed:
                return narrowed
        attempts = self.attempts[shard]
        if attempts >= self.rules.max_attempts:
            self.failed[shard] = reason
            return [Fail(shard, attempts, reason)]
        if shard in self.deaths:
            self.solo.appendleft((shard, None))
        else:
            self.queue.appendleft(shard)
        return [Retry(shard, attempts, reason)]

    def _narrow(self, shard: int, cause: str) -> list[Decision]:
        """Start narrowing a shard that killed its worker twice, if it has an attempt left
        for the run without its poison rows; [] if it is not (or no longer) narrowed."""
        if (self.deaths[shard] < 2 or shard in self.narrowings
                or self.attempts[shard] >= self.rules.max_attempts):
            return []
        self.narrowings[shard] = Narrowing(self.rows[shard])
        return [Narrow(shard, self.deaths[shard], cause), *self._next_probes(shard)]

    def _probed(self, lease: Lease, cause: str | None) -> list[Decision]:
        narrowing = self.narrowings[lease.shard]
        if cause is None:
            narrowing.passed(lease.probe)
        else:
            narrowing.died(lease.probe, cause)
        return self._next_probes(lease.shard)

    def _next_probes(self, shard: int) -> list[Decision]:
        narrowing = self.narrowings[shard]
        self.solo.extend((shard, rows) for rows in narrowing.take())
        if not narrowing.done:
            return []
        self.skips[shard] = narrowing.poison  # the shard's last attempt runs without them
        self.solo.appendleft((shard, None))
        return [Poisoned(shard, dict(narrowing.poison))]

    # ------------------------------------------------------------------ workers

    def replace(self, slot: int, reason: str, now: float, *, counted: bool = True) -> Replace | GiveUp:
        """A slot's actor died, hung or failed to start: swap it for a fresh one. Workers
        lost to narrowing probes (expected deaths) are not `counted` towards the limit that
        stops a crash loop."""
        state = self.slots[slot]
        if counted:
            if state.replacements >= self.rules.max_attempts * 2:
                return GiveUp(f"worker {slot} was replaced {state.replacements} times; last: {reason}")
            state.replacements += 1
        state.incarnation += 1
        state.ready, state.created = False, now
        state.heartbeat, state.busy = None, {}
        return Replace(slot, reason, counted, state.replacements)

    def ready(self, slot: int, now: float) -> None:
        """A replacement's engine is loaded."""
        state = self.slots[slot]
        state.ready, state.last_progress = True, now

    def observe(self, slot: int, *, heartbeat: Any, busy: dict[str, Any] | None,
                context: int | None, now: float, rows: int | None = None, window: int | None = None) -> None:
        """A worker's progress() report: a new heartbeat means its engine moved; `rows`
        (done since it started) updates its rate, over at least RATE_WINDOW_S."""
        state = self.slots[slot]
        state.busy, state.context = busy or {}, context or 0
        state.window = window or state.window
        if rows is not None:
            if state.rows_done is None or rows < state.rows_done[1]:  # a new actor counts from 0
                state.rows_done = (now, rows)
            elif now - state.rows_done[0] >= RATE_WINDOW_S:
                rate = (rows - state.rows_done[1]) / (now - state.rows_done[0])
                state.rows_per_s = rate if not state.rows_per_s else (state.rows_per_s + rate) / 2
                state.rows_done = (now, rows)
        if heartbeat != state.heartbeat:
            state.heartbeat, state.last_progress = heartbeat, now

    def watchdog(self, now: float) -> list[Decision]:
        """Replace each ready worker holding work whose engine stalled past its hang_limit;
        give up on a replacement not ready within worker_start_timeout_s."""
        out: list[Decision] = []
        for slot in self.slots:
            if not slot.ready:
                if now - slot.created > self.rules.worker_start_timeout_s:
                    return [*out, GiveUp(f"worker {slot.index}'s replacement was not ready after "
                                         f"{self.rules.worker_start_timeout_s:.0f}s")]
                continue
            held = self.held(slot.index)
            stalled = now - slot.last_progress
            limit = hang_limit(self.rules.hang_timeout_s, slot.busy, slot.context)
            if held and stalled > limit:
                reason = (f"its engine made no progress for {stalled:.0f}s (limit {limit:.0f}s) with "
                          f"{len(held)} shard(s) in hand (run.hang_timeout_s)")
                for lease in held:
                    lease.killed = reason
                probing = any(lease.probe is not None for lease in held)
                out.append(self.replace(slot.index, reason, now, counted=not probing))
        return out

    # ------------------------------------------------------------------ stopping

    def stop(self, now: float) -> bool:
        """No new leases from now on; those in flight get rules.stop_grace_s to finish.
        True the first time (the caller says so in its log)."""
        if self.stop_deadline is not None:
            return False
        self.stop_deadline = now + self.rules.stop_grace_s
        return True

    def interrupted(self, now: float) -> bool:
        """Stopped, and nothing is in flight any more or the grace period is over."""
        return self.stop_deadline is not None and (not self.leases or now > self.stop_deadline)
