"""TensorRT engines as cached build artifacts.

An engine only runs on the GPU architecture and TensorRT-LLM version it was built with,
for the build settings it was built with. So each engine has a key made of those plus
the model's identity; built engines are published to `engine.options.engine_cache` (any fsspec
URL) under that key, and each node keeps one verified local copy:

    <engine_cache>/<key>/manifest.json          written last, create-if-absent: first build wins
    <engine_cache>/<key>/<build id>/config.json, rank0.engine, batchinfer-engine.json
    <cache root>/engines/<key>/...              this node's copy (one download per node)

Nothing here imports tensorrt_llm; building is passed in as a function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchinfer import atomic, cache, model_refs, storage
from batchinfer.config import Config
from batchinfer.engines.base import EngineSetupError
from batchinfer.engines.trtllm.options import build_settings
from batchinfer.records import now_iso

log = logging.getLogger(__name__)

SIDECAR = "batchinfer-engine.json"
MANIFEST = "manifest.json"
# Set to "<GPU name>/sm_<major><minor>" to skip CUDA detection: used by the TensorRT-LLM
# test double, which runs on machines without a GPU.
GPU_IDENTITY_ENV = "BATCHINFER_GPU_IDENTITY"


class EngineArtifactError(EngineSetupError):
    """An engine that is missing or does not fit this worker; the message says what to do."""


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    """e.g. "NVIDIA L40S"."""
    sm: str
    """Compute capability, e.g. "sm_89" (Ada: L40S, L4, RTX 4090; Hopper: sm_90)."""

    def describe(self) -> str:
        return f"{self.name} ({self.sm})"


def detect_gpu() -> GpuIdentity:
    """The GPU this process will build for or run on (device 0 of those Ray gave it)."""
    override = os.environ.get(GPU_IDENTITY_ENV)
    if override:
        name, _, sm = override.rpartition("/")
        return GpuIdentity(name, sm)
    import torch

    if not torch.cuda.is_available():
        raise EngineArtifactError(
            "the trtllm backend needs a CUDA GPU and torch sees none in this worker; "
            "check run.gpus_per_worker (1) and run.accelerator_type")
    major, minor = torch.cuda.get_device_capability(0)
    return GpuIdentity(torch.cuda.get_device_name(0), f"sm_{major}{minor}")


def engine_key(cfg: Config, gpu: GpuIdentity, version: str) -> str:
    """A readable, unique name for the engine this config needs on this GPU and version."""
    model = model_refs.resolve(cfg.engine.model)
    identity = {"model": model.identity, "gpu": gpu.name, "sm": gpu.sm, "tensorrt_llm": version,
                "build": build_settings(cfg)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{_slug(Path(model.path).name)}-{gpu.sm}-trtllm{version}-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")[:48] or "model"


# --------------------------------------------------------------------------- one engine folder


def write_sidecar(engine_dir: Path, cfg: Config, gpu: GpuIdentity, version: str, key: str) -> dict[str, Any]:
    """Record in a built engine folder what it was built for, with a checksum of each file."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(engine_dir.iterdir()) if p.is_file() and p.name not in (SIDECAR, cache.DONE)}
    record = {"key": key, "gpu": asdict(gpu), "tensorrt_llm": version, "build": build_settings(cfg),
              "model": model_refs.resolve(cfg.engine.model).identity, "files": files,
              "built_at": now_iso(),
              "built_on": socket.gethostname()}
    (engine_dir / SIDECAR).write_text(json.dumps(record, indent=1))
    return record


def check_compat(engine_dir: Path, gpu: GpuIdentity, version: str) -> dict[str, Any]:
    """Refuse, with the reason, an engine folder this worker cannot run; return its config.json."""
    config_file = engine_dir / "config.json"
    if not config_file.is_file():
        raise EngineArtifactError(f"{engine_dir} is not a TensorRT engine folder (no config.json)")
    config = json.loads(config_file.read_text())
    if "pretrained_config" not in config or "build_config" not in config:
        raise EngineArtifactError(
            f"{engine_dir}/config.json is not a TensorRT engine config (expected pretrained_config "
            "and build_config, as written by tensorrt_llm's LLM.save)")
    built_with = config.get("version")
    sidecar = engine_dir / SIDECAR
    built_for = json.loads(sidecar.read_text())["gpu"] if sidecar.is_file() else None
    problems = []
    if built_with != version:
        problems.append(f"TensorRT-LLM {built_with} (this worker has {version})")
    if built_for and built_for["sm"] != gpu.sm:
        problems.append(f"{built_for['name']} ({built_for['sm']}) (this worker has {gpu.describe()})")
    if problems:
        raise EngineArtifactError(
            f"the engine at {engine_dir} was built for {' and '.join(problems)}; a TensorRT engine "
            "only runs on the GPU architecture and TensorRT-LLM version it was built with. "
            "Rebuild it here with `batchinfer build-engine CONFIG` (or unset engine.options.engine_dir "
            "and set engine.options.build_on_miss: true)")
    if built_for is None:
        log.warning("%s has no %s: cannot check which GPU it was built for", engine_dir, SIDECAR)
    return config


