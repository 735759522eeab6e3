"""The run report's page: a RunView (what report.py read from a run directory) -> one
self-contained HTML file. Pure: no storage, no clock but the "report written" line.

plotly draws the plots; plotly.js (~4.8 MB) is inlined once in the page head, so the page
opens offline and makes no network request. Every string that comes from the run (ids,
error messages, reasons, settings) is escaped, in the page and in the plots' hover text.
Histograms are binned here (numpy), so the page holds bin counts, not the sampled rows.
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.offline

from batchinfer.records import Attempt, Manifest, ShardSummary, now_iso

SAMPLE_IDS = 5
"""Sample ids shown per error code."""
OUTCOME_COLORS = {"committed": "#2e7d32", "committed earlier": "#a5d6a7", "lost": "#9e9e9e",
                  "cancelled": "#bdbdbd", "error": "#ef6c00", "worker_died": "#c62828",
                  "unfinished": "#1565c0"}
"""Attempt outcomes (records.Attempt.outcome; "committed earlier": a shard a previous
invocation of a resumed run committed) and their colors on the timeline."""
HIST_BINS = 40


@dataclass(frozen=True)
class Sample:
    """Per-row columns of some committed rows (latency_s, prompt_tokens, completion_tokens;
    JSONL parts have no latency), NaN where a row has none."""

    values: dict[str, np.ndarray]
    rows: int
    of_rows: int
    parts: int
    of_parts: int

    @property
    def sampled(self) -> bool:
        return self.rows < self.of_rows


@dataclass(frozen=True)
class ErrorCode:
    code: str
    rows: int
    ids: list[str]
    message: str | None = None
    """One row's error message, as an example."""


@dataclass(frozen=True)
class RunView:
    """What the page shows, read from a run directory (report.gather) or built by a test."""

    url: str
    state: str
    """The manifest's status, else the state the records give (running, stale, failed, ...)."""
    manifest: Manifest | None = None
    """None while the run is not finished (or the manifest is older than the parts)."""
    detail: str = ""
    fingerprint: str | None = None
    total_rows: int | None = None
    total_shards: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    summaries: list[ShardSummary] = field(default_factory=list)
    sample: Sample | None = None
    errors: list[ErrorCode] = field(default_factory=list)


def render(view: RunView) -> str:
    """The page: self-contained (plotly.js inline, once), every string from the run escaped."""
    m = view.manifest
    sections = [_header(view), _numbers(view), _plots(view), _errors(view)]
    if m is not None and m.failed_shards:
        sections.append(_table("Failed shards", ["shard", "part", "reason"],
                               [[f.shard, f.part, f.reason] for f in m.failed_shards]))
    sections.append(_settings(view))
    return PAGE.format(title=_e(f"batchinfer report: {view.url}"), css=CSS,
                       plotlyjs=plotly.offline.get_plotlyjs(), body="\n".join(sections))


