"""Exactly once when two drivers meet, an input changes mid-run, the output fails, or
signals arrive at the edges; and `status` tells the truth about each.

Real `batchinfer` drivers as subprocesses joined to the session's local Ray cluster, the
real small model, real files (a 64 KiB tmpfs and a read-only bind mount where this
machine lets the tests mount them), the loopback S3 server for the S3 members. Every test
checks the output with pandas, DuckDB and pyarrow.dataset (`assert_exactly_once`) and that
the exit code and `batchinfer status` agree with what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchinfer import atomic, cli, lease, runner, storage
from batchinfer.records import ShardSummary
from batchinfer.run_store import RunStore
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import (
    REPO,
    assert_exactly_once,
    ids_of,
    make_config,
    part_stats,
    wait_for,
    write_yaml,
)

pytestmark = pytest.mark.slow


def status_of(out: str, *extra: str) -> tuple[int, dict]:
    """`batchinfer status --json OUTPUT` as a user runs it: (exit code, what it printed)."""
    done = subprocess.run([sys.executable, "-m", "batchinfer.cli", "status", "--json", out, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


def config_file(tmp_path: Path, **sections) -> str:
    return str(write_yaml(tmp_path / "job.yaml", make_config(tmp_path, **sections)))


def ids_in_parts(out: Path) -> list[str]:
    return sorted(i for p in part_stats(out) for i in pq.read_table(out / p).column("id").to_pylist())


# --------------------------------------------------------------------------- 1. two drivers


def test_second_driver_with_other_settings_while_the_first_plans_does_nothing(tmp_path, driver):
    """Reproduction: B starts 2 s into A's planning with sampling.max_tokens=6. Before,
    both exited 0 and the parts mixed 4- and 6-token outputs."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=12, row_group_size=4)
    job = config_file(tmp_path, run={"rows_per_shard": 4}, sampling={"max_tokens": 4})
    a = driver("run", job, "--no-progress", env={"BATCHINFER_FAULT": "planning:pause=8"})
    wait_for(lambda: (tmp_path / "out" / "_batchinfer" / "driver.json").exists(), 60, "A's lease", a.proc)
    time.sleep(2)
    b = driver("run", job, "--no-progress", "--set", "sampling.max_tokens=6")
    assert b.wait(120) == 4, b.output()
    assert "is being run by the driver on" in b.output() and f"pid {a.proc.pid}" in b.output()
    assert not (tmp_path / "out" / "_batchinfer" / "plan.json").exists() or \
        json.loads((tmp_path / "out" / "_batchinfer" / "plan.json").read_text())["settings"][
            "sampling"]["max_tokens"] == 4
    assert a.wait(300) == 0, a.output()
    df = assert_exactly_once(tmp_path / "out", 12)
    assert df.completion_tokens.max() <= 4
    assert status_of(str(tmp_path / "out"))[0] == 0


