"""Inputs as users really have them (issue 9): text in any string layout or dictionary
encoding, files from different writers read as one dataset, empty files of any schema
skipped, null ids refused. Planning-level unit tests (no Ray) and one end-to-end run.
"""

from __future__ import annotations

import os
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchinfer import runner
from batchinfer.cli import main
from batchinfer.plan import InputError, make_plan
from tests.conftest import assert_exactly_once, make_config, write_yaml


def put(tmp_path, name: str, table: pa.Table | pd.DataFrame) -> None:
    os.makedirs(tmp_path / "prompts", exist_ok=True)
    if isinstance(table, pd.DataFrame):
        table.to_parquet(tmp_path / "prompts" / name)
    else:
        pq.write_table(table, tmp_path / "prompts" / name)


def text(values, t: pa.DataType) -> pa.Array:
    return pa.array(values, pa.string()).cast(t)


def planned_types(plan) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in plan.schema()}


def test_a_pandas_category_prompt_is_text(tmp_path):
    put(tmp_path, "a.parquet", pd.DataFrame({"id": ["a", "b"], "prompt": pd.Categorical(["hi", "hi"])}))
    assert pq.read_schema(tmp_path / "prompts" / "a.parquet").field("prompt").type == \
        pa.dictionary(pa.int8(), pa.string())
    assert planned_types(make_plan(make_config(tmp_path)))["prompt"] == pa.string()


def test_string_and_large_string_files_are_one_dataset(tmp_path):
    put(tmp_path, "pandas.parquet", pa.table({"id": text(["a"], pa.string()), "prompt": text(["hi"], pa.string())}))
    put(tmp_path, "polars.parquet", pa.table({"id": text(["b"], pa.large_string()),
                                              "prompt": text(["yo"], pa.large_string())}))
    plan = make_plan(make_config(tmp_path))
    assert planned_types(plan) == {"id": pa.string(), "prompt": pa.string()}
    assert all(f.nullable for f in plan.schema()) and len(plan.shards) == 1  # one-row files share one


@pytest.mark.parametrize("t", [pa.string_view(), pa.large_binary(), pa.binary_view(),
                               pa.dictionary(pa.int32(), pa.large_string())])
def test_every_text_layout_is_accepted_for_prompt_id_and_passthrough(tmp_path, t):
    put(tmp_path, "a.parquet", pa.table({"id": text(["a"], pa.string()), "prompt": text(["hi"], pa.string()),
                                         "tag": text(["x"], pa.string())}))
    put(tmp_path, "b.parquet", pa.table({"id": text(["b"], t), "prompt": text(["yo"], t), "tag": text(["y"], t)}))
    unified = pa.binary() if "binary" in str(t) else pa.string()
    if unified == pa.binary():  # bytes are read as bytes; text and bytes do not mix
        with pytest.raises(InputError, match=r"differ in id: string vs binary"):
            make_plan(make_config(tmp_path, input={"passthrough_columns": ["tag"]}))
        os.remove(tmp_path / "prompts" / "a.parquet")
    plan = make_plan(make_config(tmp_path, input={"passthrough_columns": ["tag"]}))
    assert planned_types(plan) == {"id": unified, "prompt": unified, "tag": unified}
    # what a worker does with each shard's table: cast it from the file's own types
    table = pq.read_table(tmp_path / "prompts" / "b.parquet").cast(plan.schema())
    assert table.column("tag").to_pylist() == (["y"] if unified == pa.string() else [b"y"])


def test_files_differing_only_in_nullability_are_one_dataset(tmp_path):
    strict = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("prompt", pa.string(), nullable=False)])
    put(tmp_path, "a.parquet", pa.table({"id": ["a"], "prompt": ["hi"]}, schema=strict))
    put(tmp_path, "b.parquet", pa.table({"id": ["b"], "prompt": ["yo"]}))
    assert planned_types(make_plan(make_config(tmp_path))) == {"id": pa.string(), "prompt": pa.string()}


def test_a_column_all_null_in_one_file_takes_its_type_from_the_others(tmp_path):
    put(tmp_path, "a.parquet", pa.table({"id": ["a"], "prompt": ["hi"]}))
    put(tmp_path, "b.parquet", pd.DataFrame({"id": ["b"], "prompt": pd.Series([None], dtype=object)}))
    assert planned_types(make_plan(make_config(tmp_path)))["prompt"] == pa.string()


@pytest.mark.parametrize("column", ["id", "tag"])
def test_a_real_type_conflict_names_both_files_and_the_column(tmp_path, column):
    put(tmp_path, "a.parquet", pa.table({"id": ["a"], "prompt": ["hi"], "tag": ["x"]}))
    put(tmp_path, "b.parquet", pa.table({"id": [1] if column == "id" else ["b"], "prompt": ["yo"],
                                         "tag": [1] if column == "tag" else ["y"]}))
    with pytest.raises(InputError) as e:
        make_plan(make_config(tmp_path, input={"passthrough_columns": ["tag"]}))
    message = str(e.value)
    assert "a.parquet' and " in message and "b.parquet' differ in " in message
    assert f"differ in {column}: string vs int64;" in message
    assert "differ in ;" not in message


