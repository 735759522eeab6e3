"""The run directory on any fsspec URL: plan record, atomic shard commits, status, manifest.

Layout (everything but the parts starts with "_", which Parquet dataset readers skip):

    part-000000.parquet ...            one per committed shard, visible only once complete
    _SUCCESS                           written when every shard has committed
    _batchinfer/plan.json              the plan and its fingerprint
    _batchinfer/commits/part-*.json    the summary of each committed shard
    _batchinfer/status.json            the driver's state and progress
    _batchinfer/driver.json            the driver lease: who runs this directory (lease.py)
    _batchinfer/manifest.json          the final report
    _batchinfer/staging/               temp files of local commits in progress

A part file is the commit: it appears in one atomic create-if-absent step, so only the
first attempt to commit a shard wins. Its summary is stored in the part's own Parquet
metadata too, so a commit record lost to a crash is rebuilt from the part.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from batchinfer import atomic, faults, lease, storage
from batchinfer.config import StorageConfig
from batchinfer.plan import Plan
from batchinfer.records import Manifest, Record, RunStatus, ShardSummary
from batchinfer.results import SUMMARY_KEY

META_DIR = storage.RUN_META_DIR
PART_RE = re.compile(r"^part-(\d+)\.parquet$")


class RunStore:
    def __init__(self, url: str, cfg: StorageConfig | None = None):
        self.root = storage.locate(url, cfg)
        self.fs = self.root.fs
        self.meta = self.root.child(META_DIR)

    @property
    def url(self) -> str:
        return self.root.url

    # ------------------------------------------------------------------ plan

    def read_plan(self) -> Plan | None:
        text = self._read_text(self.meta.child("plan.json"))
        return Plan.from_json(text) if text is not None else None

    def write_plan(self, plan: Plan) -> Plan:
        """Record the plan unless one exists; return the plan that is on record."""
        if atomic.put_if_absent(self.meta.child("plan.json"), plan.to_json().encode(), self._staging()):
            return plan
        return self.read_plan()  # another driver recorded its plan first

    # ------------------------------------------------------------------ commits

    def part(self, shard_name: str) -> storage.Location:
        return self.root.child(f"{shard_name}.parquet")

    def commit(self, shard_name: str, data: bytes, summary: ShardSummary, generation: int) -> bool:
        """Make a shard's part visible unless another attempt did first; True if this one won.

        Fenced: raises lease.LeaseLost, committing nothing, unless the driver `generation`
        this attempt was started for still holds the run.
        """
        lease.check_fence(self.meta, generation)
        faults.point("commit")
        won = atomic.put_if_absent(self.part(shard_name), data, self._staging())
        if won:
            faults.point("part-committed")
            self._write(self._record(shard_name), summary)
        return won

    def committed(self) -> dict[int, ShardSummary]:
        """Summaries of every committed shard, by shard index; rebuilds records lost to a crash."""
        parts = self._ls(self.root)
        indexes = {int(m.group(1)): name for name in parts if (m := PART_RE.match(name))}
        records = {n.removesuffix(".json") for n in self._ls(self.meta.child("commits"))}

        def summary(item: tuple[int, str]) -> tuple[int, ShardSummary]:
            index, name = item
            shard_name = name.removesuffix(".parquet")
            if shard_name in records:
                found = self._read(self._record(shard_name), ShardSummary)
                if found is not None:
                    return index, found
                # a record cut short by a crash (or gone): the part itself knows the summary
            found = self.summary_from_part(shard_name)
            try:
                self._write(self._record(shard_name), found)
            except OSError:  # a full or read-only output: the part itself stays the record
                pass
            return index, found

        with ThreadPoolExecutor(16) as pool:
            return dict(pool.map(summary, sorted(indexes.items())))

    def summary_from_part(self, shard_name: str) -> ShardSummary:
        with self.fs.open(self.part(shard_name).path, "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        return ShardSummary.from_json(meta[SUMMARY_KEY])

    def _record(self, shard_name: str) -> storage.Location:
        return self.meta.child("commits", f"{shard_name}.json")

    # ------------------------------------------------------------------ status and manifest

    def write_status(self, status: RunStatus) -> None:
        atomic.put(self.meta.child("status.json"), status.to_json().encode(), self._staging(),
                   small_record=True)

    def read_status(self) -> RunStatus | None:
        return self._read(self.meta.child("status.json"), RunStatus)

    def write_manifest(self, manifest: Manifest, success: bool) -> None:
        self._write(self.meta.child("manifest.json"), manifest)
        if success:
            atomic.put(self.root.child("_SUCCESS"), b"", self._staging())

    def read_manifest(self) -> Manifest | None:
        return self._read(self.meta.child("manifest.json"), Manifest)

    def clear(self) -> None:
        """Remove a previous run's parts and metadata (for an explicit new run), keeping the
        driver lease the caller holds."""
        for name in self._ls(self.root):
            if PART_RE.match(name) or name == "_SUCCESS":
                self.fs.rm(self.root.child(name).path)
        keep = {lease.LEASE_FILE, f"{lease.LEASE_FILE}.lock"}
        for name in self._ls(self.meta):
            if name not in keep:
                self.fs.rm(self.meta.child(name).path, recursive=True)

    # ------------------------------------------------------------------ helpers

    def _staging(self) -> storage.Location:
        return self.meta.child("staging")

    def _ls(self, loc: storage.Location) -> list[str]:
        try:
            # refresh: s3fs caches listings, and other attempts commit while we run
            names = self.fs.ls(loc.path, detail=False, refresh=True)
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in names]
        except FileNotFoundError:
            return []

    def _read_text(self, loc: storage.Location) -> str | None:
        try:
            return self.fs.cat_file(loc.path).decode()
        except FileNotFoundError:
            return None

    def _read(self, loc: storage.Location, kind: type[Record]):
        """A record, or None if absent or not one: cut short (by a crash, or caught mid-rewrite
        in place on a full disk) or of another layout. The status is advisory, a manifest is
        rebuilt from the parts, and a commit record from its part."""
        text = self._read_text(loc)
        try:
            return kind.from_json(text) if text is not None else None
        except ValueError:  # pydantic's ValidationError is one
            return None

    def _write(self, loc: storage.Location, record: Record) -> None:
        atomic.put(loc, record.to_json().encode(), self._staging())
