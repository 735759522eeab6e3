"""The run's live metrics, recorded through Ray's metrics API (`ray.util.metrics`) and
exported by Ray's own Prometheus endpoint on every node (no second exporter).

Ray exports a metric `batchinfer_x` as `ray_batchinfer_x`, a counter as
`ray_batchinfer_x_total`, a histogram as `ray_batchinfer_x_bucket|_sum|_count`. Every
process exports its own series (Ray adds `WorkerId`, `NodeAddress`, `SessionName`, ...),
so queries sum: `sum by (worker) (rate(ray_batchinfer_rows_total{run="..."}[1m]))`.
configs/grafana/batchinfer.json is a dashboard of all of them.

| metric (Prometheus name)                     | type      | labels              | unit    | recorded by |
| -------------------------------------------- | --------- | ------------------- | ------- | ----------- |
| batchinfer_rows (`_total`)                   | counter   | run, worker, status | rows    | driver: rows of committed shards; status ok or failed |
| batchinfer_row_errors (`_total`)             | counter   | run, worker, code   | rows    | driver: failed rows by error code (`prompt_too_long`, ...) |
| batchinfer_prompt_tokens (`_total`)          | counter   | run, worker         | tokens  | driver: input tokens of committed shards |
| batchinfer_completion_tokens (`_total`)      | counter   | run, worker         | tokens  | driver: output tokens of committed shards |
| batchinfer_shards_committed (`_total`)       | counter   | run, worker         | shards  | driver |
| batchinfer_shard_duration_seconds            | histogram | run, worker         | seconds | driver: a committed attempt's generate_s |
| batchinfer_shard_retries (`_total`)          | counter   | run, worker         | attempts | driver: attempts that ended without a commit and went back to the queue |
| batchinfer_shards_failed (`_total`)          | counter   | run                 | shards  | driver: shards that used up their attempts |
| batchinfer_engine_restarts (`_total`)        | counter   | run, worker         | restarts | worker: engine restarts in place, whether or not its shard attempt then committed |
| batchinfer_worker_restarts (`_total`)        | counter   | run, worker         | restarts | driver: worker actors replaced |
| batchinfer_queue_depth                       | gauge     | run                 | shards  | driver: shards waiting to be handed out |
| batchinfer_leases                            | gauge     | run, worker         | shards  | driver: shards a worker holds |
| batchinfer_in_flight_requests                | gauge     | run, worker         | requests | worker: requests in its engine |
| batchinfer_engine_busy_seconds (`_total`)    | counter   | run, worker         | seconds | worker: time its engine held at least one request |
| batchinfer_row_retries (`_total`)            | counter   | run, worker         | requests | worker: requests run again after a retryable error |

Row retries are counted by the worker as they happen (`WorkerMetrics.row_retried`), not
from the committed shard's `row_retries` too, which would count each twice; they include
retries of attempts that did not commit, so they can exceed the manifest's
`this_run.row_retries`.

Ray keeps a gauge only while it is set again: the node's agent drops a series not
refreshed within two report intervals (Ray 2.60; `RAY_metrics_report_interval_ms`,
10 s by default). So gauges are set continually: `DriverMetrics.scheduling` on every
scheduler loop, `WorkerMetrics.in_flight` at every change and on every progress poll.
Counters stay until the node stops. A histogram's `_sum` is approximate (Ray rebuilds
it from bucket midpoints); its buckets and `_count` are exact.

Recording never raises into a run, and does nothing in a process without Ray
initialized (create `DriverMetrics` after `ray.init`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchinfer.records import ShardSummary

__all__ = ["METRICS", "SHARD_DURATION_BOUNDARIES", "DriverMetrics", "MetricDef", "WorkerMetrics",
           "metrics_endpoint", "run_label"]

log = logging.getLogger(__name__)

SHARD_DURATION_BOUNDARIES = (1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800,
                             2700, 3600, 5400, 7200)
"""Seconds: shards of a second to two hours. Every process must use the same bounds (the
node's agent registers a histogram once and skips points with other bounds)."""


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str
    """counter | gauge | histogram"""
    labels: tuple[str, ...]
    description: str

    @property
    def exported(self) -> tuple[str, ...]:
        """The series names Prometheus shows for it."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


_RW = ("run", "worker")
METRICS: dict[str, MetricDef] = {d.name: d for d in (
    MetricDef("batchinfer_rows", "counter", (*_RW, "status"),
              "Rows of committed shards, by status (ok, failed)."),
    MetricDef("batchinfer_row_errors", "counter", (*_RW, "code"),
              "Failed rows of committed shards, by error code."),
    MetricDef("batchinfer_prompt_tokens", "counter", _RW, "Input tokens of committed shards."),
    MetricDef("batchinfer_completion_tokens", "counter", _RW, "Output tokens of committed shards."),
    MetricDef("batchinfer_shards_committed", "counter", _RW, "Shards committed."),
    MetricDef("batchinfer_shard_duration_seconds", "histogram", _RW,
              "Seconds from a committed attempt's start to its last row's result."),
    MetricDef("batchinfer_shard_retries", "counter", _RW,
              "Shard attempts that ended without a commit and were queued again, by the "
              "worker they ran on."),
    MetricDef("batchinfer_shards_failed", "counter", ("run",),
              "Shards that used up their attempts."),
    MetricDef("batchinfer_engine_restarts", "counter", _RW,
              "Engine restarts in place, counted by the worker as they happen."),
    MetricDef("batchinfer_worker_restarts", "counter", _RW,
              "Worker actors replaced (died, hung or failed to start)."),
    MetricDef("batchinfer_queue_depth", "gauge", ("run",), "Shards waiting to be handed out."),
    MetricDef("batchinfer_leases", "gauge", _RW, "Shards a worker holds."),
    MetricDef("batchinfer_in_flight_requests", "gauge", _RW, "Requests in a worker's engine."),
    MetricDef("batchinfer_engine_busy_seconds", "counter", _RW,
              "Seconds a worker's engine held at least one request."),
    MetricDef("batchinfer_row_retries", "counter", _RW,
              "Requests run again after a retryable error."),
)}
"""Every metric batchinfer records, by its name in Ray (Prometheus adds `ray_`)."""


def run_label(output_url: str, name: str | None = None) -> str:
    """The `run` label: `name` (run.name) if given, else the output path's last component
    and the first 8 hex digits of the sha256 of its URL, e.g. `local-3fa2b9c0` (two runs
    writing to folders of the same name stay apart). A local path counts as its absolute
    path, so `out/local/`, `out/local` and `./out/local` are one run."""
    if name:
        return name
    url = output_url if "://" in output_url else os.path.abspath(output_url)
    url = url.rstrip("/")
    last = url.rsplit("/", 1)[-1] or "run"
    return f"{last}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def metrics_endpoint() -> str | None:
    """The URL of this node's Prometheus endpoint (Ray's metrics export port), for the log
    at run start; None if Ray is not initialized here or does not say."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                host, port = node.get("NodeManagerAddress"), node.get("MetricsExportPort")
                if not host or not port or int(port) <= 0:
                    return None
                host = f"[{host}]" if ":" in host else host  # IPv6
                return f"http://{host}:{int(port)}/metrics"
    except Exception as e:  # a log line is not worth failing a run over
        log.debug("no metrics endpoint: %s", e)
    return None


