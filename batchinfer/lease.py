"""One live driver per run directory: a lease that the storage itself enforces.

The lease is `_batchinfer/driver.json`. A driver takes it with a create-if-absent write
(the primitive that commits parts), renews it every sixth of `run.driver_lease_s`, and
releases it when it exits. A second driver finds it live and does nothing (RunBusy). It
is taken over only once it has expired, or at once when its holder is provably dead (a
pid that no longer runs on this same host), and the takeover is a compare-and-swap on
the record's version (S3 `If-Match` on the ETag; locally under a file lock), so of two
drivers that try to take it over only one can.

Each take gives the run a new `generation`. Workers are started for one generation and
check it right before they commit a part (`check_fence`): a driver that lost its lease
cannot land commits in a run it no longer owns.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from batchinfer import atomic, storage
from batchinfer.records import now_iso

log = logging.getLogger(__name__)

LEASE_FILE = "driver.json"
RENEWALS_PER_LEASE = 6
# A worker commits only while the lease was renewed within this share of its length, so
# a commit that passes the check has the rest of the lease to land before a takeover.
FENCE_SHARE = 0.5


class RunBusy(RuntimeError):
    """Another live driver holds this run directory; this one did nothing."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over or could not be renewed in time; stop committing."""


class LeaseStale(LeaseLost):
    """The lease is still this generation's, but its driver has not renewed it lately."""


class RunLapsed(RuntimeError):
    """This driver could not keep its lease (storage trouble) and stopped; nobody else holds
    the run, so a rerun resumes it."""