def test_an_empty_pandas_file_is_skipped_whatever_its_types(tmp_path):
    put(tmp_path, "empty.parquet", pd.DataFrame({"id": pd.Series([], dtype=object),
                                                 "prompt": pd.Series([], dtype=object)}))
    assert pq.read_schema(tmp_path / "prompts" / "empty.parquet").field("prompt").type == pa.null()
    put(tmp_path, "full.parquet", pa.table({"id": ["a"], "prompt": ["hi"]}))
    cfg = make_config(tmp_path)
    plan = make_plan(cfg)
    assert [(f.name, f.num_rows) for f in plan.files] == [("empty.parquet", 0), ("full.parquet", 1)]
    assert [p.file for s in plan.shards for p in s.pieces] == [1] and planned_types(plan)["prompt"] == pa.string()
    out = CliRunner().invoke(main, ["plan", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert out.exit_code == 0, out.output
    assert re.search(r"^  empty.parquet  skipped \(empty\)$", out.output, re.M)
    assert re.search(r"^  full.parquet  1 rows in 1 row groups$", out.output, re.M)


def test_an_empty_file_missing_columns_is_skipped(tmp_path):
    put(tmp_path, "empty.parquet", pa.table({"other": pa.array([], pa.int64())}))
    put(tmp_path, "full.parquet", pa.table({"id": ["a"], "prompt": ["hi"]}))
    assert [p.file for s in make_plan(make_config(tmp_path)).shards for p in s.pieces] == [1]


@pytest.mark.parametrize("ids, nulls, first", [(["a", None, "c"], 1, 1), ([None, "b", None], 2, 0)])
def test_null_ids_are_refused_naming_file_row_and_count(tmp_path, ids, nulls, first):
    put(tmp_path, "a.parquet", pa.table({"id": ["x"], "prompt": ["hi"]}))
    put(tmp_path, "b.parquet", pa.table({"id": ids, "prompt": ["1", "2", "3"]}))
    with pytest.raises(InputError) as e:
        make_plan(make_config(tmp_path))
    assert str(e.value).startswith(
        f"input.id_column 'id' is null in {nulls} row(s): b.parquet ({nulls} null, first at row {first}) "
        "(rows count from 0); expected an id in every row")
    assert "repeats" not in str(e.value)


def test_null_ids_are_refused_even_when_duplicates_are_allowed(tmp_path):
    put(tmp_path, "a.parquet", pa.table({"id": ["a", "a", None], "prompt": ["1", "2", "3"]}))
    with pytest.raises(InputError, match=r"is null in 1 row\(s\): a.parquet \(1 null, first at row 2\)"):
        make_plan(make_config(tmp_path, input={"allow_duplicate_ids": True}))


def test_null_ids_are_found_without_footer_statistics(tmp_path):
    os.makedirs(tmp_path / "prompts")
    pq.write_table(pa.table({"id": ["a", None], "prompt": ["1", "2"]}), tmp_path / "prompts" / "a.parquet",
                   write_statistics=False)
    with pytest.raises(InputError, match=r"a.parquet \(1 null, first at row 1\)"):
        make_plan(make_config(tmp_path, input={"allow_duplicate_ids": True}))


def test_a_null_id_stops_the_run_before_any_engine_starts(tmp_path):
    put(tmp_path, "a.parquet", pa.table({"id": ["a", None], "prompt": ["1", "2"]}))
    cfg = make_config(tmp_path)
    with pytest.raises(InputError, match="a.parquet"):  # no Ray here: planning refuses first
        runner.run(cfg, progress=False, install_signal_handlers=False)
    assert not list((tmp_path / "out").glob("part-*"))
    out = CliRunner().invoke(main, ["plan", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert out.exit_code == 2 and "is null in 1 row(s)" in out.output


def test_writers_mixed_with_an_empty_file_run_end_to_end(tmp_path, ray_cluster):
    ids = [f"r{i}" for i in range(6)]
    prompts = ["Say hi.", "Say bye.", "Count to two."]
    put(tmp_path, "a-pandas.parquet", pd.DataFrame({"id": ids[:3], "prompt": pd.Categorical(prompts),
                                                    "topic": pd.Categorical(["x", "y", "x"])}))
    put(tmp_path, "b-polars.parquet", pa.table({"id": text(ids[3:], pa.large_string()),
                                                "prompt": text(prompts, pa.large_string()),
                                                "topic": text(["y", "x", "y"], pa.large_string())}))
    put(tmp_path, "c-empty.parquet", pd.DataFrame({"id": pd.Series([], dtype=object),
                                                   "prompt": pd.Series([], dtype=object)}))
    cfg = make_config(tmp_path, input={"passthrough_columns": ["topic"]}, sampling={"max_tokens": 2})
    assert runner.run(cfg, progress=False).exit_code == 0
    df = assert_exactly_once(tmp_path / "out", ids)
    assert dict(zip(df.id, df.topic, strict=True)) == dict(zip(ids, ["x", "y", "x", "y", "x", "y"], strict=True))
    for part in (tmp_path / "out").glob("part-*.parquet"):
        schema = pq.read_schema(part)
        assert schema.field("id").type == pa.string() and schema.field("topic").type == pa.string()


def test_messages_in_large_layouts_are_read_as_list_of_struct_of_string(tmp_path):
    turn = pa.struct([pa.field("role", pa.large_string(), nullable=False), ("content", pa.large_string())])
    messages = pa.array([[{"role": "user", "content": "hi"}]], pa.large_list(turn))
    put(tmp_path, "a.parquet", pa.table({"id": ["a"], "messages": messages}))
    plan = make_plan(make_config(tmp_path, input={"prompt_column": None, "messages_column": "messages"}))
    wanted = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert planned_types(plan)["messages"] == wanted
    # what a worker does with each shard's table
    assert pq.read_table(tmp_path / "prompts" / "a.parquet").cast(plan.schema()).column("messages").to_pylist() \
        == [[{"role": "user", "content": "hi"}]]
