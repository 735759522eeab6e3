"""An S3 server on 127.0.0.1 for benchmarks: moto's, in its own process, so its CPU is
not the benchmark's (shared by scripts/bench_plan_s3.py and the scale part).

    with s3_loopback.server() as endpoint:   # "http://127.0.0.1:PORT"
        ...

    python -m scripts.benchlib.s3_loopback PORT [LATENCY_MS]   # what server() starts
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
"""Dummy keys for the clients (moto accepts any); never the user's own."""
STATS_PATH = "/_loopback/stats"
"""GET it for the requests served so far by HTTP method, and the server's CPU seconds (JSON)."""


def use_dummy_credentials() -> None:
    """Point botocore, s3fs and pyarrow at the dummy keys unless keys are set already."""
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)


def serve(port: int, latency_ms: float = 0.0) -> None:
    """Run moto's S3 server, each request delayed by `latency_ms` (S3's time to first byte)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    counts: collections.Counter[str] = collections.Counter()

    def delayed(environ, start_response):
        if environ.get("PATH_INFO") == STATS_PATH:  # not a bucket name S3 allows
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({"requests": counts, "cpu_s": time.process_time()}).encode()]
        counts[environ.get("REQUEST_METHOD", "?")] += 1
        if latency_ms:
            time.sleep(latency_ms / 1000)
        return app(environ, start_response)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    run_simple("127.0.0.1", port, delayed, threaded=True)


def start_server(latency_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    """Start `serve` in a child process; return it and its endpoint once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scripts.benchlib.s3_loopback", str(port), str(latency_ms)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not answer within 30 s")


def stats(endpoint: str) -> dict[str, Any]:
    """{"requests": {method: count}, "cpu_s": seconds}: what the server at `endpoint` has
    served and the CPU time it has used so far (its own process, all threads)."""
    with urllib.request.urlopen(endpoint + STATS_PATH, timeout=10) as r:
        return json.loads(r.read())


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server(latency_ms: float = 0.0) -> Iterator[str]:
    """A fresh server for the duration of the block; yields its endpoint URL."""
    use_dummy_credentials()
    proc, endpoint = start_server(latency_ms)
    try:
        yield endpoint
    finally:
        stop_server(proc)


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