def numbers(view: RunView) -> list[tuple[str, str, float | int, str]]:
    """(label, data-key, value, format) of the numbers table; a data-key is the value's path
    in the manifest (`rows.ok`, `cost.gpu_hours`); `this_run.worker_restarts` is a count."""
    m = view.manifest
    if m is None:
        done = sum(s.rows for s in view.summaries)
        rows = [("rows total", "rows.total", view.total_rows or 0, "int"),
                ("rows ok", "rows.ok", sum(s.rows_ok for s in view.summaries), "int"),
                ("rows failed", "rows.failed", sum(s.rows_failed for s in view.summaries), "int"),
                ("rows missing", "rows.missing", (view.total_rows or 0) - done, "int"),
                ("shards committed", "shards.committed", len(view.summaries), "int"),
                ("shards total", "shards.total", view.total_shards or 0, "int"),
                ("tokens in", "tokens.prompt", sum(s.prompt_tokens for s in view.summaries), "int"),
                ("tokens out", "tokens.completion", sum(s.completion_tokens for s in view.summaries), "int")]
        return rows
    t = m.this_run
    rows = [("rows total", "rows.total", m.rows.total, "int"), ("rows ok", "rows.ok", m.rows.ok, "int"),
            ("rows failed", "rows.failed", m.rows.failed, "int"),
            ("rows missing", "rows.missing", m.rows.missing, "int"),
            ("shards committed", "shards.committed", m.shards.committed, "int"),
            ("shards total", "shards.total", m.shards.total, "int"),
            ("shards failed", "shards.failed", m.shards.failed, "int"),
            ("tokens in", "tokens.prompt", m.tokens.prompt, "int"),
            ("tokens out", "tokens.completion", m.tokens.completion, "int"),
            ("wall time (this run)", "this_run.wall_s", t.wall_s, "s"),
            ("generating", "this_run.generate_s", t.generate_s, "s"),
            ("workers", "this_run.workers", t.workers, "int"),
            ("rows (this run)", "this_run.rows", t.rows, "int"),
            ("rows / s", "this_run.rows_per_s", t.rows_per_s, "2f"),
            ("output tokens / s", "this_run.tokens_per_s", t.tokens_per_s, "1f"),
            ("engine restarts", "this_run.engine_restarts", t.engine_restarts, "int"),
            ("worker restarts", "this_run.worker_restarts", len(t.worker_restarts), "int"),
            ("row retries", "this_run.row_retries", t.row_retries, "int")]
    if t.tail_s is not None:  # the last hand-out to the last commit: stragglers make it long
        rows.insert(rows.index(("workers", "this_run.workers", t.workers, "int")),
                    ("tail", "this_run.tail_s", t.tail_s, "s"))
    c = m.cost
    if c is not None:
        rows += [(label, f"cost.{key}", getattr(c, key), fmt) for label, key, fmt in COST_ROWS
                 if getattr(c, key) is not None]
    return rows


COST_ROWS = [("GPU-hours", "gpu_hours", "sig"), ("busy GPU-hours", "busy_gpu_hours", "sig"),
             ("output tokens / GPU-hour", "tokens_per_gpu_hour", "sig"),
             ("price of a GPU-hour", "gpu_hour_cost", "sig"), ("cost", "total", "sig"),
             ("cost / 1M output tokens", "per_million_output_tokens", "sig")]


def _significant(v: float) -> str:
    """Whole numbers from 100, cents from 1, three significant digits below (a test run's
    cost is a fraction of a cent)."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3g}"


FORMATS = {"int": "{:,}".format, "s": "{:,.1f} s".format, "1f": "{:,.1f}".format,
           "2f": "{:,.2f}".format, "sig": _significant}


def _header(view: RunView) -> str:
    m = view.manifest
    facts = [("output", view.url), ("status", view.state), ("fingerprint", view.fingerprint or "?")]
    if m is not None:
        facts += [("plan created", m.plan_created_at), ("finished", m.finished_at)]
    facts.append(("report written", now_iso()))
    finished = m is not None and m.status in ("completed", "partial")
    banner = "" if finished else (
        f'<p class="banner" id="not-finished">run not finished: state {_e(view.state)}'
        + (f" ({_e(view.detail)})" if view.detail else "") + "</p>")
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f"<header><h1>batchinfer run report</h1>{banner}<dl>{items}</dl></header>"


GROUPS = {"rows": "Rows", "shards": "Shards", "tokens": "Tokens", "this_run": "This run", "cost": "Cost"}
"""The numbers table's groups, by the first part of their data-keys."""


def _numbers(view: RunView) -> str:
    groups: dict[str, list[str]] = {}
    for label, key, value, fmt in numbers(view):
        groups.setdefault(key.split(".")[0], []).append(
            f'<tr><th>{_e(label)}</th><td data-key="{key}" data-value="{json.dumps(value)}">'
            f"{_e(FORMATS[fmt](value))}</td></tr>")
    tables = "".join(f'<table class="numbers"><tr><th colspan="2" class="group">{GROUPS[g]}</th></tr>'
                     f'{"".join(rows)}</table>' for g, rows in groups.items())
    note = "" if view.manifest is not None else (
        '<p class="note">From the commit records: the run has no manifest yet.</p>')
    return f'<section><h2>Numbers</h2>{note}<div class="numbers">{tables}</div></section>'


