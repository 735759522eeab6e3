"""The node-local cache: concurrent workers make a folder once; a failed attempt leaves nothing."""

import multiprocessing
import time
from pathlib import Path

import pytest

from batchinfer import cache


def _fill_slowly(tmp: Path, log: Path) -> dict:
    with open(log, "a") as f:
        f.write("fill\n")
    time.sleep(0.5)
    (tmp / "weights.bin").write_bytes(b"x" * 100)
    return {"made_by": "test"}


def _worker(args):
    target, log, barrier = args
    barrier.wait()
    out = cache.ensure(Path(target), lambda tmp: _fill_slowly(tmp, Path(log)))
    return (out / "weights.bin").stat().st_size


def test_concurrent_workers_on_one_node_fill_once(tmp_path):
    target, log = tmp_path / "engines" / "key", tmp_path / "fills.log"
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(4)
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            sizes = pool.map(_worker, [(str(target), str(log), barrier)] * 4)
    assert sizes == [100] * 4
    assert log.read_text() == "fill\n"
    assert cache.is_ready(target)
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_fill_leaves_nothing_and_the_next_call_retries(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("download cut off")

    with pytest.raises(RuntimeError, match="download cut off"):
        cache.ensure(target, broken)
    assert not target.exists()
    def good(tmp):
        (tmp / "ok").write_text("1")
        return {}

    assert cache.ensure(target, good) == target
    assert (target / "ok").read_text() == "1"
