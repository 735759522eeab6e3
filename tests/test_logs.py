"""Logs a machine can read (`--log-format json`): the JSON lines, their context fields, the
worker set-up, and one real run whose stderr is nothing but JSON objects."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from batchinfer import logs
from batchinfer.engines.transformers import TransformersEngine
from batchinfer.metrics import run_label
from batchinfer.progress import Progress
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import REPO, WORKER_ENV, make_config, write_yaml

KEYS = ["time", "level", "logger", "run", "worker", "shard", "event"]
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def restore_logging(monkeypatch):
    """Undo what logs.setup and logs.bind do to this process's logging."""
    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    saved = (root.handlers[:], root.level, ray_logger.handlers[:], ray_logger.propagate,
             dict(logs._state), dict(logs._process_fields))
    logs._process_fields.clear()  # e.g. bound by a ShardWorker an earlier test made here
    yield
    root.handlers[:], ray_logger.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    ray_logger.propagate = saved[3]
    logs._state.clear()
    logs._state.update(saved[4])
    logs._process_fields.clear()
    logs._process_fields.update(saved[5])
    logging.captureWarnings(False)


@pytest.fixture
def json_logs(restore_logging):
    """Set up JSON logging to a buffer; returns a function giving the records so far."""
    buf = io.StringIO()
    logs.setup(fmt="json", stream=buf)

    def records() -> list[dict]:
        lines = buf.getvalue().splitlines()
        return [json.loads(line) for line in lines]

    return records


def test_a_record_is_one_json_line_with_the_keys_in_order(json_logs):
    logging.getLogger("batchinfer.x").info("shard %d done\nsecond line", 7, extra={"rows": 3})
    [record] = json_logs()
    assert list(record) == [*KEYS, "rows"]
    assert TIME.match(record["time"]), record["time"]
    assert record["level"] == "INFO" and record["logger"] == "batchinfer.x"
    assert record["event"] == "shard 7 done\nsecond line"  # a newline is escaped, not a new line
    assert record["run"] is None and record["worker"] is None and record["shard"] is None
    assert record["rows"] == 3


def test_an_exception_is_a_field_of_its_record(json_logs):
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("batchinfer.x").exception("failed")
    [record] = json_logs()
    assert record["event"] == "failed" and record["level"] == "ERROR"
    assert "Traceback" in record["exception"] and "ZeroDivisionError" in record["exception"]


def test_bound_and_context_fields_and_extra_wins(json_logs):
    log = logging.getLogger("batchinfer.x")
    logs.bind(run="s3://b/out", worker=2)
    with logs.context(shard=5):
        log.info("in shard")
        log.info("explicit", extra={"shard": 9})
    log.info("after")
    logs.bind(worker=None)
    log.info("unbound")
    got = [(r["event"], r["run"], r["worker"], r["shard"]) for r in json_logs()]
    assert got == [("in shard", "s3://b/out", 2, 5), ("explicit", "s3://b/out", 2, 9),
                   ("after", "s3://b/out", 2, None), ("unbound", "s3://b/out", None, None)]


def test_each_asyncio_task_keeps_its_own_shard(json_logs):
    """As in the async worker actor: shards run as tasks on one event loop, and their rows
    go through tasks they create and threads (asyncio.to_thread)."""
    log = logging.getLogger("batchinfer.x")

    async def row(index: int) -> None:
        log.info("shard %d", index)

    async def shard(index: int) -> None:
        with logs.context(shard=index):
            for _ in range(3):
                log.info("shard %d", index)
                await asyncio.sleep(0)
                await asyncio.to_thread(log.info, "shard %d", index)
                await asyncio.ensure_future(row(index))

    async def main() -> None:
        await asyncio.gather(*(shard(i) for i in range(4)))
        log.info("outside")

    asyncio.run(main())
    records = json_logs()
    assert len(records) == 4 * 9 + 1
    for r in records[:-1]:
        assert r["event"] == f"shard {r['shard']}"
    assert records[-1]["shard"] is None


def test_contextual_takes_the_field_from_an_argument_and_keeps_the_signature(json_logs):
    class Worker:
        async def process(self, shard_index: int, attempt: int = 1) -> int:
            logging.getLogger("batchinfer.x").info("processing")
            return attempt

    wrapped = logs.contextual(shard="shard_index")(Worker.process)
    assert inspect.iscoroutinefunction(wrapped)  # Ray sees an async actor method
    assert inspect.signature(wrapped) == inspect.signature(Worker.process)
    assert asyncio.run(wrapped(Worker(), 4)) == 1
    assert asyncio.run(wrapped(Worker(), attempt=2, shard_index=6)) == 2
    assert [r["shard"] for r in json_logs()] == [4, 6]


def test_setup_is_idempotent_and_switches_format(restore_logging):
    root = logging.getLogger()
    first, second = io.StringIO(), io.StringIO()
    logs.setup(fmt="json", stream=first)
    logs.setup(fmt="json", stream=first)
    assert sum(isinstance(h, logs._Handler) for h in root.handlers) == 1
    logs.setup(fmt="text", stream=second)
    logging.getLogger("batchinfer.x").info("hello")
    assert sum(isinstance(h, logs._Handler) for h in root.handlers) == 1
    assert first.getvalue() == ""
    assert logs.active_format() == "text"
    with pytest.raises(ValueError, match="log format 'xml': expected one of text, json"):
        logs.setup(fmt="xml")


