"""Driver side: start the workers, hand out shards pull-style, retry, track progress.

Each worker holds up to `run.shards_per_worker` shards; when one comes back the worker
gets the next from the queue, so fast workers take more shards and nobody waits on a
static split. Only shard indexes go out and small summaries come back: the driver's
state is O(shards), never O(rows).
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

from batchinfer.config import Config
from batchinfer.plan import Plan
from batchinfer.progress import Progress
from batchinfer.worker import ShardWorker

log = logging.getLogger(__name__)

POLL_S = 0.5
# Workers log to files (forwarded to the driver): no progress bars or tokenizer fork warnings.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
PROGRESS_POLL_S = 2.0


class WorkerStartError(RuntimeError):
    """No worker could load its engine; the message carries the worker's own error."""


@dataclass
class Outcome:
    committed: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Summaries of shards committed by this run, by shard index."""
    failed: dict[int, str] = field(default_factory=dict)
    """Shards that used up their attempts, with the last reason."""
    interrupted: bool = False
    """A stop was requested before the queue was done."""


@dataclass
class _Slot:
    index: int
    actor: Any
    inflight: set = field(default_factory=set)
    replacements: int = 0


class Scheduler:
    def __init__(self, *, cfg: Config, plan: Plan, stop: threading.Event,
                 on_commit: Callable[[dict[str, Any]], None] = lambda s: None):
        self.cfg = cfg
        self.plan = plan
        self.stop = stop
        self.on_commit = on_commit
        self.plan_ref = ray.put(plan)
        self.slots: list[_Slot] = []

    # ------------------------------------------------------------------ workers

    def _new_actor(self, index: int):
        opts = {**worker_options(self.cfg), "max_restarts": 0, "max_task_retries": 0}
        return ray.remote(ShardWorker).options(**opts).remote(
            config=self.cfg, plan=self.plan_ref, worker_index=index)

    def start_workers(self, timeout_s: float) -> list[dict[str, Any]]:
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
                    raise WorkerStartError(f"worker {slot.index} failed to start: {_reason(e)}") from None
            now = time.monotonic()
            if refs and now > deadline:
                raise WorkerStartError(
                    f"{len(refs)} of {len(self.slots)} workers not ready after {timeout_s:.0f}s; "
                    f"each asks for {self._resources()} (check `ray status` for free resources)")
            if refs and now > next_note:
                log.warning("waiting for workers: %d/%d ready (each asks for %s)",
                            len(infos), len(self.slots), self._resources())
                next_note = now + 30
        return sorted(infos, key=lambda i: i["worker"])

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
        queue = deque(pending)
        attempts: dict[int, int] = {}
        inflight: dict[Any, tuple[_Slot, int, Any]] = {}
        outcome = Outcome()
        live: dict[int, dict[str, int]] = {}
        progress_refs: dict[Any, int] = {}
        next_poll = 0.0
        stop_deadline = None
        while queue or inflight:
            if self.stop.is_set():
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self.cfg.run.stop_grace_s
                    log.warning("stop requested: no new shards; waiting up to %ss for %d in flight",
                                self.cfg.run.stop_grace_s, len(inflight))
                if not inflight or time.monotonic() > stop_deadline:
                    outcome.interrupted = True
                    break
            else:
                self._fill(queue, attempts, inflight)
            done, _ = ray.wait(list(inflight) + list(progress_refs), num_returns=1, timeout=POLL_S)
            for ref in done:
                if ref in progress_refs:
                    live[progress_refs.pop(ref)] = _get_or_none(ref) or {}
                    continue
                slot, index, actor = inflight.pop(ref)
                slot.inflight.discard(ref)
                self._settle(ref, slot, actor, index, queue, attempts, outcome)
            if time.monotonic() >= next_poll and not progress_refs:
                progress_refs = {s.actor.progress.remote(): s.index for s in self.slots}
                next_poll = time.monotonic() + PROGRESS_POLL_S
            progress.update(outcome.committed, live, len(outcome.failed))
        return outcome

    def _fill(self, queue: deque, attempts: dict[int, int], inflight: dict) -> None:
        for slot in self.slots:
            while queue and len(slot.inflight) < self.cfg.run.shards_per_worker:
                index = queue.popleft()
                attempts[index] = attempts.get(index, 0) + 1
                ref = slot.actor.process.remote(index, attempts[index])
                slot.inflight.add(ref)
                inflight[ref] = (slot, index, slot.actor)

    def _settle(self, ref, slot: _Slot, actor: Any, index: int, queue: deque,
                attempts: dict[int, int], outcome: Outcome) -> None:
        try:
            summary = ray.get(ref)
        except RayActorError as e:
            reason = f"worker {slot.index} died: {_reason(e)}"
            if slot.actor is actor:  # the first of its shards to report; replace it once
                self._replace(slot, reason)
        except RayTaskError as e:
            reason = _reason(e)
        else:
            outcome.committed[index] = summary
            self.on_commit(summary)
            return
        shard = self.plan.shards[index].name
        if attempts[index] >= self.cfg.run.max_attempts:
            log.error("shard %s failed after %d attempts: %s", shard, attempts[index], reason)
            outcome.failed[index] = reason
        else:
            log.warning("shard %s attempt %d failed, retrying: %s", shard, attempts[index], reason)
            queue.appendleft(index)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Swap a dead worker for a fresh one; its other shards come back as failed attempts too."""
        if slot.replacements >= self.cfg.run.max_attempts * 2:
            raise WorkerStartError(f"worker {slot.index} died {slot.replacements + 1} times; last: {reason}")
        slot.replacements += 1
        log.warning("worker %d died, starting a replacement (%d so far): %s",
                    slot.index, slot.replacements, reason)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.actor = self._new_actor(slot.index)


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


def _reason(e: BaseException) -> str:
    """The last meaningful line of a Ray error: the worker's own exception message."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, (RayActorError, RayTaskError)):
        return f"{type(cause).__name__}: {cause}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
