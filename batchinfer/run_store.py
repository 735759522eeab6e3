"""The run directory on any fsspec URL: plan record, atomic shard commits, status, manifest.

Layout (everything but the parts starts with "_", which Parquet dataset readers skip):

    part-000000.parquet ...            one per committed shard, visible only once complete
                                       (output.format openai_batch: part-000000.jsonl ...)
    _errors/part-000000.parquet ...    the shard's failed rows, if any (id, error_code,
                                       error_message, shard, attempt); openai_batch:
                                       _errors/part-000000.jsonl, its failed requests
    _SUCCESS                           written when every shard has committed
    _batchinfer/plan.json              the plan and its fingerprint
    _batchinfer/commits/part-*.json    the summary of each committed shard
    _batchinfer/status.json            the driver's state and progress
    _batchinfer/driver.json            the driver lease: who runs this directory (lease.py)
    _batchinfer/manifest.json          the final report
    _batchinfer/staging/               temp files of local commits in progress

A part file is the commit: it appears in one atomic create-if-absent step, so only the
first attempt to commit a shard wins. Its summary is stored in the part's own Parquet
metadata too (a JSONL part's is counted from its lines), so a commit record lost to a crash
is rebuilt from the part. A failed-rows file is written by the winner after its part, and is
rebuilt from the part when a crash came between the two (`repair_error_files`): it is a
function of the committed part alone, so it holds exactly the rows the part has failed.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from batchinfer import atomic, faults, lease, storage
from batchinfer.config import StorageConfig
from batchinfer.plan import Plan
from batchinfer.records import Manifest, Record, RunStatus, ShardSummary
from batchinfer.results import OpenAIBatchParts, ParquetParts, failed_rows, summary_from_part

META_DIR = storage.RUN_META_DIR
PART_RE = re.compile(rf"^part-(\d+)(?:{re.escape(ParquetParts.suffix)}|{re.escape(OpenAIBatchParts.suffix)})$")
ERRORS_DIR = "_errors"
"""Failed-rows files, one per committed shard with failed rows (skipped by Parquet readers)."""
LEGACY_ERRORS_DIR = "errors"
"""Where openai_batch runs before issue 13 kept them; removed with the run by --new-run."""


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

    def part(self, part: str) -> storage.Location:
        """A part file by its name (`ShardSummary.part`, e.g. part-000003.parquet)."""
        return self.root.child(part)

    def commit(self, part: str, data: bytes, summary: ShardSummary, generation: int,
               errors: bytes | None = None) -> bool:
        """Make a shard's part (file name `part`) visible unless another attempt did first;
        True if this one won. The winner then writes the commit record and `errors`, the
        shard's error file, if it has one.

        Fenced: raises lease.LeaseLost, committing nothing, unless the driver `generation`
        this attempt was started for still holds the run.
        """
        lease.check_fence(self.meta, generation)
        faults.point("commit")
        won = atomic.put_if_absent(self.part(part), data, self._staging())
        if won:
            faults.point("part-committed")
            self._write(self._record(_shard_name(part)), summary)
            if errors is not None:
                atomic.put(self.root.child(ERRORS_DIR, part), errors, self._staging())
        return won

    def part_names(self) -> list[str]:
        """The committed parts' file names, from one listing (no record is read)."""
        return sorted(name for name in self._ls(self.root) if PART_RE.match(name))

    def committed(self, rebuild: bool = True) -> dict[int, ShardSummary]:
        """Summaries of every committed shard, by shard index. A record lost to a crash is
        read from its part, and written again when `rebuild` (the driver); readers such as
        `status` and `report` pass False and change nothing."""
        indexes = {int(PART_RE.match(name).group(1)): name for name in self.part_names()}
        records = {n.removesuffix(".json") for n in self._ls(self.meta.child("commits"))}

        def summary(item: tuple[int, str]) -> tuple[int, ShardSummary]:
            index, name = item
            shard_name = _shard_name(name)
            if shard_name in records:
                found = self._read(self._record(shard_name), ShardSummary)
                if found is not None:
                    return index, found
                # a record cut short by a crash (or gone): the part itself knows the summary
            found = self.summary_from_part(name)
            if rebuild:
                try:
                    self._write(self._record(shard_name), found)
                except OSError:  # a full or read-only output: the part itself stays the record
                    pass
            return index, found

        with ThreadPoolExecutor(16) as pool:
            return dict(pool.map(summary, sorted(indexes.items())))

    def summary_from_part(self, part: str) -> ShardSummary:
        with self.fs.open(self.part(part).path, "rb") as f:
            return summary_from_part(part, f)

    def summary_of(self, part: str) -> ShardSummary:
        """A committed part's summary: its commit record, else what the part itself says."""
        found = self._read(self._record(_shard_name(part)), ShardSummary)
        return found if found is not None else self.summary_from_part(part)

    def failed_row_files(self) -> dict[str, str]:
        """Part name -> the folder holding its failed-rows file: `_errors/`, or `errors/` for
        an openai_batch run written before it moved (the new folder wins)."""
        return {name: folder for folder in (LEGACY_ERRORS_DIR, ERRORS_DIR)
                for name in self._ls(self.root.child(folder))}

    def repair_error_files(self, committed: dict[int, ShardSummary]) -> int:
        """Write the failed-rows file of every committed part with failed rows that lacks one
        (its winner crashed between the part and that file); returns how many."""
        have = set(self._ls(self.root.child(ERRORS_DIR)))
        missing = [s for s in committed.values() if s.rows_failed and s.part not in have]
        for summary in missing:
            with self.fs.open(self.part(summary.part).path, "rb") as f:
                errors = failed_rows(summary.part, f, summary)
            if errors is not None:
                atomic.put(self.root.child(ERRORS_DIR, summary.part), errors, self._staging())
        return len(missing)

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
        for folder in (ERRORS_DIR, LEGACY_ERRORS_DIR):
            for name in self._ls(self.root.child(folder)):
                if PART_RE.match(name):
                    self.fs.rm(self.root.child(folder, name).path)
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


def _shard_name(part: str) -> str:
    """part-000003.parquet -> part-000003"""
    return part.rsplit(".", 1)[0]