def _plots(view: RunView) -> str:
    out = ["<section><h2>Throughput</h2>",
           _plot("throughput", throughput(view.summaries), "no shard committed yet"), "</section>",
           "<section><h2>Shard timeline</h2>"]
    if view.manifest is None or not view.manifest.this_run.attempts:
        out.append('<p class="note">Committed attempts only: the run did not record its attempts '
                   "(a run without a manifest, or one written before they were kept).</p>")
    out.append(_plot("timeline", timeline(view), "no shard attempt on record"))
    restarts = view.manifest.this_run.worker_restarts if view.manifest is not None else []
    if restarts:
        out.append(_table("Worker restarts", ["worker", "at", "reason"],
                          [[r.worker, _utc(r.at), r.reason] for r in restarts], level=3))
    out.append("</section><section><h2>Latency and token lengths</h2>")
    s = view.sample
    if s is not None and s.sampled:
        out.append(f'<p class="note">A sample: <span data-key="sample.rows">{s.rows:,}</span> of '
                   f"{s.of_rows:,} rows, whole parts ({s.parts} of {s.of_parts}) spread over the run.</p>")
    out.append('<div class="grid">')
    for column, title in (("latency_s", "latency (s)"), ("prompt_tokens", "prompt tokens"),
                          ("completion_tokens", "completion tokens")):
        values = s.values.get(column) if s is not None else None
        out.append(_plot(column, histogram(values, title), f"no {title} recorded"))
    out.append("</div></section>")
    return "".join(out)


# --------------------------------------------------------------------------- plots


def throughput(summaries: list[ShardSummary]):
    """Cumulative rows and output tokens over time, one step per commit."""
    if not summaries:
        return None
    done = sorted(summaries, key=lambda s: _parse_iso(s.committed_at))
    times = [_plot_time(_parse_iso(s.committed_at)) for s in done]
    rows = np.cumsum([s.rows for s in done]).tolist()
    tokens = np.cumsum([s.completion_tokens for s in done]).tolist()
    fig = go.Figure([
        go.Scatter(x=times, y=rows, name="rows", mode="lines+markers", line_shape="hv",
                   line_color="#1565c0"),
        go.Scatter(x=times, y=tokens, name="output tokens", mode="lines+markers", line_shape="hv",
                   line_color="#ef6c00", yaxis="y2")])
    fig.update_layout(**_layout(340), xaxis_title="commit time (UTC)",
                      yaxis={"title": "rows committed", "rangemode": "tozero"},
                      yaxis2={"title": "output tokens", "overlaying": "y", "side": "right",
                              "rangemode": "tozero", "showgrid": False},
                      legend=LEGEND)
    if len(done) > 200:
        fig.update_traces(mode="lines")
    return fig


@dataclass(frozen=True)
class Bar:
    """One shard attempt on the timeline."""

    worker: int
    shard: int
    attempt: int
    start: float
    end: float
    outcome: str
    speculative: bool = False
    reason: str | None = None
    track: int = 0
    """Its track in the worker's lane (`tracks`)."""


def timeline_bars(view: RunView) -> list[Bar]:
    """The run's shard attempts (manifest.this_run.attempts), and each committed shard that
    no attempt of this invocation committed (a resumed run's earlier work, or a run that did
    not record its attempts), from its summary: it started at `started_at`, or `generate_s`
    before its commit."""
    attempts: list[Attempt] = view.manifest.this_run.attempts if view.manifest is not None else []
    bars = [Bar(a.worker, a.shard, a.attempt, a.started_at, max(a.ended_at, a.started_at), a.outcome,
                a.speculative, a.reason) for a in attempts]
    now = {a.shard for a in attempts if a.outcome == "committed"}
    for s in view.summaries:
        if s.shard in now:
            continue
        committed = _parse_iso(s.committed_at)
        start = s.started_at if s.started_at is not None else committed - s.generate_s
        bars.append(Bar(s.worker, s.shard, s.attempt, start, max(committed, start),
                        "committed earlier" if attempts else "committed"))
    return bars


