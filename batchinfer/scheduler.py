"""Driver side: start the workers, hand out shards pull-style, retry, track progress.

Each worker holds up to `run.shards_per_worker` shards; when one comes back the worker
gets the next from the queue, so fast workers take more shards and nobody waits on a
static split. Only shard indexes go out and small summaries come back: the driver's
state is O(shards), never O(rows).

A shard whose worker died is retried alone on a worker, so that another death is its own
and not a neighbour's. A shard whose worker died twice is narrowed (batchinfer/narrowing.py):
probes of its rows, each alone on a worker, find the rows that kill a worker alone, and the
shard runs once more with those rows recorded as `worker_died` row errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from batchinfer import faults, storage
from batchinfer.config import Config
from batchinfer.errors import describe
from batchinfer.lease import LeaseLost
from batchinfer.narrowing import Narrowing
from batchinfer.plan import Plan
from batchinfer.progress import Progress
from batchinfer.records import ShardSummary, WorkerInfo, WorkerProgress
from batchinfer.worker import ShardWorker

log = logging.getLogger(__name__)

POLL_S = 0.5
# Workers log to files (forwarded to the driver): no progress bars or tokenizer fork warnings.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
PROGRESS_POLL_S = 2.0
# Errors from a shard attempt that no retry can fix: the run stops handing out shards.
# InputChanged and output errors (no space, read-only, permission) are StorageErrors.
FATAL_ERRORS = (storage.StorageError, LeaseLost)


class WorkerStartError(RuntimeError):
    """No worker could load its engine; the message carries the worker's own error."""


@dataclass
class Outcome:
    committed: dict[int, ShardSummary] = field(default_factory=dict)
    """Summaries of shards committed by this run, by shard index."""
    failed: dict[int, str] = field(default_factory=dict)
    """Shards that used up their attempts, with the last reason."""
    interrupted: bool = False
    """A stop was requested before the queue was done."""
    fatal: BaseException | None = None
    """The first error no retry can fix (FATAL_ERRORS); the run stopped on it."""


@dataclass
class _Slot:
    """One worker position; its actor is replaced when it dies or hangs."""

    index: int
    actor: Any
    leases: set = field(default_factory=set)
    """Refs of the shards this worker holds."""
    ready_ref: Any = None
    """The pending ready() call of a replacement actor; None once the actor is ready."""
    created: float = field(default_factory=time.monotonic)
    replacements: int = 0
    progress_ref: Any = None
    next_poll: float = 0.0
    heartbeat: Any = None
    last_progress: float = field(default_factory=time.monotonic)
    """When the engine last moved (or got work while idle); the hang watchdog reads this."""
    busy: dict[str, Any] = field(default_factory=dict)
    """The engine's last `busy()` report: whether it is inside a step, and its prompt tokens."""
    context: int = 0
    """The engine's max_model_len, the unit of prompt tokens one hang_timeout_s allows."""

    @property
    def ready(self) -> bool:
        return self.ready_ref is None


@dataclass
class _Lease:
    slot: _Slot
    actor: Any
    index: int
    attempt: int
    started: float = field(default_factory=time.monotonic)
    speculative: bool = False
    probe: list[int] | None = None
    """For a narrowing probe: the shard's rows it runs (nothing is committed)."""
    solo: bool = False
    """Runs alone on its worker: a probe, or a retry after its worker died."""
    killed: str | None = None
    """Why the driver stopped its worker (a hang), if it did."""


