"""Engine registry: a backend name maps to a lazily imported class plus an install hint.

Nothing here imports an engine library; `check_available` lets the driver fail before
any worker starts when a backend's packages are missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from batchinfer.engines.base import BatchEngine, Engine, Request, Result, row_seed

__all__ = ["BatchEngine", "Engine", "EngineUnavailable", "Request", "Result",
           "check_available", "engine_class", "get_engine_class", "names", "register", "row_seed"]


class EngineUnavailable(RuntimeError):
    """A backend whose packages are not installed; the message says which pip install fixes it."""


@dataclass(frozen=True)
class EngineSpec:
    target: str
    """"module:Class" of the backend."""
    requires: tuple[str, ...]
    """Top-level modules the backend imports."""
    install: str
    """The command that installs them."""


_REGISTRY: dict[str, EngineSpec] = {}


def register(name: str, target: str, *, requires: tuple[str, ...] = (), install: str = "") -> None:
    """Add a backend; a name can be registered only once."""
    if name in _REGISTRY:
        raise ValueError(f"engine backend {name!r} is already registered ({_REGISTRY[name].target})")
    _REGISTRY[name] = EngineSpec(target, requires, install)


def names() -> list[str]:
    return sorted(_REGISTRY)


def check_available(name: str) -> None:
    """Raise EngineUnavailable unless the backend's packages can be imported here."""
    spec = _spec(name)
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"engine backend {name!r} needs {', '.join(missing)}, which is not installed here; "
            f"install it with: {spec.install}"
        )


def get_engine_class(name: str) -> type[Engine]:
    """The backend's class, after checking that its packages are installed."""
    check_available(name)
    return engine_class(name)


def engine_class(name: str) -> type[Engine]:
    """The backend's class without importing its engine library (for driver-side checks)."""
    spec = _spec(name)
    module, _, attr = spec.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise EngineUnavailable(
            f"engine backend {name!r} failed to import ({e}); install it with: {spec.install}"
        ) from e
    return cls


def _spec(name: str) -> EngineSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:  # "package.module:Class" names a backend outside the registry
        return EngineSpec(name, (name.partition(":")[0].split(".")[0],), f"make {name.partition(':')[0]} importable")
    raise EngineUnavailable(
        f"unknown engine backend {name!r}; registered backends: {', '.join(names())} "
        "(or give 'package.module:Class')"
    )


register(
    "transformers",
    "batchinfer.engines.transformers:TransformersEngine",
    requires=("torch", "transformers", "accelerate"),
    install="pip install 'batchinfer[cpu]'",
)
register(
    "trtllm",
    "batchinfer.engines.trtllm.engine:TrtLlmEngine",
    requires=("tensorrt_llm",),
    install=("pip install tensorrt-llm==1.2.1 --extra-index-url https://pypi.nvidia.com on a Linux "
             "GPU node with the CUDA and torch versions it pins (README: 'Running on L40S')"),
)
