"""run(config): plan -> resume state -> workers -> manifest.

Everything that can be refused is checked before a worker starts: the engine's packages,
the model, the inputs and their columns, and whether the output holds another run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchinfer import atomic, engines, faults, logs, model_refs, plan as planning, prompts, storage
from batchinfer.config import Config, ConfigError
from batchinfer.errors import describe
from batchinfer.lease import DriverLease, LeaseLost, RunBusy, RunLapsed
from batchinfer.lifecycle import EXIT_FAILED, exit_code_for
from batchinfer.metrics import metrics_endpoint, run_label
from batchinfer.outcome import Outcome
from batchinfer.plan import Plan
from batchinfer.progress import Progress
from batchinfer.records import (
    Cost,
    FailedShard,
    Manifest,
    RowTotals,
    RunStatus,
    ShardSummary,
    ShardTotals,
    ThisRun,
    TokenTotals,
    WorkerInfo,
    error_counts,
    now_iso,
)
from batchinfer.results import suffix_of
from batchinfer.run_store import RunStore
from batchinfer.signals import SignalWatch

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0


class RunRefused(RuntimeError):
    """The output holds a run this config must not resume; the message says what differs."""


# Errors that mean "fix the config, the inputs or the install", raised before any work.
USAGE_ERRORS = (ConfigError, RunRefused, planning.InputError, storage.StorageError,
                model_refs.ModelError, engines.EngineUnavailable, engines.EngineSetupError)


@dataclass
class RunReport:
    status: str
    """completed | partial | interrupted | failed"""
    exit_code: int
    manifest: Manifest
    did_work: bool


def preflight(cfg: Config) -> None:
    """Cheap checks that need no inputs: output apart from input, backend settings, engine
    packages installed, model found."""
    # gs:// without gcsfs, abfs:// without adlfs: exit 2 with the pip command, before Ray.
    for role, url in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
        storage.check_installed(url, role)
    clash = storage.input_output_clash(cfg.input.path, cfg.output.path, cfg.storage)
    if clash:
        raise ConfigError(clash)
    atomic.check_conditional_writes(cfg.output.path)
    problems = engines.engine_class(cfg.engine.backend).check_config(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems for engine.backend {cfg.engine.backend!r}:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    engines.check_available(cfg.engine.backend)
    _check_metrics_port(cfg)
    model_refs.resolve(cfg.engine.model)
    if cfg.engine.tokenizer:
        model_refs.resolve(cfg.engine.tokenizer)


def _check_metrics_port(cfg: Config) -> None:
    """The embedded cluster's run.metrics_export_port must be free: Ray's agent fails to start
    on a taken one and the node times out ~30 s later with no word of why (the agent's own
    log says "Address already in use"). A killed run's agent can hold it for a while."""
    port = cfg.run.metrics_export_port
    if port is None or cfg.run.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # a joined cluster exports where its nodes were started to
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
            return
        except OSError as e:
            why = e.strerror or str(e)
    holder = ""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                holder = f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline()[:2])})"
                break
    except Exception:  # naming the holder is a courtesy
        pass
    raise ConfigError(f"run.metrics_export_port {port} is taken on this machine{holder}: {why}. "
                      "Pick a free port, stop that process (a Ray agent left by a killed run "
                      "holds its port until it exits), or set it null to let Ray choose")