def tracks(bars: list[Bar]) -> dict[int, int]:
    """Each bar's track within its worker's lane (by index in `bars`): a worker holds several
    shards at once (the next ones queue behind the one generating), so attempts that overlap
    in time go on tracks of their own, first fit in start order, instead of hiding each other."""
    out: dict[int, int] = {}
    ends: dict[int, list[float]] = {}  # worker -> end of the last bar on each track
    for i in sorted(range(len(bars)), key=lambda i: (bars[i].start, bars[i].end)):
        b = bars[i]
        free = ends.setdefault(b.worker, [])
        track = next((t for t, end in enumerate(free) if end <= b.start), len(free))
        if track == len(free):
            free.append(b.end)
        else:
            free[track] = b.end
        out[i] = track
    return out


def timeline(view: RunView):
    """Each worker's lane with its shard attempts (color: outcome; hatched: a speculative
    copy; shards held at once on tracks of their own) and its restarts (x markers)."""
    bars = timeline_bars(view)
    if not bars:
        return None
    rows = {s.shard: s.rows for s in view.summaries}
    restarts = view.manifest.this_run.worker_restarts if view.manifest is not None else []
    track = tracks(bars)
    bars = [dataclasses.replace(b, track=track[i]) for i, b in enumerate(bars)]
    lanes = sorted({(b.worker, b.track) for b in bars} | {(r.worker, 0) for r in restarts})
    fig = go.Figure()
    for outcome in sorted({b.outcome for b in bars}, key=_outcome_order):
        mine = [b for b in bars if b.outcome == outcome]
        fig.add_trace(go.Bar(
            orientation="h", name=outcome, base=[_plot_time(b.start) for b in mine],
            x=[max(b.end - b.start, 0.001) * 1000 for b in mine], y=[_lane(b.worker, b.track) for b in mine],
            marker={"color": OUTCOME_COLORS.get(outcome, "#6a1b9a"), "line": {"color": "white", "width": 1},
                    "pattern": {"shape": ["/" if b.speculative else "" for b in mine]}},
            text=[f"s{b.shard}" for b in mine] if len(bars) <= 200 else None, textposition="inside",
            insidetextanchor="middle",
            customdata=[[b.shard, b.attempt, rows.get(b.shard, "?") if outcome == "committed" else "-",
                         f"{b.end - b.start:.1f}", "yes" if b.speculative else "no", _e(b.reason or "")]
                        for b in mine],
            hovertemplate=("shard %{customdata[0]} attempt %{customdata[1]}<br>rows %{customdata[2]}, "
                           "%{customdata[3]} s, speculative %{customdata[4]}<br>%{customdata[5]}"
                           f"<extra>{outcome}</extra>")))
    if restarts:
        fig.add_trace(go.Scatter(
            x=[_plot_time(r.at) for r in restarts], y=[_lane(r.worker) for r in restarts], mode="markers",
            name="worker restart", marker={"symbol": "x", "size": 13, "color": "black"},
            customdata=[_e(r.reason) for r in restarts],
            hovertemplate="worker restarted: %{customdata}<extra></extra>"))
    fig.update_layout(**_layout(max(240, 90 + 28 * len(lanes))), barmode="overlay", showlegend=True,
                      xaxis={"type": "date", "title": "time (UTC)"},
                      yaxis={"categoryorder": "array", "categoryarray": [_lane(*lane) for lane in reversed(lanes)]},
                      legend=LEGEND)
    return fig


