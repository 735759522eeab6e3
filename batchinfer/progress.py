"""Progress on the driver: a tqdm bar on a terminal, a plain line every so often in logs
(with --log-format json: a "progress" log record with the numbers as fields, never a bar)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from batchinfer import logs
from batchinfer.records import WorkerProgress

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, *, total_shards: int, total_rows: int, done_shards: int, done_rows: int,
                 stream: TextIO | None = None, enabled: bool = True, interval_s: float = 30.0):
        self.stream = stream or sys.stderr
        self.total_shards, self.total_rows = total_shards, total_rows
        self.done_shards, self.done_rows = done_shards, done_rows
        self.started = time.monotonic()
        self.enabled = enabled
        self.json = logs.active_format() == "json"
        self.tty = enabled and not self.json and self.stream.isatty()
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=total_rows, initial=done_rows, unit="row", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)
        self.interval_s = interval_s
        self.next_line = self.started + interval_s
        self.rows = done_rows
        self.tokens = 0
        self.shards = done_shards
        self.failed = 0

    def update(self, committed_shards: int, committed_rows: int, live: dict[int, WorkerProgress],
               failed: int) -> None:
        """This run's shards and rows committed so far (running totals: the scheduler calls
        this every loop, so nothing here may grow with the shards committed), each live
        worker's report, and the shards failed."""
        live_rows = sum(p.rows for p in live.values())
        self.rows = min(self.total_rows, self.done_rows + max(committed_rows, live_rows))
        self.tokens = sum(p.completion_tokens for p in live.values())
        self.shards = self.done_shards + committed_shards
        self.failed = failed
        if self.bar is not None:
            self.bar.n = self.rows
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.refresh()
        elif self.enabled and time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + self.interval_s
            if self.json:
                log.info("progress", extra=self.fields())
            else:
                print(self.line(), file=self.stream, flush=True)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def _postfix(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"shards {self.shards}/{self.total_shards}{failed}, {self.tokens_per_s():.0f} tok/s"

    def line(self) -> str:
        pct = 100.0 * self.rows / max(self.total_rows, 1)
        elapsed = time.monotonic() - self.started
        eta_s = self._eta_s(elapsed)
        eta = "" if eta_s is None else f", eta {_duration(eta_s)}"
        return (f"progress: {self.rows}/{self.total_rows} rows ({pct:.0f}%), "
                f"{self._postfix()}, elapsed {_duration(elapsed)}{eta}")

    def fields(self) -> dict[str, Any]:
        """The progress as numbers: the fields of a JSON "progress" record."""
        elapsed = time.monotonic() - self.started
        eta_s = self._eta_s(elapsed)
        return {"rows_done": self.rows, "rows_total": self.total_rows,
                "shards_done": self.shards, "shards_total": self.total_shards,
                "shards_failed": self.failed, "tokens_per_s": round(self.tokens_per_s(), 1),
                "elapsed_s": round(elapsed, 1), "eta_s": None if eta_s is None else round(eta_s, 1)}

    def _eta_s(self, elapsed: float) -> float | None:
        """Seconds left at this run's pace so far; None before it has done a row."""
        new_rows = self.rows - self.done_rows
        return elapsed * (self.total_rows - self.rows) / new_rows if new_rows > 0 else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