def prepare_plan(cfg: Config, store: RunStore, *, new_run: bool,
                 infos: list[dict[str, Any]] | None = None,
                 still_held: Callable[[], None] = lambda: None) -> Plan:
    """The plan on record if this config may resume it, else a new one (recorded).

    Called with the driver lease held, and `infos` the input listing (made now if None);
    `still_held()` raises if the lease was lost meanwhile, and is called before anything
    is removed or recorded. Whichever way the plan on record came to be (a previous run,
    or another driver that recorded first), it is checked against this config's settings
    and the inputs before it is adopted.
    """
    infos = infos if infos is not None else planning.list_inputs(cfg)
    with storage.errors(cfg.output.path, "output.path"):
        existing = store.read_plan()
        if existing is not None and new_run:
            still_held()
            log.warning("--new-run: removing the previous run at %s", store.url)
            store.clear()
            existing = None
    if existing is None:
        plan = planning.make_plan(cfg, infos)
        # Before the plan is recorded: fixing the inputs must not make the rerun a resume
        # refused for changed inputs.
        prompts.check_sample(cfg, plan)
        faults.point("planning")
        still_held()
        with storage.errors(cfg.output.path, "output.path"):
            existing = store.write_plan(plan)
        if existing is plan:
            return plan
        infos = planning.list_inputs(cfg)  # lost the race: check the winner like any plan
    planning.verify_inputs(existing, infos)
    diffs = planning.diff_settings(existing.settings, planning.settings_of(cfg))
    if diffs:
        raise RunRefused(
            f"{store.url} holds a run made with other settings ({'; '.join(diffs)}); "
            "resuming would mix results. Use another output.path, or pass --new-run to "
            "discard that run and start over"
        )
    if existing.rows_per_shard != cfg.run.rows_per_shard:
        log.warning("resuming with the recorded plan, cut for rows_per_shard=%d (config says %d)",
                    existing.rows_per_shard, cfg.run.rows_per_shard)
    return existing


def verify_committed(plan: Plan, committed: dict[int, ShardSummary], store: RunStore) -> None:
    """Every committed part must be one of this plan's shards, with its rows: a part written
    for another plan (or a run directory changed by hand) is refused, never counted."""
    problems = []
    for index, summary in sorted(committed.items()):
        name = summary.part
        if index >= len(plan.shards):
            problems.append(f"{name} is not in the plan ({len(plan.shards)} shards)")
        elif summary.fingerprint not in (None, plan.fingerprint):
            problems.append(f"{name} was written for another plan ({summary.fingerprint})")
        elif summary.rows != plan.shards[index].num_rows:
            problems.append(f"{name} has {summary.rows} rows where the plan has "
                            f"{plan.shards[index].num_rows}")
    if problems:
        raise RunRefused(
            f"{store.url} holds parts that do not belong to its plan ({plan.fingerprint}): "
            f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Its results cannot "
            "be trusted; pass --new-run to start over, or use another output.path")


def run(cfg: Config, *, new_run: bool = False, progress: bool = True,
        install_signal_handlers: bool = True) -> RunReport:
    """Run (or resume) the job: take the run's driver lease, plan, run the shards, write
    the manifest. Raises the USAGE_ERRORS before any engine starts, RunBusy when another
    live driver holds the run, LeaseLost when one takes it over during this run."""
    started = time.time()
    preflight(cfg)
    store = RunStore(cfg.output.path, cfg.storage)
    stop = threading.Event()
    status = _Status(store)
    held = DriverLease(store.meta, cfg.run.driver_lease_s)

    def exit_now() -> None:  # a second signal: record the state, free the run, go
        if held.holder is not None and not held.lost:
            status.write("interrupted", force=True, reason="a second signal: exited at once")
            held.release("interrupted")

    # Before anything slow: a SIGTERM at any moment from here on is handled as documented.
    signals = SignalWatch(stop, exit_now, EXIT_FAILED) if install_signal_handlers else None
    state, reason = "failed", None
    try:
        infos = planning.list_inputs(cfg)  # input errors first: they say what to fix
        with storage.errors(cfg.output.path, "output.path"):
            held.acquire()  # also the write probe: a read-only or full output fails here
        held.start_renewing(on_lost=stop.set)  # from now on: planning may take minutes
        status.begin()
        try:
            report = _run_held(cfg, store, held, status, stop, signals, new_run, progress,
                               started, infos)
        except KeyboardInterrupt:
            if held.lost:  # the stop came from the lease, not a signal
                raise _lease_error(held, store) from None
            raise
        state = report.status
        return report
    except KeyboardInterrupt:
        state, reason = "interrupted", "stopped by a signal"
        raise
    except (RunBusy, LeaseLost):
        state = None  # another driver holds the run: nothing here is ours to record
        raise
    except USAGE_ERRORS as e:
        # Refused before adopting a plan (the output holds another run, or its inputs changed
        # since it was planned): the run there keeps its own status. A new run says why.
        reason = None if status.plan is None and status.restore() else describe(e)
        raise
    except BaseException as e:
        reason = describe(e)
        raise
    finally:
        if state is not None and held.holder is not None:
            if reason is not None:  # a report wrote its own final state
                status.write(state, force=True, reason=reason)
            held.release(state)
        if signals is not None:
            signals.restore()


