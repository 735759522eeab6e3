"""Live metrics (batchinfer/metrics.py): the Grafana dashboard reads only the metrics batchinfer
records and shows each one, and Ray's Prometheus endpoint exports what was recorded.

The integration tests need a Ray cluster whose metrics port they know, which the
session's `ray_cluster` (conftest.py) is not, and pytest runs every test in one process,
where that cluster may already be connected (Ray allows one cluster per process). So
each test runs its cluster in a child process:
`python -m tests.test_metrics MODE PORT [ARG]` (`_child` at the bottom of this file). The
child starts `ray.init(address="local", _metrics_export_port=PORT)` in a session of its
own, records (mode `record`) or runs a job (mode `run`), prints one JSON line, and keeps
its cluster up while the test scrapes the endpoint. The test then closes the child's
stdin, and the child shuts Ray down. Teardown kills what is left by the child's session
id (conftest.stop_process_session), never by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from batchinfer import metrics
from batchinfer.metrics import METRICS, DriverMetrics, WorkerMetrics, run_label
from batchinfer.records import ShardSummary
from tests.conftest import REPO, WORKER_ENV, free_port, stop_process_session, wait_for

DASHBOARD = REPO / "configs" / "grafana" / "batchinfer.json"
SERIES = re.compile(r"\bray_batchinfer_[A-Za-z0-9_]+")
RUN = "metrics-test"

Samples = dict[tuple[str, frozenset], float]


# --------------------------------------------------------------------------- scraping helpers


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """Every sample at a Prometheus endpoint: (series name, frozenset of label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    samples: Samples = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] += s.value
    return dict(samples)


def summed(samples: Samples, name: str, by: tuple[str, ...] = (), **where: str) -> dict[tuple, float]:
    """Series `name` whose labels match `where`, summed over everything but the labels `by`
    (as PromQL's `sum by (...)`, across the processes that each export their own series)."""
    out: dict[tuple, float] = defaultdict(float)
    for (series, labels), value in samples.items():
        labels = dict(labels)
        if series == name and all(labels.get(k) == v for k, v in where.items()):
            out[tuple(labels.get(b) for b in by)] += value
    return dict(out)


def total(samples: Samples, name: str, **where: str) -> float:
    """`sum(name{where})`; 0 when there is no such series."""
    return summed(samples, name, **where).get((), 0.0)


def wait_for_samples(url: str, observe, expected, timeout: float = 30.0) -> Samples:
    """Scrape until `observe(samples) == expected` (Ray exports every report interval); then
    fail with what the last scrape showed against what was expected."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if observe(samples) == expected or time.monotonic() > deadline:
            assert observe(samples) == expected
            return samples
        time.sleep(0.5)


class OwnCluster:
    """A child `python -m tests.test_metrics MODE PORT ARGS` that owns a local Ray cluster
    with its metrics on PORT; in a session of its own, stopped by that session's id."""

    def __init__(self, folder: Path, mode: str, *args: str):
        self.port = free_port()
        self.out, self.log = folder / f"{mode}.out", folder / f"{mode}.log"
        env = {**os.environ, **WORKER_ENV, "RAY_metrics_report_interval_ms": "1000"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_metrics", mode, str(self.port), *args],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=self.out.open("wb"),
            stderr=self.log.open("wb"), start_new_session=True)

    def report(self, timeout: float = 240) -> dict:
        """The child's JSON line, once its work is done (its cluster then stays up)."""
        wait_for(lambda: self.out.read_text().endswith("\n"), timeout, "the child's report",
                 proc=self.proc, details=lambda: self.log.read_text(errors="replace")[-5000:])
        return json.loads(self.out.read_text().splitlines()[0])

    def stop(self) -> None:
        """Let the child shut Ray down (EOF on its stdin), then kill what is left of its session."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_process_session(self.proc, grace=5)


@pytest.fixture
def own_cluster(tmp_path):
    started: list[OwnCluster] = []

    def start(mode: str, *args: str) -> OwnCluster:
        cluster = OwnCluster(tmp_path, mode, *args)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


# --------------------------------------------------------------------------- the dashboard


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel, also those inside collapsed rows."""
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", []) if "expr" in t]


