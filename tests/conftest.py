"""Shared fixtures: one local Ray cluster per session, the real small model, config helpers.

Tiers: pure unit tests use no fixture here; engine tests use `tokenizer`/`encode`
(the real SmolLM2 model on the CPU); integration tests use `ray_cluster`; tests marked
`slow` run `batchinfer` as real subprocesses.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from batchinfer import model_refs
from batchinfer.config import Config
from batchinfer.config_loader import config_from_dict

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes"
TEST_DOUBLE_GPU = "NVIDIA L40S (TensorRT-LLM test double)/sm_89"
# Ray workers see the TensorRT-LLM test double as `tensorrt_llm`, and the GPU it stands for.
TRTLLM_DOUBLE_ENV = {"env_vars": {"PYTHONPATH": f"{FAKES}:{REPO}", "BATCHINFER_GPU_IDENTITY": TEST_DOUBLE_GPU}}
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}
# Dummy credentials for the loopback S3 server, set before any Ray process starts so every
# worker inherits them (the AWS credential chain's environment step). No instance metadata.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
for _k, _v in S3_ENV.items():
    os.environ.setdefault(_k, _v)
BUCKET = "batchinfer-test"


@pytest.fixture(scope="session")
def model_folder() -> str:
    """The embedded model converted once into the local cache (about 30 s the first time)."""
    return model_refs.materialize(model_refs.resolve("smollm2-135m"), None)


@pytest.fixture(scope="session")
def tokenizer(model_folder):
    from batchinfer.config import EngineConfig
    from batchinfer.prompts import load_tokenizer

    return load_tokenizer(EngineConfig())


@pytest.fixture(scope="session")
def encode(tokenizer):
    """text -> the token ids of the default chat prompt for it."""
    from batchinfer.config import InputConfig
    from batchinfer.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer, InputConfig())
    return lambda text: builder.encode([text])[0]


@pytest.fixture(scope="session")
def ray_cluster(model_folder):
    """A local Ray cluster for the whole session; yields its address for subprocess drivers.

    It advertises 2 logical GPUs (there is no real one) so GPU-shaped workers of the
    TensorRT-LLM test double can be scheduled; nothing here runs on a GPU.
    """
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def make_config(tmp_path: Path, **sections) -> Config:
    """A config for the real small model with fast defaults, overridable per section."""
    raw = {
        "input": {"path": str(tmp_path / "prompts"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"max_batch_size": 8},
        "sampling": {"max_tokens": 4},
        "run": {"num_workers": 1, "rows_per_shard": 20},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def ids_of(n: int) -> list[str]:
    """The ids `write_sample_prompts` gives n rows."""
    return [f"q{i:06d}" for i in range(n)]


def assert_exactly_once(out, n: int | list[str]):
    """The results hold each of n ids (or of the given ids) once. A local output folder is
    read three ways, as users do: pandas, DuckDB (`*.parquet`) and pyarrow.dataset."""
    import pandas as pd

    expected = ids_of(n) if isinstance(n, int) else sorted(n)
    if isinstance(out, pd.DataFrame):
        assert sorted(out.id) == expected, "every input row exactly once"
        return out
    import duckdb
    import pyarrow.dataset as ds

    df = pd.read_parquet(out)
    assert sorted(df.id) == expected, "pandas: every input row exactly once"
    by_duckdb = duckdb.sql(f"SELECT id FROM read_parquet('{out}/*.parquet')").fetchall()
    assert sorted(r[0] for r in by_duckdb) == expected, "DuckDB: every input row exactly once"
    by_arrow = ds.dataset(str(out), format="parquet").to_table(columns=["id"]).column("id")
    assert sorted(by_arrow.to_pylist()) == expected, "pyarrow.dataset: every input row exactly once"
    return df


def part_stats(out: Path) -> dict[str, tuple[int, int]]:
    """part name -> (inode, mtime) of every result part in a local output folder."""
    if not out.exists():
        return {}
    return {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns)
            for p in sorted(os.listdir(out)) if p.startswith("part-")}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             details=lambda: "") -> None:
    """Poll until predicate() holds; fail at the deadline, or at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}\n"
                                 + details())
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + details())
        time.sleep(0.2)


def hold_run(url: str, storage_cfg=None, lease_s: float = 3600) -> int:
    """Take a run directory's driver lease as a driver would, for tests that commit parts or
    start workers by hand (commits are fenced by it); returns the lease generation."""
    from batchinfer.lease import DriverLease
    from batchinfer.run_store import RunStore

    return DriverLease(RunStore(url, storage_cfg).meta, lease_s).acquire().generation