def test_text_is_the_format_it_always_was(restore_logging):
    buf = io.StringIO()
    logs.setup(verbose=True, fmt="text", stream=buf)
    logs.bind(run="r", worker=1)  # text lines do not show fields
    logging.getLogger("batchinfer.x").debug("hello %s", "there")
    assert re.fullmatch(r"\d\d:\d\d:\d\d DEBUG batchinfer.x: hello there\n", buf.getvalue())
    assert logging.getLogger("fsspec").level == logging.WARNING


def test_worker_env_reaches_the_worker_set_up(restore_logging, monkeypatch):
    logs.setup(verbose=True, fmt="json", stream=io.StringIO())
    env = logs.worker_env()
    assert env == {logs.ENV_VAR: "json", logs.LEVEL_ENV_VAR: "DEBUG"}
    assert logs.worker_env("text")[logs.ENV_VAR] == "text"
    logs.setup(fmt="text", stream=io.StringIO())  # a fresh worker process: text, as Ray left it
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    logs.setup_from_env(run="out", worker=3)
    assert logs.active_format() == "json" and logging.getLogger().level == logging.DEBUG
    assert logs._process_fields == {"run": "out", "worker": 3}
    monkeypatch.setenv(logs.ENV_VAR, "xml")
    with pytest.raises(ValueError, match="BATCHINFER_LOG_FORMAT='xml': expected one of text, json"):
        logs.setup_from_env()


def test_ray_init_kwargs_make_ray_forward_worker_lines_as_they_are(restore_logging, monkeypatch):
    assert logs.ray_init_kwargs("text") == {}
    from ray._private import ray_constants, ray_logging

    monkeypatch.setattr(ray_constants, "RAY_DISABLE_WORKER_LOG_PREFIX", False)
    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)
    assert logs.ray_init_kwargs("json") == {"configure_logging": False}
    assert ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX is True
    assert ray_logging.RAY_DEDUP_LOGS is False
    assert logging.getLogger("ray").propagate and not logging.getLogger("ray").handlers


def test_progress_is_a_record_in_json(json_logs):
    from batchinfer.records import WorkerProgress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = Progress(total_shards=4, total_rows=40, done_shards=1, done_rows=10, stream=Terminal(),
                   interval_s=1e-9)
    assert bar.bar is None  # never a tqdm bar in JSON mode, even on a terminal
    bar.update(1, 10, {0: WorkerProgress.model_construct(rows=10, completion_tokens=50)}, failed=0)
    assert bar.stream.getvalue() == ""
    [record] = json_logs()
    assert record["event"] == "progress" and record["logger"] == "batchinfer.progress"
    assert {k: record[k] for k in ("rows_done", "rows_total", "shards_done", "shards_total")} == \
        {"rows_done": 20, "rows_total": 40, "shards_done": 2, "shards_total": 4}
    assert record["tokens_per_s"] > 0 and record["eta_s"] >= 0


class ShardLoggingEngine(TransformersEngine):
    """TEST ENGINE: the real backend, logging each request it is handed (a shard-level event
    in the worker: the record must carry the request's shard)."""

    async def generate(self, request):
        logging.getLogger("tests.test_logs").info("request", extra={"request": request.id})
        return await super().generate(request)


@pytest.mark.slow
def test_json_run_writes_only_json_lines_to_stderr(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=6, row_group_size=3)
    cfg = make_config(tmp_path, engine={"backend": "tests.test_logs:ShardLoggingEngine"},
                      sampling={"max_tokens": 2},
                      run={"num_workers": 2, "rows_per_shard": 3, "progress_interval_s": 0.2,
                           "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}}})
    env = {**os.environ, **WORKER_ENV, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(
        [sys.executable, "-m", "batchinfer.cli", "--log-format", "json", "run",
         str(write_yaml(tmp_path / "c.yaml", cfg))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "batchinfer: completed" in proc.stdout  # the summary stays text
    records = []
    for line in proc.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}\n{proc.stderr}")
    for r in records:
        assert list(r)[:7] == KEYS and TIME.match(r["time"]), r
        assert r["run"] == run_label(cfg.output.path), r  # the driver's and the workers' lines alike, as metrics label the run
    driver = [r for r in records if r["worker"] is None]
    assert any(r["logger"] == "batchinfer.runner" for r in driver)
    assert any(r["event"] == "progress" and r["rows_total"] == 6 for r in driver)
    # Both workers' load lines: the same event from two workers, which Ray's log
    # deduplication holds back and merges into one "[repeated 2x ...]" line when they come
    # within RAY_DEDUP_LOGS_AGG_WINDOW_S (5 s) of each other.
    loaded = {r["worker"] for r in records if r["logger"] == "batchinfer.engines.transformers"}
    assert loaded == {0, 1}
    requests = [r for r in records if r["event"] == "request"]
    assert len(requests) == 6
    assert all(r["worker"] in (0, 1) and r["shard"] in (0, 1) for r in requests)
    assert {r["shard"] for r in requests} == {0, 1}