def histogram(values: np.ndarray | None, title: str):
    """A histogram, binned here (integer bins for token counts that fit), with p50/p90/p99."""
    if values is None:
        return None
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    lo, hi = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.round(values)))
    if integral and hi - lo < HIST_BINS:
        edges = np.arange(lo - 0.5, hi + 1.5)
    else:
        edges = np.histogram_bin_edges(values, bins=HIST_BINS)
    counts, edges = np.histogram(values, bins=edges)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    fig = go.Figure(go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist(),
                           width=np.diff(edges).tolist(), marker_color="#5c6bc0",
                           hovertemplate="%{x:.3g}: %{y} rows<extra></extra>"))
    fig.update_layout(**{**_layout(300), "margin": {"l": 50, "r": 20, "t": 40, "b": 50}}, bargap=0.02, xaxis_title=title, yaxis_title="rows",
                      title={"text": f"p50 {_short(p50)} · p90 {_short(p90)} · p99 {_short(p99)} · "
                                     f"{values.size:,} rows", "font": {"size": 13}})
    return fig


LEGEND = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0}


def _short(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _layout(height: int) -> dict[str, Any]:
    return {"template": "plotly_white", "height": height, "margin": {"l": 60, "r": 60, "t": 40, "b": 50}}


def _outcome_order(outcome: str) -> int:
    order = list(OUTCOME_COLORS)
    return order.index(outcome) if outcome in order else len(order)


def _lane(worker: int, track: int = 0) -> str:
    """A worker's lane label on the timeline; its extra tracks (shards held at once) follow it."""
    name = f"worker {worker}" if worker >= 0 else "worker ?"
    return name if track == 0 else f"{name} +{track}"


def _parse_iso(text: str) -> float:
    """ISO 8601 -> Unix seconds; records write UTC (a time without an offset is taken as UTC)."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _plot_time(t: float) -> str:
    """Unix seconds -> the UTC time plotly.js reads (it ignores time zone offsets)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _plot(name: str, fig, empty: str) -> str:
    if fig is None:
        return f'<p class="empty" data-plot="{name}">{_e(empty)}</p>'
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}",
                      config={"displaylogo": False, "responsive": True})
    return f'<div class="plot" data-plot="{name}">{div}</div>'


def _errors(view: RunView) -> str:
    if not view.errors:
        return '<section><h2>Errors</h2><p class="empty">no row failed</p></section>'
    rows = [[e.code, f"{e.rows:,}", ", ".join(e.ids) or "(none found)", _clip(e.message or "")]
            for e in view.errors]
    return _table("Errors by code", ["code", "rows", f"sample ids (up to {SAMPLE_IDS})", "example message"],
                  rows, css="errors")


def _settings(view: RunView) -> str:
    text = json.dumps(view.settings, indent=2, sort_keys=True, default=str)
    return (f'<section><h2>Settings</h2><p>fingerprint <code data-key="fingerprint">'
            f"{_e(view.fingerprint or '?')}</code> covers the inputs and these settings:</p>"
            f"<pre>{_e(text)}</pre></section>")


def _table(title: str, head: list[str], rows: list[list[Any]], level: int = 2, css: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<section><h{level}>{_e(title)}</h{level}><table class="{css}"><tr>{th}</tr>{trs}</table>'
            "</section>")


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222;
       padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 15px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dt { color: #666; } dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; } th, td { padding: 3px 10px; border-bottom: 1px solid #eee;
       text-align: left; vertical-align: top; }
table.numbers td { text-align: right; font-variant-numeric: tabular-nums; }
table.errors td { word-break: break-word; max-width: 520px; }
.banner { background: #fff3e0; border: 1px solid #ef6c00; padding: 8px 12px; font-weight: 600; }
.note, .empty { color: #666; } .plot { height: auto; }
/* fixed columns: each plot is drawn as its script runs, before the next cell exists */
.grid { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
@media (max-width: 900px) { .grid { grid-template-columns: minmax(0, 1fr); } }
div.numbers { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
th.group { font-size: 15px; border-bottom: 2px solid #ccc; }
pre { background: #f7f7f7; padding: 10px; overflow: auto; max-height: 480px; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
<script>{plotlyjs}</script>
</head><body>
{body}
</body></html>
"""