def test_new_run_while_a_driver_runs_is_refused_and_the_run_stays_exact(tmp_path, driver):
    """Reproduction: B runs --new-run with another rows_per_shard while A runs. Before,
    B deleted A's parts while A kept committing: 120 rows for 80 inputs, both `complete`."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=30, row_group_size=5)
    job = config_file(tmp_path, run={"rows_per_shard": 5}, sampling={"max_tokens": 3})
    a = driver("run", job, "--no-progress")
    wait_for(lambda: len(part_stats(tmp_path / "out")) >= 1, 300, "A's first commit", a.proc)
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (4, "running") and info["driver"]["pid"] == a.proc.pid
    b = driver("run", job, "--no-progress", "--new-run", "--set", "run.rows_per_shard=3")
    assert b.wait(120) == 4, b.output()
    assert a.wait(300) == 0, a.output()
    assert_exactly_once(tmp_path / "out", 30)
    manifest = json.loads((tmp_path / "out" / "_batchinfer" / "manifest.json").read_text())
    assert manifest["rows"] == {"total": 30, "ok": 30, "failed": 0, "missing": 0}


def test_a_driver_that_loses_its_lease_stops_and_lands_no_more_commits(tmp_path, ray_cluster):
    """Another member: A's lease is taken over mid-run (as by a driver that found it expired).
    A stops handing out shards and its workers' commits are fenced off."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=40, row_group_size=4)
    cfg = make_config(tmp_path, run={"rows_per_shard": 4, "driver_lease_s": 6},
                      sampling={"max_tokens": 3})
    errors: list[BaseException] = []

    def drive():
        try:
            runner.run(cfg, progress=False, install_signal_handlers=False)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=drive)
    thread.start()
    out = tmp_path / "out"
    wait_for(lambda: len(part_stats(out)) >= 1, 300, "a first commit")
    meta = RunStore(str(out)).meta
    record = json.loads((out / "_batchinfer" / "driver.json").read_text())
    taken = {**record, "generation": record["generation"] + 1, "token": "another-driver",
             "host": "other-node", "pid": 1, "renewed_at": time.time() + 3600}
    atomic.put(meta.child(lease.LEASE_FILE), json.dumps(taken).encode(), meta.child("staging"))
    took_over = time.time()
    thread.join(timeout=300)
    assert len(errors) == 1 and isinstance(errors[0], lease.LeaseLost), errors
    parts = part_stats(out)
    assert 1 <= len(parts) < 10
    late = [p for p in parts if os.stat(out / p).st_mtime > took_over + 0.5]
    assert late == [], "no commit lands after the takeover was visible"
    summaries = RunStore(str(out)).committed()
    assert {s.generation for s in summaries.values()} == {record["generation"]}
    assert_exactly_once(out, ids_in_parts(out))  # what landed, landed once
    code, info = status_of(str(out))  # the run is the other driver's now
    assert (code, info["state"], info["driver"]["host"]) == (4, "running", "other-node")


def test_parts_that_do_not_belong_to_the_plan_are_an_error_never_complete(tmp_path):
    """`complete` means every planned row has exactly one committed row: a part from
    another plan, or with other rows, is refused, never counted as a negative `missing`."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=5)
    cfg = make_config(tmp_path, run={"rows_per_shard": 5})
    plan = runner.planning.make_plan(cfg)
    store = RunStore(cfg.output.path)

    def summary(index: int, rows: int = 5, fingerprint: str | None = None) -> ShardSummary:
        return ShardSummary(shard=index, part=f"part-{index:06d}.parquet", attempt=1, worker=0,
                            generate_s=1.0, rows=rows, rows_ok=rows, rows_failed=0, prompt_tokens=rows,
                            completion_tokens=rows, committed_at="2026-11-29T00:00:00+00:00",
                            fingerprint=fingerprint)

    ok = summary(0, fingerprint=plan.fingerprint)
    runner.verify_committed(plan, {0: ok, 1: summary(1, fingerprint=plan.fingerprint)}, store)
    cases = {
        "was written for another plan (sha256:other)": {1: summary(1, fingerprint="sha256:other")},
        "part-000001.parquet has 3 rows where the plan has 5": {1: summary(1, rows=3)},
        "part-000007.parquet is not in the plan (2 shards)": {7: summary(7)},
    }
    for message, committed in cases.items():
        with pytest.raises(runner.RunRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
            runner.verify_committed(plan, {0: ok, **committed}, store)


# --------------------------------------------------------------------------- 2. inputs that change


def test_input_replaced_during_the_run_stops_it_with_exit_2(tmp_path, driver):
    """Reproduction: the file is replaced (same rows, new ids) after the workers start.
    Before: exit 0 `complete` with 20 old ids and 60 new ones."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=30, row_group_size=5)
    path = tmp_path / "prompts" / "prompts-000.parquet"
    original, stat = path.read_bytes(), path.stat()
    job = config_file(tmp_path, run={"rows_per_shard": 5, "shards_per_worker": 1},
                      sampling={"max_tokens": 3})
    a = driver("run", job, "--no-progress")
    wait_for(lambda: len(part_stats(tmp_path / "out")) >= 1, 300, "a first commit", a.proc)
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=30, row_group_size=5,
                         start=1000)
    assert a.wait(300) == 2, a.output()
    assert f"input file {str(path)!r} changed" in a.output() and "Traceback" not in a.output()
    assert set(ids_in_parts(tmp_path / "out")) <= set(ids_of(30)), "no part mixes in the new file"
    assert len(part_stats(tmp_path / "out")) < 6
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (1, "failed") and "changed" in info["detail"]
    # Put the planned version back (bytes and mtime): the rerun finishes it exactly once.
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    b = driver("run", job, "--no-progress")
    assert b.wait(300) == 0, b.output()
    assert_exactly_once(tmp_path / "out", 30)
    assert status_of(str(tmp_path / "out"))[0] == 0


