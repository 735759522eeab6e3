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

from batchinfer import atomic, engines, faults, model_refs, plan as planning, prompts, storage
from batchinfer.config import Config, ConfigError
from batchinfer.errors import describe
from batchinfer.lease import DriverLease, LeaseLost, RunBusy, RunLapsed
from batchinfer.plan import Plan
from batchinfer.progress import Progress
from batchinfer.records import (
    FailedShard,
    Manifest,
    RowTotals,
    RunStatus,
    ShardSummary,
    ShardTotals,
    ThisRun,
    TokenTotals,
    WorkerInfo,
    now_iso,
)
from batchinfer.results import suffix_of
from batchinfer.run_store import RunStore
from batchinfer.signals import SignalWatch

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_BUSY = 0, 1, 2, 3, 4
STATUS_EVERY_S = 5.0


class RunRefused(RuntimeError):
    """The output holds a run this config must not resume; the message says what differs."""


# Errors that mean "fix the config, the inputs or the install", raised before any work.
USAGE_ERRORS = (ConfigError, RunRefused, planning.InputError, storage.StorageError,
                model_refs.ModelError, engines.EngineUnavailable, engines.EngineSetupError)


@dataclass
class RunReport:
    status: str
    """complete | partial | interrupted | failed"""
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
    model_refs.resolve(cfg.engine.model)
    if cfg.engine.tokenizer:
        model_refs.resolve(cfg.engine.tokenizer)


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
        with storage.errors(cfg.output.path, "output.path"):
            store.repair_error_files(committed)
        manifest = store.read_manifest()
        if manifest is None or not manifest.describes(plan.fingerprint, len(committed)):
            manifest = build_manifest(plan, store, committed, {}, {}, started, started, 0, None)
            with storage.errors(cfg.output.path, "output.path"):
                store.write_manifest(manifest, success=True)
        log.info("run at %s is already complete: nothing to do", store.url)
        return RunReport(manifest.status, exit_code_for(manifest.status), manifest, False)
    if stop.is_set():
        raise KeyboardInterrupt

    log.info("%d of %d shards to do (%d rows); %d already committed",
             len(pending), len(plan.shards), sum(plan.shards[i].num_rows for i in pending),
             len(committed))
    status.start(plan, len(committed))
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
        scheduler = Scheduler(cfg=cfg, plan=plan, stop=stop, generation=held.generation,
                              on_commit=status.commit)
        _prepare_engine(cfg)
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
    manifest = build_manifest(plan, store, committed, outcome.committed, outcome.failed,
                              started, generate_started, len(workers),
                              "interrupted" if outcome.interrupted else None,
                              tail_s=outcome.tail_s, engines=outcome.engines)
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


def exit_code_for(status: str) -> int:
    """The exit code of a run (or `status`) in this state: 0 complete, 3 partial, 4 running
    (another driver holds the run), 1 anything else (failed, interrupted, stale: rerun)."""
    return {"completed": EXIT_OK, "partial": EXIT_PARTIAL, "running": EXIT_BUSY}.get(status, EXIT_FAILED)


def build_manifest(plan: Plan, store: RunStore, committed: dict[int, ShardSummary],
                   new: dict[int, ShardSummary], failed: dict[int, str], started: float,
                   generate_started: float, workers: int, status: str | None,
                   tail_s: float | None = None, engines: list[dict[str, Any]] | None = None) -> Manifest:
    """The final report: status, counts, tokens, throughput, and every shard's summary.

    `committed` holds every committed shard, `new` those this invocation committed.
    """
    finished = time.time()
    summaries = [committed[i] for i in sorted(committed)]
    errors: dict[str, int] = {}
    for s in summaries:
        for code, n in s.errors.items():
            errors[code] = errors.get(code, 0) + n
    rows_ok = sum(s.rows_ok for s in summaries)
    rows_failed = sum(s.rows_failed for s in summaries)
    this_run = list(new.values())
    run_rows = sum(s.rows for s in this_run)
    run_tokens = sum(s.completion_tokens for s in this_run)
    gen_s = max(finished - generate_started, 1e-9)
    if status is None:
        # complete: every planned row has exactly one committed row, and none failed
        done = len(committed) == len(plan.shards) and rows_ok + rows_failed == plan.total_rows
        status = "completed" if done and not rows_failed else "partial"
    return Manifest(
        status=status,
        output=store.url,
        fingerprint=plan.fingerprint,
        plan_created_at=plan.created_at,
        finished_at=now_iso(),
        shards=ShardTotals(total=len(plan.shards), committed=len(committed), failed=len(failed)),
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
            tail_s=tail_s,
            engines=engines or [],
        ),
        failed_shards=[FailedShard(shard=i, part=f"{plan.shards[i].name}{part_suffix(plan)}", reason=r)
                       for i, r in sorted(failed.items())],
        shard_summaries=summaries,
    )


class _Status:
    """Writes `_batchinfer/status.json`: the driver's state (with the reason of a failure),
    its workers and progress, at state changes and, at most every few seconds, on commits.
    Liveness is the driver lease's heartbeat (lease.py), renewed on its own clock."""

    def __init__(self, store: RunStore):
        self.store = store
        self.started_at = now_iso()
        self.last = 0.0
        self.state = "starting"
        self.plan: Plan | None = None
        self.done = 0
        self.workers: list[WorkerInfo] = []

    def start(self, plan: Plan, done: int) -> None:
        self.plan, self.done = plan, done
        self.write("starting", force=True)

    def commit(self, summary: ShardSummary) -> None:
        self.done += 1
        self.write(self.state)

    def write(self, state: str, force: bool = False, reason: str | None = None) -> None:
        self.state = state
        if self.plan is None or (not force and time.monotonic() - self.last < STATUS_EVERY_S):
            return
        self.last = time.monotonic()
        try:
            self.store.write_status(RunStatus(
                state=state, reason=reason, started_at=self.started_at, updated_at=now_iso(),
                host=socket.gethostname(), pid=os.getpid(), shards_done=self.done,
                shards_total=len(self.plan.shards), fingerprint=self.plan.fingerprint,
                workers=self.workers,
            ))
        except Exception as e:  # advisory (the output may be full): never fail a run over it
            log.warning("could not write status.json: %s", e)


def _connect_ray(cfg: Config) -> bool:
    """Join the configured or $RAY_ADDRESS cluster, else start a fresh local one; True if we own it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
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
                     include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            log.warning("the local Ray cluster runs on %s, not 127.0.0.1: it may be reachable from "
                        "the network", node_ip)
    return True