def test_the_dashboard_reads_only_recorded_metrics_and_shows_every_one():
    dash = json.loads(DASHBOARD.read_text())
    exported = {series: name for name, d in METRICS.items() for series in d.exported}
    shown = set()
    for expr in dashboard_exprs(dash):
        found = SERIES.findall(expr)
        assert found, f"{expr!r} reads no batchinfer metric"
        unknown = [s for s in found if s not in exported]
        assert not unknown, f"{expr!r} reads {unknown}, not among the exported {sorted(exported)}"
        shown.update(exported[s] for s in found)
        assert 'run=~"$run"' in expr, f"{expr!r} is not filtered by the run variable"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    assert sorted(set(METRICS) - shown) == [], "metrics on no panel"


def test_the_dashboard_is_importable_with_a_datasource_and_run_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 27
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["type"] == "query"
    assert "label_values(" in variables["run"]["query"]["query"]
    assert SERIES.search(variables["run"]["query"]["query"])
    panels = dashboard_panels(dash)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for p in panels:
        assert p["datasource"] == "${datasource}", p["title"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}, p["title"]
        assert p["targets"], p["title"]


def test_the_module_docstring_lists_every_metric():
    doc = metrics.__doc__
    for name, d in METRICS.items():
        assert re.search(rf"\b{name}\b.*\b{d.kind}\b", doc), f"{name} ({d.kind}) not in the table"
        assert name.startswith("batchinfer_")
        assert re.fullmatch(r"[a-z_]+", name), "Ray drops a metric with an invalid name silently"


# --------------------------------------------------------------------------- units


def test_run_label():
    url = "s3://bucket/nightly/2026-01-02/"
    label = run_label(url)
    assert re.fullmatch(r"2026-01-02-[0-9a-f]{8}", label)
    assert label != run_label("s3://other/nightly/2026-01-02/"), "same folder name, other URL"
    assert run_label(url) == run_label(url.rstrip("/"))
    assert run_label(url, "my-run") == "my-run"  # run.name


def test_a_local_output_path_is_one_run_however_it_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = {run_label(p) for p in ("out/local/", "out/local", "./out/local", str(tmp_path / "out" / "local"))}
    assert len(labels) == 1 and labels.pop().startswith("local-")


class FakeInstrument:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def inc(self, value, tags):
        assert value > 0, "Ray's Counter.inc refuses 0"
        self.calls.append((self.name, "inc", value, tags))

    def set(self, value, tags):
        self.calls.append((self.name, "set", value, tags))

    def observe(self, value, tags):
        self.calls.append((self.name, "observe", value, tags))


@pytest.fixture
def recorded(monkeypatch) -> list:
    """The Ray metric calls made, by (name, method, value, tags); Ray itself is not used."""
    calls: list = []
    monkeypatch.setattr(metrics, "_instrument", lambda name: FakeInstrument(calls, name))
    return calls


def recording(recorder):
    """A recorder that records whether or not this process is connected to Ray."""
    recorder.enabled = True
    return recorder


def summary(shard: int, worker: int, ok: int, failed: int, prompt: int, completion: int,
            generate_s: float, errors: dict[str, int] | None = None, engine_restarts: int = 0,
            row_retries: int = 0) -> ShardSummary:
    return ShardSummary(shard=shard, part=f"part-{shard:06d}.parquet", attempt=1, worker=worker,
                        rows=ok + failed, rows_ok=ok, rows_failed=failed, prompt_tokens=prompt,
                        completion_tokens=completion, errors=errors or {}, generate_s=generate_s,
                        engine_restarts=engine_restarts, committed_at="2026-01-01T00:00:00+00:00",
                        row_retries=row_retries)


def test_a_committed_shard_is_counted_once_per_metric_and_zeros_are_skipped(recorded):
    recording(DriverMetrics("r")).shard_committed(summary(3, 2, ok=4, failed=0, prompt=40, completion=8,
                                               generate_s=1.5, row_retries=5))
    w = {"run": "r", "worker": "2"}
    assert recorded == [
        ("batchinfer_rows", "inc", 4.0, {**w, "status": "ok"}),
        ("batchinfer_prompt_tokens", "inc", 40.0, w),
        ("batchinfer_completion_tokens", "inc", 8.0, w),
        ("batchinfer_shards_committed", "inc", 1.0, w),
        ("batchinfer_shard_duration_seconds", "observe", 1.5, w),
    ], "row retries are the worker's to count (WorkerMetrics.row_retried), not counted twice"