def write_yaml(path: Path, cfg: Config) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


class Driver:
    """A `batchinfer` subprocess in its own process group, stopped by its own pid."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchinfer.cli", *args], env=env, cwd=REPO,
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def driver(tmp_path, ray_cluster):
    """Start `batchinfer` subprocesses that join the session cluster; kill leftovers at teardown."""
    started: list[Driver] = []
    base_env = {**os.environ, **WORKER_ENV, "RAY_ADDRESS": ray_cluster}

    def start(*args: str, env: dict[str, str] | None = None) -> Driver:
        d = Driver(list(args), {**base_env, **(env or {})}, tmp_path / f"driver-{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.kill_group()
            d.proc.wait(timeout=30)


# --------------------------------------------------------------------------- S3 on loopback


def atomic_moto_server_class():
    """moto's threaded S3 server, with conditional writes made atomic as they are on S3.

    moto checks `If-None-Match: *` and then stores the object in two steps without a lock
    (moto/s3/responses.py, the put_object handler), so two racing conditional PUTs can both
    succeed on it, where S3 guarantees exactly one winner. Serializing the requests that
    carry a precondition gives the test double S3's semantics; all others stay concurrent.
    """
    import threading

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class AtomicMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            lock = threading.Lock()

            def atomic_preconditions(environ, start_response):
                if environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MATCH"):
                    with lock:
                        return app(environ, start_response)
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, atomic_preconditions, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return AtomicMotoServer


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto), for the whole session; reset per test."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = atomic_moto_server_class()(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class S3:
    """The loopback S3 server, reset to one empty bucket for each test."""

    def __init__(self, endpoint: str):
        import s3fs

        self.endpoint = endpoint
        self.bucket = BUCKET
        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def upload_dir(self, local: Path, key: str) -> str:
        for f in sorted(local.iterdir()):
            self.fs.put_file(str(f), f"{self.bucket}/{key.rstrip('/')}/{f.name}")
        return self.url(key)

    def read(self, key: str):
        """The run's results as pandas reads them (a fresh listing, not a cached one)."""
        import pandas as pd

        self.fs.invalidate_cache()
        return pd.read_parquet(f"{self.bucket}/{key}", filesystem=self.fs)

    def keys(self, prefix: str = "") -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.split("/", 1)[1] for p in self.fs.find(f"{self.bucket}/{prefix}"))


@pytest.fixture
def s3(s3_server):
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST"))
    store = S3(s3_server)
    store.fs.mkdir(BUCKET)
    return store


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_session(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process started with start_new_session and everything it spawned, by session id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for pid in session_members(proc.pid):  # children that left the process group (Ray workers)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until a server we started answers at `url`; fail with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {url} did not start:\n{log.read_text()}") from None
            time.sleep(0.3)


def session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and int(entry) != os.getpid():  # field 6 of stat: session id
            members.append(int(entry))
    return members


@pytest.fixture(scope="module")
def s3_auth_server(tmp_path_factory):
    """A separate moto server that enforces IAM auth: one admin key, one key with no rights.

    Yields (endpoint, admin_key, admin_secret, nobody_key, nobody_secret). The first few
    requests (the set-up below) run before auth is enforced.
    """
    import json

    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6"}
    log = tmp_path_factory.mktemp("moto-auth") / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc, log, timeout=60)
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam, s3c = boto3.client("iam", **kw), boto3.client("s3", **kw)
        s3c.create_bucket(Bucket=BUCKET)
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        admin = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.create_user(UserName="nobody")
        nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield (endpoint, admin["AccessKeyId"], admin["SecretAccessKey"],
               nobody["AccessKeyId"], nobody["SecretAccessKey"])
    finally:
        stop_process_session(proc)


# --------------------------------------------------------------------------- TensorRT-LLM test double


@pytest.fixture
def trtllm_double(monkeypatch):
    """Make the TensorRT-LLM test double importable as `tensorrt_llm`, here and in Ray workers.

    Yields the runtime_env that puts it on the workers' path (with the GPU identity the
    double stands for, since there is no GPU to detect).
    """
    import importlib

    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.setenv("BATCHINFER_GPU_IDENTITY", TEST_DOUBLE_GPU)
    importlib.invalidate_caches()
    yield TRTLLM_DOUBLE_ENV
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]
