"""Talking to storage through fsspec: resolve URLs, list inputs, version tags, atomic create.

Everything that must behave differently per filesystem lives here, so the planner, the
run directory and the workers stay filesystem-agnostic.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

GLOB_CHARS = "*?["


class StorageError(RuntimeError):
    """A storage location that cannot be used; the message names the URL and what to check."""


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it; `url` is what users and the plan record see."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def url(self) -> str:
        return join_protocol(self.fs, self.path)

    def child(self, *names: str) -> Location:
        return Location(self.fs, "/".join([self.path.rstrip("/"), *names]))


def locate(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a URL or local path; local paths become absolute so Ray workers see the same file."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return Location(fs, path.rstrip("/") or "/")


def join_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def version_tag(info: dict[str, Any]) -> str:
    """A tag that changes when the object changes: the ETag on object stores, else size+mtime."""
    for key in ("ETag", "etag", "generation", "VersionId"):
        if info.get(key):
            return key.lower() + ":" + str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def list_parquet(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Location, list[dict[str, Any]]]:
    """Every Parquet file a URL names (a file, a folder/prefix or a glob), sorted, with its info.

    Returns the root the files are relative to (used in synthesized ids) and their info dicts.
    Names starting with "_" or "." are skipped, as Parquet dataset readers do.
    """
    loc = locate(url, storage_options)
    fs = loc.fs
    if any(ch in loc.path for ch in GLOB_CHARS):
        infos = fs.glob(loc.path, detail=True)
        root = _glob_root(loc.path)
    elif fs.isdir(loc.path):
        infos = fs.find(loc.path, detail=True)
        root = loc.path
        infos = {p: i for p, i in infos.items() if p.endswith((".parquet", ".parq", ".pq"))}
    elif fs.exists(loc.path):
        infos = {loc.path: fs.info(loc.path)}
        root = loc.path.rsplit("/", 1)[0]
    else:
        raise StorageError(f"input path {url!r} does not exist (expected a Parquet file, a folder, or a glob)")
    files = []
    for path, info in sorted(infos.items()):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        if info.get("type") == "directory" or any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        files.append({**info, "name": path, "relative": rel or path.rsplit("/", 1)[-1]})
    if not files:
        raise StorageError(f"no Parquet files matched {url!r} (looked for *.parquet, *.parq, *.pq)")
    return Location(fs, root), files


def _glob_root(pattern: str) -> str:
    head = []
    for part in pattern.split("/"):
        if any(ch in part for ch in GLOB_CHARS):
            break
        head.append(part)
    return "/".join(head)


def put_if_absent(loc: Location, data: bytes, staging: Location) -> bool:
    """Create `loc` holding `data` in one atomic step unless it exists; True if this call created it.

    Never overwrites: on a local filesystem the bytes go to a temp file in `staging` (same
    filesystem) that is hard-linked into place (link fails if the target exists); on S3 a
    conditional PUT (If-None-Match: *) is refused with 412, which s3fs raises as
    FileExistsError. A loser or a crashed attempt leaves nothing at `loc`.
    """
    fs = loc.fs
    if is_local(fs):
        with _staged(loc, data, staging) as tmp:
            try:
                os.link(tmp, loc.path)
                return True
            except FileExistsError:
                return False
    if "s3" in _protocols(fs):
        try:
            fs.pipe_file(loc.path, data, mode="create")
            return True
        except FileExistsError:
            return False
    raise StorageError(
        f"{loc.url!r}: no atomic create-if-absent for the {_protocols(fs)[0]!r} filesystem; "
        "supported for commits: local paths and s3://"
    )


def put(loc: Location, data: bytes, staging: Location) -> None:
    """Write `data` to `loc`, replacing it in one step: a reader sees the old or the new bytes.

    Object stores already replace whole objects on PUT; on a local disk the bytes go to a
    temp file in `staging` that is renamed over the target.
    """
    if not is_local(loc.fs):
        loc.fs.pipe_file(loc.path, data)
        return
    with _staged(loc, data, staging) as tmp:
        os.replace(tmp, loc.path)


@contextlib.contextmanager
def _staged(loc: Location, data: bytes, staging: Location) -> Iterator[str]:
    """A durable temp copy of `data` in `staging`, removed afterwards (moved or not)."""
    os.makedirs(staging.path, exist_ok=True)
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    tmp = os.path.join(staging.path, f"{os.path.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