def test_leases_of_a_worker_that_holds_none_and_of_a_finished_run_read_zero(recorded):
    driver = recording(DriverMetrics("r"))
    driver.scheduling(5, {0: 2, 1: 1})
    driver.scheduling(4, {0: 2})
    driver.finished()
    leases = [(c[3]["worker"], c[2]) for c in recorded if c[0] == "batchinfer_leases"]
    assert len(leases) == 6
    assert sorted(leases[2:4]) == [("0", 2.0), ("1", 0.0)], "worker 1 holds nothing now"
    assert sorted(leases[4:]) == [("0", 0.0), ("1", 0.0)], "the run finished"
    queue = [c[2] for c in recorded if c[0] == "batchinfer_queue_depth"]
    assert queue == [5.0, 4.0, 0.0]


def test_recording_never_raises(monkeypatch, caplog):
    def broken(name):
        raise RuntimeError("the metrics agent is gone")

    caplog.set_level(logging.DEBUG, logger="batchinfer.metrics")
    monkeypatch.setattr(metrics, "_instrument", broken)
    driver, worker = recording(DriverMetrics("r")), recording(WorkerMetrics("r", 0))
    driver.shard_committed(summary(0, 0, ok=1, failed=0, prompt=1, completion=1, generate_s=1.0))
    driver.scheduling(1, {0: 1})
    worker.in_flight(3)
    worker.engine_busy(1.0)
    assert "the metrics agent is gone" in caplog.text


