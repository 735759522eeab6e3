"""The planner: pure shard cutting (no Ray, no I/O) and footer-only planning of real files."""

import json
import os
import re
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from batchinfer import plan as planning, readers
from batchinfer.atomic import read_pinned
from batchinfer.config_loader import config_from_dict
from batchinfer.plan import (
    InputError,
    InputFile,
    Piece,
    Plan,
    cut_shards,
    diff_settings,
    make_plan,
    verify_inputs,
)
from batchinfer.readers.parquet import ParquetReader
from batchinfer.storage import InputChanged, StorageError, input_output_clash
from scripts.sample_prompts import write_sample_prompts


def list_parquet(url: str):
    """The Parquet reader's listing (storage.list_files with Parquet's suffixes)."""
    return ParquetReader().list_files(url)


def files_of(*groups):
    return [InputFile(url=f"/in/{i}.parquet", name=f"{i}.parquet", version="v", size=1,
                      num_rows=sum(g), row_groups=tuple(g)) for i, g in enumerate(groups)]


def rows_of(shards):
    return [(p.file, p.row_start + k) for s in shards for p in s.pieces for k in range(p.num_rows)]


def starts(shards):
    return [(s.pieces[0].row_start, s.num_rows) for s in shards]


def test_whole_row_groups_are_merged_near_the_target():
    shards = cut_shards(files_of([25] * 8), rows_per_shard=50)
    assert starts(shards) == [(0, 50), (50, 50), (100, 50), (150, 50)]


def test_a_row_group_is_added_only_when_that_gets_closer_to_the_target():
    shards = cut_shards(files_of([300, 300, 300]), rows_per_shard=512)
    assert [s.num_rows for s in shards] == [600, 300]


def test_a_big_row_group_is_split_into_even_row_ranges():
    shards = cut_shards(files_of([10, 1000, 10]), rows_per_shard=300)
    assert starts(shards) == [
        (0, 10), (10, 250), (260, 250), (510, 250), (760, 250), (1010, 10)]


def test_small_files_share_a_shard_and_empty_ones_add_nothing():
    shards = cut_shards(files_of([5, 5], [7], [], [0]), rows_per_shard=100)
    assert [(s.index, s.pieces) for s in shards] == [(0, (Piece(0, 0, 10), Piece(1, 0, 7)))]


def test_many_small_files_make_shards_by_rows_not_by_files():
    """Issue 9, item 6: 24 one-row files and a 100-row file were 28 shards (28 part files)."""
    files = files_of(*[[1]] * 24, [25] * 4)
    shards = cut_shards(files, rows_per_shard=20)
    assert [s.num_rows for s in shards] == [20, 29, 25, 25, 25]
    assert [s.index for s in shards] == list(range(5)) and shards[1].name == "part-000001"
    assert shards[1].pieces == (*(Piece(f, 0, 1) for f in range(20, 24)), Piece(24, 0, 25))
    assert rows_of(shards) == [(f, 0) for f in range(24)] + [(24, r) for r in range(100)]


def test_a_file_bigger_than_a_shard_is_still_cut_by_row_groups_and_ranges():
    shards = cut_shards(files_of([1], [1], [10, 10, 10], [100]), rows_per_shard=20)
    assert [s.pieces for s in shards] == [
        (Piece(0, 0, 1), Piece(1, 0, 1), Piece(2, 0, 20)), (Piece(2, 20, 10),),
        *((Piece(3, a, 20),) for a in range(0, 100, 20))]


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.lists(st.integers(0, 400), max_size=12), min_size=1, max_size=5),
       target=st.integers(1, 500))
def test_every_row_is_in_exactly_one_shard(groups, target):
    files = files_of(*groups)
    shards = cut_shards(files, target)
    expected = [(fi, r) for fi, f in enumerate(files) for r in range(f.num_rows)]
    assert rows_of(shards) == expected
    assert cut_shards(files, target) == shards  # deterministic
    assert [s.index for s in shards] == list(range(len(shards)))
    split = []  # shards cut from one row group much bigger than the target
    for s in shards:
        assert 0 < s.num_rows <= 2 * target
        for p in s.pieces:
            assert p.num_rows > 0
            groups_, skip = files[p.file].row_groups_for(p.row_start, p.num_rows)
            covered = sum(files[p.file].row_groups[g] for g in groups_)
            assert 0 <= skip and skip + p.num_rows <= covered
        split.append(len(groups_) == 1 and files[p.file].row_groups[groups_[0]] > target * 1.5)
    for (a, a_split), (b, b_split) in pairwise(zip(shards, split, strict=True)):
        if not (a_split or b_split):  # else a shard was closed to make room for the split
            assert a.num_rows + b.num_rows > target, "neighbouring shards this small would be one"


