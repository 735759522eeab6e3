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

from collections.abc import Iterable
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


@dataclass(frozen=True)
class Counts:
    """A run's progress: from its manifest once finished; while it runs, shards from the
    listing of its parts (exact) and rows and tokens from the driver's status record (which
    it rewrites on commits at most every 5 s, so they may trail the shards by that much);
    else (stopped without a manifest) from the commit records."""

    shards_done: int = 0
    shards_failed: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of_summaries(cls, summaries: Iterable[ShardSummary]) -> Counts:
        summaries = list(summaries)
        return cls(len(summaries), 0, sum(s.rows for s in summaries), sum(s.rows_failed for s in summaries),
                   sum(s.prompt_tokens for s in summaries), sum(s.completion_tokens for s in summaries))


@dataclass
class RunView:
    """What a run directory says about its run now."""

    output: str
    state: str
    detail: str
    plan: Plan | None
    counts: Counts
    manifest: Manifest | None
    """The manifest, if it describes the parts on record (a resumed run's old one does not)."""
    record: RunStatus | None
    holder: lease.Holder | None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form (module docstring)."""
        plan, c, m, record, holder = self.plan, self.counts, self.manifest, self.record, self.holder
        return {
            "version": JSON_VERSION,
            "output": self.output,
            "state": self.state,
            "exit_code": self.exit_code,
            "terminal": self.state in TERMINAL_STATES,
            "detail": self.detail,
            "fingerprint": plan.fingerprint if plan is not None else None,
            "shards": {"done": c.shards_done, "total": len(plan.shards) if plan else None,
                       "failed": c.shards_failed},
            "rows": {"done": c.rows_done, "total": plan.total_rows if plan else None,
                     "ok": c.rows_done - c.rows_failed, "failed": c.rows_failed},
            "tokens": {"prompt": c.prompt_tokens, "completion": c.completion_tokens},
            "started_at": record.started_at if record else None,
            "updated_at": record.updated_at if record else None,
            "finished_at": m.finished_at if m else None,
            "driver": None if holder is None else {
                "host": holder.host, "pid": holder.pid, "generation": holder.generation,
                "last_heartbeat_s": round(holder.age_s(), 1), "released": holder.released},
            "workers": len(record.workers) if record else 0,
            "cost": m.cost.model_dump() if m and m.cost else None,
        }


def read(store: RunStore) -> RunView | None:
    """The run at `store` as it stands, None if there is none (no plan, status or driver
    lease). Reads, never writes; a few small records and one listing of the parts, except
    for a run that stopped without a manifest, whose commit records are read. Raises what
    storage raises (the caller names the path)."""
    plan = store.read_plan()
    record = store.read_status()
    holder = lease.read_holder(store.meta)
    if plan is None and record is None and holder is None:
        return None
    parts = len(store.part_names()) if plan is not None else 0
    manifest = store.read_manifest()
    if plan is None or manifest is None or not manifest.describes(plan.fingerprint, parts):
        manifest = None
    state, detail = decide(plan, parts, manifest, record, holder)
    if manifest is not None:
        counts = Counts(manifest.shards.committed, manifest.shards.failed,
                        manifest.rows.ok + manifest.rows.failed, manifest.rows.failed,
                        manifest.tokens.prompt, manifest.tokens.completion)
    elif state in LIVE_STATES and record is not None and record.rows_done is not None:
        counts = Counts(parts, record.shards_failed, record.rows_done, record.rows_failed or 0,
                        record.prompt_tokens, record.completion_tokens)
    else:
        counts = Counts.of_summaries(store.committed(rebuild=False).values() if parts else ())
    return RunView(store.url, state, detail, plan, counts, manifest, record, holder)


def decide(plan: Plan | None, committed: int, manifest: Manifest | None, record: RunStatus | None,
           holder: lease.Holder | None) -> tuple[str, str]:
    """(state, detail) from the records and the number of committed parts: a live driver
    lease (planning or running, as its status says); else a failure or interruption recorded
    after the last manifest; else the manifest if it describes the parts on record; else
    stale (a driver stopped without saying why) or not started."""
    if holder is not None and holder.is_live():
        state = record.state if record is not None and record.state in LIVE_STATES else "running"
        if plan is None:
            state = "planning"
        return state, holder.describe()
    finished = plan is not None and manifest is not None and manifest.describes(plan.fingerprint, committed)
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