def _lease_error(held: DriverLease, store: RunStore) -> Exception:
    """LeaseLost (exit 4) if another live driver took the run over, else RunLapsed (exit 1)."""
    successor = held.successor()
    if successor is not None:
        return LeaseLost(f"{store.url}: the run was taken over by the {successor.describe()}; "
                         "this driver stopped (exit 4)")
    return RunLapsed(f"{store.url}: this driver could not keep its lease "
                     f"({held.lost or 'a commit found it not renewed in time'}) and stopped; no "
                     "other driver holds the run: rerun the same command to resume")


def _check_held(held: DriverLease, store: RunStore) -> None:
    if held.lost:
        raise _lease_error(held, store)


def _run_held(cfg: Config, store: RunStore, held: DriverLease, status: _Status,
              stop: threading.Event, signals: SignalWatch | None, new_run: bool, progress: bool,
              started: float, infos: list[dict[str, Any]]) -> RunReport:
    plan = prepare_plan(cfg, store, new_run=new_run, infos=infos,
                        still_held=lambda: _check_held(held, store))
    with storage.errors(cfg.output.path, "output.path"):
        committed = store.committed()
    verify_committed(plan, committed, store)
    pending = [s.index for s in plan.shards if s.index not in committed]
    if not pending:
        return _already_finished(cfg, plan, store, committed, status, started)
    if stop.is_set():
        raise KeyboardInterrupt

    log.info("%d of %d shards to do (%d rows); %d already committed",
             len(pending), len(plan.shards), sum(plan.shards[i].num_rows for i in pending),
             len(committed))
    status.start(plan, committed)
    # Imported here so `plan`, `status` and `validate` never import Ray.
    from batchinfer.scheduler import Scheduler

    scheduler = None
    owns_ray = False
    bar = None
    try:
        try:
            owns_ray = _connect_ray(cfg)
            if signals is not None:
                signals.reinstall()  # ray.init installed its own SIGTERM handler
        except SystemExit:  # ray.init's own SIGTERM handler (sys.exit) ran before ours was back
            owns_ray = True
            raise KeyboardInterrupt from None
        endpoint = metrics_endpoint()
        log.info("live metrics: %s (run label %s; Grafana dashboard: configs/grafana/)",
                 endpoint or "Ray's Prometheus endpoint on each node", run_label(cfg.output.path, cfg.run.name))
        scheduler = Scheduler(cfg=cfg, plan=plan, stop=stop, generation=held.generation,
                              on_commit=status.commit, on_fail=status.fail)
        _prepare_engine(cfg)
        workers_started = time.time()  # GPU time is billed from here
        workers = scheduler.start_workers(cfg.run.worker_start_timeout_s)
        log.info("%d workers ready (engine load %s s)", len(workers),
                 ", ".join(str(w.load_s) for w in workers))
        status.workers = workers
        status.write("running", force=True)
        generate_started = time.time()
        bar = Progress(total_shards=len(plan.shards), total_rows=plan.total_rows,
                       done_shards=len(committed),
                       done_rows=sum(s.rows for s in committed.values()), enabled=progress,
                       interval_s=cfg.run.progress_interval_s)
        outcome = scheduler.run(pending, bar)
    finally:
        if bar is not None:
            bar.close()
        if scheduler is not None:
            scheduler.shutdown()
        if owns_ray:
            import ray
            ray.shutdown()

    if held.lost or isinstance(outcome.fatal, LeaseLost):
        raise _lease_error(held, store)
    if outcome.fatal is not None:
        raise outcome.fatal
    committed.update(outcome.committed)
    verify_committed(plan, committed, store)
    manifest = build_manifest(plan, store, committed, cfg=cfg, started=started, outcome=outcome,
                              generate_started=generate_started, workers=len(workers),
                              workers_started=workers_started,
                              status="interrupted" if outcome.interrupted else None)
    faults.point("manifest")
    with storage.errors(cfg.output.path, "output.path"):
        store.repair_error_files(committed)
    if outcome.interrupted:
        status.write("interrupted", force=True, reason="stopped by a signal")
        return RunReport("interrupted", EXIT_FAILED, manifest, True)
    with storage.errors(cfg.output.path, "output.path"):
        store.write_manifest(manifest, success=len(committed) == len(plan.shards))
    status.write(manifest.status, force=True)
    return RunReport(manifest.status, exit_code_for(manifest.status), manifest, True)


