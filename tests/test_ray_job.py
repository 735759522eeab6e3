"""`ray job submit` / `ray job stop` against a real `ray start --head` cluster on 127.0.0.1,
and the nightly config fired twice for one date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from scripts.sample_prompts import write_sample_prompts
from tests.conftest import (
    REPO,
    S3_ENV,
    WORKER_ENV,
    assert_exactly_once,
    free_port,
    make_config,
    part_stats,
    stop_process_session,
    wait_for,
    wait_for_http,
    write_yaml,
)

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# Ray 2.60: `ray start` and `ray job submit` must agree on token auth; tests run without it.
JOB_ENV = {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, model_folder):
    """`ray start --head --block` on 127.0.0.1, stopped by its own session id at teardown."""
    port, dashboard = free_port(), free_port()
    # Every port of its own: the session's ray.init() cluster already holds Ray's defaults
    # (the dashboard agent's 52365 among them), and a head whose agent cannot bind it
    # never takes a job.
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    proc = subprocess.Popen(
        [*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=true", *agent_ports],
        # A cluster with token auth off stays on loopback: without this Ray 2.60 rewrites
        # --node-ip-address=127.0.0.1 to the machine's address and listens on all interfaces.
        env={**JOB_ENV, **WORKER_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{address}/api/version", proc, log, timeout=120)
        wait_for_job_agent(address, proc, log, timeout=180)
        yield address
    finally:
        stop_process_session(proc, grace=3)  # a test cluster: nothing to drain


def wait_for_job_agent(address: str, proc: subprocess.Popen, log, timeout: float) -> None:
    """The dashboard answers before the head's job agent registers, and the head gives a
    submission only 10 s to find it: submit a no-op job until it is taken and has run."""
    deadline = time.monotonic() + timeout
    body = json.dumps({"entrypoint": "true", "submission_id": "bi-agent-ready"}).encode()
    while True:
        request = urllib.request.Request(f"{address}/api/jobs/", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
            break
        except OSError as e:  # HTTPError 500 "No available agent to submit job" while it starts
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"job agent at {address} not ready ({e}):\n{log.read_text()}") \
                    from None
            time.sleep(1)
    status = wait_status(address, "bi-agent-ready", {"SUCCEEDED", "FAILED", "STOPPED"},
                         max(deadline - time.monotonic(), 60))
    assert status == "SUCCEEDED", ray_job(address, "logs", "bi-agent-ready").stdout


def ray_job(address: str, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RAY, "job", command, "--address", address, *args], env=JOB_ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def submit(address: str, submission_id: str, config: str, runtime_env: str) -> None:
    proc = ray_job(address, "submit", "--no-wait", "--submission-id", submission_id,
                   "--runtime-env", runtime_env, "--working-dir", str(REPO), "--",
                   sys.executable, "jobs/batch_job.py", "--config", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def job_status(address: str, submission_id: str) -> str:
    with urllib.request.urlopen(f"{address}/api/jobs/{submission_id}", timeout=10) as r:
        return json.load(r)["status"]


def wait_status(address: str, submission_id: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(address, submission_id)
        if status in wanted:
            return status
        time.sleep(1)
    raise AssertionError(f"job {submission_id} still {status} after {timeout}s:\n"
                         + ray_job(address, "logs", submission_id).stdout[-5000:])


def job_config(tmp_path, rows_per_file: int, **run) -> str:
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=rows_per_file,
                         row_group_size=5)
    cfg = make_config(tmp_path, run={"num_workers": 2, "rows_per_shard": 5,
                                     "progress_interval_s": 0.5, **run})
    return str(write_yaml(tmp_path / "job.yaml", cfg))


def runtime_env(tmp_path, stop_wait_s: int) -> str:
    """The shipped configs/runtime_env.yaml, with the test's stop grace."""
    import yaml

    env = yaml.safe_load((REPO / "configs" / "runtime_env.yaml").read_text())
    env.pop("working_dir")  # given on the command line
    env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] = str(stop_wait_s)
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return str(path)


