"""The run report (`batchinfer report`, issue 13 item 3): one self-contained HTML page.

Built on a synthetic run directory written here (plan, Parquet parts, failed-rows files,
a manifest with attempts, a raced copy, a worker restart, errors and cost): no Ray, no
model. The browser test opens the page in headless Chromium (Debian's
chromium-headless-shell, which scripts/setup.sh --dev installs) with the network blocked.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchinfer import report
from batchinfer.cli import main
from batchinfer.config import StorageConfig
from batchinfer.plan import InputFile, Piece, Plan, Shard
from batchinfer.records import (
    Attempt,
    Cost,
    FailedShard,
    Manifest,
    RowTotals,
    RunStatus,
    ShardSummary,
    ShardTotals,
    ThisRun,
    TokenTotals,
    WorkerRestart,
)
from batchinfer.report_page import ErrorCode, RunView, Sample, histogram, render, timeline_bars
from batchinfer.results import to_parquet
from batchinfer.run_store import RunStore
from tests.conftest import REPO

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
EVIL = "<script>alert('x')</script>"
ROWS = 10
SHARDS = 4
SETTINGS = {"model": "SmolLM2-135M-Instruct", "sampling": {"max_tokens": 16, "stop": ["</s>"]}}


def iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def make_plan() -> Plan:
    schema = pa.schema([pa.field("id", pa.string()), pa.field("prompt", pa.string())])
    files = [InputFile(url="/in/p.parquet", name="p.parquet", version="v1", size=1,
                       num_rows=ROWS * SHARDS, row_groups=(ROWS,) * SHARDS)]
    shards = [Shard(i, (Piece(0, i * ROWS, ROWS),)) for i in range(SHARDS)]
    return Plan(files=files, shards=shards, settings=SETTINGS, rows_per_shard=ROWS,
                input_schema=base64.b64encode(schema.serialize().to_pybytes()).decode())


def write_part(out: Path, shard: int, errors: dict[int, str], worker: int, attempt: int,
               started: float, generate_s: float) -> ShardSummary:
    """A committed Parquet part of ROWS rows (row k of shard s has id q<s><k>; the rows in
    `errors` fail with that error), its failed-rows file, and its summary."""
    ids = [f"q{shard}{k}" for k in range(ROWS)]
    if shard == 2:
        ids[3] = EVIL  # ids are user data: the page must escape them
    err = [errors.get(k) for k in range(ROWS)]
    table = pa.table({
        "id": ids,
        "output": [None if e else f"answer {k}" for k, e in enumerate(err)],
        "finish_reason": ["error" if e else "stop" for e in err],
        "prompt_tokens": [20 + k for k in range(ROWS)],
        "completion_tokens": [0 if e else 5 + k for k, e in enumerate(err)],
        "latency_s": [None if e else 0.5 + 0.1 * k for k, e in enumerate(err)],
        "error": err,
    })
    codes: dict[str, int] = {}
    for e in err:
        if e:
            codes[e.split(":")[0]] = codes.get(e.split(":")[0], 0) + 1
    summary = ShardSummary(
        shard=shard, part=f"part-{shard:06d}.parquet", rows=ROWS, rows_ok=ROWS - len(errors),
        rows_failed=len(errors), prompt_tokens=sum(table.column("prompt_tokens").to_pylist()),
        completion_tokens=sum(table.column("completion_tokens").to_pylist()), errors=codes,
        attempt=attempt, worker=worker, generate_s=generate_s,
        committed_at=iso(started + generate_s + 1), started_at=started)
    (out / summary.part).write_bytes(to_parquet(table, summary, "zstd"))
    if errors:
        failed = [(ids[k], e) for k, e in enumerate(err) if e]
        (out / "_errors").mkdir(exist_ok=True)
        pq.write_table(pa.table({
            "id": [i for i, _ in failed],
            "error_code": [e.split(":", 1)[0] for _, e in failed],
            "error_message": [e.split(":", 1)[1].strip() for _, e in failed],
            "shard": [shard] * len(failed), "attempt": [attempt] * len(failed)}),
            out / "_errors" / summary.part)
    return summary


def write_run(out: Path, finished: bool = True) -> Manifest | None:
    """A run of 4 shards on 2 workers: shard 1's first attempt died with its worker (which was
    restarted), shard 2 was raced by a speculative copy that lost, shard 3 failed twice and
    is a failed shard; shards 1 and 2 have failed rows. Without `finished`, only shards 0
    and 1 are committed, no manifest, and the status says running (its driver is gone)."""
    store = RunStore(str(out))
    plan = store.write_plan(make_plan())
    summaries = [write_part(out, 0, {}, worker=0, attempt=1, started=T0 + 5, generate_s=20),
                 write_part(out, 1, {2: "prompt_too_long: 5000 tokens > 4096",
                                     7: "prompt_too_long: 4100 tokens > 4096"},
                            worker=1, attempt=2, started=T0 + 16, generate_s=18)]
    if not finished:
        store.write_status(RunStatus(state="running", shards_done=2, shards_total=SHARDS))
        return None
    summaries.append(write_part(out, 2, {3: f"timeout: request over 60 s {EVIL}"}, worker=0, attempt=1,
                                started=T0 + 26, generate_s=30))
    attempts = [
        Attempt(shard=0, worker=0, attempt=1, started_at=T0 + 5, ended_at=T0 + 26, outcome="committed"),
        Attempt(shard=1, worker=1, attempt=1, started_at=T0 + 5, ended_at=T0 + 12, outcome="worker_died",
                reason="actor died: SIGKILL"),
        Attempt(shard=1, worker=1, attempt=2, started_at=T0 + 16, ended_at=T0 + 35, outcome="committed"),
        Attempt(shard=2, worker=0, attempt=1, started_at=T0 + 26, ended_at=T0 + 57, outcome="committed"),
        Attempt(shard=2, worker=1, attempt=2, started_at=T0 + 40, ended_at=T0 + 57, outcome="cancelled",
                speculative=True),
        Attempt(shard=3, worker=1, attempt=1, started_at=T0 + 35, ended_at=T0 + 38, outcome="error",
                reason="engine_error: CUDA OOM"),
        Attempt(shard=3, worker=0, attempt=2, started_at=T0 + 57, ended_at=T0 + 60, outcome="error",
                reason=f"engine_error: {EVIL}"),
    ]
    tokens_out = sum(s.completion_tokens for s in summaries)
    m = Manifest(
        status="partial", output=store.url, fingerprint=plan.fingerprint, plan_created_at=plan.created_at,
        finished_at=iso(T0 + 62),
        shards=ShardTotals(total=SHARDS, committed=3, failed=1),
        rows=RowTotals(total=ROWS * SHARDS, ok=27, failed=3, missing=ROWS),
        errors={"prompt_too_long": 2, "timeout": 1},
        tokens=TokenTotals(prompt=sum(s.prompt_tokens for s in summaries), completion=tokens_out),
        this_run=ThisRun(wall_s=62.0, generate_s=55.5, workers=2, shards=3, rows=30,
                         completion_tokens=tokens_out, rows_per_s=0.541, tokens_per_s=5.23,
                         started_at=T0, workers_started_at=T0 + 1, attempts=attempts, tail_s=22.0,
                         worker_restarts=[WorkerRestart(worker=1, at=T0 + 13, reason="died: SIGKILL")],
                         engine_restarts=1, row_retries=2, busy_s=90.5),
        failed_shards=[FailedShard(shard=3, part="part-000003.parquet", reason=f"engine_error: {EVIL}")],
        shard_summaries=summaries,
        cost=Cost(workers=2, gpus_per_worker=1, wall_s=61.0, gpu_hours=0.0339, busy_gpu_hours=0.0251,
                  output_tokens=tokens_out, tokens_per_gpu_hour=4012.3, gpu_hour_cost=1.8,
                  total=0.061, per_million_output_tokens=448.5),
        settings=SETTINGS)
    store.write_manifest(m, success=False)
    return m


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, Manifest]:
    out = tmp_path / "out"
    out.mkdir()
    return out, write_run(out)


def manifest_value(m: Manifest, key: str):
    value = m
    for name in key.split("."):
        value = getattr(value, name)
    return len(value) if isinstance(value, list) else value


def cells(page: str) -> dict[str, tuple[str, str]]:
    """data-key -> (data-value, text) of the numbers table."""
    return {k: (v, t) for k, v, t in re.findall(r'<td data-key="([^"]+)" data-value="([^"]*)">([^<]*)</td>', page)}


# --------------------------------------------------------------------------- reading and the page


def test_gather_reads_the_manifest_samples_and_error_ids(run_dir):
    out, m = run_dir
    view = report.gather(RunStore(str(out)))
    assert (view.state, view.manifest, view.fingerprint) == ("partial", m, m.fingerprint)
    assert view.sample.rows == view.sample.of_rows == 30 and not view.sample.sampled
    latency = view.sample.values["latency_s"]
    assert np.isnan(latency).sum() == 3 and np.nanmax(latency) == pytest.approx(1.4)
    assert sorted(view.sample.values["prompt_tokens"]) == sorted([20 + k for k in range(ROWS)] * 3)
    assert view.errors == [
        ErrorCode("prompt_too_long", 2, ["q12", "q17"], "5000 tokens > 4096"),
        ErrorCode("timeout", 1, [EVIL], f"request over 60 s {EVIL}")]


def test_error_ids_come_from_the_parts_without_failed_rows_files(run_dir):
    out, _ = run_dir
    shutil.rmtree(out / "_errors")
    view = report.gather(RunStore(str(out)))
    assert [(e.code, e.ids) for e in view.errors] == [("prompt_too_long", ["q12", "q17"]), ("timeout", [EVIL])]


def test_a_big_run_is_sampled_by_whole_parts_and_the_page_says_so(run_dir):
    out, _ = run_dir
    view = report.gather(RunStore(str(out)), max_rows=15)
    assert view.sample.sampled and (view.sample.rows, view.sample.of_rows) == (15, 30)
    assert (view.sample.parts, view.sample.of_parts) == (2, 3)
    page = render(view)
    assert 'A sample: <span data-key="sample.rows">15</span> of 30 rows' in page


def test_the_page_holds_the_manifest_numbers_escaped_strings_and_plotly_once(run_dir):
    out, m = run_dir
    page = report.render(report.gather(RunStore(str(out))))
    found = cells(page)
    assert set(found) == {
        "rows.total", "rows.ok", "rows.failed", "rows.missing", "shards.committed", "shards.total",
        "shards.failed", "tokens.prompt", "tokens.completion", "this_run.wall_s", "this_run.generate_s",
        "this_run.workers", "this_run.rows", "this_run.tail_s", "this_run.rows_per_s", "this_run.tokens_per_s", "this_run.engine_restarts",
        "this_run.worker_restarts", "this_run.row_retries", "cost.gpu_hours", "cost.busy_gpu_hours",
        "cost.tokens_per_gpu_hour", "cost.gpu_hour_cost", "cost.total", "cost.per_million_output_tokens"}
    for key, (value, _) in found.items():
        assert json.loads(value) == manifest_value(m, key), key
    assert found["rows.ok"][1] == "27" and found["this_run.wall_s"][1] == "62.0 s"
    assert (found["cost.per_million_output_tokens"][1], found["cost.total"][1]) == ("448", "0.061")
    assert EVIL not in page  # never verbatim ...
    assert html_escaped(EVIL) in page  # ... but shown, escaped (ids, messages, reasons)
    assert page.count("<script>") == 1 + 5  # plotly.js once, then one call per plot
    assert not re.search(r"""<(script|link|img)[^>]*(src|href)=""", page)  # nothing to fetch
    assert "run not finished" not in page
    assert html_escaped('"stop": [\n      "</s>"') in page  # the settings, pretty and escaped
    assert m.fingerprint in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_the_timeline_shows_every_attempt_or_else_each_committed_shard():
    m = Manifest.from_json((REPO / "tests" / "data" / "legacy_run" / "_batchinfer" / "manifest.json").read_text())
    view = RunView(url="x", state=m.status, manifest=m, summaries=m.shard_summaries)
    [bar] = timeline_bars(view)  # a manifest from before attempts and started_at were kept
    s = m.shard_summaries[0]
    assert (bar.shard, bar.worker, bar.outcome) == (s.shard, s.worker, "committed")
    assert bar.end - bar.start == pytest.approx(s.generate_s)
    later = s.model_copy(update={"started_at": bar.start - 5})
    [bar2] = timeline_bars(RunView(url="x", state="completed", summaries=[later]))
    assert bar2.start == bar.start - 5
    # a resumed run: this invocation's attempts, and the shard an earlier one committed
    resumed = m.model_copy(update={"this_run": m.this_run.model_copy(update={"attempts": [
        Attempt(shard=1, worker=0, attempt=1, started_at=10.0, ended_at=20.0, outcome="committed")]})})
    shard1 = s.model_copy(update={"shard": 1, "part": "part-000001.parquet"})
    bars = timeline_bars(RunView(url="x", state="completed", manifest=resumed, summaries=[s, shard1]))
    assert sorted((b.shard, b.outcome) for b in bars) == [(0, "committed earlier"), (1, "committed")]


def test_histograms_bin_integers_one_per_value_and_skip_missing_values():
    fig = histogram(np.array([3.0, 3.0, 5.0, np.nan]), "tokens")
    bar = fig.data[0]
    assert list(bar.x) == [3.0, 4.0, 5.0] and list(bar.y) == [2, 0, 1]
    assert histogram(np.array([np.nan]), "tokens") is None and histogram(None, "x") is None
    assert len(histogram(np.linspace(0, 1, 1000), "latency").data[0].y) == 40


def test_a_view_without_plots_data_says_so():
    page = render(RunView(url="s3://b/run", state="not_started", total_rows=10, total_shards=1,
                          sample=Sample({}, 0, 0, 0, 0)))
    assert "run not finished: state not_started" in page
    assert 'class="plot"' not in page and page.count("<script>") == 1
    assert "no shard committed yet" in page and "no latency (s) recorded" in page


def test_a_killed_run_is_reported_from_its_records(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_run(out, finished=False)
    html_path = report.write_report(str(out), None, tmp_path / "r.html")
    page = html_path.read_text()
    assert "run not finished: state stale (no driver is running it" in page
    found = cells(page)
    assert {k: json.loads(v) for k, (v, _) in found.items()} == {
        "rows.total": 40, "rows.ok": 18, "rows.failed": 2, "rows.missing": 20,
        "shards.committed": 2, "shards.total": 4, "tokens.prompt": 490, "tokens.completion": 171}
    assert "q12, q17" in page and page.count('class="plot"') == 5


def test_the_cli_writes_the_report_and_refuses_a_folder_without_a_run(run_dir, tmp_path):
    out, _ = run_dir
    target = tmp_path / "r" / "page.html"
    target.parent.mkdir()
    done = CliRunner().invoke(main, ["report", str(out), "--html", str(target)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == f"report written: {target}"
    assert target.stat().st_size > 4_000_000  # plotly.js inline
    empty = tmp_path / "empty"
    empty.mkdir()
    done = CliRunner().invoke(main, ["report", str(empty), "--html", str(tmp_path / "x.html")])
    assert done.exit_code == 2
    assert f"no run at {empty} (expected {empty}/_batchinfer/manifest.json or plan.json)" in done.output
    assert not (tmp_path / "x.html").exists()


def test_a_run_on_s3_is_reported_the_same(run_dir, s3, tmp_path):
    out, m = run_dir
    for f in sorted(out.rglob("*")):
        if f.is_file():
            s3.fs.put_file(str(f), f"{s3.bucket}/runs/r1/{f.relative_to(out)}")
    cfg = StorageConfig(endpoint_url=s3.endpoint)
    view = report.gather(RunStore(s3.url("runs/r1"), cfg))
    local = report.gather(RunStore(str(out)))
    assert (view.manifest, view.errors, view.sample.rows) == (m, local.errors, 30)
    page = report.write_report(s3.url("runs/r1"), cfg, tmp_path / "s3.html").read_text()
    assert cells(page) == cells(report.render(local))


@pytest.mark.parametrize("errors_dir", ["_errors", "errors", None])
def test_an_openai_batch_run_has_token_histograms_and_error_ids_from_its_lines(tmp_path, errors_dir):
    """JSONL parts (OpenAI batch output lines) carry usage but no latency; failed requests'
    custom_ids come from the error file (`_errors/`, or `errors/` before issue 13), else
    from the part."""
    from batchinfer import openai_batch
    from batchinfer.results import summary_from_part

    out = tmp_path / "out"
    out.mkdir()
    RunStore(str(out)).write_plan(make_plan())
    rows = [openai_batch.Row(custom_id=f"c{k}", kind="chat", model="m", text=None if k == 4 else "hi",
                             finish_reason="error" if k == 4 else "stop", prompt_tokens=10 + k,
                             completion_tokens=None if k == 4 else 3,
                             error="bad_request: line 5 is not JSON" if k == 4 else None)
             for k in range(ROWS)]
    lines = [openai_batch.result_line(r, "fp", "m") for r in rows]
    (out / "part-000000.jsonl").write_bytes(openai_batch.to_jsonl(lines))
    if errors_dir:
        (out / errors_dir).mkdir()
        (out / errors_dir / "part-000000.jsonl").write_bytes(openai_batch.to_jsonl([lines[4]]))
    with open(out / "part-000000.jsonl", "rb") as f:
        assert summary_from_part("part-000000.jsonl", f).errors == {"bad_request": 1}
    view = report.gather(RunStore(str(out)))
    assert view.errors == [ErrorCode("bad_request", 1, ["c4"], "line 5 is not JSON")]
    assert "latency_s" not in view.sample.values
    assert np.nansum(view.sample.values["completion_tokens"]) == 27
    page = render(view)
    assert "no latency (s) recorded" in page and page.count('class="plot"') == 4
    assert "worker ?" in page  # a summary rebuilt from JSONL lines does not know its worker


def test_the_default_page_name_follows_the_run_directory():
    assert report.default_html_path("s3://bucket/runs/2026-01-01/") == Path("2026-01-01-report.html")
    assert report.default_html_path("out/local") == Path("local-report.html")


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    from scripts.report_screenshot import CHROMIUM, launch

    missing = [what for what, there in (
        (CHROMIUM, os.path.exists(CHROMIUM)),
        ("the playwright package", importlib.util.find_spec("playwright") is not None)) if not there]
    if missing:
        message = f"headless browser test needs {' and '.join(missing)} (scripts/setup.sh --dev)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def non_white_share(png: bytes) -> float:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return float((pixels.min(axis=2) < 235).mean())


def test_the_page_renders_offline_in_a_browser(browser, run_dir, tmp_path):
    from scripts.report_screenshot import open_report

    out, m = run_dir
    html_path = report.write_report(str(out), None, tmp_path / "report.html")
    page, problems = open_report(browser, html_path)
    try:
        plots = page.locator(".plot").all()
        assert [p.get_attribute("data-plot") for p in plots] == [
            "throughput", "timeline", "latency_s", "prompt_tokens", "completion_tokens"]
        for plot in plots:
            share = non_white_share(plot.screenshot())
            assert share > 0.01, f"{plot.get_attribute('data-plot')}: {share:.3%} of its pixels drawn"
        shown = page.eval_on_selector_all(
            "table.numbers td[data-key]", "cells => cells.map(c => [c.dataset.key, c.dataset.value, c.innerText])")
        assert len(shown) == 25
        for key, value, text in shown:
            expected = manifest_value(m, key)
            assert json.loads(value) == expected, key
            number = float(text.removesuffix(" s").replace(",", ""))
            assert number == pytest.approx(expected, rel=0.01, abs=0.001), key
        # the timeline holds every attempt and the restart, hatched where speculative
        traces = page.evaluate("document.getElementById('plot-timeline').data.map("
                               "t => [t.name, t.x.length, t.marker.pattern ? t.marker.pattern.shape : null])")
        assert {t[0]: t[1] for t in traces} == {"committed": 3, "cancelled": 1, "error": 2,
                                                  "worker_died": 1, "worker restart": 1}
        assert ["cancelled", 1, ["/"]] in traces
        assert page.locator("table.errors td", has_text="q12, q17").count() == 1
        assert page.locator("table.errors td", has_text=EVIL).count() == 2  # an id, a message: text
        assert page.locator("script", has_text="alert").count() == 0
    finally:
        page.close()
    assert problems == {"console": [], "pageerror": [], "requests": []}


def test_the_screenshot_script_writes_a_small_png(browser, run_dir, tmp_path):
    from PIL import Image

    from scripts.report_screenshot import screenshot

    out, _ = run_dir
    size = screenshot(str(out), tmp_path / "shot.png", browser=browser)
    assert size == (tmp_path / "shot.png").stat().st_size < 300_000
    with Image.open(tmp_path / "shot.png") as image:
        assert image.width == 1200 and image.height > 1500


@pytest.mark.slow
def test_the_report_of_a_demo_run_renders_offline_and_shows_its_manifest(browser, ray_cluster, tmp_path):
    """The demo's config (configs/local.yaml: the real model, 2 workers) on a few prompts, one
    of them null (a failed row) and a price per GPU-hour: the report opens in a real browser
    with no console errors and no requests, every plot draws, and every number on the page
    is the manifest's."""
    from batchinfer import runner
    from batchinfer.config_loader import load_config
    from scripts.report_screenshot import open_report
    from scripts.sample_prompts import write_sample_prompts

    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=23, row_group_size=6)
    bad = pa.table({"id": ["ok-1", "bad-1"], "prompt": pa.array(["Say hi.", None], pa.string()),
                    "category": ["chat", "chat"]})
    pq.write_table(bad, tmp_path / "prompts" / "zz-bad.parquet")
    cfg = load_config(str(REPO / "configs" / "local.yaml"), (
        f"input.path={tmp_path / 'prompts'}", f"output.path={tmp_path / 'out'}",
        "sampling.max_tokens=8", "run.rows_per_shard=6", "run.gpu_hour_cost=1.86"))
    result = runner.run(cfg, progress=False)
    m = result.manifest
    assert (result.status, m.rows.failed, m.errors) == ("partial", 1, {"empty_prompt": 1})
    assert m.cost is not None and m.cost.total == pytest.approx(m.cost.gpu_hours * 1.86, rel=1e-3)
    assert len(m.this_run.attempts) >= m.shards.committed and m.this_run.busy_s > 0

    html_path = report.write_report(str(tmp_path / "out"), None, tmp_path / "report.html")
    page, problems = open_report(browser, html_path)
    try:
        for plot in page.locator(".plot").all():
            share = non_white_share(plot.screenshot())
            assert share > 0.01, f"{plot.get_attribute('data-plot')}: {share:.3%} of its pixels drawn"
        shown = page.eval_on_selector_all(
            "table.numbers td[data-key]", "cells => cells.map(c => [c.dataset.key, c.dataset.value])")
        keys = {key for key, _ in shown}
        assert {"rows.ok", "rows.failed", "tokens.completion", "cost.gpu_hours", "cost.total",
                "cost.per_million_output_tokens", "this_run.rows_per_s"} <= keys
        for key, value in shown:
            assert json.loads(value) == manifest_value(m, key), key
        assert page.locator("table.errors td", has_text="bad-1").count() == 1
    finally:
        page.close()
    assert problems == {"console": [], "pageerror": [], "requests": []}