def _already_finished(cfg: Config, plan: Plan, store: RunStore, committed: dict[int, ShardSummary],
                      status: _Status, started: float) -> RunReport:
    """Every shard is committed: repair what a crash may have left (failed-rows files, the
    manifest) and report the run as it is."""
    with storage.errors(cfg.output.path, "output.path"):
        store.repair_error_files(committed)
    manifest = store.read_manifest()
    if manifest is None or not manifest.describes(plan.fingerprint, len(committed)):
        manifest = build_manifest(plan, store, committed, cfg=cfg, started=started)
        with storage.errors(cfg.output.path, "output.path"):
            store.write_manifest(manifest, success=True)
    log.info("run at %s is already finished: nothing to do", store.url)
    if status.previous is not None and status.previous.state == manifest.status:
        status.restore()  # the finished run's own record, with its times and workers
    else:
        status.plan = plan
        status.write(manifest.status, force=True)
    return RunReport(manifest.status, exit_code_for(manifest.status), manifest, False)


def _prepare_engine(cfg: Config) -> None:
    """The backend's once-per-run step on the cluster (e.g. find or build the TensorRT engine)."""
    _unwrap(lambda: engines.engine_class(cfg.engine.backend).prepare(cfg, RayCluster(cfg)))


class RayCluster:
    """The cluster as a backend's driver-side steps see it (`engines.Cluster`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run_on_worker_node(self, fn, *args):
        import ray

        from batchinfer.scheduler import gpu_task_options

        return ray.get(ray.remote(fn).options(**gpu_task_options(self.cfg)).remote(*args))


def build_engine(cfg: Config) -> dict[str, str]:
    """`batchinfer build-engine`: the backend's build step (e.g. the TensorRT engine), run on a
    node of the workers' type; ConfigError when the backend has no build step."""
    backend = engines.engine_class(cfg.engine.backend)
    if backend.build.__func__ is engines.Engine.build.__func__:
        raise ConfigError(f"engine backend {cfg.engine.backend!r} has no build step: its workers load "
                          f"engine.model ({cfg.engine.model}) as is, so there is nothing to build")
    preflight(cfg)
    import ray

    owns_ray = _connect_ray(cfg)
    try:
        info = _unwrap(lambda: backend.build(cfg, RayCluster(cfg)))
    finally:
        if owns_ray:
            ray.shutdown()
    if info is None:
        raise ConfigError(f"engine backend {cfg.engine.backend!r} built nothing for this config")
    return info


def _unwrap(call: Callable[[], Any]) -> Any:
    """Run a Ray call, re-raising a backend's setup error from the task as itself."""
    from ray.exceptions import RayTaskError

    try:
        return call()
    except RayTaskError as e:
        if isinstance(e.cause, engines.EngineSetupError):
            raise type(e.cause)(str(e.cause)) from None
        raise


def part_suffix(plan: Plan) -> str:
    """The file suffix of the plan's parts (output.format is in its settings)."""
    return suffix_of(plan.settings.get("output", {}).get("format", "parquet"))


