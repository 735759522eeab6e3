"""The `batchinfer` command: a thin click layer over config, plan, runner and store.

Exit codes: 0 complete, 3 partial (some rows or shards failed), 1 failed or interrupted
(rerun to resume), 2 bad usage, config, inputs or output (fix something before rerunning),
4 another live driver holds the run (this one did nothing; not an error for a scheduler).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback

import click

from batchinfer import engines, lease, plan as planning, runner, storage
from batchinfer.config import Config, ConfigError
from batchinfer.config_loader import load_config, to_commented_yaml
from batchinfer.errors import describe
from batchinfer.lease import LeaseLost, RunBusy, RunLapsed
from batchinfer.prompts import check_sample
from batchinfer.records import Manifest, RunStatus
from batchinfer.results import OpenAIBatchParts
from batchinfer.run_store import RunStore
from batchinfer.runner import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE

log = logging.getLogger("batchinfer")

SET_HELP = "Override a config key, e.g. --set sampling.max_tokens=32 (repeatable)."
DATE_HELP = "Date for {date} in input.path/output.path, YYYY-MM-DD (default: today, UTC)."


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("filelock", "fsspec", "urllib3", "botocore", "s3fs", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(code: int, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_or_exit(config_path: str, sets: tuple[str, ...], date: str | None = None) -> Config:
    try:
        return load_config(config_path, sets, date)
    except ConfigError as e:
        _fail(EXIT_USAGE, str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Batch LLM inference on Ray: Parquet prompts in, Parquet results out, exactly once.

    \b
    Exit codes: 0 complete, 3 partial (some rows or shards failed),
                1 failed or interrupted (rerun to resume),
                2 bad usage/config/inputs/output (fix, then rerun),
                4 another live driver holds the run (this one did nothing).
    """
    setup_logging(verbose)


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
    try:
        report = runner.run(cfg, new_run=new_run, progress=progress)
    except runner.USAGE_ERRORS as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    except (RunBusy, LeaseLost) as e:
        click.echo(f"batchinfer: {e}", err=True)
        return EXIT_BUSY
    except RunLapsed as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        return EXIT_FAILED
    except Exception as e:
        traceback.print_exc()
        click.echo(f"error: run failed: {describe(e)}\n"
                   "rerun the same command to resume after fixing the cause", err=True)
        return EXIT_FAILED
    click.echo(format_summary(report.manifest, did_work=report.did_work))
    return report.exit_code


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
    if any(s.part.endswith(OpenAIBatchParts.suffix) for s in m.shard_summaries):
        lines.append(f"  output   {m.output}  (part-*.jsonl: OpenAI batch output lines; errors/: failed requests)")
    else:
        lines.append(f"  output   {m.output}  (pandas.read_parquet reads it as one table)")
    if m.status == "interrupted":
        lines.append("  rerun the same command to finish the remaining shards")
    return "\n".join(lines)


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
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take the storage settings (endpoint, region, profile) from this config.")
def status(output_path: str, as_json: bool, config_path: str | None) -> None:
    """Show a run's progress and state from its run directory alone.

    \b
    States: running (a live driver holds it), stale (its driver stopped
    heartbeating: rerun to resume), interrupted, failed (with the reason),
    complete, partial, not started.
    Exit codes: 0 complete, 3 partial, 4 running, 1 stale/interrupted/failed/
    not started (rerun to resume), 2 no run at OUTPUT_PATH.
    """
    storage_cfg = load_or_exit(config_path, ()).storage if config_path else None
    store = RunStore(output_path, storage_cfg)
    try:
        with storage.errors(output_path, "OUTPUT_PATH"):
            plan = store.read_plan()
            committed = store.committed() if plan is not None else {}
            manifest = store.read_manifest()
            record = store.read_status()
            holder = lease.read_holder(store.meta)
    except storage.StorageError as e:
        _fail(EXIT_USAGE, str(e))
    if plan is None:
        _fail(EXIT_USAGE, f"no run at {store.url} (expected {store.meta.url}/plan.json)")
    state, detail = run_state(plan, committed, manifest, record, holder)
    rows_done = sum(s.rows for s in committed.values())
    info = {
        "output": store.url, "state": state, "detail": detail,
        "shards": {"done": len(committed), "total": len(plan.shards)},
        "rows": {"done": rows_done, "total": plan.total_rows,
                 "failed": sum(s.rows_failed for s in committed.values())},
        "updated_at": record.updated_at if record is not None else None,
        "driver": None if holder is None else {
            "host": holder.host, "pid": holder.pid, "generation": holder.generation,
            "last_heartbeat_s": round(holder.age_s(), 1), "released": holder.released},
        "fingerprint": plan.fingerprint,
    }
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        click.echo(f"run      {store.url}")
        click.echo(f"state    {state}" + (f": {detail}" if detail else ""))
        click.echo(f"shards   {len(committed)}/{len(plan.shards)} committed")
        click.echo(f"rows     {rows_done:,}/{plan.total_rows:,} done, "
                   f"{info['rows']['failed']:,} with errors")
    sys.exit(runner.exit_code_for(state))


def run_state(plan, committed: dict, manifest: Manifest | None, record: RunStatus | None,
              holder) -> tuple[str, str]:
    """(state, detail) of a run from its records: a live driver lease (running); else a
    failure or interruption recorded after the last manifest; else the manifest if it
    describes the parts on record; else the lease (expired or its driver gone: stale)."""
    if holder is not None and holder.is_live():
        return "running", holder.describe()
    finished = manifest is not None and manifest.describes(plan.fingerprint, len(committed))
    if record is not None and record.state in ("failed", "interrupted") and (
            not finished or (record.updated_at or "") > manifest.finished_at):
        why = record.reason or "no reason recorded"
        fixed = " once the cause is fixed" if record.state == "failed" else ""
        after = f"rerun the same command to resume{fixed}"
        return record.state, f"{why}; {after}"
    if finished:
        return manifest.status, ""
    if holder is not None and not holder.released:
        return "stale", (f"driver on {holder.host} (pid {holder.pid}) last seen "
                         f"{_ago(holder.age_s())} ago; rerun to resume")
    return ("stale", "no driver is running it; rerun to resume") if committed or record is not None \
        else ("not started", "")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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


if __name__ == "__main__":
    main()
