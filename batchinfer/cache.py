"""A machine-local cache of folders made once per node: converted models, downloaded engines.

Workers on one node share it: the first one to need a folder makes it under a file lock
while the others wait, and the folder appears by an atomic rename only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

DONE = "done.json"


def root(cache_dir: str | None) -> Path:
    """The cache root: `cache_dir`, else $BATCHINFER_CACHE_DIR, else ~/.cache/batchinfer."""
    return Path(cache_dir or os.environ.get("BATCHINFER_CACHE_DIR") or "~/.cache/batchinfer").expanduser()


def is_ready(target: Path) -> bool:
    return (target / DONE).is_file()


def ensure(target: Path, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """`target`, made by `fill(tmp_folder)` if no complete copy exists yet on this machine.

    `fill` writes the folder's files and returns a small record kept in its done marker.
    """
    if is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # An OS lock (flock on Unix): released when its holder exits, also if it dies.
    with FileLock(target.parent / f".{target.name}.lock"):
        if is_ready(target):
            return target
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            record = fill(tmp)
            (tmp / DONE).write_text(json.dumps(record, default=str))
            if target.exists():  # a copy cut short before its rename has no done marker
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