def verify(engine_dir: Path) -> None:
    """Check every file against the checksums recorded when the engine was built."""
    record = json.loads((engine_dir / SIDECAR).read_text())
    for name, expected in record["files"].items():
        path = engine_dir / name
        if not path.is_file() or path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise EngineArtifactError(f"engine file {name} in {engine_dir} does not match its recorded "
                                      "checksum (a download cut short or a corrupted cache)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the shared cache


def fetch(cfg: Config, key: str, dest: Path) -> bool:
    """Download the engine for `key` from the shared cache into `dest` and verify it; False on a miss."""
    root = storage.locate(cfg.engine.options.engine_cache, cfg.storage)
    manifest = root.child(key, MANIFEST)
    with storage.errors(cfg.engine.options.engine_cache, "engine.options.engine_cache"):
        try:
            record = json.loads(root.fs.cat_file(manifest.path))
        except FileNotFoundError:
            return False
        folder = root.child(key, record["build_id"])
        for name in [*record["files"], SIDECAR]:
            root.fs.get_file(folder.child(name).path, str(dest / name))
    verify(dest)
    log.info("downloaded engine %s from %s", key, folder.url)
    return True


def publish(cfg: Config, key: str, engine_dir: Path) -> str:
    """Upload a built engine; the first build published for a key stays, later ones are dropped."""
    root = storage.locate(cfg.engine.options.engine_cache, cfg.storage)
    build_id = f"build-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    folder = root.child(key, build_id)
    record = json.loads((engine_dir / SIDECAR).read_text())
    with storage.errors(cfg.engine.options.engine_cache, "engine.options.engine_cache"):
        if storage.is_local(root.fs):
            os.makedirs(folder.path, exist_ok=True)
        for name in [*record["files"], SIDECAR]:
            root.fs.put_file(str(engine_dir / name), folder.child(name).path)
        manifest = json.dumps({**record, "build_id": build_id}, indent=1).encode()
        if atomic.put_if_absent(root.child(key, MANIFEST), manifest, root.child(key, ".staging")):
            log.info("published engine %s to %s", key, folder.url)
            return folder.url
        root.fs.rm(folder.path, recursive=True)  # another build of the same key got there first
    return root.child(key).url


def others_for_model(cfg: Config, key: str) -> list[str]:
    """Engines in the shared cache for the same model but another GPU, version or settings."""
    if not cfg.engine.options.engine_cache:
        return []
    prefix = key.split("-sm_")[0] + "-"
    root = storage.locate(cfg.engine.options.engine_cache, cfg.storage)
    found = []
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in root.fs.ls(root.path, detail=False)]
    except FileNotFoundError:
        return []
    for name in sorted(n for n in names if n.startswith(prefix) and n != key):
        try:
            record = json.loads(root.fs.cat_file(root.child(name, MANIFEST).path))
        except (FileNotFoundError, ValueError):
            continue
        found.append(f"{record['gpu']['name']} ({record['gpu']['sm']}), TensorRT-LLM "
                     f"{record['tensorrt_llm']}, {json.dumps(record['build'], sort_keys=True)}")
    return found


def resolve(cfg: Config, gpu: GpuIdentity, version: str,
            build: Callable[[Path], None]) -> tuple[Path, str, str]:
    """This node's copy of the engine `cfg` needs: (folder, key, how it got here).

    `how` is node-cache (already here), downloaded (from engine.options.engine_cache) or built
    (engine.options.build_on_miss); a built engine is published to the shared cache.
    """
    key = engine_key(cfg, gpu, version)
    target = node_dir(cfg) / key
    how = "node-cache"

    def fill(tmp: Path) -> dict[str, Any]:
        nonlocal how
        if cfg.engine.options.engine_cache and fetch(cfg, key, tmp):
            how = "downloaded"
        elif cfg.engine.options.build_on_miss:
            log.info("building engine %s on %s", key, gpu.describe())
            build(tmp)
            write_sidecar(tmp, cfg, gpu, version, key)
            if cfg.engine.options.engine_cache:
                publish(cfg, key, tmp)
            how = "built"
        else:
            raise EngineArtifactError(missing_message(cfg, key, gpu, version))
        return {"key": key, "how": how}

    cache.ensure(target, fill)
    return target, key, how


def node_dir(cfg: Config) -> Path:
    """Where this node keeps its engine copies."""
    if cfg.engine.options.node_cache_dir:
        return Path(cfg.engine.options.node_cache_dir).expanduser()
    return cache.root(cfg.engine.cache_dir) / "engines"


def missing_message(cfg: Config, key: str, gpu: GpuIdentity, version: str) -> str:
    where = cfg.engine.options.engine_cache or "this node's cache (no engine.options.engine_cache set)"
    text = (f"no TensorRT engine {key} in {where}: none was built for {gpu.describe()} with "
            f"TensorRT-LLM {version} and these settings. Build it once with `batchinfer "
            "build-engine CONFIG` (it runs on a GPU worker of this type), or set "
            "engine.options.build_on_miss: true")
    others = others_for_model(cfg, key)
    if others:
        text += ". The cache has engines of this model for other GPUs, versions or settings, "
        text += "which cannot run here: " + "; ".join(others)
    return text
