"""Talking to storage through fsspec: resolve URLs, list inputs, version tags, atomic create.

Everything that must behave differently per filesystem lives here, so the planner, the
run directory and the workers stay filesystem-agnostic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem

from batchinfer.config import StorageConfig

T = TypeVar("T")
GLOB_CHARS = "*?["
RUN_META_DIR = "_batchinfer"
"""The metadata folder of a run directory (see store.py); a folder holding it is never input."""
S3_PROTOCOLS = ("s3", "s3a")


class StorageError(RuntimeError):
    """A storage location that cannot be used; the message names the URL and what to check."""


class InputChanged(StorageError):
    """An input file is no longer the version the plan recorded (changed, replaced, deleted)."""


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


def locate(url: str, cfg: StorageConfig | None = None) -> Location:
    """Resolve a URL or local path; local paths become absolute so Ray workers see the same file."""
    fs, path = fsspec.core.url_to_fs(url, **fsspec_options(protocol_of(url), cfg))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return Location(fs, path.rstrip("/") or "/")


def protocol_of(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def fsspec_options(protocol: str, cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec options for a protocol: `storage.options`, plus the S3 settings for s3:// URLs."""
    if cfg is None:
        return {}
    opts = copy.deepcopy(cfg.options)
    if protocol in S3_PROTOCOLS:
        client = opts.setdefault("client_kwargs", {})
        if cfg.endpoint_url:
            client.setdefault("endpoint_url", cfg.endpoint_url)
        if cfg.region:
            client.setdefault("region_name", cfg.region)
        if cfg.profile:
            opts.setdefault("profile", cfg.profile)
        if cfg.anon:
            opts.setdefault("anon", True)
        # botocore retries throttling (SlowDown) and 5xx with exponential backoff; s3fs's own
        # loop (5 attempts) covers timeouts and dropped connections.
        opts.setdefault("config_kwargs", {}).setdefault(
            "retries", {"max_attempts": cfg.retries, "mode": "standard"})
    return opts


def open_parquet(url: str, cfg: StorageConfig | None = None) -> pq.ParquetFile:
    """Open a Parquet file for footer and column reads through pyarrow's native I/O.

    S3 goes through pyarrow's own S3 client (ranged GETs, pre-buffered row groups),
    local files through the OS; anything else through its fsspec filesystem.
    """
    protocol = protocol_of(url)
    if protocol in S3_PROTOCOLS:
        path = fsspec.core.split_protocol(url)[1]
        return pq.ParquetFile(path, filesystem=_arrow_s3(_freeze(cfg)), pre_buffer=True)
    loc = locate(url, cfg)
    if is_local(loc.fs):
        return pq.ParquetFile(loc.path, pre_buffer=True)
    return pq.ParquetFile(loc.fs.open(loc.path, "rb"), pre_buffer=True)


