"""Driver side: start the workers, hand out shards pull-style, retry, track progress.

Each worker holds a few shards (lease_book.py says how many); when one comes back the worker
gets the next from the queue, so fast workers take more shards and nobody waits on a
static split. Only shard indexes go out and small summaries come back: the driver's
state is O(shards), never O(rows).

What to hand out, retry, narrow, race or replace is decided by batchinfer/lease_book.py
(pure, unit-tested without Ray); this module starts, polls and replaces the Ray actors,
carries out the book's decisions and logs them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from batchinfer import faults, logs, storage
from batchinfer.config import Config
from batchinfer.errors import describe
from batchinfer.lease import LeaseLost
from batchinfer.lease_book import (
    Cancel,
    Commit,
    Decision,
    Fail,
    GiveUp,
    Lease,
    LeaseBook,
    Narrow,
    Poisoned,
    Race,
    Replace,
    Retry,
    Rules,
    Start,
    hang_limit,
)
from batchinfer.metrics import DriverMetrics, run_label
from batchinfer.outcome import Outcome, Timeline
from batchinfer.plan import Plan
from batchinfer.progress import Progress
from batchinfer.records import ShardSummary, WorkerInfo, WorkerProgress, WorkerRestart
from batchinfer.worker import ShardWorker

__all__ = ["Outcome", "Scheduler", "WorkerStartError", "gpu_task_options", "hang_limit",
           "worker_options"]

log = logging.getLogger(__name__)

POLL_S = 0.5
# Workers log to files (forwarded to the driver): no progress bars or tokenizer fork warnings.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
PROGRESS_POLL_S = 2.0
STATS_TIMEOUT_S = 2.0
# Errors from a shard attempt that no retry can fix: the run stops handing out shards.
# InputChanged and output errors (no space, read-only, permission) are StorageErrors.
FATAL_ERRORS = (storage.StorageError, LeaseLost)


class WorkerStartError(RuntimeError):
    """No worker could load its engine; the message carries the worker's own error."""


@dataclass
class _Slot:
    """One worker position's actor and its pending calls; its actor is replaced when it
    dies or hangs (the book keeps what is known of the position)."""

    index: int
    actor: Any
    ready_ref: Any = None
    """The pending ready() call of a replacement actor; None once the actor is ready."""
    progress_ref: Any = None
    next_poll: float = 0.0

    @property
    def ready(self) -> bool:
        return self.ready_ref is None


