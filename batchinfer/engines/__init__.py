"""Engine backends: the protocol (`base.py`), one folder or module per backend, and the
registry (`batchinfer.registry`, re-exported here) that finds them by name."""

from __future__ import annotations

from batchinfer.engines.base import (
    BatchEngine,
    Cluster,
    Engine,
    EngineSetupError,
    Request,
    Result,
    row_seed,
)
from batchinfer.registry import (
    EngineUnavailable,
    check_available,
    engine_class,
    get_engine_class,
    names,
    register,
)

__all__ = ["BatchEngine", "Cluster", "Engine", "EngineSetupError", "EngineUnavailable", "Request", "Result",
           "check_available", "engine_class", "get_engine_class", "names", "register", "row_seed"]