def _freeze(cfg: StorageConfig | None) -> str:
    return json.dumps(dataclasses.asdict(cfg) if cfg else {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _arrow_s3(frozen: str) -> pafs.S3FileSystem:
    """A pyarrow S3 client configured like the fsspec one (cached per process)."""
    cfg = json.loads(frozen)
    opts = cfg.get("options", {})
    client = opts.get("client_kwargs", {})
    endpoint = (cfg.get("endpoint_url") or client.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.get("retries", 10)),
    }
    region = cfg.get("region") or client.get("region_name")
    if region:
        kwargs["region"] = region
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if cfg.get("anon") or opts.get("anon"):
        kwargs["anonymous"] = True
    elif opts.get("key") and opts.get("secret"):
        kwargs.update(access_key=opts["key"], secret_key=opts["secret"])
        if opts.get("token"):
            kwargs["session_token"] = opts["token"]
    elif cfg.get("profile") or opts.get("profile"):
        import botocore.session

        session = botocore.session.Session(profile=cfg.get("profile") or opts.get("profile"))
        creds = session.get_credentials().get_frozen_credentials()
        kwargs.update(access_key=creds.access_key, secret_key=creds.secret_key)
        if creds.token:
            kwargs["session_token"] = creds.token
    return pafs.S3FileSystem(**kwargs)


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


def list_parquet(url: str, cfg: StorageConfig | None = None) -> tuple[Location, list[dict[str, Any]]]:
    """Every Parquet file a URL names (a file, a folder/prefix or a glob), sorted, with its info.

    Returns the root the files are relative to (used in synthesized ids) and their info dicts.
    Names starting with "_" or "." are skipped, as Parquet dataset readers do, and so is every
    file in or under a batchinfer run directory (a folder holding `_batchinfer/`): results,
    this run's own or another's, are never read as prompts (an output inside the input folder).
    An input that is itself a run directory is refused.
    """
    loc = locate(url, cfg)
    fs = loc.fs
    fs.invalidate_cache()  # s3fs caches listings per process; inputs must be seen as they are now
    if any(ch in loc.path for ch in GLOB_CHARS):
        infos = fs.glob(loc.path, detail=True)
        root = _glob_root(loc.path)
        # The glob's matches hold no `_batchinfer/` entries: one more glob, same shape, finds
        # the run directories it reaches (`in/**/*.parquet` -> `in/**/_batchinfer`).
        folder, last = loc.path.rsplit("/", 1)
        markers = fs.glob(f"{folder}{'/**' if '**' in last else ''}/{RUN_META_DIR}")
        run_dirs = {p.rstrip("/").rsplit("/", 1)[0] for p in markers}
    elif fs.isdir(loc.path):
        found = fs.find(loc.path, detail=True)
        root = loc.path
        run_dirs = run_directories(found)
        infos = {p: i for p, i in found.items() if p.endswith((".parquet", ".parq", ".pq"))}
    elif fs.exists(loc.path):
        # A file named on its own is read as named, wherever it lies.
        infos, run_dirs = {loc.path: fs.info(loc.path)}, set()
        root = loc.path.rsplit("/", 1)[0]
    elif not is_local(fs) and not fs.exists(bucket := loc.path.split("/", 1)[0]):
        raise StorageError(f"input.path {url!r}: " + MISSING_BUCKET.format(bucket=bucket))
    else:
        raise StorageError(f"input path {url!r} does not exist (expected a Parquet file, a folder, or a glob)")
    if root in run_dirs:
        raise StorageError(
            f"input.path {url!r} reads a batchinfer run directory ({join_protocol(fs, root)!r} "
            f"holds {RUN_META_DIR}/): its part files are results, not prompts; expected a folder "
            "(or glob) of prompt Parquet files")
    files = []
    for path, info in sorted(infos.items()):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        if info.get("type") == "directory" or any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if run_dirs and in_run_directory(path, run_dirs):
            continue
        files.append({**info, "name": path, "relative": rel or path.rsplit("/", 1)[-1]})
    if not files:
        skipped = f"; skipped the run directories {sorted(run_dirs)}" if run_dirs else ""
        raise StorageError(f"no Parquet files matched {url!r} (looked for *.parquet, *.parq, *.pq"
                           f"{skipped})")
    return Location(fs, root), files


def input_output_clash(input_url: str, output_url: str, cfg: StorageConfig | None = None) -> str | None:
    """Why output.path cannot go where input.path reads from, or None if it can.

    Compares resolved locations (local paths absolute and normalised, s3a:// as s3://). The
    output may sit inside the input folder, since run directories are never read as input,
    but not be the input itself (or a glob's folder): the first run would then be its own
    input's run directory, and every later listing would skip the prompts with the results.
    """
    inp, out = locate(input_url, cfg), locate(output_url, cfg)
    folder = _glob_root(inp.path) if any(ch in inp.path for ch in GLOB_CHARS) else inp.path
    if Location(inp.fs, folder.rstrip("/") or "/").url != out.url:
        return None
    return (f"output.path {output_url!r} is where input.path {input_url!r} reads from "
            f"(both {out.url!r}): results would land among the prompts. Expected an output.path "
            f"outside the input, or a folder inside it such as {out.child('out').url!r} (a run "
            "directory inside the input folder is never read as input)")


def run_directories(paths: Iterable[str]) -> set[str]:
    """The batchinfer run directories in a recursive listing: the folders holding `_batchinfer/`."""
    marker = f"/{RUN_META_DIR}/"
    return {p[:p.index(marker)] for p in paths if marker in p}


def in_run_directory(path: str, run_dirs: set[str]) -> bool:
    """Whether `path` lies in or under one of `run_dirs` (checked folder by folder up the path)."""
    folder = path
    while "/" in folder:
        folder = folder.rsplit("/", 1)[0]
        if folder in run_dirs:
            return True
    return False


def _glob_root(pattern: str) -> str:
    head = []
    for part in pattern.split("/"):
        if any(ch in part for ch in GLOB_CHARS):
            break
        head.append(part)
    return "/".join(head)


# What a storage failure looks like (botocore codes, s3fs texts, pyarrow's AWS error names),
# lower-cased, what to tell the user, and whether a retry could help. The first match wins.
MISSING_BUCKET = ("bucket {bucket!r} does not exist; check the bucket name, storage.endpoint_url "
                  "and storage.region")
_DIAGNOSES = (
    (("nosuchbucket", "no_such_bucket", "bucket does not exist"), MISSING_BUCKET, True),
    (("invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch",
      "signature_does_not_match", "access key id you provided does not exist",
      "signature we calculated does not match", "invalidtoken", "expiredtoken"),
     "the storage credentials were refused; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
     "storage.profile or the instance role", True),
    (("nocredentialserror", "unable to locate credentials", "no credentials"),
     "no storage credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
     "AWS_PROFILE (storage.profile), use an instance role, or storage.anon: true for a public bucket",
     True),
    (("accessdenied", "access_denied", "access denied", "forbidden", "permissionerror"),
     "access denied: the credentials in use lack permission ({needs})", True),
    (("endpointconnectionerror", "could not connect", "connection refused", "connecttimeout",
      "network_connection", "name or service not known"),
     "cannot reach the storage endpoint; check storage.endpoint_url and the network", False),
    (("filenotfounderror", "nosuchkey", "no_such_key"),
     "does not exist", False),
)
_NEEDS = {"input.path": "s3:ListBucket and s3:GetObject on the inputs",
          "output.path": "s3:ListBucket, s3:GetObject and s3:PutObject on the output"}
# Local errors no retry can fix, and what to do about them.
_LOCAL_PERMANENT = {
    errno.ENOSPC: "no space left on the device; free space or use another output.path",
    errno.EDQUOT: "disk quota exceeded; free space or use another output.path",
    errno.EROFS: "the filesystem is read-only; use a writable output.path",
    errno.EACCES: "permission denied; check the owner and mode of the folder (ls -ld)",
    errno.EPERM: "operation not permitted; check the owner and mode of the folder (ls -ld)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; output.path must be a folder",
}


def diagnose(error: BaseException, url: str, role: str, *, permanent_only: bool = False
             ) -> StorageError | None:
    """A StorageError naming the URL and what to check, or None if `error` is not about storage.

    With `permanent_only`, only errors no retry can fix (no space, read-only, permission,
    missing bucket, refused credentials) are translated; transient ones give None.
    """
    chain, e = [], error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if protocol_of(url) == "file":
        for e in chain:
            if isinstance(e, OSError) and e.errno in _LOCAL_PERMANENT:
                where = f" ({e.filename})" if e.filename else ""
                return StorageError(f"{role} {url!r}: cannot write{where}: {os.strerror(e.errno)} "
                                    f"[{errno.errorcode[e.errno]}]: {_LOCAL_PERMANENT[e.errno]}")
        if permanent_only:
            return None
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain).lower()
    for needles, advice, permanent in _DIAGNOSES:
        if any(n in text for n in needles):
            if permanent_only and not permanent:
                return None
            bucket = fsspec.core.split_protocol(url)[1].split("/", 1)[0]
            message = advice.format(bucket=bucket, needs=_NEEDS.get(role, "read and write"))
            return StorageError(f"{role} {url!r}: {message}")
    return None


