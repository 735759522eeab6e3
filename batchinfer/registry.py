"""Engine backend registry: a backend name maps to a lazily imported class plus an install hint.

Nothing here imports an engine library, or any other batchinfer module: the config loader
uses it to find a backend's own settings model (`Engine.Options`), and `check_available`
lets the driver fail before any worker starts when a backend's packages are missing.

Backends come from three places (STYLE.md item 4: a registry, not an if/elif chain):
the built-in lines at the bottom of this file, the entry-point group `batchinfer.engines`
of installed packages (`name = "package.module:Class"`), and a "package.module:Class"
name given directly as `engine.backend`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "batchinfer.engines"


class EngineUnavailable(RuntimeError):
    """A backend that is unknown, or whose packages are not installed; the message says how to fix it."""


@dataclass(frozen=True)
class EngineSpec:
    target: str
    """"module:Class" of the backend."""
    requires: tuple[str, ...]
    """Top-level modules the backend's engine imports."""
    install: str
    """The command that installs them."""


_REGISTRY: dict[str, EngineSpec] = {}


def register(name: str, target: str, *, requires: tuple[str, ...] = (), install: str = "") -> None:
    """Add a backend; a name can be registered only once (ValueError otherwise)."""
    if name in _REGISTRY:
        raise ValueError(f"engine backend {name!r} is already registered ({_REGISTRY[name].target})")
    _REGISTRY[name] = EngineSpec(target, requires, install)


def names() -> list[str]:
    """Registered backend names, built-in and from entry points."""
    _load_entry_points()
    return sorted(_REGISTRY)


def check_available(name: str) -> None:
    """Raise EngineUnavailable unless the backend's packages can be imported here."""
    spec = _spec(name)
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"engine backend {name!r} needs {', '.join(missing)}, which is not installed here; "
            f"install it with: {spec.install}")


def engine_class(name: str) -> Any:
    """The backend's class without importing its engine library (for driver-side hooks)."""
    spec = _spec(name)
    module, _, attr = spec.target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EngineUnavailable(
            f"engine backend {name!r} ({spec.target}) failed to import ({e}); "
            f"install it with: {spec.install}") from e


def get_engine_class(name: str) -> Any:
    """The backend's class, after checking that its packages are installed."""
    check_available(name)
    return engine_class(name)


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            top = ep.value.partition(":")[0].split(".")[0]
            _REGISTRY[ep.name] = EngineSpec(ep.value, (), f"pip install the package that provides {top}")


def _spec(name: str) -> EngineSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:  # "package.module:Class" names a backend outside the registry
        module = name.partition(":")[0]
        return EngineSpec(name, (module.split(".")[0],), f"make {module} importable")
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    hint = difflib.get_close_matches(name, names(), n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    raise EngineUnavailable(f"unknown engine backend {name!r}{maybe} (registered backends: "
                            f"{', '.join(names())}, or give 'package.module:Class')")


register("transformers", "batchinfer.engines.transformers:TransformersEngine",
         requires=("torch", "transformers", "accelerate"), install="pip install 'batchinfer[cpu]'")
register("simulated", "batchinfer.engines.simulated.engine:SimulatedEngine")
register("trtllm", "batchinfer.engines.trtllm.engine:TrtLlmEngine", requires=("tensorrt_llm",),
         install=("pip install tensorrt-llm==1.2.1 --extra-index-url https://pypi.nvidia.com on a Linux "
                  "GPU node with the CUDA and torch versions it pins (README: 'Running on L40S')"))
