"""How batchinfer logs: human-readable lines (the default) or one JSON object per line.

    batchinfer --log-format json run configs/x.yaml      # or BATCHINFER_LOG_FORMAT=json

In JSON mode every record on stderr, from the driver and from every worker, is one line:

    {"time": "2026-05-01T12:00:00.123Z", "level": "INFO", "logger": "batchinfer.worker",
     "run": "2026-05-01-3fa2b9c0", "worker": 1, "shard": 17, "event": "...", ...}

`time` is UTC with milliseconds; `run` (the run's label, as its metrics carry it:
metrics.run_label), `worker` (the worker index) and `shard` (the shard index) are null where
unknown (the driver sets them on records about a worker or shard); fields
passed with `extra=` follow, and an exception comes as the field `exception`. The driver's
progress lines are records too (event "progress", see progress.py).

Where the fields come from:

- `bind(run=..., worker=...)`: process-wide fields (a worker process is one worker of one
  run), seen by every thread, Ray's included.
- `context(shard=...)` / `@contextual(shard="shard_index")`: fields of the current context
  only (contextvars). Each call into the async worker actor is its own asyncio task, so a
  shard's records carry its index while other shards run on the same event loop; tasks it
  creates and `asyncio.to_thread` copy the context, so its rows and writes carry it too.

How the format reaches the workers: the driver puts `worker_env()` in each worker's
runtime_env and the worker calls `setup_from_env()` when it starts. How their lines reach
the driver's stderr unchanged: `ray_init_kwargs()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
ENV_VAR = "BATCHINFER_LOG_FORMAT"
"""The log format, for the CLI (click reads it) and for the workers (`worker_env`)."""
LEVEL_ENV_VAR = "BATCHINFER_LOG_LEVEL"
"""The workers' log level in JSON mode (DEBUG with --verbose, else INFO)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_DATEFMT = "%H:%M:%S"
NOISY = ("filelock", "fsspec", "urllib3", "botocore", "s3fs", "asyncio")
"""Libraries that log every request at INFO/DEBUG: WARNING and up only."""

_process_fields: dict[str, Any] = {}
_context_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "batchinfer_log_fields", default=MappingProxyType({}))
_state = {"format": "text", "verbose": False}


class JsonLineFormatter(JsonFormatter):
    """python-json-logger's formatter with batchinfer's keys, in this order: time, level,
    logger, run, worker, shard, event, then `extra=` fields, then exception / stack."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(run)s %(worker)s %(shard)s %(message)s",
                         rename_fields={"levelname": "level", "name": "logger", "message": "event",
                                        "exc_info": "exception", "stack_info": "stack"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)


class _ContextFilter(logging.Filter):
    """Puts the bound fields on each record; a field passed with `extra=` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in {**_process_fields, **_context_fields.get()}.items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


class _Handler(logging.StreamHandler):
    """batchinfer's own root handler, so that `setup` can find and replace it."""


def setup(verbose: bool = False, fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Log to stderr (or `stream`) at INFO, DEBUG if verbose, as text or JSON lines.

    Idempotent: it replaces the handler an earlier call installed, and leaves handlers it
    did not install alone. Text is the format batchinfer always had. JSON also routes Python
    warnings and Ray's own "ray" logger (when Ray is imported) through the same handler, so
    that their lines are JSON objects too. (What code writes to stderr itself, e.g. the CLI's
    "error: ..." messages, stays text.)
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
        handler.addFilter(_ContextFilter())
        logging.captureWarnings(True)
        if "ray" in sys.modules:
            _adopt_ray_logger()
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state.update(format=fmt, verbose=verbose)


def active_format() -> str:
    """The format the last `setup` chose ("text" if it was never called)."""
    return _state["format"]


def bind(**fields: Any) -> None:
    """Set process-wide fields (e.g. run, worker) on every record from now on; None unsets."""
    global _process_fields
    # A new dict, never one changed in place: other threads may be logging with the old one.
    merged = {**_process_fields, **fields}
    _process_fields = {key: value for key, value in merged.items() if value is not None}


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Set fields (e.g. shard) on the records of the current context (thread or asyncio
    task, and the tasks and threads it starts) for the duration of the block."""
    token = _context_fields.set({**_context_fields.get(), **fields})
    try:
        yield
    finally:
        _context_fields.reset(token)


def contextual(**params: str) -> Callable[[Callable], Callable]:
    """Decorator: run the (async or plain) function inside `context(field=<argument>)` for
    each `field="parameter name"`, e.g. `@contextual(shard="shard_index")`."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def fields(args, kwargs) -> dict[str, Any]:
            bound = signature.bind(*args, **kwargs).arguments
            return {field: bound.get(param) for field, param in params.items()}

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args, **kwargs):
                with context(**fields(args, kwargs)):
                    return await fn(*args, **kwargs)
            return run_async

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with context(**fields(args, kwargs)):
                return fn(*args, **kwargs)
        return run

    return decorate


