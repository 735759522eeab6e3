"""The run lifecycle as `batchinfer status` reads it (batchinfer/lifecycle.py), from records
written by the real store and driver lease; the end-to-end states (running, stale after a
SIGKILL, completed, --watch) are in tests/test_resume.py, partial in tests/test_failed_rows.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from batchinfer import lifecycle
from batchinfer.cli import main
from batchinfer.lease import DriverLease
from batchinfer.records import RunStatus
from batchinfer.run_store import RunStore
from tests.conftest import REPO


def test_exit_codes_tell_a_scheduler_what_to_do():
    assert {s: lifecycle.exit_code_for(s) for s in (*lifecycle.LIVE_STATES, *lifecycle.TERMINAL_STATES)} == {
        "planning": 4, "running": 4, "completed": 0, "partial": 3, "failed": 1, "interrupted": 1,
        "stale": 1, "not_started": 1}


def test_a_driver_that_holds_the_run_before_its_plan_is_planning_and_then_running(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert lifecycle.read(store) is None  # nothing there: `status` exits 2
    held = DriverLease(store.meta, lease_s=60)
    held.acquire()
    store.write_status(RunStatus(state="planning"))
    view = lifecycle.read(store)
    assert (view.state, view.exit_code, view.to_json()["shards"]["total"]) == ("planning", 4, None)
    assert view.to_json()["terminal"] is False
    result = CliRunner().invoke(main, ["status", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 4 and json.loads(result.output)["state"] == "planning"
    # a stale record of the previous driver does not hide that a live driver holds the run
    store.write_status(RunStatus(state="completed"))
    assert lifecycle.read(store).state == "planning"
    held.release("failed")
    store.write_status(RunStatus(state="failed", reason="InputError: no files at in/",
                                 updated_at="2026-11-29T01:00:00+00:00"))
    view = lifecycle.read(store)
    assert (view.state, view.exit_code) == ("failed", 1)
    assert view.detail == "InputError: no files at in/; rerun the same command to resume once the cause is fixed"


def test_a_driver_killed_while_planning_leaves_a_stale_run(tmp_path):
    """A real driver process takes the lease and writes `planning`, then is SIGKILLed: its pid
    is gone from this host, so readers see the run stale at once, not after the lease."""
    url = str(tmp_path / "run")
    code = ("import sys, time\n"
            "from batchinfer.lease import DriverLease\n"
            "from batchinfer.records import RunStatus\n"
            "from batchinfer.run_store import RunStore\n"
            "store = RunStore(sys.argv[1])\n"
            "DriverLease(store.meta, 3600).acquire()\n"
            "store.write_status(RunStatus(state='planning'))\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lifecycle.read(RunStore(url)).state == "planning"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while lifecycle.read(RunStore(url)).state != "stale" and time.monotonic() < deadline:
        time.sleep(0.1)
    view = lifecycle.read(RunStore(url))
    assert (view.state, view.exit_code) == ("stale", 1)
    assert f"(pid {proc.pid})" in view.detail and "rerun to resume" in view.detail
    result = CliRunner().invoke(main, ["status", url])
    assert result.exit_code == 1 and "state    stale" in result.output
