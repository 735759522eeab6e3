"""The records that cross layers — between worker and driver, and into the run directory —
each a model with one JSON form.

    ShardSummary   a committed shard: worker -> driver, the commit record, the part's metadata
    WorkerInfo     a worker's ready() answer; its identity is kept in the run status
    WorkerProgress a worker's progress() answer, polled by the driver
    RunStatus      _batchinfer/status.json, the driver's state
    Manifest       _batchinfer/manifest.json, the final report (versioned)

The JSON forms are those the dicts before them had, so run directories written before
these models existed stay readable: fields added since carry defaults, and fields a reader
does not know are ignored (a record written by a newer version still reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_VERSION = 1
"""The manifest layout this code writes. A manifest without a version field is layout 1."""


RESULT_COLUMNS = ("output", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error")
"""The result columns of every output row, after the id and passthrough columns (their Arrow
types: results.RESULT_FIELDS); an input column of one of these names cannot pass through."""


def now_iso() -> str:
    """The current time as records store it: UTC, ISO 8601, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Record(BaseModel):
    """A record: immutable, one JSON form (`to_json` / `from_json`), unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_json(self, indent: int | None = 1) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes):
        """Parse a record; pydantic.ValidationError (a ValueError) if it is not one."""
        return cls.model_validate_json(text)


# ---------------------------------------------------------------------- shards


class RowCounts(Record):
    """What became of some rows: counts, tokens, and error codes with their counts."""

    rows: int
    rows_ok: int
    rows_failed: int
    prompt_tokens: int
    completion_tokens: int
    errors: dict[str, int] = Field(default_factory=dict)
    """Error code (the part of a row's `error` before the colon) -> rows with it."""


def error_counts(summaries: Iterable[RowCounts]) -> dict[str, int]:
    """Rows per error code over some shards (the manifest's `errors`)."""
    out: dict[str, int] = {}
    for s in summaries:
        for code, n in s.errors.items():
            out[code] = out.get(code, 0) + n
    return out


class ShardSummary(RowCounts):
    """One committed shard. The same JSON is the commit record
    (`_batchinfer/commits/part-*.json`), the part file's own metadata, and an entry of the
    manifest's `shard_summaries`."""

    shard: int
    part: str
    """The part file's name, e.g. `part-000003.parquet`."""
    attempt: int
    worker: int
    generate_s: float
    """Seconds from the attempt's start to its last row's result."""
    engine_restarts: int = 0
    """Engine restarts in place during this attempt."""
    committed_at: str
    fingerprint: str | None = None
    """The plan's fingerprint; absent in records written before it was kept."""
    generation: int | None = None
    """The driver lease generation that committed it; absent in older records."""
    started_at: float | None = None
    """When the attempt started (Unix time, seconds); absent in older records."""
    row_retries: int = 0
    """Requests run again within this attempt after a retryable error (run.row_retries)."""


class ShardAttempt(Record):
    """What `ShardWorker.process` returns: the shard's summary, and whether this attempt's
    commit is the one that counts. Not persisted: a losing attempt returns the winner's
    summary."""

    summary: ShardSummary
    won: bool


# ---------------------------------------------------------------------- workers


class WorkerInfo(Record):
    """A worker whose engine is loaded: `ShardWorker.ready()`; the run status keeps the list."""

    worker: int
    host: str
    pid: int
    load_s: float | None = None
    """Seconds to load the engine and tokenizer; absent in status records before it was kept."""
    engine_source: str | None = None
    """Where the backend got its engine from, if it says (e.g. TensorRT-LLM: built, cached)."""
    window: int = 0
    """Requests the worker keeps submitted to its engine (`Engine.max_in_flight`)."""


class WorkerProgress(Record):
    """`ShardWorker.progress()`: what the driver's progress line and hang watchdog read."""

    rows: int
    """Rows generated without error, since the worker started."""
    completion_tokens: int
    heartbeat: int
    """Moves while the engine works; the watchdog calls a worker hung when it stops."""
    busy: dict[str, Any] = Field(default_factory=dict)
    """The engine's own `busy()` report (engines/base.py): `in_step`, `step_tokens`."""
    max_model_len: int = 0
    window: int = 0
    """Requests the worker keeps submitted to its engine (`Engine.max_in_flight`)."""
    in_flight: int = 0
    """Requests in the engine now."""
    busy_s: float = 0.0
    """Seconds, since the worker started, that its engine held at least one request."""
    engine_restarts: int = 0
    """Engine restarts in place since the worker started (committed or not)."""


# ---------------------------------------------------------------------- the run


RUN_STATES = ("planning", "running", "completed", "partial", "failed", "interrupted")
"""The run lifecycle a driver writes to `status.json`, in order: planning -> running ->
completed | partial | failed | interrupted. A reader adds `stale` (the state says a driver
runs it, but its lease lapsed) and `not_started` (status.py)."""


class RunStatus(Record):
    """`_batchinfer/status.json`: the driver's state, rewritten at state changes and, at
    most every few seconds, on commits. Advisory: liveness is the driver lease (lease.py)."""

    state: str
    """One of RUN_STATES."""
    reason: str | None = None
    """Why the run failed or was interrupted."""
    started_at: str | None = None
    updated_at: str | None = None
    host: str | None = None
    pid: int | None = None
    shards_done: int = 0
    shards_total: int = 0
    rows_done: int | None = None
    """Rows in committed shards (with or without an error); absent in older records."""
    rows_failed: int | None = None
    rows_total: int | None = None
    shards_failed: int = 0
    """Shards recorded as failed (out of attempts) so far in this run."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens of the committed shards."""
    fingerprint: str | None = None
    workers: list[WorkerInfo] = Field(default_factory=list)

    _legacy_state = field_validator("state")(lambda v: _LEGACY_STATES.get(v, v))


_LEGACY_STATES = {"complete": "completed", "starting": "running"}
"""States written before the lifecycle (issue 13) had its names."""


class ShardTotals(Record):
    total: int
    committed: int
    failed: int


class RowTotals(Record):
    total: int
    ok: int
    failed: int
    missing: int
    """Planned rows without a committed row (shards failed or not run)."""


class TokenTotals(Record):
    prompt: int
    completion: int


class ThisRun(Record):
    """What this invocation did (a resumed run counts only its own work)."""

    wall_s: float
    generate_s: float
    workers: int
    shards: int
    rows: int
    completion_tokens: int
    rows_per_s: float
    tokens_per_s: float
    tail_s: float | None = None
    """Seconds from the last shard handed out to the last commit: the end of the run, when
    workers run out of work one by one."""
    engines: list[dict[str, Any]] = Field(default_factory=list)
    """Each worker's engine accounting when the run ended (`Engine.stats`, up to the last
    shard handed out), with its `worker` index; empty for backends that keep none."""
    started_at: float | None = None
    """When this invocation started (Unix time, seconds)."""
    workers_started_at: float | None = None
    """When the workers were asked for (Unix time, seconds): GPU time is billed from here."""
    attempts: list[Attempt] = Field(default_factory=list)
    """Every shard attempt this invocation started, in start order."""
    worker_restarts: list[WorkerRestart] = Field(default_factory=list)
    engine_restarts: int = 0
    """Engine restarts in place during this invocation, by every worker (replaced ones too),
    whether or not the attempt it happened in committed."""
    row_retries: int = 0
    """Requests retried within their shard attempt, over this invocation's committed shards."""
    busy_s: float | None = None
    """Seconds, summed over workers, that an engine held at least one request."""


class Attempt(Record):
    """One shard attempt of this run (the report's timeline): where and when it ran and how
    it ended."""

    shard: int
    worker: int
    attempt: int
    started_at: float
    """Unix time, seconds."""
    ended_at: float
    outcome: str
    """committed (its part is the shard's) | lost (another copy committed first) | error (the
    call raised; retried) | worker_died | cancelled (a raced copy committed) | unfinished
    (the run stopped first)"""
    speculative: bool = False
    reason: str | None = None


class WorkerRestart(Record):
    """A worker actor replaced by the driver (it died, hung, or failed to start)."""

    worker: int
    at: float
    """Unix time, seconds."""
    reason: str


class Cost(Record):
    """What this invocation used, in GPU-hours and (with run.gpu_hour_cost) money.

    A worker counts `run.gpus_per_worker` GPUs (fractions too), and a CPU worker (the
    embedded default, 0 GPUs) one, so its arithmetic is the one a GPU run gets."""

    workers: int
    gpus_per_worker: float
    wall_s: float
    """Seconds the workers were held: from the first worker starting to the end of the run."""
    gpu_hours: float
    """workers x GPUs per worker x wall_s / 3600: what a cluster bills."""
    busy_gpu_hours: float | None
    """GPU-hours while an engine held at least one request; None if no worker reported it."""
    output_tokens: int
    tokens_per_gpu_hour: float
    """Output (completion) tokens per GPU-hour used."""
    gpu_hour_cost: float | None = None
    """run.gpu_hour_cost: price of one GPU-hour (any currency; USD in the README)."""
    total: float | None = None
    """gpu_hours x gpu_hour_cost."""
    per_million_output_tokens: float | None = None
    """total / (output_tokens / 1e6): the number to compare with a batch API's price."""


class FailedShard(Record):
    shard: int
    part: str
    reason: str


class Manifest(Record):
    """`_batchinfer/manifest.json`: the final report of a run."""

    version: int = MANIFEST_VERSION
    """The layout; manifests written before this field existed are layout 1."""
    status: str
    """completed | partial | interrupted"""
    output: str
    fingerprint: str
    plan_created_at: str
    finished_at: str
    shards: ShardTotals
    rows: RowTotals
    errors: dict[str, int] = Field(default_factory=dict)
    tokens: TokenTotals
    this_run: ThisRun
    failed_shards: list[FailedShard] = Field(default_factory=list)
    shard_summaries: list[ShardSummary] = Field(default_factory=list)
    cost: Cost | None = None
    """This invocation's GPU-hours and cost; absent in manifests written before it was kept."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The plan's settings (model, engine, sampling, prompt template): what the fingerprint covers."""

    _legacy_status = field_validator("status")(lambda v: _LEGACY_STATES.get(v, v))

    def describes(self, fingerprint: str, committed: int) -> bool:
        """Whether this manifest is current: made for the plan with `fingerprint`, after the
        `committed` shards on record now (a later commit makes it stale)."""
        return self.fingerprint == fingerprint and self.shards.committed == committed