def build_manifest(plan: Plan, store: RunStore, committed: dict[int, ShardSummary], *, cfg: Config,
                   started: float, outcome: Outcome | None = None, generate_started: float | None = None,
                   workers: int = 0, workers_started: float | None = None,
                   status: str | None = None) -> Manifest:
    """The final report: status, counts, tokens, throughput, cost, this invocation's timeline
    and every shard's summary. `committed` holds every committed shard; `outcome` is what
    this invocation's scheduler did (None when it had nothing to do)."""
    finished = time.time()
    outcome = outcome if outcome is not None else Outcome()
    summaries = [committed[i] for i in sorted(committed)]
    errors = error_counts(summaries)
    rows_ok = sum(s.rows_ok for s in summaries)
    rows_failed = sum(s.rows_failed for s in summaries)
    this_run = list(outcome.committed.values())
    run_rows = sum(s.rows for s in this_run)
    run_tokens = sum(s.completion_tokens for s in this_run)
    gen_s = max(finished - (generate_started or started), 1e-9)
    if status is None:
        # completed: every planned row has exactly one committed row, and none failed
        done = len(committed) == len(plan.shards) and rows_ok + rows_failed == plan.total_rows
        status = "completed" if done and not rows_failed else "partial"
    return Manifest(
        status=status,
        output=store.url,
        fingerprint=plan.fingerprint,
        plan_created_at=plan.created_at,
        finished_at=now_iso(),
        shards=ShardTotals(total=len(plan.shards), committed=len(committed), failed=len(outcome.failed)),
        rows=RowTotals(total=plan.total_rows, ok=rows_ok, failed=rows_failed,
                       missing=plan.total_rows - rows_ok - rows_failed),
        errors=errors,
        tokens=TokenTotals(prompt=sum(s.prompt_tokens for s in summaries),
                           completion=sum(s.completion_tokens for s in summaries)),
        this_run=ThisRun(
            wall_s=round(finished - started, 2),
            generate_s=round(gen_s, 2) if run_rows else 0.0,
            workers=workers,
            shards=len(this_run),
            rows=run_rows,
            completion_tokens=run_tokens,
            rows_per_s=round(run_rows / gen_s, 3) if run_rows else 0.0,
            tokens_per_s=round(run_tokens / gen_s, 2) if run_rows else 0.0,
            tail_s=outcome.tail_s,
            engines=outcome.engines,
            started_at=round(started, 3),
            workers_started_at=None if workers_started is None else round(workers_started, 3),
            attempts=outcome.attempts,
            worker_restarts=outcome.worker_restarts,
            engine_restarts=(outcome.engine_restarts if outcome.engine_restarts is not None
                             else sum(s.engine_restarts for s in this_run)),
            row_retries=sum(s.row_retries for s in this_run),
            busy_s=outcome.busy_s,
        ),
        failed_shards=[FailedShard(shard=i, part=f"{plan.shards[i].name}{part_suffix(plan)}", reason=r)
                       for i, r in sorted(outcome.failed.items())],
        shard_summaries=summaries,
        cost=run_cost(cfg, workers, finished - workers_started if workers_started else 0.0,
                      outcome.busy_s, run_tokens) if workers else None,
        settings=plan.settings,
    )


def run_cost(cfg: Config, workers: int, wall_s: float, busy_s: float | None, output_tokens: int) -> Cost:
    """GPU-hours and cost of `workers` held for `wall_s` (records.Cost). A worker counts
    run.gpus_per_worker GPUs (a fraction too: 4 workers on 0.25 GPU are one GPU), and a CPU
    worker (0 GPUs) one; `busy_s` is summed over workers already."""
    gpus = cfg.run.gpus_per_worker or 1.0
    gpu_hours = workers * gpus * wall_s / 3600
    price = cfg.run.gpu_hour_cost
    total = None if price is None else gpu_hours * price
    return Cost(
        workers=workers, gpus_per_worker=cfg.run.gpus_per_worker, wall_s=round(wall_s, 2),
        gpu_hours=round(gpu_hours, 6),
        busy_gpu_hours=None if busy_s is None else round(busy_s * gpus / 3600, 6),
        output_tokens=output_tokens,
        tokens_per_gpu_hour=round(output_tokens / gpu_hours, 1) if gpu_hours else 0.0,
        gpu_hour_cost=price,
        total=None if total is None else round(total, 6),
        per_million_output_tokens=(round(total / output_tokens * 1e6, 6)
                                   if total is not None and output_tokens else None),
    )


