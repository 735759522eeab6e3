"""Input formats: a registry of readers by name, imported only when asked for.

A new format is one file with a `Reader` subclass (readers/base.py) plus one line in
`READERS`. This package never imports an engine (an import-linter contract checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from batchinfer.readers.base import FileFacts, InputError, ReadColumn, Reader

if TYPE_CHECKING:
    from batchinfer.config import StorageConfig

__all__ = ["DEFAULT_FORMAT", "READERS", "FileFacts", "InputError", "ReadColumn", "Reader",
           "reader_class", "reader_for", "register"]

DEFAULT_FORMAT = "parquet"
"""The input format of every run until the config names one."""

READERS: dict[str, str | type[Reader]] = {
    "parquet": "batchinfer.readers.parquet:ParquetReader",
    "openai_batch": "batchinfer.readers.openai_batch:OpenAIBatchReader",
}
"""Format name -> "module:Class" (imported on first use) or the class itself."""


def register(name: str, reader: str | type[Reader]) -> None:
    """Add a format; a name already taken is refused (ValueError), never replaced."""
    if name in READERS:
        raise ValueError(f"input format {name!r} is already registered ({READERS[name]}); "
                         "expected a new name")
    READERS[name] = reader


def reader_class(name: str) -> type[Reader]:
    """The Reader class of a format name; ValueError naming the known formats otherwise."""
    if name not in READERS:
        raise ValueError(f"unknown input format {name!r}; expected one of {', '.join(sorted(READERS))}")
    target = READERS[name]
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def reader_for(name: str = DEFAULT_FORMAT, *, storage: StorageConfig | None = None) -> Reader:
    """A reader of format `name` using these storage settings."""
    return reader_class(name)(storage=storage)
