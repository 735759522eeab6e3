"""What one scheduler run did (`Outcome`), with the timeline of its shard attempts
(`Timeline`): what the runner turns into the manifest. Pure: no Ray, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from batchinfer.lease_book import Lease
from batchinfer.records import Attempt, ShardSummary, WorkerRestart


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
    tail_s: float | None = None
    """Seconds from the last shard handed out to the last commit."""
    engines: list[dict[str, Any]] = field(default_factory=list)
    """Each ready worker's `Engine.stats` up to the last shard handed out, at the end."""
    attempts: list[Attempt] = field(default_factory=list)
    """Every shard attempt started (probes aside), in start order, with how it ended."""
    worker_restarts: list[WorkerRestart] = field(default_factory=list)
    busy_s: float | None = None
    """Seconds, summed over workers (replaced ones included), an engine held a request;
    None if no worker reported it."""
    engine_restarts: int | None = None
    """Engine restarts in place, summed over workers (replaced ones included, as of their
    last report); None if no worker reported."""


class Timeline:
    """The shard attempts of a run as they start and end (`Outcome.attempts`), for the
    report: a lease's attempt is recorded when it starts and closed once, by the first
    thing that ends it."""

    def __init__(self) -> None:
        self.attempts: dict[int, dict[str, Any]] = {}

    def start(self, lease: Lease) -> None:
        if lease.probe is None:
            self.attempts[lease.id] = {"shard": lease.shard, "worker": lease.slot, "attempt": lease.attempt,
                                       "started_at": time.time(), "speculative": lease.speculative}

    def end(self, lease_id: int, outcome: str, reason: str | None = None) -> None:
        entry = self.attempts.get(lease_id)
        if entry is not None and "outcome" not in entry:
            entry.update(ended_at=time.time(), outcome=outcome, reason=reason)

    def end_slot(self, slot: int, outcome: str, reason: str) -> None:
        """End every open attempt on a worker (replaced: its calls will not return)."""
        for lease_id, entry in self.attempts.items():
            if entry["worker"] == slot and "outcome" not in entry:
                self.end(lease_id, outcome, reason)

    def last_worker(self, shard: int) -> int:
        """The worker of the shard's latest attempt (-1 if none started)."""
        workers = [e["worker"] for e in self.attempts.values() if e["shard"] == shard]
        return workers[-1] if workers else -1

    def records(self, committed: dict[int, ShardSummary]) -> list[Attempt]:
        """Every attempt; those still open are `unfinished` (the run stopped first). The
        attempt whose part a shard's commit holds (`committed`: its summary) is `committed`,
        also when its worker died before it could say so (its call ended in a death)."""
        for lease_id in self.attempts:
            self.end(lease_id, "unfinished")
        winners = {(s.shard, s.attempt, s.worker) for s in committed.values()}
        for entry in self.attempts.values():
            key = (entry["shard"], entry["attempt"], entry["worker"])
            if key in winners and entry["outcome"] != "committed":
                entry["reason"] = f"its part is the shard's commit; the call ended {entry['outcome']}"
                entry["outcome"] = "committed"
        return [Attempt(**e) for e in self.attempts.values()]