def test_without_ray_the_recorders_do_nothing_and_importing_starts_no_ray():
    """In a fresh process (this one may be connected to the session cluster)."""
    code = """if True:
        import ray
        from batchinfer import metrics
        from batchinfer.records import ShardSummary
        assert not ray.is_initialized()
        assert metrics.metrics_endpoint() is None
        d, w = metrics.DriverMetrics("r"), metrics.WorkerMetrics("r", 0)
        assert not d.enabled and not w.enabled
        d.shard_committed(ShardSummary(shard=0, part="p", attempt=1, worker=0, rows=1, rows_ok=1,
            rows_failed=0, prompt_tokens=1, completion_tokens=1, generate_s=1.0, committed_at="t"))
        d.shard_retried(0); d.shard_failed(); d.worker_restarted(0); d.scheduling(1, {0: 1})
        d.finished(); w.in_flight(1); w.engine_busy(0.5); w.row_retried()
        assert not ray.is_initialized() and not metrics._instruments
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --------------------------------------------------------------------------- through Ray

SUMMARIES = [
    summary(0, 0, ok=9, failed=1, prompt=300, completion=40, generate_s=3.0,
            errors={"prompt_too_long": 1}, engine_restarts=1),
    summary(1, 1, ok=3, failed=2, prompt=150, completion=20, generate_s=45.0,
            errors={"timeout": 1, "engine_error": 1}),
    summary(2, 0, ok=5, failed=0, prompt=100, completion=30, generate_s=700.0),
]


class Recording:
    """A stand-in worker actor (async, as ShardWorker is) that records worker metrics."""

    def __init__(self, run: str, worker: int):
        self.metrics = WorkerMetrics(run, worker)
        self.in_flight = None

    async def record(self, in_flight: int | None, busy_s: list[float], retries: list[int],
                     engine_restarts: int = 0) -> bool:
        for _ in range(engine_restarts):
            self.metrics.engine_restarted()
        for s in busy_s:
            self.metrics.engine_busy(s)
        for n in retries:
            self.metrics.row_retried(n)
        self.in_flight = in_flight
        await self.keep()
        return self.metrics.enabled

    async def keep(self) -> None:
        """Set the gauge again, as the worker does on every progress poll."""
        if self.in_flight is not None:
            self.metrics.in_flight(self.in_flight)


def _record(port: int, done: threading.Event) -> None:
    """Mode `record`: the driver's metrics here, worker metrics in three actors (two of them
    one worker position, as a replaced worker is); gauges kept set until `done`."""
    import ray

    driver = DriverMetrics(RUN)
    assert driver.enabled
    for s in SUMMARIES:
        driver.shard_committed(s)
    driver.shard_retried(1)
    driver.shard_retried(1)
    driver.shard_failed()
    driver.worker_restarted(0)
    driver.scheduling(5, {0: 2, 1: 1})
    actor = ray.remote(num_cpus=0)(Recording)
    actors = [actor.remote(RUN, 3), actor.remote(RUN, 3), actor.remote(RUN, 4)]
    enabled = ray.get([actors[0].record.remote(4, [1.5, 0.0], [1], engine_restarts=1),
                       actors[1].record.remote(None, [1.0], [2, 0]),
                       actors[2].record.remote(2, [0.25], [])])
    _report({"endpoint": metrics.metrics_endpoint(), "enabled": enabled})
    while not done.wait(0.5):
        driver.scheduling(3, {0: 2})
        ray.get([a.keep.remote() for a in actors])


def observed(samples: Samples) -> dict:
    """What test_ray_exports_what_was_recorded compares, summed as the dashboard sums."""
    def by(name, *labels, **where):
        return summed(samples, name, labels, run=RUN, **where)

    return {
        "rows": by("ray_batchinfer_rows_total", "worker", "status"),
        "row_errors": by("ray_batchinfer_row_errors_total", "worker", "code"),
        "prompt_tokens": by("ray_batchinfer_prompt_tokens_total", "worker"),
        "completion_tokens": by("ray_batchinfer_completion_tokens_total", "worker"),
        "shards_committed": by("ray_batchinfer_shards_committed_total", "worker"),
        "durations": by("ray_batchinfer_shard_duration_seconds_count", "worker"),
        "duration_buckets": {float(le): n for (le,), n in
                             by("ray_batchinfer_shard_duration_seconds_bucket", "le").items()},
        "shard_retries": by("ray_batchinfer_shard_retries_total", "worker"),
        "shards_failed": by("ray_batchinfer_shards_failed_total"),
        "engine_restarts": by("ray_batchinfer_engine_restarts_total", "worker"),
        "worker_restarts": by("ray_batchinfer_worker_restarts_total", "worker"),
        "queue_depth": by("ray_batchinfer_queue_depth"),
        "leases": by("ray_batchinfer_leases", "worker"),
        "in_flight": by("ray_batchinfer_in_flight_requests", "worker"),
        "engine_busy_s": by("ray_batchinfer_engine_busy_seconds_total", "worker"),
        "row_retries": by("ray_batchinfer_row_retries_total", "worker"),
    }


def test_ray_exports_what_was_recorded(own_cluster):
    cluster = own_cluster("record")
    report = cluster.report()
    assert report["enabled"] == [True, True, True], "WorkerMetrics records inside an actor"
    endpoint = report["endpoint"]
    assert endpoint and endpoint.endswith(f":{cluster.port}/metrics"), endpoint
    buckets = {b: (b >= 3.0) + (b >= 45.0) + (b >= 700.0) for b in metrics.SHARD_DURATION_BOUNDARIES}
    expected = {
        "rows": {("0", "ok"): 14, ("0", "failed"): 1, ("1", "ok"): 3, ("1", "failed"): 2},
        "row_errors": {("0", "prompt_too_long"): 1, ("1", "timeout"): 1, ("1", "engine_error"): 1},
        "prompt_tokens": {("0",): 400, ("1",): 150},
        "completion_tokens": {("0",): 70, ("1",): 20},
        "shards_committed": {("0",): 2, ("1",): 1},
        "durations": {("0",): 2, ("1",): 1},
        "duration_buckets": {**{float(b): n for b, n in buckets.items()}, float("inf"): 3},
        "shard_retries": {("1",): 2},
        "shards_failed": {(): 1},
        "engine_restarts": {("3",): 1},  # the worker's own count, not its commits'
        "worker_restarts": {("0",): 1},
        "queue_depth": {(): 3},
        "leases": {("0",): 2, ("1",): 0},
        "in_flight": {("3",): 4, ("4",): 2},
        "engine_busy_s": {("3",): 2.5, ("4",): 0.25},
        "row_retries": {("3",): 3},
    }
    samples = wait_for_samples(endpoint, observed, expected, timeout=30)
    ours = {name for (name, labels) in samples if name.startswith("ray_batchinfer_")}
    assert ours <= {s for d in METRICS.values() for s in d.exported}
    assert {(name, dict(labels)["run"]) for (name, labels) in samples
            if name.startswith("ray_batchinfer_")} == {(name, RUN) for name in ours}


# --------------------------------------------------------------------------- a real run


def _run(port: int, done: threading.Event, config: str) -> None:
    """Mode `run`: `batchinfer.runner.run` on this process's cluster (it joins the cluster a
    process is connected to), which then stays up for the scrape until `done`."""
    from batchinfer.config_loader import load_config
    from batchinfer.runner import run

    report = run(load_config(config), progress=False, install_signal_handlers=False)
    _report({"endpoint": metrics.metrics_endpoint(), "exit_code": report.exit_code,
             "manifest": json.loads(report.manifest.to_json(indent=None))})
    done.wait()


@pytest.mark.slow
def test_a_run_exports_counters_equal_to_its_manifest(tmp_path, own_cluster, model_folder):
    """A run of the real model through `batchinfer.runner.run(cfg)`, on a cluster of its own with
    a metrics port (OwnCluster mode `run`: the run joins the child's cluster, which stays up
    after the run for the scrape). Ray's endpoint then exports counters equal to the
    manifest: rows ok and failed, tokens in and out, shards committed; summed over
    processes and filtered by the run's label.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scripts.sample_prompts import write_sample_prompts
    from tests.conftest import make_config, write_yaml

    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=20, row_group_size=5)
    bad = pa.table({"id": ["ok-1", "bad-1"], "prompt": pa.array(["Say hi.", None], pa.string())})  # a row error
    pq.write_table(bad, tmp_path / "prompts" / "zz-bad.parquet")
    cfg = make_config(tmp_path, run={"num_workers": 1, "rows_per_shard": 5})
    cluster = own_cluster("run", str(write_yaml(tmp_path / "run.yaml", cfg)))
    report = cluster.report(timeout=400)
    assert report["exit_code"] == 3  # partial: the null prompt is a failed row
    manifest = report["manifest"]
    assert manifest["rows"]["failed"] == 1 and manifest["rows"]["ok"] == 21
    run = run_label(cfg.output.path)

    def counters(samples: Samples) -> dict:
        return {
            "rows_ok": total(samples, "ray_batchinfer_rows_total", run=run, status="ok"),
            "rows_failed": total(samples, "ray_batchinfer_rows_total", run=run, status="failed"),
            "prompt_tokens": total(samples, "ray_batchinfer_prompt_tokens_total", run=run),
            "completion_tokens": total(samples, "ray_batchinfer_completion_tokens_total", run=run),
            "shards_committed": total(samples, "ray_batchinfer_shards_committed_total", run=run),
        }

    wait_for_samples(report["endpoint"], counters, {
        "rows_ok": manifest["rows"]["ok"],
        "rows_failed": manifest["rows"]["failed"],
        "prompt_tokens": manifest["tokens"]["prompt"],
        "completion_tokens": manifest["tokens"]["completion"],
        "shards_committed": manifest["shards"]["committed"],
    })
    # the workers' own series: the engine was busy, and its in-flight gauge is exported
    samples = scrape(report["endpoint"])
    assert total(samples, "ray_batchinfer_engine_busy_seconds_total", run=run) > 0
    assert summed(samples, "ray_batchinfer_row_errors_total", ("code",), run=run) == {("empty_prompt",): 1}


# --------------------------------------------------------------------------- the child process


def _report(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _child(mode: str, port: int, *args: str) -> None:
    """A cluster of this process's own with its metrics on `port`; `mode` ("record" or
    "run") works on it; Ray shuts down when stdin closes (the test is done, or gone)."""
    import ray

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=port,
             runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    try:
        {"record": _record, "run": _run}[mode](port, done, *args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])


def test_a_taken_metrics_port_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Ray's agent cannot start on a taken port, and its node then times out with no word of
    why: `validate` and `run` refuse it first (exit 2), naming the process that holds it."""
    import socket

    from click.testing import CliRunner

    from batchinfer.cli import main
    from tests.conftest import make_config, write_yaml

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_yaml(tmp_path / "c.yaml", make_config(tmp_path, run={"metrics_export_port": port}))
        result = CliRunner().invoke(main, ["validate", str(config)])
    assert result.exit_code == 2
    assert f"run.metrics_export_port {port} is taken on this machine by pid {os.getpid()}" in result.output