@dataclass
class Holder:
    """The driver.json record: who holds the run, since when, and for which generation."""

    generation: int
    token: str
    host: str
    pid: int
    pid_started: float
    """The holder process's start time (epoch s), so a reused pid is not taken for it."""
    boot_id: str
    acquired_at: str
    renewed_at: float
    """Epoch seconds of the last renewal."""
    lease_s: float
    pid_ns: int = 0
    """Inode of the holder's pid namespace: two containers on one host share the hostname
    and boot id but not their pids."""
    released: bool = False
    state: str = "starting"

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (ValueError, TypeError):
            return None  # a record cut short: nobody can hold the run through it

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def age_s(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.renewed_at

    def is_live(self, now: float | None = None) -> bool:
        """Held: not released, renewed within its lease, and not a dead process on this host."""
        if self.released or self.age_s(now) > self.lease_s:
            return False
        return not self.provably_dead()

    def provably_dead(self) -> bool:
        """The holder ran on this machine, in this pid namespace, and its process is gone
        (or the pid now belongs to a process started at another time). Anything we cannot
        see for sure (another host, container or boot; a process we may not inspect) is alive."""
        if (self.host, self.boot_id, self.pid_ns) != (socket.gethostname(), boot_id(), pid_namespace()):
            return False  # only expiry tells
        started = process_start_time(self.pid)
        if started is ALIVE_UNKNOWN:
            return False
        # psutil derives the start time from the boot time, which moves when the clock is
        # stepped: a second of slack tells a reused pid from the same process.
        return started is None or abs(started - self.pid_started) > 1.0

    def describe(self) -> str:
        return (f"driver on {self.host} (pid {self.pid}, generation {self.generation}), "
                f"last heartbeat {self.age_s():.0f} s ago")


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


ALIVE_UNKNOWN = -1.0


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_start_time(pid: int) -> float | None:
    """Start time (epoch s) of `pid`; None if no such process; ALIVE_UNKNOWN if we may not look."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return None
    except psutil.AccessDenied:
        return ALIVE_UNKNOWN


def read_holder(meta: storage.Location) -> Holder | None:
    found = atomic.read_versioned(meta.child(LEASE_FILE))
    return Holder.parse(found[0]) if found else None


def check_fence(meta: storage.Location, generation: int) -> None:
    """Raise LeaseLost unless `generation` still holds the run and was renewed recently.

    Called by workers right before a commit; one small read.
    """
    holder = read_holder(meta)
    if holder is None or holder.generation != generation or holder.released:
        now = "no driver" if holder is None else holder.describe()
        raise LeaseLost(f"the run is no longer held by generation {generation} (now: {now}); "
                        "this attempt's result is discarded")
    if holder.age_s() > holder.lease_s * FENCE_SHARE:
        raise LeaseStale(f"the driver of generation {generation} has not renewed its lease for "
                        f"{holder.age_s():.0f} s; not committing for a driver that may be gone")


class DriverLease:
    """This driver's hold on a run directory: acquire, renew in a thread, release."""

    def __init__(self, meta: storage.Location, lease_s: float):
        self.meta = meta
        self.loc = meta.child(LEASE_FILE)
        self.staging = meta.child("staging")
        self.lease_s = lease_s
        self.holder: Holder | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        """Why the lease was lost, once it was."""

    @property
    def generation(self) -> int:
        assert self.holder is not None
        return self.holder.generation

    def acquire(self) -> Holder:
        """Take the run, or raise RunBusy naming the live holder. Also the first write of the
        run: an output that cannot be written fails here, before any engine starts."""
        for _ in range(5):
            found = atomic.read_versioned(self.loc)
            previous = Holder.parse(found[0]) if found else None
            if previous is not None and previous.is_live():
                raise RunBusy(
                    f"{self.meta.url.rsplit('/', 1)[0]} is being run by the {previous.describe()}; "
                    "this driver did nothing (exit 4). Wait for it, or `batchinfer status` to follow "
                    f"it; if that driver is gone, its lease expires {previous.lease_s:.0f} s after "
                    "its last heartbeat and a rerun takes over")
            # A record cut short (a full disk) has no generation to follow: a time-based one
            # is larger than any count and so never equal to a generation still at work.
            mine = self._record(generation=previous.generation + 1 if previous
                                else int(time.time()) if found else 1)
            if found is None:
                taken = atomic.put_if_absent(self.loc, mine.to_bytes(), self.staging)
            else:
                if previous is not None:
                    why = "released" if previous.released else (
                        "its holder is gone" if previous.provably_dead() else "expired")
                    # a released lease is the normal handover of a rerun; the others are news
                    log.log(logging.INFO if previous.released else logging.WARNING,
                            "taking over the run from the %s (%s)", previous.describe(), why)
                taken = atomic.replace_if_version(self.loc, mine.to_bytes(), found[1], self.staging)
            if not taken:  # a write whose reply was lost may have landed all the same
                current = read_holder(self.meta)
                taken = current is not None and current.token == mine.token
            if taken:
                self.holder = mine
                self._version = self._read_version()
                return mine
        raise RunBusy(f"{self.loc.url}: another driver keeps taking the lease; try again")

    def _record(self, generation: int) -> Holder:
        now = time.time()
        return Holder(generation=generation, token=uuid.uuid4().hex, host=socket.gethostname(),
                      pid=os.getpid(), pid_started=process_start_time(os.getpid()) or 0.0,
                      boot_id=boot_id(), pid_ns=pid_namespace(),
                      acquired_at=now_iso(),
                      renewed_at=now, lease_s=self.lease_s)

    def _read_version(self) -> str | None:
        found = atomic.read_versioned(self.loc)
        if found is None:
            return None
        holder = Holder.parse(found[0])
        return found[1] if holder is not None and holder.token == self.holder.token else None

    def renew(self, **changes: Any) -> bool:
        """Write a fresh heartbeat (and `changes`, e.g. state) if we still hold the lease.

        Returns False, and records why in `lost`, when another driver took it over.
        """
        with self._lock:
            if self.lost:
                return False
            for key, value in changes.items():
                setattr(self.holder, key, value)
            self.holder.renewed_at = time.time()
            data = self.holder.to_bytes()
            for _ in range(2):
                if self._version is not None and atomic.replace_if_version(
                        self.loc, data, self._version, self.staging):
                    self._version = self._read_version()
                    return self._version is not None or self._lose("the lease record vanished")
                # The record changed since we last wrote it: still ours (same token), or taken?
                self._version = self._read_version()
                if self._version is None:
                    break
            current = read_holder(self.meta)
            who = current.describe() if current else "nobody (the record is gone)"
            return self._lose(f"another driver took the run over: {who}")

    def successor(self) -> Holder | None:
        """The live driver that took the run over from us, if one did."""
        try:
            current = read_holder(self.meta)
        except Exception:  # storage trouble: we cannot tell
            return None
        if current is None or self.holder is None or current.token == self.holder.token:
            return None
        return current if current.is_live() else None

    def _lose(self, why: str) -> bool:
        self.lost = why
        log.error("lost the lease on %s: %s", self.loc.url, why)
        return False

    def start_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew every lease_s/6 in a thread; call `on_lost` once if the lease is lost, or if
        it could not be renewed for longer than the fence allows (then we may no longer hold it)."""
        interval = self.lease_s / RENEWALS_PER_LEASE

        def loop() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        on_lost()
                        return
                    last_ok = time.monotonic()
                except Exception as e:  # transient storage trouble: keep trying within the lease
                    log.warning("could not renew the driver lease: %s", e)
                    if time.monotonic() - last_ok > self.lease_s * FENCE_SHARE:
                        self._lose(f"no renewal for {time.monotonic() - last_ok:.0f} s ({e})")
                        on_lost()
                        return

        self._thread = threading.Thread(target=loop, name="driver-lease", daemon=True)
        self._thread.start()

    def release(self, state: str) -> None:
        """Mark the lease released (a rerun takes it at once) and stop renewing. Best effort."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder is None or self.lost:
            return
        try:
            self.renew(released=True, state=state)
        except Exception as e:
            log.warning("could not release the driver lease (it expires in %.0f s): %s", self.lease_s, e)