def test_input_deleted_during_the_run_on_s3_stops_it_with_exit_2(tmp_path, s3, driver):
    """Another member, on S3: the object is deleted after the first commit; reads are
    conditional on the planned ETag. Re-uploading the same bytes (same ETag) resumes."""
    write_sample_prompts(str(tmp_path / "local"), files=1, rows_per_file=20, row_group_size=5)
    s3.upload_dir(tmp_path / "local", "prompts")
    key = f"{s3.bucket}/prompts/prompts-000.parquet"
    job = config_file(tmp_path, input={"path": s3.url("prompts/")},
                      output={"path": s3.url("out/run/")}, storage={"endpoint_url": s3.endpoint},
                      run={"rows_per_shard": 5, "shards_per_worker": 1}, sampling={"max_tokens": 3})
    a = driver("run", job, "--no-progress")
    wait_for(lambda: any(k.endswith(".parquet") for k in s3.keys("out/run/")), 300, "a commit", a.proc)
    s3.fs.rm(key)
    assert a.wait(300) == 2, a.output()
    assert "prompts-000.parquet' was deleted during the run" in a.output()
    s3.fs.put_file(str(tmp_path / "local" / "prompts-000.parquet"), key)
    b = driver("run", job, "--no-progress")
    assert b.wait(300) == 0, b.output()
    assert_exactly_once(s3.read("out/run/"), 20)


# --------------------------------------------------------------------------- 4. output failures


@pytest.fixture
def mounts():
    """mount(args, target, read_only) -> True if mounted (as root); unmounted at teardown."""
    done: list[Path] = []

    def mount(args: list[str], target: Path, read_only: bool = False) -> bool:
        target.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", *args, str(target)], capture_output=True).returncode:
            return False
        done.append(target)
        if read_only:  # a bind mount turns read-only on a remount
            return subprocess.run(["mount", "-o", "remount,ro,bind", str(target)],
                                  capture_output=True).returncode == 0
        return True

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_mid_run_stops_at_once_naming_the_path(tmp_path, driver, mounts):
    """Reproduction: a 64 KiB output filesystem fills up. Before: every remaining shard was
    generated and failed to commit on every attempt, then a raw ENOSPC traceback, exit 1,
    status left `running`."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=60, row_group_size=2)
    run = {"rows_per_shard": 2, "shards_per_worker": 1}
    if not mounts(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], tmp_path / "out"):
        # No mount here: the storage fault point, in the workers that commit.
        run["runtime_env"] = {"env_vars": {"BATCHINFER_FAULT": "commit#4:oserror=28",
                                           "PYTHONPATH": str(REPO)}}
    job = config_file(tmp_path, run=run, sampling={"max_tokens": 2})
    a = driver("run", job, "--no-progress")
    assert a.wait(600) == 2, a.output()
    text = a.output()
    assert "No space left on device [ENOSPC]" in text and str(tmp_path / "out") in text
    assert "Traceback" not in text and "retrying" not in text, "no shard is retried into a full disk"
    committed = len(part_stats(tmp_path / "out"))
    assert 1 <= committed < 30
    assert_exactly_once(tmp_path / "out", ids_in_parts(tmp_path / "out"))
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (1, "failed") and "No space left on device" in info["detail"]


def test_unwritable_output_is_refused_before_any_engine_starts(tmp_path, mounts):
    """Other members, found by the write probe at start (exit 2, no Ray, no engine): a
    read-only output, and an output.path that is a file."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=4, row_group_size=4)
    (tmp_path / "ro").mkdir()
    if mounts(["--bind", str(tmp_path / "ro")], tmp_path / "ro", read_only=True):
        expected = "the filesystem is read-only"
    else:  # not root: a folder we may not write (as root, permissions would not stop us)
        os.chmod(tmp_path / "ro", 0o555)
        expected = "permission denied; check the owner and mode"
    for out, message in ((tmp_path / "ro" / "run", expected),
                         (tmp_path / "prompts" / "prompts-000.parquet", "output.path must be a folder")):
        cfg = make_config(tmp_path, output={"path": str(out)})
        started = time.monotonic()
        assert cli.run_job(cfg, progress=False) == 2
        assert time.monotonic() - started < 20
        # the message names the path and the cause, and never S3 permissions
        with pytest.raises(storage.StorageError) as refused:
            runner.run(cfg, progress=False, install_signal_handlers=False)
        assert message in str(refused.value) and str(out) in str(refused.value)
        assert "s3:" not in str(refused.value)
        assert status_of(str(out))[0] == 2  # nothing was started: no run there


