"""The `batchinfer` command: a thin click layer over config, plan, runner and store.

Exit codes: 0 completed, 3 partial (some rows or shards failed), 1 failed or interrupted
(rerun to resume), 2 bad usage, config, inputs or output (fix something before rerunning),
4 another live driver holds the run (this one did nothing; not an error for a scheduler).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

import click

from batchinfer import engines, lifecycle, logs, plan as planning, runner, storage
from batchinfer.config import Config, ConfigError
from batchinfer.config_loader import load_config, to_commented_yaml
from batchinfer.errors import describe
from batchinfer.lease import LeaseLost, RunBusy, RunLapsed
from batchinfer.lifecycle import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from batchinfer.metrics import run_label
from batchinfer.prompts import check_sample
from batchinfer.records import Cost, Manifest, now_iso
from batchinfer.results import OpenAIBatchParts
from batchinfer.run_store import RunStore

log = logging.getLogger("batchinfer")

WATCH_ERRORS = 5
"""Consecutive storage errors `status --watch` rides out before it exits 2."""
SET_HELP = "Override a config key, e.g. --set sampling.max_tokens=32 (repeatable)."
DATE_HELP = "Date for {date} in input.path/output.path, YYYY-MM-DD (default: today, UTC)."


LOG_FORMAT_HELP = ("Log lines on stderr, from the driver and the workers: text, or json (one object "
                   "per line: time, level, logger, run, worker, shard, event, and the fields of "
                   "the event; progress too). The summary on stdout stays text.")


def _fail(code: int, message: str) -> None:
    _say(f"error: {message}", logging.ERROR, "usage_error" if code == EXIT_USAGE else "failed")
    sys.exit(code)


def load_or_exit(config_path: str, sets: tuple[str, ...], date: str | None = None) -> Config:
    try:
        return load_config(config_path, sets, date)
    except ConfigError as e:
        _fail(EXIT_USAGE, str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              envvar=logs.ENV_VAR, show_envvar=True, help=LOG_FORMAT_HELP)
def main(verbose: bool, log_format: str) -> None:
    """Batch LLM inference on Ray: Parquet prompts in, Parquet results out, exactly once.

    \b
    Exit codes: 0 completed, 3 partial (some rows or shards failed),
                1 failed or interrupted (rerun to resume),
                2 bad usage/config/inputs/output (fix, then rerun),
                4 another live driver holds the run (this one did nothing).
    """
    logs.setup(verbose, log_format)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--date", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.option("--new-run", is_flag=True,
              help="Discard a previous run at output.path (its parts too) and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
def run(config_path: str, sets: tuple[str, ...], date: str | None, new_run: bool,
        no_progress: bool) -> None:
    """Run (or resume) the batch job described by CONFIG.

    Rerunning the same command after a crash finishes the remaining shards; rerunning a
    finished run does nothing.
    """
    sys.exit(run_job(load_or_exit(config_path, sets, date), new_run=new_run,
                     progress=not no_progress))


def run_job(cfg: Config, *, new_run: bool = False, progress: bool = True) -> int:
    """Run and print the summary; return the exit code. Shared with jobs/batch_job.py."""
    logs.bind(run=run_label(cfg.output.path, cfg.run.name))  # the run a JSON log line is about, as metrics label it
    try:
        report = runner.run(cfg, new_run=new_run, progress=progress)
    except runner.USAGE_ERRORS as e:
        _say(f"error: {e}", logging.ERROR, "usage_error")
        return EXIT_USAGE
    except (RunBusy, LeaseLost) as e:
        _say(f"batchinfer: {e}", logging.WARNING, "run_busy")
        return EXIT_BUSY
    except RunLapsed as e:
        _say(f"error: {e}", logging.ERROR, "lease_lapsed")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume", logging.WARNING, "interrupted")
        return EXIT_FAILED
    except Exception as e:
        _say(f"error: run failed: {describe(e)}\n"
             "rerun the same command to resume after fixing the cause", logging.ERROR, "run_failed",
             with_traceback=True)
        return EXIT_FAILED
    click.echo(format_summary(report.manifest, did_work=report.did_work))
    return report.exit_code


def _say(message: str, level: int, event: str, with_traceback: bool = False) -> None:
    """Why a run stopped, on stderr: as written for a person, or with --log-format json a log
    record (`event` in its `reason` field) like every other line there."""
    if logs.active_format() == "json":
        log.log(level, message, extra={"reason": event}, exc_info=with_traceback)
        return
    if with_traceback:
        traceback.print_exc()
    click.echo(message, err=True)


def format_summary(m: Manifest, *, did_work: bool = True) -> str:
    rows, tokens, this, shards = m.rows, m.tokens, m.this_run, m.shards
    lines = [f"batchinfer: {m.status}" + ("" if did_work else " (already done; nothing to do)")]
    lines.append(f"  rows     {rows.ok:,} ok, {rows.failed:,} failed, "
                 f"{rows.missing:,} not done, of {rows.total:,}")
    lines.append(f"  shards   {shards.committed}/{shards.total} committed"
                 + (f", {shards.failed} failed" if shards.failed else ""))
    if m.errors:
        lines.append("  errors   " + ", ".join(f"{k}: {v}" for k, v in sorted(m.errors.items())))
    lines.append(f"  tokens   {tokens.prompt:,} in, {tokens.completion:,} out")
    if did_work:
        lines.append(f"  this run {this.rows:,} rows in {this.wall_s:.1f} s wall "
                     f"({this.generate_s:.1f} s generating on {this.workers} workers): "
                     f"{this.rows_per_s:.2f} rows/s, {this.tokens_per_s:.1f} tokens/s")
    for f in m.failed_shards:
        lines.append(f"  failed   {f.part}: {f.reason}")
    if did_work and m.cost is not None:
        lines.append("  cost     " + format_cost(m.cost))
    failed_rows = "; _errors/: the failed rows" if rows.failed else ""
    if any(s.part.endswith(OpenAIBatchParts.suffix) for s in m.shard_summaries):
        lines.append(f"  output   {m.output}  (part-*.jsonl: OpenAI batch output lines"
                     f"{'; _errors/: failed requests' if rows.failed else ''})")
    else:
        lines.append(f"  output   {m.output}  (pandas.read_parquet reads it as one table{failed_rows})")
    if m.status == "interrupted":
        lines.append("  rerun the same command to finish the remaining shards")
    return "\n".join(lines)


def format_cost(c) -> str:
    """A Cost on one line: GPU-hours, busy share, output tokens per GPU-hour and, with a price,
    the run's cost and its cost per 1M output tokens."""
    busy = "" if c.busy_gpu_hours is None else f" ({c.busy_gpu_hours:.3g} busy)"
    text = f"{c.gpu_hours:.3g} GPU-hours{busy}, {c.tokens_per_gpu_hour:,.0f} output tokens per GPU-hour"
    if c.total is None:
        return text + " (set run.gpu_hour_cost for the price)"
    per_m = "" if c.per_million_output_tokens is None else \
        f", {c.per_million_output_tokens:,.4g} per 1M output tokens"
    return text + f"; {c.total:,.4g} at {c.gpu_hour_cost:g} per GPU-hour{per_m}"


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--date", metavar="YYYY-MM-DD", help=DATE_HELP)
def plan(config_path: str, sets: tuple[str, ...], date: str | None) -> None:
    """Show the files, rows and shards CONFIG would run, and one rendered prompt.

    Reads the input files' footers, the first rows of the first files (to check they become
    prompts), and with input.id_column the ids (to check they are present and unique);
    starts no engine and writes nothing.
    """
    cfg = load_or_exit(config_path, sets, date)
    try:
        runner.preflight(cfg)
        p = planning.make_plan(cfg)
        check_sample(cfg, p)
        existing = RunStore(cfg.output.path, cfg.storage).read_plan()
    except runner.USAGE_ERRORS as e:
        _fail(EXIT_USAGE, str(e))
    sizes = [s.num_rows for s in p.shards]
    click.echo(f"inputs   {len(p.files)} files, {p.total_rows:,} rows ({cfg.input.path})")
    units = "row groups" if cfg.input.format == "parquet" else "blocks of lines"
    for f in p.files[:20]:
        click.echo(f"  {f.name}  " + (f"{f.num_rows:,} rows in {len(f.row_groups)} {units}"
                                        if f.num_rows else "skipped (empty)"))
    if len(p.files) > 20:
        click.echo(f"  ... and {len(p.files) - 20} more")
    click.echo(f"shards   {len(p.shards)} (rows per shard: min {min(sizes)}, max {max(sizes)}, "
               f"target {cfg.run.rows_per_shard})")
    click.echo(f"output   {cfg.output.path}")
    if existing is not None:
        same = existing.fingerprint == p.fingerprint
        click.echo("         holds a run with the same fingerprint: `run` resumes it" if same else
                   "         holds a run with a different fingerprint: `run` refuses unless --new-run")
    click.echo(f"fingerprint {p.fingerprint}")
    click.echo("first prompt, as the model sees it:")
    click.echo(_first_prompt(cfg, p))