class _Status:
    """Writes `_batchinfer/status.json` as the run moves through its lifecycle (lifecycle.py):
    planning once this driver holds the run, running once its plan is adopted, then its end
    state (with the reason of a failure); its workers and progress on commits, at most every
    few seconds. Liveness is the driver lease's heartbeat (lease.py), renewed on its own clock."""

    def __init__(self, store: RunStore):
        self.store = store
        self.started_at = now_iso()
        self.last = 0.0
        self.state = "planning"
        self.plan: Plan | None = None
        self.previous: RunStatus | None = None
        self.done = self.rows_done = self.rows_failed = self.shards_failed = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.workers: list[WorkerInfo] = []

    def begin(self) -> None:
        """This driver holds the run: planning (what was there is kept, for `restore`)."""
        try:
            self.previous = self.store.read_status()
        except Exception:  # advisory: never fail a run over it
            self.previous = None
        self.write("planning", force=True)

    def start(self, plan: Plan, committed: dict[int, ShardSummary]) -> None:
        """The plan is adopted; `committed` were committed before: running."""
        self.plan, self.done = plan, len(committed)
        for summary in committed.values():
            self._count(summary)
        self.write("running", force=True)

    def commit(self, summary: ShardSummary) -> None:
        self.done += 1
        self._count(summary)
        self.write(self.state)

    def fail(self, shard: int) -> None:
        self.shards_failed += 1
        self.write(self.state)

    def _count(self, summary: ShardSummary) -> None:
        self.rows_done += summary.rows
        self.rows_failed += summary.rows_failed
        self.prompt_tokens += summary.prompt_tokens
        self.completion_tokens += summary.completion_tokens

    def restore(self) -> bool:
        """Put back the status this driver found, if there was one: it refused the run (the
        output holds another, or the inputs changed) or found it finished, so that run's
        record is not this driver's to change."""
        if self.previous is not None:
            self._put(self.previous)
        return self.previous is not None

    def write(self, state: str, force: bool = False, reason: str | None = None) -> None:
        self.state = state
        if not force and time.monotonic() - self.last < STATUS_EVERY_S:
            return
        self.last = time.monotonic()
        plan = self.plan
        self._put(RunStatus(
            state=state, reason=reason, started_at=self.started_at, updated_at=now_iso(),
            host=socket.gethostname(), pid=os.getpid(), shards_done=self.done,
            shards_total=len(plan.shards) if plan else 0, rows_done=self.rows_done,
            rows_failed=self.rows_failed, rows_total=plan.total_rows if plan else None,
            shards_failed=self.shards_failed, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            fingerprint=plan.fingerprint if plan else None, workers=self.workers,
        ))

    def _put(self, record: RunStatus) -> None:
        try:
            self.store.write_status(record)
        except Exception as e:  # advisory (the output may be full): never fail a run over it
            log.warning("could not write status.json: %s", e)


def _connect_ray(cfg: Config) -> bool:
    """Join the configured or $RAY_ADDRESS cluster, else start a fresh local one; True if we own it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **logs.ray_init_kwargs())
    else:
        # address="local" never joins a stale "current cluster" left by an earlier `ray start`.
        needed = int(cfg.run.num_workers * cfg.run.cpus_per_worker + 0.999)
        # The embedded cluster stays on this machine: its node IP is 127.0.0.1, so the GCS,
        # raylet, agents and workers listen on loopback only (with a routable node IP Ray's
        # gRPC servers listen on all interfaces). ray.init rewrites _node_ip_address=127.0.0.1
        # to the machine's address (services.resolve_ip_for_localhost); only Ray's
        # single-machine mode, its default on macOS/Windows, keeps the node on loopback.
        # Restored after start, so that joining a real cluster later resolves addresses as usual.
        from ray._private import ray_constants

        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed),
                     include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True,
                     _metrics_export_port=cfg.run.metrics_export_port, **logs.ray_init_kwargs())
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            log.warning("the local Ray cluster runs on %s, not 127.0.0.1: it may be reachable from "
                        "the network", node_ip)
    return True
