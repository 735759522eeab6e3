"""Entry point for `ray job submit`: runs the same job as `batchinfer run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/batch_job.py --config configs/local.yaml [--set key=value ...] [--log-format json]

Inside a Ray job, RAY_ADDRESS is set, so the driver joins that cluster instead of starting
one. The exit status is the one `batchinfer run` documents (0, 3, 1, 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

# With `--working-dir .` the repo root is the job's cwd, but Python only puts jobs/ on
# sys.path; make the package importable when it is not installed in the cluster's image.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click  # noqa: E402

from batchinfer import logs  # noqa: E402
from batchinfer.cli import DATE_HELP, LOG_FORMAT_HELP, SET_HELP, load_or_exit, run_job  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The job's YAML config.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--date", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.option("--new-run", is_flag=True, help="Discard a previous run at output.path and start over.")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              envvar=logs.ENV_VAR, show_envvar=True, help=LOG_FORMAT_HELP)
def main(config_path: str, sets: tuple[str, ...], date: str | None, new_run: bool,
         log_format: str) -> None:
    """Run a batchinfer job as a Ray job driver."""
    logs.setup(False, log_format)
    # A job's logs are files, not a terminal: progress comes as periodic lines.
    sys.exit(run_job(load_or_exit(config_path, sets, date), new_run=new_run, progress=True))


if __name__ == "__main__":
    main()