def test_row_groups_for_a_range():
    f = files_of([10, 20, 30])[0]
    assert f.row_groups_for(0, 10) == ([0], 0)
    assert f.row_groups_for(15, 20) == ([1, 2], 5)
    assert f.row_groups_for(35, 5) == ([2], 5)


# --------------------------------------------------------------------------- real files


def config(tmp_path, **input_):
    return config_from_dict({"input": {"path": str(tmp_path / "in"), "id_column": "id", **input_},
                             "output": {"path": str(tmp_path / "out")},
                             "run": {"rows_per_shard": 50}})


def test_plan_reads_footers_and_round_trips(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=100, row_group_size=25)
    plan = make_plan(config(tmp_path))
    assert [f.name for f in plan.files] == ["prompts-000.parquet", "prompts-001.parquet"]
    assert plan.total_rows == 200 and len(plan.shards) == 4
    assert plan.files[0].version.startswith("size:")
    again = Plan.from_json(plan.to_json())
    assert again.fingerprint == plan.fingerprint and again.shards == plan.shards
    assert again.schema().names == ["id", "prompt"]


def test_a_plan_record_of_version_1_still_loads(tmp_path):
    """Run directories planned before shards could span files still resume."""
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=100, row_group_size=25)
    plan = make_plan(config(tmp_path))
    record = json.loads(plan.to_json())
    record["version"] = 1
    record["shards"] = [{"index": s.index, "file": s.pieces[0].file, "row_start": s.pieces[0].row_start,
                         "num_rows": s.num_rows} for s in plan.shards]
    old = Plan.from_json(json.dumps(record))
    assert old.shards == plan.shards and old.fingerprint == plan.fingerprint
    assert Plan.from_json(old.to_json()).shards == plan.shards
    record["version"] = 99
    with pytest.raises(InputError, match="plan record version 99 is not supported"):
        Plan.from_json(json.dumps(record))


def test_inputs_by_glob_and_single_file(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=3, rows_per_file=10)
    root, infos = list_parquet(str(tmp_path / "in" / "prompts-00[12].parquet"))
    assert [i["relative"] for i in infos] == ["prompts-001.parquet", "prompts-002.parquet"]
    _, infos = list_parquet(str(tmp_path / "in" / "prompts-000.parquet"))
    assert [i["relative"] for i in infos] == ["prompts-000.parquet"]


@pytest.mark.parametrize("name", ["data[2026]", "runs*", "what?"])
def test_an_existing_folder_with_glob_characters_is_that_folder(tmp_path, name):
    """Issue 9, item 8: a path that exists is read as that path, not as a pattern."""
    folder = tmp_path / name
    write_sample_prompts(str(folder), files=2, rows_per_file=10)
    os.makedirs(folder / "out" / "_batchinfer")  # a run directory inside is still skipped
    (folder / "out" / "_batchinfer" / "plan.json").write_text("{}")
    write_sample_prompts(str(folder / "out"), files=1, rows_per_file=10)
    plan = make_plan(config(tmp_path, path=str(folder)))
    assert [f.name for f in plan.files] == ["prompts-000.parquet", "prompts-001.parquet"]
    assert plan.total_rows == 20
    first = plan.files[0]  # the workers' pinned read, too, takes the name as it is
    assert read_pinned(first.url, first.version, None, ParquetReader().facts).num_rows == 10
    root, infos = list_parquet(str(folder / "prompts-001.parquet"))  # a file in it, too
    assert root.path == str(folder) and [i["relative"] for i in infos] == ["prompts-001.parquet"]


def test_a_missing_path_with_glob_characters_is_a_pattern(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=10)
    _, infos = list_parquet(str(tmp_path / "in" / "prompts-00[1].parquet"))
    assert [i["relative"] for i in infos] == ["prompts-001.parquet"]
    pattern = str(tmp_path / "in" / "prompts-9[0-9].parquet")
    with pytest.raises(StorageError, match=rf"no Parquet files matched '{re.escape(pattern)}' "
                       r"\(taken as a glob pattern, as no file or folder has that name; "):
        list_parquet(pattern)


def test_output_beside_a_literal_folder_with_glob_characters(tmp_path):
    """The clash check reads an existing `data[2026]` as that folder, not as the glob root."""
    write_sample_prompts(str(tmp_path / "data[2026]"), files=1, rows_per_file=3)
    inp = str(tmp_path / "data[2026]")
    assert input_output_clash(inp, str(tmp_path), None) is None
    assert "is where input.path" in input_output_clash(inp, inp + "/", None)


