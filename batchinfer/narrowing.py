"""Narrowing a poison shard: the rows that kill a worker on their own, found by bisection.

A shard whose attempts keep ending with their worker dead (a crash of the process, or a
hang the watchdog ended) may hold a row that takes down any worker that runs it. Failing
the whole shard would lose its innocent rows with it. Instead the driver runs halves of
the shard's rows as probes on workers, without committing anything, and halves again
each range whose worker died, until only single rows that kill a worker alone remain.
The shard then runs once more with those rows recorded as `worker_died` row errors.

Pure bookkeeping, no Ray: the scheduler hands out `take()`'s ranges and reports back.
"""

from __future__ import annotations


class Narrowing:
    """The search for one shard's poison rows (row numbers within the shard)."""

    def __init__(self, rows: int):
        self.poison: dict[int, str] = {}
        """Rows that killed a worker alone, with the reason the worker died."""
        # The shard's deaths may have been another shard's doing (a worker holds several),
        # so even a one-row shard is probed alone before its row is called poison.
        everything, half = list(range(rows)), rows // 2
        self._todo = [r for r in (everything[:half], everything[half:]) if r]
        self._running = 0

    def take(self) -> list[list[int]]:
        """Ranges to probe now, each on a worker of its own."""
        ranges, self._todo = self._todo, []
        self._running += len(ranges)
        return ranges

    def passed(self, rows: list[int]) -> None:
        """A probe of `rows` ended without killing its worker: none of them is poison alone."""
        self._running -= 1

    def died(self, rows: list[int], reason: str) -> None:
        """The worker running a probe of `rows` died: a single row is poison; more rows are
        probed again in halves."""
        self._running -= 1
        if len(rows) == 1:
            self.poison[rows[0]] = reason
        else:
            half = len(rows) // 2
            self._todo += [rows[:half], rows[half:]]

    @property
    def done(self) -> bool:
        return not self._todo and not self._running
