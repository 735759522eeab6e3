"""The run directory: first-commit-wins, nothing partial visible, records rebuilt from parts."""

import json
import multiprocessing
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa

from batchinfer.records import Manifest, RunStatus, ShardSummary
from batchinfer.results import to_parquet
from batchinfer.run_store import RunStore
from tests.conftest import hold_run

LEGACY = Path(__file__).parent / "data" / "legacy_run"
"""Records as the code before batchinfer/records.py wrote them (see test_records.py)."""


def part_bytes(shard: int, worker: int, rows: int = 5) -> tuple[bytes, ShardSummary]:
    """A part as `worker` would commit it: its rows' output and its summary name the worker."""
    summary = ShardSummary(shard=shard, part=f"part-{shard:06d}.parquet", rows=rows, rows_ok=rows,
                           rows_failed=0, prompt_tokens=1, completion_tokens=2, errors={},
                           attempt=1, worker=worker, generate_s=0.1,
                           committed_at="2026-12-01T00:00:00+00:00")
    table = pa.table({"id": [f"{shard}-{i}" for i in range(rows)], "output": [f"worker-{worker}"] * rows})
    return to_parquet(table, summary, "zstd"), summary


def a_manifest() -> Manifest:
    """A manifest as a finished run writes it (from a run made with the code before records.py)."""
    return Manifest.from_json((LEGACY / "_batchinfer" / "manifest.json").read_text())


def _commit_in_process(args):
    url, generation, worker, barrier = args
    data, summary = part_bytes(7, worker)
    barrier.wait()
    return worker, RunStore(url).commit("part-000007.parquet", data, summary, generation)


def test_same_shard_committed_concurrently_by_processes_exactly_one_wins(tmp_path):
    url = str(tmp_path / "run")
    generation = hold_run(url)
    n = 8
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(n)
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            outcomes = pool.map(_commit_in_process,
                                [(url, generation, i, barrier) for i in range(n)])
    winners = [worker for worker, won in outcomes if won]
    assert len(winners) == 1
    df = pd.read_parquet(url)
    assert len(df) == 5 and set(df.output) == {f"worker-{winners[0]}"}
    store = RunStore(url)
    assert store.committed()[7].worker == winners[0]
    assert os.listdir(tmp_path / "run" / "_batchinfer" / "staging") == []  # no temp file left


def test_a_losing_commit_leaves_the_winner_untouched(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    gen = hold_run(store.url)
    first, s1 = part_bytes(0, 1)
    second, s2 = part_bytes(0, 2)
    assert store.commit("part-000000.parquet", first, s1, gen) is True
    path = tmp_path / "run" / "part-000000.parquet"
    before = (path.stat().st_ino, path.stat().st_mtime_ns)
    assert store.commit("part-000000.parquet", second, s2, gen) is False
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == before
    assert path.read_bytes() == first


def test_metadata_is_invisible_to_dataset_readers(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    gen = hold_run(store.url)
    for i in range(3):
        data, summary = part_bytes(i, 0)
        store.commit(f"part-{i:06d}.parquet", data, summary, gen)
    store.write_status(RunStatus(state="running"))
    store.write_manifest(a_manifest(), success=True)
    (tmp_path / "run" / "_batchinfer" / "staging" / "part-000009.parquet.tmp").write_bytes(b"junk")
    assert len(pd.read_parquet(str(tmp_path / "run"))) == 15
    assert (tmp_path / "run" / "_SUCCESS").exists()


def test_lost_or_torn_commit_records_are_rebuilt_from_the_parts(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    gen = hold_run(store.url)
    for i in range(3):
        data, summary = part_bytes(i, i)
        store.commit(f"part-{i:06d}.parquet", data, summary, gen)
    records = tmp_path / "run" / "_batchinfer" / "commits"
    os.remove(records / "part-000001.json")           # crash between part and record
    (records / "part-000002.json").write_text('{"sha')  # crash mid-write of a record
    found = store.committed()
    assert sorted(found) == [0, 1, 2]
    assert [found[i].worker for i in range(3)] == [0, 1, 2]
    assert json.loads((records / "part-000001.json").read_text())["worker"] == 1


def test_clear_removes_the_previous_run_only(tmp_path):
    run = tmp_path / "run"
    store = RunStore(str(run))
    gen = hold_run(store.url)
    data, summary = part_bytes(0, 0)
    store.commit("part-000000.parquet", data, summary, gen)
    store.write_manifest(a_manifest(), success=True)
    (run / "notes.txt").write_text("user file")
    store.clear()
    assert sorted(os.listdir(run)) == ["_batchinfer", "notes.txt"]
    assert os.listdir(run / "_batchinfer") == ["driver.json"]  # the lease its caller holds stays