def test_underscore_and_dot_files_are_skipped(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=1, rows_per_file=10)
    os.makedirs(tmp_path / "in" / "_tmp")
    write_sample_prompts(str(tmp_path / "in" / "_tmp"), files=1, rows_per_file=10)
    (tmp_path / "in" / ".hidden.parquet").write_bytes(b"x")
    _, infos = list_parquet(str(tmp_path / "in"))
    assert [i["relative"] for i in infos] == ["prompts-000.parquet"]


def test_missing_input_path(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_parquet(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(StorageError, match="no Parquet files matched"):
        list_parquet(str(tmp_path / "empty"))


def test_missing_prompt_column_lists_the_columns_found(tmp_path):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": ["a"], "text": ["hi"]}), tmp_path / "in" / "x.parquet")
    with pytest.raises(InputError) as e:
        make_plan(config(tmp_path))
    assert "has no column 'prompt' (columns found: id, text)" in str(e.value)
    assert "x.parquet" in str(e.value)


def test_prompt_column_of_wrong_type(tmp_path):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": ["a"], "prompt": [3]}), tmp_path / "in" / "x.parquet")
    with pytest.raises(InputError, match="prompt column 'prompt' has type int64; expected string"):
        make_plan(config(tmp_path))


def test_files_that_disagree_on_types(tmp_path):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": ["a"], "prompt": ["hi"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": [1], "prompt": ["hi"]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match="disagree on column types.*id: string vs int64"):
        make_plan(config(tmp_path))


def test_not_a_parquet_file(tmp_path):
    os.makedirs(tmp_path / "in")
    (tmp_path / "in" / "bad.parquet").write_text("id,prompt\n1,hi\n")
    with pytest.raises(InputError, match="bad.parquet' is not a readable Parquet file"):
        make_plan(config(tmp_path))


def test_verify_inputs_names_changed_new_and_gone_files(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=10)
    plan = make_plan(config(tmp_path))
    _, infos = list_parquet(str(tmp_path / "in"))
    verify_inputs(plan, infos)  # unchanged: fine
    pq.write_table(pa.table({"id": ["z"], "prompt": ["changed"]}), tmp_path / "in" / "prompts-001.parquet")
    os.remove(tmp_path / "in" / "prompts-000.parquet")
    write_sample_prompts(str(tmp_path / "extra"), files=1, rows_per_file=3)
    os.rename(tmp_path / "extra" / "prompts-000.parquet", tmp_path / "in" / "late.parquet")
    _, infos = list_parquet(str(tmp_path / "in"))
    with pytest.raises(InputError) as e:
        verify_inputs(plan, infos)
    text = str(e.value)
    assert "input file 'prompts-000.parquet' is gone" in text
    assert "input file 'prompts-001.parquet' changed since the plan was made" in text
    assert "input file 'late.parquet' is new" in text


def test_fingerprint_covers_settings_and_inputs(tmp_path):
    write_sample_prompts(str(tmp_path / "in"), files=1, rows_per_file=10)
    a = make_plan(config(tmp_path))
    assert make_plan(config(tmp_path)).fingerprint == a.fingerprint
    b = make_plan(config(tmp_path, system_prompt="Be brief."))
    assert b.fingerprint != a.fingerprint
    assert diff_settings(a.settings, b.settings) == ["input.system_prompt: None -> 'Be brief.'"]


def test_the_last_shards_of_a_big_plan_are_cut_in_quarters_and_cover_the_same_rows():
    from batchinfer.plan import InputFile, Piece, Shard, cut_shards, taper_end

    files = [InputFile(url=f"f{i}", name=f"f{i}", version="v", size=1, num_rows=250, row_groups=(100, 100, 50))
             for i in range(4)]
    shards = cut_shards(files, 100)  # 9 shards, the last two: rows 100-199 and 200-249 of file 3
    assert len(shards) == 9 and taper_end(shards, held=3) == shards  # under 4 x held: as it was
    tapered = taper_end(shards, held=2)
    assert len(tapered) == 9 - 2 + 4 + 1 and [s.index for s in tapered] == list(range(len(tapered)))
    assert tapered[:7] == shards[:7]
    assert [s.num_rows for s in tapered[7:]] == [25] * 4 + [50]  # under TAPER_MIN_ROWS: whole

    def rows(ss: list[Shard]) -> list[tuple[int, int]]:
        return [(p.file, p.row_start + i) for s in ss for p in s.pieces for i in range(p.num_rows)]

    assert rows(tapered) == rows(shards)  # every row once, in the same order
    assert tapered[7].pieces == (Piece(3, 100, 25),) and tapered[-1].pieces == (Piece(3, 200, 50),)


# --------------------------------------------------------------------------- the one pass: facts and ids


def write_ids(tmp_path, name, ids):
    os.makedirs(tmp_path / "in", exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": [f"p{i}" for i in range(len(ids))]}),
                   tmp_path / "in" / name, row_group_size=2)


def same_hash_for_every_id(monkeypatch):
    monkeypatch.setattr(planning, "_id_hashes", lambda ids: np.zeros(len(ids), np.int64))


def test_ids_that_only_share_a_hash_are_not_repeats(tmp_path, monkeypatch):
    """Repeats are found on 64-bit hashes, then confirmed on the ids themselves."""
    write_ids(tmp_path, "a.parquet", ["a", "b", "c"])
    write_ids(tmp_path, "b.parquet", pa.array(["d", "e"], pa.large_string()))
    same_hash_for_every_id(monkeypatch)
    assert make_plan(config(tmp_path)).total_rows == 5


@pytest.mark.parametrize("colliding", [False, True])
def test_repeated_ids_are_named_in_order_with_their_files(tmp_path, monkeypatch, colliding):
    write_ids(tmp_path, "a.parquet", ["a", "b", "c", "x"])
    write_ids(tmp_path, "b.parquet", ["d", "x", "b"])
    write_ids(tmp_path, "c.parquet", pa.array(["e", "b"]).dictionary_encode())
    if colliding:  # every id shares a hash: the ids themselves tell the repeats apart
        same_hash_for_every_id(monkeypatch)
    with pytest.raises(InputError) as e:
        make_plan(config(tmp_path))
    assert str(e.value) == (
        "input.id_column 'id' repeats 2 value(s), e.g. 'b' (in a.parquet, b.parquet, c.parquet); "
        "'x' (in a.parquet, b.parquet); each row needs its own id for exactly-once results. Fix the "
        "inputs, or set input.allow_duplicate_ids: true to accept them")


@pytest.mark.parametrize("ids, repeats", [
    (pa.array([1, 2, 3], pa.int64()), False),
    (pa.array([1.5, float("nan"), float("nan")]), True),   # Arrow counts NaNs as one value
    (pa.array([0.0, -0.0, 1.0]), False),                   # ... and 0.0 and -0.0 as two
    (pa.array([b"\x00", b"\x00\x00", b"\x00"]), True),
])
def test_repeats_of_ids_of_other_types(tmp_path, ids, repeats):
    write_ids(tmp_path, "a.parquet", ids)
    if repeats:
        with pytest.raises(InputError, match="repeats 1 value"):
            make_plan(config(tmp_path))
    else:
        assert make_plan(config(tmp_path)).total_rows == len(ids)


def test_files_above_the_whole_file_size_are_read_by_ranges_with_the_same_outcome(tmp_path, monkeypatch):
    """Planning fetches a small file whole (readers.base.WHOLE_FILE_BYTES) and reads a larger
    one by ranges: the plan and every refusal are the same either way."""
    write_sample_prompts(str(tmp_path / "in"), files=3, rows_per_file=10, row_group_size=4)
    whole = make_plan(config(tmp_path))
    monkeypatch.setattr(readers.base, "WHOLE_FILE_BYTES", 0)
    ranged = make_plan(config(tmp_path))
    assert ranged.files == whole.files and ranged.shards == whole.shards
    write_ids(tmp_path, "z-dup.parquet", ["q000003", None])
    with pytest.raises(InputError, match=r"is null in 1 row\(s\): z-dup.parquet \(1 null, first at row 1\)"):
        make_plan(config(tmp_path))
    write_ids(tmp_path, "z-dup.parquet", ["q000003", "new"])
    with pytest.raises(InputError, match=r"repeats 1 value\(s\), e.g. 'q000003' \(in prompts-000.parquet, "
                                         r"z-dup.parquet\)"):
        make_plan(config(tmp_path))


def test_a_file_changed_after_listing_is_refused_while_planning(tmp_path):
    """Each file is read at the version listed, which is the version the plan records."""
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=10)
    _, infos = list_parquet(str(tmp_path / "in"))
    write_ids(tmp_path, "prompts-001.parquet", ["a", "b", "c"])
    with pytest.raises(InputChanged, match=r"prompts-001.parquet' changed \(version size:.*\) while the "
                                           "plan was being made"):
        make_plan(config(tmp_path), infos)