def _first_prompt(cfg: Config, p) -> str:
    from batchinfer.plan import input_reader
    from batchinfer.prompts import PromptBuilder, RowError, first_cells, load_tokenizer

    first = p.files[p.shards[0].pieces[0].file]
    cell = first_cells(cfg, input_reader(cfg), first, 1)[0]
    try:
        builder = PromptBuilder(load_tokenizer(cfg.engine), cfg.input)
    except ImportError as e:
        return f"  (cannot render: {e}; install the engine's extra)"
    try:
        return "  " + builder.render(cell).replace("\n", "\n  ")
    except RowError as e:
        return f"  (this row is an error: {e})"


@main.command()
@click.argument("output_path", metavar="OUTPUT_PATH")
@click.option("--json", "as_json", is_flag=True,
              help="Print the status as JSON (keys documented in batchinfer/lifecycle.py; "
                   "with --watch, one object per line).")
@click.option("--watch", is_flag=True,
              help="Refresh every --interval seconds until the run is no longer planning or "
                   "running (waiting for it to appear if OUTPUT_PATH has none yet); exit with "
                   "the final state's code.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take the storage settings (endpoint, region, profile) from this config.")
def status(output_path: str, as_json: bool, watch: bool, interval: float,
           config_path: str | None) -> None:
    """Show a run's state and progress from its run directory alone (local or s3://).

    \b
    States: planning, running (a live driver holds it), completed, partial,
    failed (with the reason), interrupted, stale (its driver stopped
    heartbeating: rerun to resume), not_started.
    Exit codes: 0 completed, 3 partial, 4 planning/running, 1 stale/failed/
    interrupted/not_started (rerun to resume), 2 no run at OUTPUT_PATH.
    """
    storage_cfg = load_or_exit(config_path, ()).storage if config_path else None
    store = RunStore(output_path, storage_cfg)
    redraw = watch and not as_json and sys.stdout.isatty()
    errors, waited = 0, False
    while True:
        try:
            with storage.errors(output_path, "OUTPUT_PATH"):
                view = lifecycle.read(store)
            errors = 0
        except storage.StorageError as e:
            errors += 1  # watching: a blip of the object store does not end the watch
            if not watch or errors >= WATCH_ERRORS:
                _fail(EXIT_USAGE, str(e))
            log.warning("status: %s (try %d of %d)", e, errors, WATCH_ERRORS)
            time.sleep(interval)
            continue
        if view is None:
            if not watch:
                _fail(EXIT_USAGE, f"no run at {store.url} (expected {store.meta.url}/plan.json "
                                  "or status.json)")
            if not waited:  # a job just started may still be listing its inputs
                log.info("status: no run at %s yet; waiting for one to start", store.url)
            waited = True
            time.sleep(interval)
            continue
        if as_json:
            click.echo(json.dumps(view.to_json(), indent=None if watch else 1))
        else:
            if redraw:
                click.clear()
            elif watch:
                click.echo(f"--- {now_iso()}")
            click.echo(format_status(view.to_json()))
        if not watch or view.state not in lifecycle.LIVE_STATES:
            sys.exit(view.exit_code)
        time.sleep(interval)


