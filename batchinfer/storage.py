"""Talking to storage through fsspec: resolve URLs, list inputs, version tags, atomic create.

Everything that must behave differently per filesystem lives here, so the planner, the
run directory and the workers stay filesystem-agnostic.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from batchinfer.config import StorageConfig

GLOB_CHARS = "*?["
RUN_META_DIR = "_batchinfer"
"""The metadata folder of a run directory (see run_store.py); a folder holding it is never input."""
S3_PROTOCOLS = ("s3", "s3a")


class StorageError(RuntimeError):
    """A storage location that cannot be used; the message names the URL and what to check."""


class MissingImplementation(StorageError):
    """A URL whose fsspec protocol needs a package that is not installed (gcsfs for gs://)."""


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
    check_installed(url)
    fs, path = fsspec.core.url_to_fs(url, **fsspec_options(protocol_of(url), cfg))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return Location(fs, path.rstrip("/") or "/")


def protocol_of(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def check_installed(url: str, role: str = "storage URL") -> None:
    """Raise MissingImplementation, naming the URL and the pip command, if the fsspec
    implementation of a protocol in the URL cannot be imported (gs:// without gcsfs), and
    StorageError for a protocol fsspec does not know.

    fsspec's registry knows each protocol's class and an install hint, and raises a bare
    ImportError with the hint; this adds which setting it was and what to install.
    """
    links = url.split("::")  # chained URLs: simplecache::s3://bucket/key
    for i, link in enumerate(links):
        protocol = fsspec.core.split_protocol(link)[0] or (link if i < len(links) - 1 else "file")
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise _missing(url, role, protocol, e) from e
        except ValueError as e:
            raise StorageError(f"{role} {url!r}: unknown protocol {protocol!r} ({e}); expected a "
                               "local path or an fsspec URL such as s3://bucket/prefix/") from e


def _missing(url: str, role: str, protocol: str, error: ImportError) -> MissingImplementation:
    known = sys.modules["fsspec.registry"].known_implementations.get(protocol, {})
    package = known.get("class", "").split(".", 1)[0]
    missing = error.__cause__ if isinstance(error.__cause__, ModuleNotFoundError) else None
    if package in ("", "fsspec") and missing is not None and missing.name:
        package = missing.name.split(".", 1)[0]  # fsspec's own sftp:// needs paramiko
    why = "; ".join(str(x) for x in (error, missing) if x is not None and str(x))
    fix = f": pip install {package.replace('_', '-')}" if package not in ("", "fsspec") else ""
    return MissingImplementation(f"{role} {url!r}: the {protocol}:// protocol needs a package "
                                 f"that is not installed ({why}){fix}")


def fsspec_options(protocol: str, cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec options for a protocol: `storage.options`, plus the S3 settings for s3:// URLs."""
    if cfg is None:
        return {}
    opts = cfg.fsspec_options()  # a fresh copy: the S3 settings below are added to it
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


def arrow_file(url: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem | None, Any]:
    """Where a reader using pyarrow's native I/O reads `url`: (filesystem, path), or (None, an
    open binary file) for protocols pyarrow has no client for; a reader opens it (e.g.
    `pq.ParquetFile(path, filesystem=fs)`).

    S3 goes through pyarrow's own S3 client (ranged GETs, pre-buffered reads) with the
    credentials in force at this call (`_arrow_s3_now`), local files through the OS; anything
    else through its fsspec filesystem.
    """
    if protocol_of(url) in S3_PROTOCOLS:
        return _arrow_s3_now(cfg), fsspec.core.split_protocol(url)[1]
    loc = locate(url, cfg)
    if is_local(loc.fs):
        return pafs.LocalFileSystem(), loc.path
    return None, loc.fs.open(loc.path, "rb")


def _arrow_s3_now(cfg: StorageConfig | None) -> pafs.S3FileSystem:
    """A pyarrow S3 client configured like the fsspec one, signing with the credentials in
    force now; take one per file opened, not one per process.

    pyarrow keeps the keys it is given for the life of the filesystem
    (apache/arrow python/pyarrow/_s3fs.pyx: explicit keys become
    `S3Options.FromAccessKey`), and it has no setting for an AWS profile, so the credentials
    come from botocore's chain, the one s3fs signs its own requests with (s3fs/core.py,
    `set_session`: an `AioSession(profile=...)` when no key is given). Temporary credentials
    there (credential_process, assumed roles, web identity/IRSA, container and instance
    roles) are botocore `RefreshableCredentials`, renewed by `get_frozen_credentials()` from
    15 minutes before they expire (botocore/credentials.py, `_DEFAULT_ADVISORY_REFRESH_TIMEOUT`),
    so each call here sees current ones, and a new snapshot gets a new pyarrow client (cached
    per snapshot). A file opened already keeps its client: its reads must end within the
    10 minutes botocore leaves before the old credentials expire.
    """
    frozen = _freeze(cfg)
    return _arrow_s3(frozen, _credentials_now(frozen))


def _freeze(cfg: StorageConfig | None) -> str:
    plain = {**cfg.model_dump(), "options": cfg.fsspec_options()} if cfg else {}
    return json.dumps(plain, sort_keys=True, default=str)


def _credentials_now(frozen: str) -> tuple[str, str, str] | None:
    """(key, secret, token) for pyarrow to sign with now; None for anonymous access.

    Keys given in storage.options are used as given, static, as s3fs uses them; anything
    else is a snapshot of botocore's chain for the configured profile, taken now.
    """
    cfg = json.loads(frozen)
    opts = cfg.get("options", {})
    if cfg.get("anon") or opts.get("anon"):
        return None
    if opts.get("key") and opts.get("secret"):
        return opts["key"], opts["secret"], opts.get("token") or ""
    creds = _botocore_session(cfg.get("profile") or opts.get("profile")).get_credentials()
    if creds is None:
        import botocore.exceptions

        raise botocore.exceptions.NoCredentialsError()
    now = creds.get_frozen_credentials()  # refreshes first when botocore says it is due
    return now.access_key, now.secret_key, now.token or ""


@functools.lru_cache(maxsize=8)
def _botocore_session(profile: str | None) -> Any:
    """One botocore session per profile and process: it holds the chain's credentials
    object, which refreshes itself, so caching it caches no keys."""
    import botocore.session

    return botocore.session.Session(profile=profile)


@functools.lru_cache(maxsize=8)
def _arrow_s3(frozen: str, credentials: tuple[str, str, str] | None) -> pafs.S3FileSystem:
    """A pyarrow S3 client for one config and one credential snapshot; a rotation makes a new
    one and the oldest fall out of the cache."""
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
    if credentials is None:
        kwargs["anonymous"] = True
    else:
        key, secret, token = credentials
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


def join_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(set(S3_PROTOCOLS) & set(_protocols(fs)))


def version_tag(info: dict[str, Any]) -> str:
    """A tag that changes when the object changes: the ETag on object stores, else size,
    mtime and (local files) inode, so a file replaced by a rename is seen even when the new
    one has the old size and mtime (`rsync -t`, `cp -p` to a temp file)."""
    for key in ("ETag", "etag", "generation", "VersionId"):
        if info.get(key):
            return key.lower() + ":" + str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    inode = f":ino:{info['ino']}" if info.get("ino") else ""
    return f"size:{info.get('size')}:mtime:{mtime}{inode}"


def list_files(url: str, cfg: StorageConfig | None, suffixes: tuple[str, ...],
               label: str) -> tuple[Location, list[dict[str, Any]]]:
    """Every input file a URL names (a file, a folder/prefix or a glob), sorted, with its
    fsspec info dict plus `name` (full path) and `relative` (to the returned root, used in
    synthesized ids); under a folder or glob only names ending in `suffixes` count, and
    `label` names the format in errors ("Parquet"). Raises StorageError.

    Names starting with "_" or "." are skipped, as Parquet dataset readers do, and so is every
    file in or under a batchinfer run directory (a folder holding `_batchinfer/`): results,
    this run's own or another's, are never read as prompts (an output inside the input folder).
    An input that is itself a run directory is refused.
    """
    loc = locate(url, cfg)
    fs = loc.fs
    fs.invalidate_cache()  # s3fs caches listings per process; inputs must be seen as they are now
    pattern = False
    # A path that exists is that path, even with glob characters in its name (`data[2026]/`);
    # only one that does not is expanded as a glob.
    if fs.isdir(loc.path):
        found = fs.find(loc.path, detail=True)
        root = loc.path
        run_dirs = run_directories(found)
        infos = {p: i for p, i in found.items() if p.endswith(suffixes)}
    elif fs.exists(loc.path):
        # A file named on its own is read as named, wherever it lies.
        infos, run_dirs = {loc.path: fs.info(loc.path)}, set()
        root = loc.path.rsplit("/", 1)[0]
    elif pattern := any(ch in loc.path for ch in GLOB_CHARS):
        infos = fs.glob(loc.path, detail=True)
        root = _glob_root(loc.path)
        # The glob's matches hold no `_batchinfer/` entries: one more glob, same shape, finds
        # the run directories it reaches (`in/**/*.parquet` -> `in/**/_batchinfer`).
        folder, last = loc.path.rsplit("/", 1)
        markers = fs.glob(f"{folder}{'/**' if '**' in last else ''}/{RUN_META_DIR}")
        run_dirs = {p.rstrip("/").rsplit("/", 1)[0] for p in markers}
    elif not is_local(fs) and not fs.exists(bucket := loc.path.split("/", 1)[0]):
        raise StorageError(f"input.path {url!r}: " + MISSING_BUCKET.format(bucket=bucket))
    else:
        raise StorageError(f"input path {url!r} does not exist (expected a {label} file, a folder, or a glob)")
    if root in run_dirs:
        raise StorageError(
            f"input.path {url!r} reads a batchinfer run directory ({join_protocol(fs, root)!r} "
            f"holds {RUN_META_DIR}/): its part files are results, not prompts; expected a folder "
            f"(or glob) of prompt {label} files")
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
        glob = "taken as a glob pattern, as no file or folder has that name; " if pattern else ""
        looked = ", ".join(f"*{s}" for s in suffixes)
        raise StorageError(f"no {label} files matched {url!r} ({glob}looked for {looked}{skipped})")
    return Location(fs, root), files


def input_output_clash(input_url: str, output_url: str, cfg: StorageConfig | None = None) -> str | None:
    """Why output.path cannot go where input.path reads from, or None if it can.

    Compares resolved locations (local paths absolute and normalised, s3a:// as s3://). The
    output may sit inside the input folder, since run directories are never read as input,
    but not be the input itself (or a glob's folder): the first run would then be its own
    input's run directory, and every later listing would skip the prompts with the results.
    """
    inp, out = locate(input_url, cfg), locate(output_url, cfg)
    folder = inp.path
    if any(ch in inp.path for ch in GLOB_CHARS):
        root = Location(inp.fs, _glob_root(inp.path).rstrip("/") or "/")
        # A glob's folder is its root, unless the name exists (`data[2026]/`, as list_files
        # reads it). Asked of local paths only: preflight makes no network calls, so an
        # output at the root of a literal remote `bucket/runs[1]/` is refused, to be safe.
        if root.url == out.url and not (is_local(inp.fs) and inp.fs.exists(inp.path)):
            folder = root.path
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
      "signature we calculated does not match", "invalidtoken"),
     "the storage credentials were refused; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
     "storage.profile or the instance role", True),
    # Expired temporary credentials (STS, IRSA) are refreshed by the credential chain: retry.
    (("expiredtoken",), "the storage credentials have expired; check that the instance role "
     "or web identity can refresh them", False),
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


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