@contextlib.contextmanager
def errors(url: str, role: str, *, permanent_only: bool = False) -> Iterator[None]:
    """Translate storage failures inside the block into a StorageError naming `role` and `url`
    (with `permanent_only`, only those no retry can fix; see `diagnose`)."""
    try:
        yield
    except (StorageError, FileExistsError):
        raise
    except Exception as e:
        if not (isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "aiobotocore"))):
            raise
        translated = diagnose(e, url, role, permanent_only=permanent_only)
        if translated is None:
            raise
        raise translated from e


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
    if set(S3_PROTOCOLS) & set(_protocols(fs)):
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
    try:
        with _staged(loc, data, staging) as tmp:
            os.replace(tmp, loc.path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not os.path.exists(loc.path):
            raise
        # A full disk has no room for a second copy, but a small record (status, lease) fits
        # in the blocks its old version frees: rewrite it in place so a failure can be told.
        with open(loc.path, "r+b") as f:
            f.truncate(0)
            f.write(data)


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
            put(loc, data, staging)
            return True
    if not set(S3_PROTOCOLS) & set(_protocols(loc.fs)):
        raise StorageError(f"{loc.url!r}: no compare-and-swap for the {_protocols(loc.fs)[0]!r} "
                           "filesystem; supported for run directories: local paths and s3://")
    try:
        loc.fs.pipe_file(loc.path, data, IfMatch=version)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # s3fs/errors.py maps PreconditionFailed (412) to OSError(EINVAL)
        if e.errno == errno.EINVAL or "precondition" in str(e).lower():
            return False
        raise


def read_input_file(url: str, version: str, cfg: StorageConfig | None,
                    read: Callable[[pq.ParquetFile], T]) -> T:
    """`read(parquet_file)` on exactly the version of an input file the plan recorded.

    S3: the file is opened through s3fs, whose ranged reads all carry `If-Match` with the
    ETag seen at open, and that ETag must be the recorded one; a replacement mid-read fails
    with 412. Local: size and mtime are checked before and after the read. Anything else:
    the version tag is checked before and after. Raises InputChanged naming the file.
    """
    loc = locate(url, cfg)
    fs = loc.fs

    def current() -> str:
        try:
            fs.invalidate_cache(loc.path)
            return version_tag(fs.info(loc.path))
        except FileNotFoundError:
            return "deleted"

    def changed(now: str) -> InputChanged:
        what = "was deleted" if now == "deleted" else f"changed (version {version} -> {now})"
        return InputChanged(
            f"input file {url!r} {what} during the run; a shard must read the version the plan "
            "recorded. Restore the file and rerun, or pass --new-run to start over on the new inputs")

    if (now := current()) != version:
        raise changed(now)
    try:
        if set(S3_PROTOCOLS) & set(_protocols(fs)):
            with fs.open(loc.path, "rb") as f:
                if version_tag(f.details) != version:
                    raise changed(version_tag(f.details))
                result = read(pq.ParquetFile(f, pre_buffer=True))
        else:
            with open_parquet(url, cfg) as pf:
                result = read(pf)
    except Exception as e:  # a file rewritten under a read fails in many ways; was it that?
        if (now := current()) != version:
            raise changed(now) from e
        raise
    if (now := current()) != version:
        raise changed(now)
    return result
