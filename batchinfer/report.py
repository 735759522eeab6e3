"""The run report (`batchinfer report OUT`): one self-contained HTML page about a run.

It shows what a run did and where its time went: the numbers of the manifest (rows,
shards, tokens, throughput, GPU-hours, cost), throughput over time, each worker's shard
attempts on a timeline (stragglers, raced copies and worker restarts show), histograms of
latency and token lengths, errors by code with sample ids, failed shards, and the settings
the fingerprint covers. A run without a manifest (still going, or killed) is reported from
its plan, commit records and status, under a "run not finished" banner.

Reads stay bounded however large the run: the manifest and commit records are O(shards);
the histograms read only their columns, of at most MAX_SAMPLE_ROWS rows (whole parts
spread over the run, and the page says so); sample ids come from the failed-rows files
(`_errors/`) of the few shards that have each error code.

`gather` reads a run directory into a RunView; `render` turns a RunView into the page
(pure: the tests build RunViews by hand); `write_report` does both.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchinfer import lifecycle, openai_batch
from batchinfer.config import StorageConfig
from batchinfer.errors import split_error
from batchinfer.records import ShardSummary, error_counts
from batchinfer.report_page import SAMPLE_IDS, ErrorCode, RunView, Sample, render
from batchinfer.run_store import RunStore

MAX_SAMPLE_ROWS = 200_000
"""Rows read for the histograms, at most."""
HIST_COLUMNS = ("latency_s", "prompt_tokens", "completion_tokens")


class NoRun(LookupError):
    """Neither a manifest nor a plan at the URL: nothing to report on."""


def write_report(url: str, storage_cfg: StorageConfig | None, html_path: str | Path) -> Path:
    """Write the report of the run at `url` to `html_path`; NoRun if there is none."""
    page = build_page(url, storage_cfg)
    path = Path(html_path)
    path.write_text(page, encoding="utf-8")
    return path


def build_page(url: str, storage_cfg: StorageConfig | None = None) -> str:
    """The report page of the run at `url`; NoRun if there is none."""
    return render(gather(RunStore(url, storage_cfg)))


def default_html_path(url: str) -> Path:
    """`<run directory name>-report.html` in the current directory."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "run"
    return Path(f"{name}-report.html")


def gather(store: RunStore, max_rows: int = MAX_SAMPLE_ROWS) -> RunView:
    manifest, plan = store.read_manifest(), store.read_plan()
    if manifest is None and plan is None:
        raise NoRun(f"no run at {store.url} (expected {store.meta.url}/manifest.json "
                    "or plan.json)")
    parts = store.part_names()
    if manifest is not None and plan is not None and not manifest.describes(plan.fingerprint, len(parts)):
        manifest = None  # shards committed since: a resumed run is under way
    if manifest is not None and manifest.shard_summaries:
        summaries = manifest.shard_summaries
    else:
        summaries = [s for _, s in sorted(store.committed(rebuild=False).items())]
    counts = error_counts(summaries)
    if manifest is not None:
        state, detail = manifest.status, ""
        counts = manifest.errors or counts
    else:
        view = lifecycle.read(store)  # the state `batchinfer status` would say
        state, detail = (view.state, view.detail) if view is not None else ("not_started", "")
    return RunView(
        url=store.url, state=state, manifest=manifest, detail=detail,
        fingerprint=manifest.fingerprint if manifest else plan.fingerprint,
        total_rows=manifest.rows.total if manifest else plan.total_rows,
        total_shards=manifest.shards.total if manifest else len(plan.shards),
        settings=(manifest.settings if manifest else {}) or (plan.settings if plan else {}),
        summaries=summaries, sample=sample_rows(store, summaries, max_rows),
        errors=sample_errors(store, summaries, counts))