def test_ray_job_submit_runs_the_job(tmp_path, ray_head):
    config = job_config(tmp_path, rows_per_file=10)
    submit(ray_head, "bi-submit", config, runtime_env(tmp_path, 60))
    assert wait_status(ray_head, "bi-submit", {"SUCCEEDED", "FAILED", "STOPPED"}, 300) == "SUCCEEDED"
    logs = ray_job(ray_head, "logs", "bi-submit").stdout
    assert "4 of 4 shards to do" in logs and "batchinfer: completed" in logs
    assert "progress: " in logs and " rows (" in logs  # periodic progress lines in the job log
    assert "rows     20 ok, 0 failed" in logs
    assert_exactly_once(tmp_path / "out", 20)


def test_ray_job_stop_is_clean_and_resubmit_finishes_exactly_once(tmp_path, ray_head):
    config = job_config(tmp_path, rows_per_file=40, shards_per_worker=1)  # 16 shards of 5
    submit(ray_head, "bi-stop-1", config, runtime_env(tmp_path, 60))
    out = tmp_path / "out"
    wait_for(lambda: len(part_stats(out)) >= 2, 300, "2 committed shards",
             details=lambda: ray_job(ray_head, "logs", "bi-stop-1").stdout)
    stopped = ray_job(ray_head, "stop", "bi-stop-1", timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert wait_status(ray_head, "bi-stop-1", {"STOPPED", "FAILED", "SUCCEEDED"}, 120) == "STOPPED"
    logs = ray_job(ray_head, "logs", "bi-stop-1").stdout
    assert "SIGTERM received: finishing shards in flight" in logs
    assert "batchinfer: interrupted" in logs  # a clean exit with a summary, not a SIGKILL
    at_stop = part_stats(out)
    assert 2 <= len(at_stop) < 16
    status = json.loads((out / "_batchinfer" / "status.json").read_text())
    assert status["state"] == "interrupted"

    submit(ray_head, "bi-stop-2", config, runtime_env(tmp_path, 60))
    assert wait_status(ray_head, "bi-stop-2", {"SUCCEEDED", "FAILED", "STOPPED"}, 400) == "SUCCEEDED"
    logs = ray_job(ray_head, "logs", "bi-stop-2").stdout
    assert f"{16 - len(at_stop)} of 16 shards to do" in logs
    assert_exactly_once(out, 80)


def test_nightly_config_fired_twice_for_one_date_does_inference_once(tmp_path, s3, driver):
    write_sample_prompts(str(tmp_path / "night"), files=1, rows_per_file=8, row_group_size=4)
    s3.fs.mkdir("example-batch-bucket")
    for f in (tmp_path / "night").iterdir():
        s3.fs.put_file(str(f), f"example-batch-bucket/prompts/2026-11-27/{f.name}")
    args = ["run", "configs/nightly.yaml", "--date", "2026-11-27", "--no-progress",
            "--set", f"storage.endpoint_url={s3.endpoint}", "--set", "sampling.max_tokens=4",
            "--set", "run.rows_per_shard=4"]

    first = driver(*args)
    assert first.wait(timeout=300) == 0, first.output()
    assert "batchinfer: completed" in first.output()
    s3.fs.invalidate_cache()
    results = "example-batch-bucket/results/2026-11-27"
    before = {i["name"]: i["ETag"] for i in s3.fs.ls(results, detail=True) if i["type"] == "file"}
    assert len([n for n in before if n.endswith(".parquet")]) == 2

    second = driver(*args)
    assert second.wait(timeout=120) == 0, second.output()
    assert "already finished: nothing to do" in second.output()
    assert "workers ready" not in second.output()  # no engine was started
    s3.fs.invalidate_cache()
    assert {i["name"]: i["ETag"] for i in s3.fs.ls(results, detail=True) if i["type"] == "file"} == before
    assert_exactly_once(pd.read_parquet(results, filesystem=s3.fs), 8)