class Scheduler:
    """Leases shards to workers. A lease ends when the shard commits, when its worker dies,
    or when its worker's engine stops making progress for run.hang_timeout_s (the worker
    is then replaced). A shard whose lease ended without a commit goes back to the queue
    for another attempt, up to run.max_attempts; then it is recorded as failed. A shard
    whose worker died twice, with an attempt left, is narrowed first."""

    def __init__(self, *, cfg: Config, plan: Plan, stop: threading.Event, generation: int,
                 on_commit: Callable[[ShardSummary], None] = lambda s: None):
        self.cfg = cfg
        self.plan = plan
        self.stop = stop
        self.generation = generation
        self.on_commit = on_commit
        self.plan_ref = ray.put(plan)
        self.slots: list[_Slot] = []

    # ------------------------------------------------------------------ workers

    def _new_actor(self, index: int):
        opts = {**worker_options(self.cfg), "max_restarts": 0, "max_task_retries": 0}
        return ray.remote(ShardWorker).options(**opts).remote(
            config=self.cfg, plan=self.plan_ref, worker_index=index, generation=self.generation)

    def start_workers(self, timeout_s: float) -> list[WorkerInfo]:
        """Start every worker and wait until each engine is loaded; fail with a worker's error."""
        self.slots = [_Slot(i, self._new_actor(i)) for i in range(self.cfg.run.num_workers)]
        refs = {slot.actor.ready.remote(): slot for slot in self.slots}
        infos, deadline, next_note = [], time.monotonic() + timeout_s, time.monotonic() + 30
        while refs:
            if self.stop.is_set():
                raise KeyboardInterrupt
            done, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
            for ref in done:
                slot = refs.pop(ref)
                try:
                    infos.append(ray.get(ref))
                except (RayActorError, RayTaskError) as e:
                    raise WorkerStartError(f"worker {slot.index} failed to start: {describe(e)}") from None
            now = time.monotonic()
            if refs and now > deadline:
                raise WorkerStartError(
                    f"{len(refs)} of {len(self.slots)} workers not ready after {timeout_s:.0f}s; "
                    f"each asks for {self._resources()} (check `ray status` for free resources)")
            if refs and now > next_note:
                log.warning("waiting for workers: %d/%d ready (each asks for %s)",
                            len(infos), len(self.slots), self._resources())
                next_note = now + 30
        return sorted(infos, key=lambda i: i.worker)

    def _resources(self) -> str:
        run = self.cfg.run
        parts = [f"{run.cpus_per_worker:g} CPU", f"{run.gpus_per_worker:g} GPU"]
        if run.accelerator_type:
            parts.append(f"accelerator_type {run.accelerator_type}")
        return ", ".join(parts)

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.slots = []

    def _replace(self, slot: _Slot, reason: str, counted: bool = True) -> None:
        """Swap a dead or hung worker for a fresh one; the shards it held come back as failed
        attempts. Workers lost to narrowing probes (expected deaths) are not `counted`
        towards the limit that stops a crash loop."""
        if counted:
            if slot.replacements >= self.cfg.run.max_attempts * 2:
                raise WorkerStartError(f"worker {slot.index} was replaced {slot.replacements} times; "
                                       f"last: {reason}")
            slot.replacements += 1
        log.warning("worker %d: %s; starting a replacement (%s)", slot.index, reason,
                    f"{slot.replacements} so far" if counted else "lost to a narrowing probe, not counted")
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.actor = self._new_actor(slot.index)
        slot.ready_ref, slot.created = slot.actor.ready.remote(), time.monotonic()
        slot.progress_ref, slot.heartbeat, slot.busy = None, None, {}

    # ------------------------------------------------------------------ the loop

    def run(self, pending: list[int], progress: Progress) -> Outcome:
        self.queue: deque[int] = deque(pending)
        self.attempts: dict[int, int] = {}
        self.leases: dict[Any, _Lease] = {}
        self.outcome = Outcome()
        self.live: dict[int, WorkerProgress] = {}
        self.deaths: dict[int, int] = {}
        self.narrowings: dict[int, Narrowing] = {}
        self.solo: deque[tuple[int, list[int] | None]] = deque()
        """Work that runs alone on a worker: (shard, None) retries a shard whose worker
        died, (shard, rows) probes some of its rows."""
        self.skips: dict[int, dict[int, str]] = {}
        """Rows of a narrowed shard that killed a worker alone, for its next attempt."""
        stop_deadline = None
        while self.queue or self.leases or self.solo:
            if self.stop.is_set():
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self.cfg.run.stop_grace_s
                    log.warning("stop requested: no new shards; waiting up to %ss for %d in flight",
                                self.cfg.run.stop_grace_s, len(self.leases))
                if not self.leases or time.monotonic() > stop_deadline:
                    self.outcome.interrupted = True
                    break
            else:
                self._fill()
                self._speculate()
            self._wait_and_dispatch()
            self._poll_progress()
            self._watchdog()
            progress.update(self.outcome.committed, self.live, len(self.outcome.failed))
        return self.outcome

    def _wait_and_dispatch(self) -> None:
        waiting = {**{ref: "lease" for ref in self.leases},
                   **{s.progress_ref: ("progress", s) for s in self.slots if s.progress_ref is not None},
                   **{s.ready_ref: ("ready", s) for s in self.slots if s.ready_ref is not None}}
        if not waiting:
            time.sleep(POLL_S)
            return
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
        for ref in done:
            kind = waiting[ref]
            if kind == "lease":
                self._settle(ref)
            elif kind[0] == "progress":
                self._record_progress(kind[1], ref)
            else:
                self._record_ready(kind[1], ref)

    def _fill(self) -> None:
        # Solo work goes to an idle worker, and nothing joins it there, so that its death is
        # its own; while some waits, the least busy worker takes no new shards until idle.
        for slot in self.slots:
            if self.solo and not slot.leases:
                index, rows = self.solo.popleft()
                if rows is None:
                    self.attempts[index] += 1
                self._lease(slot, index, self.attempts[index], speculative=False, probe=rows, solo=True)
        draining = min(self.slots, key=lambda s: len(s.leases)) if self.solo else None
        for slot in self.slots:
            if slot is draining or any(self.leases[ref].solo for ref in slot.leases):
                continue
            while self.queue and len(slot.leases) < self.cfg.run.shards_per_worker:
                index = self.queue.popleft()
                self.attempts[index] = self.attempts.get(index, 0) + 1
                self._lease(slot, index, self.attempts[index], speculative=False)
                if len(self.leases) == 1 and not self.outcome.committed:
                    faults.point("first-shard")

    def _lease(self, slot: _Slot, index: int, attempt: int, speculative: bool,
               probe: list[int] | None = None, solo: bool = False) -> None:
        if not slot.leases:  # an idle worker's clock starts with its new work
            slot.last_progress = time.monotonic()
        if probe is None:
            ref = slot.actor.process.remote(index, attempt, self.skips.get(index))
        else:
            ref = slot.actor.probe.remote(index, probe)
        slot.leases.add(ref)
        self.leases[ref] = _Lease(slot, slot.actor, index, attempt, speculative=speculative,
                                  probe=probe, solo=solo)

    def _probing(self, slot: _Slot) -> bool:
        return any(self.leases[ref].probe is not None for ref in slot.leases)

    def _speculate(self) -> None:
        """With nothing left to hand out, let idle workers race the stragglers."""
        if not self.cfg.run.speculative or self.queue:
            return
        idle = [s for s in self.slots if s.ready and not s.leases]
        if not idle:
            return
        durations = sorted(s.generate_s for s in self.outcome.committed.values())
        median = durations[len(durations) // 2] if durations else 0.0
        threshold = max(self.cfg.run.speculate_after_s, 2 * median)
        now = time.monotonic()
        copies = {lease.index for lease in self.leases.values() if lease.speculative}
        stragglers = sorted((lease for lease in self.leases.values() if not lease.solo
                             and lease.index not in copies and now - lease.started > threshold),
                            key=lambda lease: lease.started)
        for slot, lease in zip(idle, stragglers, strict=False):
            log.warning("shard %s has run %.0fs (median %.0fs): racing a copy on worker %d; "
                        "the first commit wins", self.plan.shards[lease.index].name,
                        now - lease.started, median, slot.index)
            self._lease(slot, lease.index, lease.attempt, speculative=True)

    def _settle(self, ref) -> None:
        lease = self.leases.pop(ref)
        lease.slot.leases.discard(ref)
        index = lease.index
        cause = None  # why its worker died, if it did
        try:
            result = ray.get(ref)  # a ShardAttempt, or a probe's row count
        except RayActorError as e:
            cause = lease.killed or describe(e).split(" Some common causes")[0]  # Ray's advice is long
            reason = f"worker {lease.slot.index} {'was replaced' if lease.killed else 'died'}: {cause}"
            if lease.slot.actor is lease.actor:  # the first of its shards to report; replace it once
                self._replace(lease.slot, "died", counted=lease.probe is None)
        except RayTaskError as e:
            reason = describe(e)
            if isinstance(e.cause, FATAL_ERRORS):
                self._halt(index, e.cause)
                return
        else:
            if lease.probe is None:
                self._committed(index, result.summary)
            else:
                self._probed(lease, None)
            return
        if lease.probe is not None:  # only a death counts against a probe's rows, not a task error
            self._probed(lease, cause)
            return
        if index in self.outcome.committed or any(other.index == index for other in self.leases.values()):
            return  # another copy of this shard committed or is still running
        self._retry_or_fail(index, reason, cause)

    def _retry_or_fail(self, index: int, reason: str, cause: str | None) -> None:
        """A shard attempt ended without a commit (`cause`: why its worker died, if it did):
        narrow it, queue it again, or record it as failed once out of attempts."""
        shard = self.plan.shards[index].name
        if cause is not None:
            self.deaths[index] = self.deaths.get(index, 0) + 1
            if self._narrow(index, cause):
                return
        if self.attempts[index] >= self.cfg.run.max_attempts:
            log.error("shard %s failed after %d attempts: %s", shard, self.attempts[index], reason)
            self.outcome.failed[index] = reason
        else:
            log.warning("shard %s attempt %d failed, retrying: %s", shard, self.attempts[index], reason)
            if index in self.deaths:
                self.solo.appendleft((index, None))
            else:
                self.queue.appendleft(index)

    def _narrow(self, index: int, cause: str) -> bool:
        """Start narrowing a shard that killed its worker twice, if it has an attempt left
        for the run without its poison rows; False if it is not (or no longer) narrowed."""
        run = self.cfg.run
        if self.deaths[index] < 2 or index in self.narrowings or self.attempts[index] >= run.max_attempts:
            return False
        log.warning("shard %s: its worker died %d times (last: %s); probing its rows for the ones "
                    "that kill a worker alone", self.plan.shards[index].name, self.deaths[index], cause)
        self.narrowings[index] = Narrowing(self.plan.shards[index].num_rows)
        self._next_probes(index)
        return True

    def _probed(self, lease: _Lease, cause: str | None) -> None:
        narrowing = self.narrowings[lease.index]
        if cause is None:
            narrowing.passed(lease.probe)
        else:
            narrowing.died(lease.probe, cause)
        self._next_probes(lease.index)

    def _next_probes(self, index: int) -> None:
        narrowing = self.narrowings[index]
        self.solo.extend((index, rows) for rows in narrowing.take())
        if narrowing.done:  # the shard's last attempt runs without its poison rows
            self.skips[index] = narrowing.poison
            log.warning("shard %s: %d row(s) kill a worker alone %s; they become worker_died row "
                        "errors and the shard runs again", self.plan.shards[index].name,
                        len(narrowing.poison), sorted(narrowing.poison))
            self.solo.appendleft((index, None))

    def _halt(self, index: int, error: BaseException) -> None:
        """Stop handing out shards: `error` would fail every attempt of every shard."""
        if self.outcome.fatal is None:
            log.error("shard %s: %s; stopping the run (no retry can fix this)",
                      self.plan.shards[index].name, error)
            self.outcome.fatal = error
        self.stop.set()

    def _committed(self, index: int, summary: ShardSummary) -> None:
        if index in self.outcome.committed:
            return
        self.outcome.committed[index] = summary
        self.on_commit(summary)
        faults.point("committed")
        for ref, other in list(self.leases.items()):  # a raced copy lost: stop it
            if other.index == index and other.probe is None:
                ray.cancel(ref)
                del self.leases[ref]
                other.slot.leases.discard(ref)

    # ------------------------------------------------------------------ liveness

    def _poll_progress(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.ready and slot.progress_ref is None and now >= slot.next_poll:
                slot.progress_ref = slot.actor.progress.remote()
                slot.next_poll = now + PROGRESS_POLL_S

    def _record_progress(self, slot: _Slot, ref) -> None:
        slot.progress_ref = None
        info = _get_or_none(ref)
        if info is None:
            return
        self.live[slot.index] = info
        slot.busy, slot.context = info.busy, info.max_model_len
        if info.heartbeat != slot.heartbeat:
            slot.heartbeat = info.heartbeat
            slot.last_progress = time.monotonic()

    def _record_ready(self, slot: _Slot, ref) -> None:
        slot.ready_ref = None
        try:
            ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            self._replace(slot, f"the replacement failed to start: {describe(e)}")
            return
        slot.last_progress = time.monotonic()

    def _watchdog(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.ready:
                if now - slot.created > self.cfg.run.worker_start_timeout_s:
                    raise WorkerStartError(f"worker {slot.index}'s replacement was not ready after "
                                           f"{self.cfg.run.worker_start_timeout_s:.0f}s")
                continue
            stalled = now - slot.last_progress
            limit = hang_limit(self.cfg.run.hang_timeout_s, slot.busy, slot.context)
            if slot.leases and stalled > limit:
                reason = (f"its engine made no progress for {stalled:.0f}s (limit {limit:.0f}s) with "
                          f"{len(slot.leases)} shard(s) in hand (run.hang_timeout_s)")
                for ref in slot.leases:
                    self.leases[ref].killed = reason
                self._replace(slot, reason, counted=not self._probing(slot))


def hang_limit(timeout_s: float, busy: dict[str, Any], context: int) -> float:
    """Seconds without progress before a worker is called hung: run.hang_timeout_s per
    context's worth of prompt tokens in the engine's current step, and at least once. A
    step that prefills N full-length prompts is legal work that may take N times as long."""
    if not busy.get("in_step") or not context:
        return timeout_s
    return timeout_s * max(1.0, busy["step_tokens"] / context)


def worker_options(cfg: Config) -> dict[str, Any]:
    """Ray options of an engine worker: its resources, accelerator type and runtime_env."""
    run = cfg.run
    env = dict(run.runtime_env)
    env["env_vars"] = {**WORKER_ENV, **env.get("env_vars", {})}
    opts: dict[str, Any] = {"num_cpus": run.cpus_per_worker, "num_gpus": run.gpus_per_worker,
                            "runtime_env": env}
    if run.accelerator_type:
        opts["accelerator_type"] = run.accelerator_type
    return opts


def gpu_task_options(cfg: Config) -> dict[str, Any]:
    """Options of a one-off task that must run where a worker would (e.g. an engine build)."""
    return {**worker_options(cfg), "num_gpus": max(1, cfg.run.gpus_per_worker), "max_retries": 0}


def _get_or_none(ref) -> Any:
    try:
        return ray.get(ref, timeout=0)
    except (RayActorError, RayTaskError, GetTimeoutError):
        return None
