"""A run's lifecycle as anyone can read it from its run directory, on any machine.

The driver moves a run through `planning -> running -> completed | partial | failed |
interrupted` and writes each state to `_batchinfer/status.json` (records.RunStatus) as it
enters it. A reader adds two states the driver cannot write itself:

    stale        status.json says planning or running (or parts are committed without a
                 manifest), but no live driver holds the run's lease (lease.py): its driver
                 was killed or its machine lost. Rerunning the same command resumes it.
    not_started  nothing but a plan, or a driver that stopped before its first commit.

`read(store)` is the one place that decides; `batchinfer status` prints it, and its JSON
form (`RunView.to_json`) is the documented interface for scripts and schedulers:

    {
      "version": 1,
      "output": "s3://bucket/nightly/2026-11-29/",
      "state": "running",            # planning|running|completed|partial|failed|interrupted|stale|not_started
      "exit_code": 4,                # the `status` command's exit code for this state
      "terminal": false,             # true: the state changes only if someone reruns the job
      "detail": "driver on host-1 (pid 4242, generation 2)",
      "fingerprint": "9f2c...",
      "shards": {"done": 12, "total": 40, "failed": 0},
      "rows": {"done": 6144, "total": 20480, "ok": 6140, "failed": 4},
      "tokens": {"prompt": 901233, "completion": 1572864},
      "started_at": "2026-11-29T01:00:03+00:00",
      "updated_at": "2026-11-29T01:07:41+00:00",
      "finished_at": null,
      "driver": {"host": "host-1", "pid": 4242, "generation": 2, "last_heartbeat_s": 3.1, "released": false},
      "workers": 4,
      "cost": null                   # the manifest's cost (records.Cost) once finished
    }

Keys are never removed or renamed within a version; new keys may be added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchinfer import lease
from batchinfer.plan import Plan
from batchinfer.records import Manifest, RunStatus, ShardSummary
from batchinfer.run_store import RunStore

JSON_VERSION = 1
"""The layout of `RunView.to_json`."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_BUSY = 0, 1, 2, 3, 4
"""Exit codes of `batchinfer run` and `batchinfer status` (cli.py documents them)."""

LIVE_STATES = ("planning", "running")
"""States in which a live driver holds the run."""
TERMINAL_STATES = ("completed", "partial", "failed", "interrupted", "stale", "not_started")
"""States that change only when someone runs the job again."""


def exit_code_for(state: str) -> int:
    """The exit code of a run, or of `status`, in `state`: 0 completed, 3 partial, 4 planning
    or running (a live driver holds it: wait), 1 anything else (failed, interrupted, stale,
    not started: rerun the same command to resume)."""
    if state in LIVE_STATES:
        return EXIT_BUSY
    return {"completed": EXIT_OK, "partial": EXIT_PARTIAL}.get(state, EXIT_FAILED)


@dataclass
class RunView:
    """What a run directory says about its run now."""

    output: str
    state: str
    detail: str
    plan: Plan | None
    committed: dict[int, ShardSummary]
    manifest: Manifest | None
    record: RunStatus | None
    holder: lease.Holder | None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form (module docstring)."""
        plan, committed, m, record, holder = self.plan, self.committed, self.manifest, self.record, self.holder
        current = m if m is not None and plan is not None and m.describes(plan.fingerprint, len(committed)) else None
        summaries = committed.values()
        return {
            "version": JSON_VERSION,
            "output": self.output,
            "state": self.state,
            "exit_code": self.exit_code,
            "terminal": self.state in TERMINAL_STATES,
            "detail": self.detail,
            "fingerprint": plan.fingerprint if plan is not None else None,
            "shards": {"done": len(committed), "total": len(plan.shards) if plan else None,
                       "failed": current.shards.failed if current else 0},
            "rows": {"done": sum(s.rows for s in summaries),
                     "total": plan.total_rows if plan else None,
                     "ok": sum(s.rows_ok for s in summaries),
                     "failed": sum(s.rows_failed for s in summaries)},
            "tokens": {"prompt": sum(s.prompt_tokens for s in summaries),
                       "completion": sum(s.completion_tokens for s in summaries)},
            "started_at": record.started_at if record else None,
            "updated_at": record.updated_at if record else None,
            "finished_at": current.finished_at if current else None,
            "driver": None if holder is None else {
                "host": holder.host, "pid": holder.pid, "generation": holder.generation,
                "last_heartbeat_s": round(holder.age_s(), 1), "released": holder.released},
            "workers": len(record.workers) if record else 0,
            "cost": current.cost.model_dump() if current and current.cost else None,
        }


def read(store: RunStore) -> RunView | None:
    """The run at `store` as it stands, None if there is none (no plan, status or driver
    lease). Raises what storage raises (the caller names the path)."""
    plan = store.read_plan()
    record = store.read_status()
    holder = lease.read_holder(store.meta)
    if plan is None and record is None and holder is None:
        return None
    committed = store.committed() if plan is not None else {}
    manifest = store.read_manifest()
    state, detail = decide(plan, committed, manifest, record, holder)
    return RunView(store.url, state, detail, plan, committed, manifest, record, holder)


def decide(plan: Plan | None, committed: dict, manifest: Manifest | None, record: RunStatus | None,
           holder: lease.Holder | None) -> tuple[str, str]:
    """(state, detail) from the records: a live driver lease (planning or running, as its
    status says); else a failure or interruption recorded after the last manifest; else the
    manifest if it describes the parts on record; else stale (a driver stopped without
    saying why) or not started."""
    if holder is not None and holder.is_live():
        state = record.state if record is not None and record.state in LIVE_STATES else "running"
        if plan is None:
            state = "planning"
        return state, holder.describe()
    finished = plan is not None and manifest is not None and manifest.describes(plan.fingerprint, len(committed))
    if record is not None and record.state in ("failed", "interrupted") and (
            not finished or (record.updated_at or "") > manifest.finished_at):
        why = record.reason or "no reason recorded"
        fixed = " once the cause is fixed" if record.state == "failed" else ""
        return record.state, f"{why}; rerun the same command to resume{fixed}"
    if finished:
        return manifest.status, ""
    if holder is not None and not holder.released:
        return "stale", (f"driver on {holder.host} (pid {holder.pid}) last seen "
                         f"{_ago(holder.age_s())} ago; rerun to resume")
    if committed or record is not None:
        return "stale", "no driver is running it; rerun to resume"
    return "not_started", "rerun the same command to start it" if plan is not None else ""


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