def worker_env(fmt: str | None = None) -> dict[str, str]:
    """Env vars for the workers' runtime_env: the log format (default: this process's) and,
    for JSON, the level."""
    fmt = fmt or active_format()
    return {ENV_VAR: fmt, LEVEL_ENV_VAR: "DEBUG" if _state["verbose"] else "INFO"}


def setup_from_env(**fields: Any) -> None:
    """In a worker, first thing: log as the driver asked through `worker_env`, and `bind`
    the fields (run, worker). Text leaves the worker's logging as Ray set it up (as workers
    always did: warnings reach the driver's stderr with Ray's "(ShardWorker pid=...)" prefix)."""
    fmt = os.environ.get(ENV_VAR, "text")
    if fmt not in FORMATS:
        raise ValueError(f"{ENV_VAR}={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "json":
        setup(verbose=os.environ.get(LEVEL_ENV_VAR) == "DEBUG", fmt=fmt)
    bind(**fields)


def ray_init_kwargs(fmt: str | None = None) -> dict[str, Any]:
    """Extra `ray.init` arguments for the log format (default: this process's); call it
    after `import ray`, right before `ray.init`.

    Text: none; worker lines keep Ray's "(ShardWorker pid=123) " prefix, as always.

    JSON: a worker's JSON line must reach the driver's stderr byte for byte. Ray forwards
    each worker stdout/stderr line to the driver, where `print_worker_logs`
    (ray/_private/worker.py) prefixes it with "(<actor> pid=<pid>, ip=<ip>) " in color unless
    `_should_ignore_worker_log_prefix()` is true, and `print_to_stdstream` first passes it
    through `LogDeduplicator.deduplicate` (ray/_private/ray_logging/__init__.py), which holds
    back lines that look alike once digits are dropped (so the same event from two workers)
    and prints one of them later with " [repeated 2x across cluster]" appended: records lost
    and a line that is no longer JSON. Ray's switches for exactly this (ray#64992,
    ray#65230; Ray >= 2.60) are RAY_DISABLE_WORKER_LOG_PREFIX=1 and RAY_DEDUP_LOGS=0, but
    both are read once when `ray._private.ray_constants` is imported, which has happened by
    now; so their values are set on the modules that read them, as the env vars would have
    (`ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX`, read by ray.init; `ray_logging.
    RAY_DEDUP_LOGS`, read per line). `ray.init(logging_config=LoggingConfig(...))` also
    drops the prefix but installs Ray's own root handler and format in the driver and every
    worker, and leaves deduplication on.

    Ray's "ray" logger (its own messages on the driver: "Started a local Ray instance", token
    auth warnings) gets a plain-text handler when ray is imported: it is handed to the JSON
    handler, and `configure_logging=False` keeps ray.init from configuring it again.
    """
    if (fmt or active_format()) != "json":
        return {}
    from ray._private import ray_constants, ray_logging

    if not hasattr(ray_constants, "RAY_DISABLE_WORKER_LOG_PREFIX"):
        import ray

        logging.getLogger(__name__).warning(
            "Ray %s prefixes the worker lines it forwards with '(ShardWorker pid=...)'; Ray "
            ">= 2.60 forwards them as they are (one JSON object per line)", ray.__version__)
    ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = True
    ray_logging.RAY_DEDUP_LOGS = False
    _adopt_ray_logger()
    return {"configure_logging": False}


def _adopt_ray_logger() -> None:
    """Ray's "ray" logger writes plain text through its own handler and does not propagate
    (ray/_private/log.py, generate_logging_config): send its records to the root handler."""
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