def test_a_local_permission_error_does_not_talk_about_s3():
    error = PermissionError(13, "Permission denied", "/data/out/_batchinfer/staging/x.tmp")
    translated = storage.diagnose(error, "/data/out", "output.path")
    assert str(translated) == ("output.path '/data/out': cannot write (/data/out/_batchinfer/staging/"
                               "x.tmp): Permission denied [EACCES]: permission denied; check the "
                               "owner and mode of the folder (ls -ld)")
    s3_error = PermissionError("Access Denied")
    assert "s3:PutObject" in str(storage.diagnose(s3_error, "s3://b/out", "output.path"))
    assert storage.diagnose(ConnectionError("connection refused"), "s3://b/out", "output.path",
                            permanent_only=True) is None


# --------------------------------------------------------------------------- 5, 6. status and signals


def test_status_of_a_killed_driver_is_stale_and_a_rerun_takes_over(tmp_path, driver):
    """Reproduction: a SIGKILLed driver's run read `running` forever."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=20, row_group_size=5)
    job = config_file(tmp_path, run={"rows_per_shard": 5, "shards_per_worker": 1},
                      sampling={"max_tokens": 3})
    a = driver("run", job, "--no-progress")
    wait_for(lambda: len(part_stats(tmp_path / "out")) >= 1, 300, "a first commit", a.proc)
    a.kill_group()
    a.wait(30)
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (1, "stale"), info
    assert f"driver on {info['driver']['host']} (pid {a.proc.pid}) last seen" in info["detail"]
    assert "rerun to resume" in info["detail"]
    b = driver("run", job, "--no-progress")  # takes the dead driver's lease at once
    assert b.wait(300) == 0, b.output()
    assert "taking over the run from the driver on" in b.output()
    assert_exactly_once(tmp_path / "out", 20)
    assert status_of(str(tmp_path / "out"))[:1] == (0,)


def test_two_sigterms_close_together_exit_at_once(tmp_path, driver):
    """Reproduction: two SIGTERMs 0.1 s apart acted as one (the driver waited for its
    shards in flight)."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=16, row_group_size=8)
    job = config_file(tmp_path, run={"rows_per_shard": 8}, sampling={"max_tokens": 48})
    a = driver("run", job, "--no-progress")
    status = tmp_path / "out" / "_batchinfer" / "status.json"
    wait_for(lambda: status.exists() and json.loads(status.read_text())["state"] == "running",
             300, "workers running", a.proc)
    time.sleep(1)
    a.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    a.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert a.wait(60) == 1, a.output()
    assert time.monotonic() - started < 10, "the second signal exits at once"
    assert "second signal (SIGTERM): exiting now" in a.output()
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (1, "interrupted"), info
    b = driver("run", job, "--no-progress")
    assert b.wait(300) == 0, b.output()
    assert_exactly_once(tmp_path / "out", 16)


def test_sigterm_during_ray_start_up_is_an_orderly_interruption(tmp_path):
    """Another member: SIGTERM while the embedded Ray cluster starts. Before: exit 15, no
    message, status stuck at `starting`."""
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=4, row_group_size=4)
    job = config_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    log = (tmp_path / "driver.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "batchinfer.cli", "run", job, "--no-progress"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        status = tmp_path / "out" / "_batchinfer" / "status.json"
        wait_for(lambda: status.exists(), 120, "the driver's start", proc)
        time.sleep(0.5)  # inside ray.init
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 1, (tmp_path / "driver.log").read_text()
    finally:
        from tests.conftest import stop_process_session

        stop_process_session(proc)
    text = (tmp_path / "driver.log").read_text()
    assert "SIGTERM received" in text and "interrupted; rerun the same command to resume" in text
    code, info = status_of(str(tmp_path / "out"))
    assert (code, info["state"]) == (1, "interrupted"), info


def test_status_without_a_run_exits_2(tmp_path):
    assert status_of(str(tmp_path / "nothing"))[0] == 2
