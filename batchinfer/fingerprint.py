"""What changes outputs: the decision every config field carries (issue 10, item 3).

A field marked `OUTPUT` is part of the run fingerprint (plan.settings_of): a resume with
another value is refused, so one output never mixes results of two settings. A field
marked `Neutral(reason)` is not, and says why. A backend may subclass `Output` for a finer
kind (the TensorRT-LLM backend's `BakedIn`: settings compiled into its engine, which make
its engine key from the same list). tests/test_fingerprint.py fails on a field without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Output:
    """A field that changes what the model outputs: part of the run fingerprint."""


@dataclass(frozen=True)
class Neutral:
    """A field that does not change outputs (scheduling, storage, paths), and why."""

    reason: str


OUTPUT = Output()


def decision(model: type[BaseModel], name: str) -> Output | Neutral | None:
    """The decision written on field `name` of `model` (in its Annotated metadata), or None."""
    return next((m for m in model.model_fields[name].metadata if isinstance(m, Output | Neutral)), None)


def fingerprinted(section: BaseModel) -> dict[str, Any]:
    """The values of `section`'s fields marked as changing outputs, by name."""
    return {n: getattr(section, n) for n in type(section).model_fields
            if isinstance(decision(type(section), n), Output)}