class Scheduler:
    """Leases shards to workers, as a LeaseBook decides. A lease ends when the shard
    commits, when its worker dies, or when its worker's engine stops making progress for
    run.hang_timeout_s (the worker is then replaced). A shard whose lease ended without a
    commit goes back to the queue for another attempt, up to run.max_attempts; then it is
    recorded as failed. A shard whose worker died twice, with an attempt left, is narrowed
    first."""

    def __init__(self, *, cfg: Config, plan: Plan, stop: threading.Event, generation: int,
                 on_commit: Callable[[ShardSummary], None] = lambda s: None,
                 on_fail: Callable[[int], None] = lambda shard: None):
        self.cfg = cfg
        self.metrics = DriverMetrics(run_label(cfg.output.path, cfg.run.name))
        self.plan = plan
        self.stop = stop
        self.generation = generation
        self.on_commit = on_commit
        self.on_fail = on_fail
        self.plan_ref = ray.put(plan)
        self.slots: list[_Slot] = []
        self.infos: list[WorkerInfo] = []

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
        self.infos = sorted(infos, key=lambda i: i.worker)
        return self.infos

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

    # ------------------------------------------------------------------ the loop

    def run(self, pending: list[int], progress: Progress) -> Outcome:
        self.book = LeaseBook(rules=Rules.from_run(self.cfg.run),
                              rows=[shard.num_rows for shard in self.plan.shards],
                              pending=pending, slots=len(self.slots), now=time.monotonic())
        for info in self.infos:  # what each worker said when it was ready
            self.book.slots[info.worker].window = info.window
        self.outcome = Outcome(committed=self.book.committed, failed=self.book.failed)
        self.timeline = Timeline()
        self.last_handout: float | None = None  # time.time() of the last shard handed out
        self.last_commit: float | None = None
        self.committed_rows = 0
        self.live: dict[int, WorkerProgress] = {}
        self.replaced: list[WorkerProgress] = []  # the last reports of replaced workers
        while self.book.unfinished:
            now = time.monotonic()
            if self.stop.is_set():
                if self.book.stop(now):
                    log.warning("stop requested: no new shards; waiting up to %ss for %d in flight",
                                self.cfg.run.stop_grace_s, len(self.book.leases))
                if self.book.interrupted(now):
                    self.outcome.interrupted = True
                    break
            else:
                first = not self.book.leases and not self.book.committed
                self._carry_out(self.book.fill(now), first_of_run=first)
                self._carry_out(self.book.speculate(now))
            self._wait_and_dispatch()
            self._poll_progress()
            self._carry_out(self.book.watchdog(time.monotonic()))
            self.metrics.scheduling(len(self.book.queue) + len(self.book.solo), self._leases_by_worker())
            progress.update(len(self.outcome.committed), self.committed_rows, self.live,
                            len(self.outcome.failed))
        if self.last_commit is not None and self.last_handout is not None:
            self.outcome.tail_s = round(max(0.0, self.last_commit - self.last_handout), 3)
        self.outcome.engines = self._engine_stats()
        self._worker_totals()
        self.outcome.attempts = self.timeline.records(self.book.committed)
        self.metrics.finished()
        return self.outcome

    def _leases_by_worker(self) -> dict[int, int]:
        held = {slot.index: 0 for slot in self.slots}
        for lease in self.book.leases.values():
            held[lease.slot] = held.get(lease.slot, 0) + 1
        return held

    def _ask_ready(self, call: Callable[[Any], Any]) -> dict[int, Any]:
        """`call(actor)` (a remote call) on every ready worker at once: the answers, by worker
        index, of those that answer within a few seconds. A dead, failed or slow worker is
        left out (these are reports at the end of the run, not work)."""
        refs = {call(slot.actor): slot.index for slot in self.slots if slot.ready}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=STATS_TIMEOUT_S) if refs else ([], [])
        answers = {refs[ref]: _get_or_none(ref) for ref in done}
        return {index: answer for index, answer in answers.items() if answer is not None}

    def _engine_stats(self) -> list[dict[str, Any]]:
        """Every ready worker's engine accounting, up to the last shard handed out."""
        if self.stop.is_set():  # stopping: nothing more to wait for
            return []
        stats = self._ask_ready(lambda actor: actor.stats.remote(self.last_handout))
        return [{"worker": index, **stats[index]} for index in sorted(stats) if stats[index]]

    def _worker_totals(self) -> None:
        """What the workers counted themselves (`Outcome.busy_s`, `Outcome.engine_restarts`):
        their last progress reports (the final ones asked for now), plus those of the workers
        they replaced."""
        self.live.update(self._ask_ready(lambda actor: actor.progress.remote()))
        reports = [*self.live.values(), *self.replaced]
        if reports:
            self.outcome.busy_s = round(sum(p.busy_s for p in reports), 3)
            self.outcome.engine_restarts = sum(p.engine_restarts for p in reports)

    def _wait_and_dispatch(self) -> None:
        waiting = {**{lease.ticket: ("lease", lease.id) for lease in self.book.leases.values()},
                   **{s.progress_ref: ("progress", s) for s in self.slots if s.progress_ref is not None},
                   **{s.ready_ref: ("ready", s) for s in self.slots if s.ready_ref is not None}}
        if not waiting:
            time.sleep(POLL_S)
            return
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
        for ref in done:
            kind, what = waiting[ref]
            if kind == "lease":
                self._settle(what, ref)
            elif kind == "progress":
                self._record_progress(what, ref)
            else:
                self._record_ready(what, ref)

    def _settle(self, lease_id: int, ref) -> None:
        lease = self.book.leases.get(lease_id)
        if lease is None:  # a copy cancelled since: its result does not count
            return
        try:
            result = ray.get(ref)  # a ShardAttempt, or a probe's row count
        except RayActorError as e:
            error = describe(e).split(" Some common causes")[0]  # Ray's advice is long
            self.timeline.end(lease_id, "worker_died", lease.killed or error)
            decisions = self.book.died(lease_id, error, time.monotonic())
        except RayTaskError as e:
            self.timeline.end(lease_id, "error", describe(e))
            if isinstance(e.cause, FATAL_ERRORS):
                self.book.drop(lease_id)
                self._halt(lease.shard, e.cause)
                return
            decisions = self.book.errored(lease_id, describe(e))
        else:
            if lease.probe is None:
                self.timeline.end(lease_id, "committed" if result.won else "lost")
            decisions = self.book.succeeded(lease_id, result.summary if lease.probe is None else None)
        self._carry_out(decisions)

    def _halt(self, index: int, error: BaseException) -> None:
        """Stop handing out shards: `error` would fail every attempt of every shard."""
        if self.outcome.fatal is None:
            log.error("shard %s: %s; stopping the run (no retry can fix this)",
                      self.plan.shards[index].name, error, extra={"shard": index})
            self.outcome.fatal = error
        self.stop.set()

    # ------------------------------------------------------------------ carrying out decisions

    def _carry_out(self, decisions: list[Decision], first_of_run: bool = False) -> None:
        for decision in decisions:
            _HANDLERS[type(decision)](self, decision)
            if first_of_run:  # the first shard of the run was just handed out
                first_of_run = False
                if isinstance(decision, Start) and not decision.lease.solo:
                    faults.point("first-shard")

    def _start(self, lease: Lease) -> None:
        self.timeline.start(lease)
        actor = self.slots[lease.slot].actor
        if lease.probe is None:
            if not lease.speculative:
                self.last_handout = time.time()
            lease.ticket = actor.process.remote(lease.shard, lease.attempt, lease.skip)
        else:
            lease.ticket = actor.probe.remote(lease.shard, lease.probe)

    def _race(self, race: Race) -> None:
        if race.queued:
            log.info("shard %s waits behind another shard on its worker: worker %d (idle) runs "
                     "a copy too; the first commit wins", self._name(race.lease.shard), race.lease.slot,
                     extra=_about(race.lease.slot, race.lease.shard))
            self._start(race.lease)
            return
        log.warning("shard %s has run %.0fs (median %.0fs): racing a copy on worker %d; "
                    "the first commit wins", self._name(race.lease.shard), race.ran_s,
                    race.median_s, race.lease.slot, extra=_about(race.lease.slot, race.lease.shard))
        self._start(race.lease)

    def _commit(self, commit: Commit) -> None:
        self.metrics.shard_committed(commit.summary)
        self.last_commit = time.time()
        self.committed_rows += commit.summary.rows
        self.on_commit(commit.summary)
        faults.point("committed")

    def _cancel(self, cancel: Cancel) -> None:
        self.timeline.end(cancel.lease.id, "cancelled", "another copy of the shard committed first")
        ray.cancel(cancel.lease.ticket)

    def _replace(self, replace: Replace) -> None:
        """Swap a dead or hung worker for a fresh one; the shards it held come back as failed
        attempts (the book already counts them)."""
        slot = self.slots[replace.slot]
        self.timeline.end_slot(slot.index, "worker_died", f"worker {slot.index} {replace.reason}")
        self.outcome.worker_restarts.append(WorkerRestart(worker=slot.index, at=time.time(),
                                                          reason=replace.reason))
        self.metrics.worker_restarted(slot.index)
        if slot.index in self.live:  # what the replaced worker counted, for the run's totals
            self.replaced.append(self.live.pop(slot.index))
        log.warning("worker %d: %s; starting a replacement (%s)", slot.index, replace.reason,
                    f"{replace.replacements} so far" if replace.counted
                    else "lost to a narrowing probe, not counted", extra=_about(slot.index))
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.actor = self._new_actor(slot.index)
        slot.ready_ref, slot.progress_ref = slot.actor.ready.remote(), None

    def _name(self, index: int) -> str:
        return self.plan.shards[index].name

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
        self.book.observe(slot.index, heartbeat=info.heartbeat, busy=info.busy,
                          context=info.max_model_len, now=time.monotonic(), rows=info.rows,
                          window=info.window)

    def _record_ready(self, slot: _Slot, ref) -> None:
        slot.ready_ref = None
        try:
            self.book.slots[slot.index].window = ray.get(ref).window
        except (RayActorError, RayTaskError) as e:
            self._carry_out([self.book.replace(slot.index, f"the replacement failed to start: "
                                                           f"{describe(e)}", time.monotonic())])
            return
        self.book.ready(slot.index, time.monotonic())


