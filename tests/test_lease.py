"""The driver lease: one live driver per run directory, enforced by the storage itself.

Pure storage tests (no Ray): local disk and the loopback S3 server, real processes racing.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import pytest

from batchinfer import atomic, lease, storage
from batchinfer.config import StorageConfig
from batchinfer.lease import DriverLease, LeaseLost, RunBusy, check_fence, read_holder
from batchinfer.run_store import RunStore


def meta_of(url: str, cfg: StorageConfig | None = None) -> storage.Location:
    return RunStore(url, cfg).meta


def age_record(meta: storage.Location, seconds: float, **changes) -> None:
    """Make the lease on record look `seconds` older (as if its driver stopped renewing)."""
    loc = meta.child(lease.LEASE_FILE)
    record = json.loads(atomic.read_versioned(loc)[0])
    record["renewed_at"] -= seconds
    record.update(changes)
    atomic.put(loc, json.dumps(record).encode(), meta.child("staging"))


@pytest.fixture(params=["local", "s3"])
def run_url(request, tmp_path):
    """A run directory URL and its storage config, on local disk and on the loopback S3."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    s3 = request.getfixturevalue("s3")
    return s3.url("runs/one"), StorageConfig(endpoint_url=s3.endpoint)


def test_a_second_driver_on_a_live_run_is_refused_naming_the_holder(run_url):
    url, cfg = run_url
    first = DriverLease(meta_of(url, cfg), lease_s=60)
    assert first.acquire().generation == 1
    with pytest.raises(RunBusy) as busy:
        DriverLease(meta_of(url, cfg), lease_s=60).acquire()
    text = str(busy.value)
    assert f"pid {first.holder.pid}" in text and first.holder.host in text
    assert "last heartbeat 0 s ago" in text and "exit 4" in text
    first.release("completed")
    assert DriverLease(meta_of(url, cfg), lease_s=60).acquire().generation == 2  # released: taken at once


def test_an_expired_lease_is_taken_over_and_the_old_driver_finds_out(run_url):
    url, cfg = run_url
    meta = meta_of(url, cfg)
    old = DriverLease(meta, lease_s=10)
    old.acquire()
    age_record(meta, 11, host="another-node")  # a driver on another host that stopped renewing
    new = DriverLease(meta_of(url, cfg), lease_s=10)
    assert new.acquire().generation == 2
    assert old.renew() is False and "another driver took the run over" in old.lost
    check_fence(meta, 2)
    with pytest.raises(LeaseLost, match="no longer held by generation 1"):
        check_fence(meta, 1)


def test_a_dead_driver_on_this_host_is_taken_over_at_once(tmp_path):
    url = str(tmp_path / "run")
    child = subprocess.run(
        [sys.executable, "-c", "from batchinfer.lease import DriverLease; from batchinfer.run_store import "
         f"RunStore; DriverLease(RunStore({url!r}).meta, 600).acquire()"], check=True)
    assert child.returncode == 0  # exited without releasing, as after a SIGKILL
    holder = read_holder(meta_of(url))
    assert holder.is_live() is False and holder.provably_dead()
    assert DriverLease(meta_of(url), lease_s=600).acquire().generation == 2


def _take_over(args):
    url, endpoint, barrier = args
    cfg = StorageConfig(endpoint_url=endpoint) if endpoint else None
    held = DriverLease(meta_of(url, cfg), lease_s=10)
    barrier.wait()
    try:
        return held.acquire().token
    except RunBusy:
        return None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_taking_over_an_expired_lease_at_once_one_wins(where, tmp_path, request):
    if where == "local":
        url, endpoint = str(tmp_path / "run"), None
    else:
        s3 = request.getfixturevalue("s3")
        url, endpoint = s3.url("runs/race"), s3.endpoint
    cfg = StorageConfig(endpoint_url=endpoint) if endpoint else None
    DriverLease(meta_of(url, cfg), lease_s=10).acquire()
    age_record(meta_of(url, cfg), 30, host="gone-node")
    n = 6
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(n)
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            tokens = pool.map(_take_over, [(url, endpoint, barrier) for _ in range(n)])
    winners = [t for t in tokens if t]
    assert len(winners) == 1, tokens
    holder = read_holder(meta_of(url, cfg))
    assert (holder.token, holder.generation) == (winners[0], 2)