def format_status(info: dict) -> str:
    """`status` for a person: state, progress, driver and, once finished, the cost."""
    shards, rows = info["shards"], info["rows"]
    lines = [f"run      {info['output']}",
             f"state    {info['state']}" + (f": {info['detail']}" if info["detail"] else "")]
    if shards["total"] is not None:
        pct = 100 * rows["done"] / rows["total"] if rows["total"] else 100.0
        lines.append(f"shards   {shards['done']}/{shards['total']} committed"
                     + (f", {shards['failed']} failed" if shards["failed"] else ""))
        lines.append(f"rows     {rows['done']:,}/{rows['total']:,} done ({pct:.0f}%), "
                     f"{rows['failed']:,} with errors")
        lines.append(f"tokens   {info['tokens']['prompt']:,} in, {info['tokens']['completion']:,} out")
    if info["updated_at"]:
        lines.append(f"updated  {info['updated_at']}"
                     + (f" (started {info['started_at']})" if info["started_at"] else ""))
    if info["cost"]:
        lines.append("cost     " + format_cost(Cost.model_validate(info["cost"])))
    return "\n".join(lines)


@main.command("build-engine")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def build_engine(config_path: str, sets: tuple[str, ...]) -> None:
    """Build what CONFIG's engine backend loads (the TensorRT-LLM engine) and publish it.

    Runs once, as a Ray task on a GPU worker of the configured type (run.accelerator_type),
    so the engine fits the GPUs the workers will run on. Does nothing if the cache already
    has it; later runs download it once per node. A backend with no build step (transformers)
    says so and exits 2.
    """
    cfg = load_or_exit(config_path, sets)
    try:
        info = runner.build_engine(cfg)
    except runner.USAGE_ERRORS as e:
        _fail(EXIT_USAGE, str(e))
    except Exception as e:
        traceback.print_exc()
        _fail(EXIT_FAILED, f"engine build failed: {describe(e)}")
    for label, value in info.items():
        click.echo(f"{label:<8} {value}")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--date", metavar="YYYY-MM-DD", help=DATE_HELP)