def sample_rows(store: RunStore, summaries: list[ShardSummary], max_rows: int) -> Sample:
    """The histogram columns of every committed row, or, past `max_rows`, of whole parts
    spread evenly over the run (each read up to `max_rows`, by row group)."""
    of_rows = sum(s.rows for s in summaries)
    n = len(summaries)
    k = n if of_rows <= max_rows else max(1, min(n, math.ceil(n * max_rows / of_rows)))
    chosen = [summaries[(i * n) // k] for i in range(k)]
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda s: _part_columns(store, s.part, max_rows), chosen))
    values = {}
    for column in HIST_COLUMNS:
        arrays = [r[column] for r in read if column in r]
        if arrays:
            values[column] = np.concatenate(arrays)[:max_rows]
    rows = min(sum(len(next(iter(r.values()), ())) for r in read), max_rows)
    return Sample(values, rows, of_rows, len(chosen), n)


def _part_columns(store: RunStore, part: str, max_rows: int) -> dict[str, np.ndarray]:
    path = store.part(part).path
    if part.endswith(".jsonl"):
        with store.fs.open(path, "rb") as f:
            usage = [((line.get("response") or {}).get("body") or {}).get("usage") or {}
                     for line in itertools.islice(openai_batch.read_jsonl(f.read()), max_rows)]
        return {c: np.array([u.get(c) for u in usage], dtype=float)  # a failed request: NaN
                for c in ("prompt_tokens", "completion_tokens")}
    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in HIST_COLUMNS if c in pf.schema_arrow.names]
        tables, rows = [], 0
        for group in range(pf.num_row_groups):
            if rows >= max_rows:
                break
            tables.append(pf.read_row_group(group, columns=columns))
            rows += tables[-1].num_rows
    out = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False).astype(float)
                              for t in tables]) if tables else np.array([]) for c in columns}
    return {c: v[:max_rows] for c, v in out.items()}


def sample_errors(store: RunStore, summaries: list[ShardSummary],
                  counts: dict[str, int]) -> list[ErrorCode]:
    """Each error code with its row count and up to SAMPLE_IDS ids, read from the failed-rows
    files (`_errors/`, or `errors/` of older openai_batch runs) of shards that have the code,
    else from those parts' own `id` and `error` columns: a few files per code, never all."""
    ids: dict[str, list[str]] = {code: [] for code in counts}
    messages: dict[str, str] = {}
    files = store.failed_row_files()
    for s in summaries:
        if not any(len(ids.get(code, ())) < SAMPLE_IDS for code in s.errors):
            continue
        for row_id, code, message in _failed_rows(store, s.part, files.get(s.part)):
            if code in ids and len(ids[code]) < SAMPLE_IDS:
                ids[code].append(row_id)
                messages.setdefault(code, message)
        if all(len(found) >= SAMPLE_IDS for found in ids.values()):
            break
    return [ErrorCode(code, n, ids[code], messages.get(code))
            for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _failed_rows(store: RunStore, part: str, folder: str | None) -> list[tuple[str, str, str]]:
    """(id, code, message) of a committed part's failed rows."""
    loc = store.root.child(folder, part) if folder else store.part(part)
    with store.fs.open(loc.path, "rb") as f:
        if part.endswith(".jsonl"):
            return [(str(line.get("custom_id")), str(line["error"].get("code") or "error"),
                     str(line["error"].get("message") or ""))
                    for line in openai_batch.read_jsonl(f.read()) if line.get("error")]
        if folder:
            t = pq.read_table(f, columns=["id", "error_code", "error_message"])
            return list(zip(map(str, t.column("id").to_pylist()), t.column("error_code").to_pylist(),
                            t.column("error_message").to_pylist(), strict=True))
        t = pq.read_table(f, columns=["id", "error"])
    t = t.filter(pc.is_valid(t.column("error")))
    out = []
    for row_id, error in zip(t.column("id").to_pylist(), t.column("error").to_pylist(), strict=True):
        out.append((str(row_id), *split_error(error)))
    return out