def test_commits_are_fenced_by_generation_and_heartbeat(tmp_path):
    from tests.test_run_store import part_bytes

    store = RunStore(str(tmp_path / "run"))
    held = DriverLease(store.meta, lease_s=10)
    generation = held.acquire().generation
    data, summary = part_bytes(0, 0)
    with pytest.raises(LeaseLost, match="generation 7"):
        store.commit("part-000000.parquet", data, summary, 7)
    age_record(store.meta, 6)  # renewed more than half a lease ago: its driver may be gone
    with pytest.raises(LeaseLost, match="has not renewed its lease"):
        store.commit("part-000000.parquet", data, summary, generation)
    assert not (tmp_path / "run" / "part-000000.parquet").exists()
    assert held.renew() is True
    assert store.commit("part-000000.parquet", data, summary, generation) is True


def test_renewal_thread_keeps_the_heartbeat_fresh_and_reports_a_takeover(tmp_path):
    meta = meta_of(str(tmp_path / "run"))
    held = DriverLease(meta, lease_s=5)  # renews every 5/6 s
    held.acquire()
    lost = []
    held.start_renewing(on_lost=lambda: lost.append(True))
    time.sleep(2.5)
    assert read_holder(meta).age_s() < 1.5
    age_record(meta, 10, token="someone-else", generation=9)  # another driver's record now
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lost and "another driver took the run over" in held.lost
    held.release("interrupted")
    assert read_holder(meta).generation == 9  # a lost lease is not released over its new holder


def test_a_holder_we_cannot_see_for_sure_is_alive(tmp_path, monkeypatch):
    """Only a process gone from this host and pid namespace is dead; another container on
    the same host (another pid namespace), or a process we may not inspect, is alive."""
    meta = meta_of(str(tmp_path / "run"))
    DriverLease(meta, lease_s=600).acquire()
    holder = read_holder(meta)
    assert not holder.provably_dead()  # ourselves
    holder.pid_ns += 1
    holder.pid = 2**22 + 7  # no such pid here, but in another pid namespace it may well run
    assert not holder.provably_dead() and holder.is_live()
    holder.pid_ns -= 1
    assert holder.provably_dead()
    monkeypatch.setattr(lease, "process_start_time", lambda pid: lease.ALIVE_UNKNOWN)
    assert not holder.provably_dead()


def test_a_lost_lease_is_exit_4_only_when_another_driver_holds_the_run(tmp_path):
    from batchinfer import runner

    store = RunStore(str(tmp_path / "run"))
    held = DriverLease(store.meta, lease_s=10)
    held.acquire()
    held.lost = "no renewal for 6 s (storage unreachable)"
    lapsed = runner._lease_error(held, store)
    assert isinstance(lapsed, lease.RunLapsed) and "no other driver holds the run" in str(lapsed)
    age_record(store.meta, 0, token="another-driver", generation=2, host="other-node")
    taken = runner._lease_error(held, store)
    assert isinstance(taken, LeaseLost) and "taken over by the driver on other-node" in str(taken)


def test_status_prefers_a_live_driver_and_a_later_failure_over_an_old_manifest(tmp_path):
    from batchinfer.lifecycle import decide as run_state
    from batchinfer.records import Manifest, RunStatus, ShardTotals

    store = RunStore(str(tmp_path / "run"))
    plan = type("P", (), {"fingerprint": "sha256:x"})()
    manifest = Manifest.model_construct(fingerprint="sha256:x", status="partial",
                                        shards=ShardTotals(total=3, committed=2, failed=1),
                                        finished_at="2026-11-29T01:00:00+00:00")
    committed = {0: {}, 1: {}}
    assert run_state(plan, len(committed), manifest, None, None) == ("partial", "")
    held = DriverLease(store.meta, lease_s=60)
    held.acquire()
    assert run_state(plan, len(committed), manifest, None, read_holder(store.meta))[0] == "running"
    held.release("failed")
    failed = RunStatus(state="failed", reason="StorageError: no space",
                       updated_at="2026-11-29T02:00:00+00:00")
    state, detail = run_state(plan, len(committed), manifest, failed, read_holder(store.meta))
    assert state == "failed" and detail.startswith("StorageError: no space; rerun")
