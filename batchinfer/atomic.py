"""Atomic and conditional storage operations, the primitives exactly-once rests on.

- `put_if_absent`: create-if-absent (part commits, the first driver lease);
- `put`: replace in one step (records, status);
- `read_versioned` / `replace_if_version`: a compare-and-swap (the driver lease);
- `read_pinned` / `fetch_pinned`: reads pinned to the version of an input file the plan
  recorded (`fetch_pinned`: a whole small file in one request, for planning).

Local disks use hard links, renames and a file lock; S3 uses conditional requests
(`If-None-Match: *`, `If-Match: <ETag>`). Other filesystems are refused for run
directories.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from filelock import FileLock

from batchinfer.config import StorageConfig
from batchinfer.storage import (
    S3_PROTOCOLS,
    InputChanged,
    Location,
    StorageError,
    _protocols,
    is_local,
    is_s3,
    locate,
    protocol_of,
    version_tag,
)

T = TypeVar("T")


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
    if is_s3(fs):
        try:
            fs.pipe_file(loc.path, data, mode="create")
            return True
        except FileExistsError:
            return False
    raise StorageError(
        f"{loc.url!r}: no atomic create-if-absent for the {_protocols(fs)[0]!r} filesystem; "
        "supported for commits: local paths and s3://"
    )


def put(loc: Location, data: bytes, staging: Location, *, small_record: bool = False) -> None:
    """Write `data` to `loc`, replacing it in one step: a reader sees the old or the new bytes.

    Object stores already replace whole objects on PUT; on a local disk the bytes go to a
    temp file in `staging` that is renamed over the target. A `small_record` (the status,
    the driver lease) that finds the disk full is rewritten in place instead, when it is no
    larger than before, so that a run can still say why it stopped.
    """
    if not is_local(loc.fs):
        loc.fs.pipe_file(loc.path, data)
        return
    try:
        with _staged(loc, data, staging) as tmp:
            os.replace(tmp, loc.path)
    except OSError as e:
        if (not small_record or e.errno not in (errno.ENOSPC, errno.EDQUOT)
                or not os.path.exists(loc.path) or len(data) > _block_room(loc.path)):
            raise
        # A full disk has no room for a second copy, but a small record (status, lease) fits
        # in the blocks its old version frees: rewrite it in place so a failure can be told.
        with open(loc.path, "r+b") as f:
            f.truncate(0)
            f.write(data)


def _block_room(path: str) -> int:
    """Bytes a file can hold in the blocks it already has."""
    st = os.stat(path)
    return max(st.st_size, st.st_blocks * 512)


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


# --------------------------------------------------------------------------- versioned reads and writes


def read_versioned(loc: Location) -> tuple[bytes, str] | None:
    """The bytes at `loc` and the version `replace_if_version` compares against; None if absent.

    S3: the object's ETag, and the read is conditional on it (s3fs sends `If-Match` with the
    ETag it saw when opening, s3fs/core.py `S3File.__init__`), so bytes and version belong
    together. Local: a hash of the bytes (writers replace the file whole, under a lock).
    """
    try:
        if is_local(loc.fs):
            with open(loc.path, "rb") as f:
                data = f.read()
            return data, "sha256:" + hashlib.sha256(data).hexdigest()
        for attempt in range(5):
            loc.fs.invalidate_cache(loc.path)
            try:
                with loc.fs.open(loc.path, "rb") as f:
                    return f.read(), str(f.details.get("ETag") or f.details.get("etag"))
            except OSError as e:  # s3fs FileExpired: it changed between the HEAD and the GET
                if type(e).__name__ != "FileExpired" or attempt == 4:
                    raise
    except FileNotFoundError:
        return None
    return None  # unreachable: the loop returns or raises


def check_conditional_writes(url: str) -> None:
    """Refuse an s3:// run directory when the installed botocore cannot send conditional
    PUTs (`If-None-Match` for commits, `If-Match` for the driver lease); botocore added
    them to PutObject in late 2024 (its botocore/data/s3/2006-03-01/service-2.json)."""
    if protocol_of(url) not in S3_PROTOCOLS:
        return
    import botocore.session

    members = botocore.session.get_session().get_service_model("s3") \
        .operation_model("PutObject").input_shape.members
    missing = [m for m in ("IfNoneMatch", "IfMatch") if m not in members]
    if missing:
        import botocore

        raise StorageError(
            f"output.path {url!r}: the installed botocore {botocore.__version__} cannot send "
            f"conditional writes ({', '.join(missing)} on PutObject); exactly-once commits and "
            "the driver lease need them: pip install -U s3fs (with its aiobotocore/botocore)")


def replace_if_version(loc: Location, data: bytes, version: str, staging: Location) -> bool:
    """Replace `loc` with `data` only if it is still at `version`: a compare-and-swap.

    S3: a conditional PUT (`If-Match: <ETag>`; S3 answers 412 Precondition Failed when the
    object changed since, https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html).
    Local: read, compare and replace under a lock file beside `loc` (filelock). True if replaced.
    """
    if is_local(loc.fs):
        with FileLock(loc.path + ".lock", timeout=60):
            current = read_versioned(loc)
            if current is None or current[1] != version:
                return False
            put(loc, data, staging, small_record=True)
            return True
    if not is_s3(loc.fs):
        raise StorageError(f"{loc.url!r}: no compare-and-swap for the {_protocols(loc.fs)[0]!r} "
                           "filesystem; supported for run directories: local paths and s3://")
    try:
        loc.fs.pipe_file(loc.path, data, IfMatch=version)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        # s3fs/errors.py maps every 4xx it knows to an OSError and keeps the ClientError as
        # __cause__: only these codes mean "someone else wrote first".
        code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):  # 412; 409 racing writes
            return False
        raise


def read_pinned(url: str, version: str, cfg: StorageConfig | None,
                read: Callable[[str | IO[bytes]], T]) -> T:
    """`read(source)` on exactly the version of an input file the plan recorded.

    S3: `source` is the file opened through s3fs, whose ranged reads all carry `If-Match`
    with the ETag seen at open, and that ETag must be the recorded one; a replacement
    mid-read fails with 412, so no check around the read is needed. Local (and anything
    else): `source` is the URL, which `read` opens its own way, and the version tag (size,
    mtime, inode) is checked before and after the read. Raises InputChanged naming the file.
    """
    loc = locate(url, cfg)
    fs = loc.fs
    s3 = is_s3(fs)
    if not s3 and (now := _version_now(loc)) != version:
        raise _changed(url, version, now)
    try:
        if s3:
            with fs.open(loc.path, "rb") as f:
                if version_tag(f.details) != version:
                    raise _changed(url, version, version_tag(f.details))
                return read(f)
        result = read(url)
    except InputChanged:
        raise
    except Exception as e:  # a file rewritten (or deleted) under a read fails in many ways; was it that?
        if (now := _version_now(loc)) != version:
            raise _changed(url, version, now) from e
        raise
    if (now := _version_now(loc)) != version:
        raise _changed(url, version, now)
    return result


def fetch_pinned(url: str, version: str, cfg: StorageConfig | None, *,
                 planning: bool = False) -> bytes:
    """The whole of an input file, exactly at `version` (a tag from `version_tag`).

    S3: one request, a GET with `If-Match: <ETag>` (S3 answers 412 once the object has
    changed, and the ETag of the bytes served is checked too, for stores that ignore
    If-Match), so bytes and version come from one response; no HEAD first. Local (and
    anything else): the version tag is checked before and after the read, as in
    `read_pinned`. Raises InputChanged naming the file; `planning` words it for a plan being
    made rather than a run.
    """
    loc = locate(url, cfg)
    fs = loc.fs
    if is_s3(fs) and version.startswith("etag:"):
        try:
            data, etag = _s3_get_if_match(fs, loc.path, '"' + version.removeprefix("etag:") + '"')
        except FileNotFoundError as e:
            raise _changed(url, version, "deleted", planning=planning) from e
        except OSError as e:
            # s3fs keeps the ClientError as __cause__ (s3fs/errors.py); 412 means "not that version"
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if code != "PreconditionFailed":
                raise
            raise _changed(url, version, _version_now(loc), planning=planning) from e
        if etag and (now := version_tag({"ETag": etag})) != version:
            raise _changed(url, version, now, planning=planning)
        return data
    if (now := _version_now(loc)) != version:
        raise _changed(url, version, now, planning=planning)
    try:
        data = loc.fs.cat_file(loc.path)
    except FileNotFoundError as e:
        raise _changed(url, version, "deleted", planning=planning) from e
    if (now := _version_now(loc)) != version:
        raise _changed(url, version, now, planning=planning)
    return data


def _s3_get_if_match(fs: Any, path: str, etag: str) -> tuple[bytes, str]:
    """One GET of a whole S3 object, conditional on its ETag: (bytes, the ETag served).

    s3fs's own `cat_file` sends a HEAD first (for its concurrent download) and takes no
    `IfMatch`, so this is its `_call_and_read` (s3fs/core.py `_cat_file`) with the condition
    added; `_call_s3` adds the filesystem's retries and extra request arguments.
    """
    import fsspec.asyn

    bucket, key, version_id = fs.split_path(path)
    extra = {"VersionId": version_id} if version_id else {}
    if not getattr(fs, "local_expiry_check", False):  # stores that refuse If-Match (s3fs docs)
        extra["IfMatch"] = etag
    extra.update(getattr(fs, "req_kw", {}))  # requester pays

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
        try:
            return await resp["Body"].read(), str(resp.get("ETag", ""))
        finally:
            resp["Body"].close()

    return fsspec.asyn.sync(fs.loop, get)


def _version_now(loc: Location) -> str:
    """The version tag of a file now, "deleted" if it is gone."""
    try:
        loc.fs.invalidate_cache(loc.path)
        return version_tag(loc.fs.info(loc.path))
    except FileNotFoundError:
        return "deleted"


def _changed(url: str, version: str, now: str, *, planning: bool = False) -> InputChanged:
    what = "was deleted" if now == "deleted" else f"changed (version {version} -> {now})"
    if planning:
        return InputChanged(
            f"input file {url!r} {what} while the plan was being made; the plan records each file "
            "at the version listed. Rerun once the inputs stop changing")
    return InputChanged(
        f"input file {url!r} {what} during the run; a shard must read the version the plan "
        "recorded. Restore the file and rerun, or pass --new-run to start over on the new inputs")