def _give_up(_: Scheduler, give_up: GiveUp) -> None:
    raise WorkerStartError(give_up.message)


def _about(worker: int, shard: int | None = None) -> dict[str, int]:
    """The `worker` and `shard` fields of a driver log record about them (logs.py)."""
    return {"worker": worker} if shard is None else {"worker": worker, "shard": shard}


def _note(level: int, message: str, *fields: str) -> Callable[[Scheduler, Any], None]:
    """A decision the scheduler only logs: `message` with the shard's name, then `fields`."""
    def handler(scheduler: Scheduler, decision: Any) -> None:
        log.log(level, message, scheduler._name(decision.shard),
                *(getattr(decision, f) for f in fields),
                extra=_about(scheduler.timeline.last_worker(decision.shard), decision.shard))
    return handler


def _counted(handler: Callable[[Scheduler, Any], None],
             count: Callable[[Scheduler, Any], None]) -> Callable[[Scheduler, Any], None]:
    """`handler`, then `count` the decision in the run's metrics."""
    def both(scheduler: Scheduler, decision: Any) -> None:
        handler(scheduler, decision)
        count(scheduler, decision)
    return both


def _poisoned(scheduler: Scheduler, poisoned: Poisoned) -> None:
    log.warning("shard %s: %d row(s) kill a worker alone %s; they become worker_died row "
                "errors and the shard runs again", scheduler._name(poisoned.shard),
                len(poisoned.rows), sorted(poisoned.rows), extra={"shard": poisoned.shard})