def validate(config_path: str, sets: tuple[str, ...], date: str | None) -> None:
    """Check CONFIG and print it resolved, every key with its description.

    Also checks that the engine backend is installed and the model can be found.
    """
    cfg = load_or_exit(config_path, sets, date)
    click.echo(to_commented_yaml(cfg), nl=False)
    try:
        runner.preflight(cfg)
    except runner.USAGE_ERRORS as e:
        _fail(EXIT_USAGE, str(e))
    click.echo(f"# OK: engine backends registered: {', '.join(engines.names())}")
    sys.exit(EXIT_OK)


@main.command("report")
@click.argument("output_path", metavar="OUT")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to write the page (default: <OUT's last path part>-report.html in the "
                   "current directory, e.g. local-report.html for out/local).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take the storage settings (endpoint, region, profile) from this config.")
def report_command(output_path: str, html_path: str | None, config_path: str | None) -> None:
    """Write the report of the run at OUT: one self-contained HTML page.

    \b
    Throughput over time, each worker's shard attempts on a timeline,
    latency and token-length histograms, errors by code with sample ids,
    failed shards, the settings and fingerprint, GPU-hours and cost. It
    opens offline (plotly.js is inside). A run without a manifest (still
    running, or killed) is reported from its commit records.
    Exit codes: 0 written, 2 no run at OUT or it cannot be read.
    """
    from pathlib import Path

    from batchinfer.report import NoRun, build_page, default_html_path  # plotly: only here

    storage_cfg = load_or_exit(config_path, ()).storage if config_path else None
    target = Path(html_path) if html_path else default_html_path(output_path)
    try:
        with storage.errors(output_path, "OUT"):
            page = build_page(output_path, storage_cfg)
    except (NoRun, storage.StorageError) as e:
        _fail(EXIT_USAGE, str(e))
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as e:
        _fail(EXIT_USAGE, f"cannot write the report to {target}: {describe(e)}")
    click.echo(f"report written: {target}")


if __name__ == "__main__":
    main()
