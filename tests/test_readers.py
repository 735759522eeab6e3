"""The input-format seam (readers/): the Parquet reader on local files, and a second format
added as one class plus one registry line."""

import json
import os

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from batchinfer import readers, storage
from batchinfer.config_loader import config_from_dict
from batchinfer.plan import InputError, Piece, Shard, make_plan
from batchinfer.readers import FileFacts, Reader
from batchinfer.readers.parquet import ParquetReader
from scripts.sample_prompts import write_sample_prompts


def config(path, **input_):
    return config_from_dict({"input": {"path": str(path), "id_column": "id", **input_},
                             "output": {"path": str(path) + "-out"},
                             "run": {"rows_per_shard": 50}})


@pytest.fixture
def parquet():
    return readers.reader_for()


# --------------------------------------------------------------------------- registry


def test_the_default_format_is_parquet_and_lazily_registered():
    assert readers.DEFAULT_FORMAT == "parquet"
    assert readers.READERS["parquet"] == "batchinfer.readers.parquet:ParquetReader"
    assert type(readers.reader_for("parquet")) is ParquetReader


def test_unknown_and_duplicate_formats_are_refused():
    with pytest.raises(ValueError, match="unknown input format 'csv'; expected one of .*parquet"):
        readers.reader_for("csv")
    with pytest.raises(ValueError, match="input format 'parquet' is already registered"):
        readers.register("parquet", ParquetReader)


# --------------------------------------------------------------------------- Parquet


def test_facts_come_from_the_footer(tmp_path, parquet):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": ["a", "b", None], "prompt": ["x", "y", "z"]}), path, row_group_size=2)
    facts = parquet.facts(str(path))
    assert facts.num_rows == 3 and facts.units == (2, 1)
    assert facts.schema.names == ["id", "prompt"]
    assert facts.null_free == {"prompt"}  # the id column has a null


def test_facts_of_a_file_that_is_not_parquet(tmp_path, parquet):
    (tmp_path / "bad.parquet").write_text("id,prompt\n1,hi\n")
    with pytest.raises(InputError, match="bad.parquet' is not a readable Parquet file"):
        parquet.read_facts([str(tmp_path / "bad.parquet")])


def test_a_shard_spanning_two_files_reads_only_its_rows_and_columns(tmp_path, parquet):
    write_sample_prompts(str(tmp_path / "in"), files=2, rows_per_file=10, row_group_size=4)
    plan = make_plan(config(tmp_path / "in", passthrough_columns=["category"]))
    shard = Shard(0, (Piece(0, 6, 4), Piece(1, 0, 3)))  # rows 6-9 of one file, 0-2 of the next
    table = parquet.read_shard(plan.files, shard, plan.schema())
    assert table.column_names == ["id", "prompt", "category"]
    assert table.column("id").to_pylist() == [f"q{i:06d}" for i in [6, 7, 8, 9, 10, 11, 12]]
    only = parquet.read_shard(plan.files, shard, pa.schema([("id", pa.large_string())]))
    assert only.schema == pa.schema([("id", pa.large_string())]) and only.num_rows == 7


def test_a_shard_read_refuses_a_file_changed_since_the_plan(tmp_path, parquet):
    write_sample_prompts(str(tmp_path / "in"), files=1, rows_per_file=10)
    plan = make_plan(config(tmp_path / "in"))
    write_sample_prompts(str(tmp_path / "in"), files=1, rows_per_file=5)
    with pytest.raises(storage.InputChanged, match="prompts-000.parquet' changed"):
        parquet.read_shard(plan.files, plan.shards[0], plan.schema())


def test_first_rows_and_one_column(tmp_path, parquet):
    write_sample_prompts(str(tmp_path / "in"), files=1, rows_per_file=10, row_group_size=3)
    plan = make_plan(config(tmp_path / "in"))
    first = parquet.first_rows(plan.files[0], ["prompt", "id"], 5)
    assert first.column_names == ["prompt", "id"]
    assert first.column("id").to_pylist() == [f"q{i:06d}" for i in range(5)]
    assert parquet.first_rows(plan.files[0], ["id"], 100).num_rows == 10
    assert len(parquet.read_column(plan.files[0], "id")) == 10


# --------------------------------------------------------------------------- a second format


class NdjsonReader(Reader):
    """Newline-delimited JSON objects, one row each: the whole of a new format."""

    name, label, suffixes = "test-ndjson", "NDJSON", (".ndjson",)

    def facts(self, source):
        table = self._table(source)
        return FileFacts(table.num_rows, (table.num_rows,) if table.num_rows else (), table.schema)

    def read_rows(self, source, file, start, num_rows, columns):
        return self._table(source).select(list(columns)).slice(start, num_rows)

    def _table(self, source):
        with self.open_binary(source) as f:
            return pajson.read_json(f)


def test_a_second_format_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(readers.READERS, NdjsonReader.name, NdjsonReader)  # the registry line
    os.makedirs(tmp_path / "in")
    for f, ids in enumerate([range(0, 30), range(30, 130)]):
        with open(tmp_path / "in" / f"part-{f}.ndjson", "w") as out:
            out.writelines(json.dumps({"id": f"r{i}", "prompt": f"say {i}"}) + "\n" for i in ids)
    (tmp_path / "in" / "ignored.parquet").write_bytes(b"not this format")
    reader = readers.reader_for("test-ndjson")
    plan = make_plan(config(tmp_path / "in"), reader=reader)
    assert [f.name for f in plan.files] == ["part-0.ndjson", "part-1.ndjson"]
    assert [s.num_rows for s in plan.shards] == [30, 50, 50]  # one unit a file, split when big
    rows = [r for s in plan.shards for r in reader.read_shard(plan.files, s, plan.schema())
            .column("id").to_pylist()]
    assert rows == [f"r{i}" for i in range(130)]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(storage.StorageError, match=r"no NDJSON files matched .*looked for \*\.ndjson"):
        reader.list_files(str(tmp_path / "empty"))