_HANDLERS: dict[type, Callable[[Scheduler, Any], None]] = {
    Start: lambda s, d: s._start(d.lease),
    Race: Scheduler._race,
    Commit: Scheduler._commit,
    Cancel: Scheduler._cancel,
    Replace: Scheduler._replace,
    GiveUp: _give_up,
    Retry: _counted(_note(logging.WARNING, "shard %s attempt %d failed, retrying: %s", "attempt", "reason"),
                    lambda s, d: s.metrics.shard_retried(s.timeline.last_worker(d.shard))),
    Fail: _counted(_note(logging.ERROR, "shard %s failed after %d attempts: %s", "attempts", "reason"),
                   lambda s, d: (s.metrics.shard_failed(), s.on_fail(d.shard))),
    Narrow: _note(logging.WARNING, "shard %s: its worker died %d times (last: %s); probing its "
                  "rows for the ones that kill a worker alone", "deaths", "cause"),
    Poisoned: _poisoned,
}


def worker_options(cfg: Config) -> dict[str, Any]:
    """Ray options of an engine worker: its resources, accelerator type and runtime_env."""
    run = cfg.run
    env = dict(run.runtime_env)
    env["env_vars"] = {**WORKER_ENV, **logs.worker_env(), **env.get("env_vars", {})}
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