# ---------------------------------------------------------------------- recording

_instruments: dict[str, Any] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def _instrument(name: str) -> Any:
    """This process's Ray metric object for `name`, made once (runs in one driver process,
    e.g. tests, share it; the run and worker are tags of each record)."""
    metric = _instruments.get(name)
    if metric is None:
        from ray.util import metrics as ray_metrics

        d = METRICS[name]
        with _lock:
            metric = _instruments.get(name)
            if metric is None:
                if d.kind == "histogram":
                    metric = ray_metrics.Histogram(name, description=d.description,
                                                   boundaries=list(SHARD_DURATION_BOUNDARIES),
                                                   tag_keys=d.labels)
                else:
                    cls = ray_metrics.Counter if d.kind == "counter" else ray_metrics.Gauge
                    metric = cls(name, description=d.description, tag_keys=d.labels)
                _instruments[name] = metric
    return metric


def _guarded(method: Callable) -> Callable:
    """Metrics never fail a run: an error is logged (a warning once per method and process)
    and the call does nothing; so does every call where Ray is not initialized."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as e:
            level = logging.DEBUG if method.__name__ in _warned else logging.WARNING
            _warned.add(method.__name__)
            log.log(level, "metrics: %s failed, not recorded: %r", method.__name__, e)
    return wrapper


class _Recorder:
    def __init__(self, run: str):
        self.run = str(run)
        import ray  # here: importing this module (for run_label) must not import Ray

        self.enabled = ray.is_initialized()

    def _inc(self, name: str, value: float, **tags: str) -> None:
        value = float(value)
        if value > 0 and math.isfinite(value):  # Ray's Counter.inc refuses 0
            _instrument(name).inc(value, tags={"run": self.run, **tags})

    def _set(self, name: str, value: float, **tags: str) -> None:
        _instrument(name).set(float(value), tags={"run": self.run, **tags})


class DriverMetrics(_Recorder):
    """The driver's metrics of one run: what the scheduler sees (commits, retries, restarts,
    the queue and the leases). Create it after `ray.init`."""

    def __init__(self, run: str):
        super().__init__(run)
        self._workers: set[str] = set()
        """Workers given a leases gauge, so one that holds nothing now is set to 0."""

    @_guarded
    def shard_committed(self, summary: ShardSummary) -> None:
        w = str(summary.worker)
        self._inc("batchinfer_rows", summary.rows_ok, worker=w, status="ok")
        self._inc("batchinfer_rows", summary.rows_failed, worker=w, status="failed")
        for code, rows in summary.errors.items():
            self._inc("batchinfer_row_errors", rows, worker=w, code=str(code))
        self._inc("batchinfer_prompt_tokens", summary.prompt_tokens, worker=w)
        self._inc("batchinfer_completion_tokens", summary.completion_tokens, worker=w)
        self._inc("batchinfer_shards_committed", 1, worker=w)
        _instrument("batchinfer_shard_duration_seconds").observe(
            max(float(summary.generate_s), 0.0), tags={"run": self.run, "worker": w})

    @_guarded
    def shard_retried(self, worker: int) -> None:
        """An attempt on `worker` ended without a commit and its shard was queued again."""
        self._inc("batchinfer_shard_retries", 1, worker=str(worker))

    @_guarded
    def shard_failed(self) -> None:
        """A shard used up its attempts."""
        self._inc("batchinfer_shards_failed", 1)

    @_guarded
    def worker_restarted(self, worker: int) -> None:
        self._inc("batchinfer_worker_restarts", 1, worker=str(worker))

    @_guarded
    def scheduling(self, queued: int, leases_by_worker: dict[int, int]) -> None:
        """Shards waiting to be handed out, and the shards each worker holds. Call it on every
        scheduler loop: Ray drops a gauge that is not set again (module docstring)."""
        self._set("batchinfer_queue_depth", queued)
        leases = {str(w): n for w, n in leases_by_worker.items()}
        self._workers.update(leases)
        for w in self._workers:
            self._set("batchinfer_leases", leases.get(w, 0), worker=w)

    @_guarded
    def finished(self) -> None:
        """The run ended: the queue and every worker's leases read 0, not their last value."""
        self._set("batchinfer_queue_depth", 0)
        for w in self._workers:
            self._set("batchinfer_leases", 0, worker=w)


class WorkerMetrics(_Recorder):
    """One worker actor's metrics: its engine's load, busy time and row retries."""

    def __init__(self, run: str, worker: int):
        super().__init__(run)
        self.worker = str(worker)

    @_guarded
    def in_flight(self, n: int) -> None:
        """Requests in the engine now. Call it at every change and on every progress poll:
        Ray drops a gauge that is not set again (module docstring)."""
        self._set("batchinfer_in_flight_requests", n, worker=self.worker)

    @_guarded
    def engine_busy(self, seconds: float) -> None:
        """Add `seconds` during which the engine held at least one request."""
        self._inc("batchinfer_engine_busy_seconds", seconds, worker=self.worker)

    @_guarded
    def engine_restarted(self) -> None:
        """The worker restarted its engine in place."""
        self._inc("batchinfer_engine_restarts", 1, worker=self.worker)

    @_guarded
    def row_retried(self, n: int = 1) -> None:
        """`n` requests are run again after a retryable error."""
        self._inc("batchinfer_row_retries", n, worker=self.worker)
