"""The OpenAI Batch JSONL reader (readers/openai_batch.py): rows, synthesized ids, census,
gzip, and shards that seek to their rows by byte offset. Pure pyarrow/fsspec, no Ray."""

import gzip
import io
import json
from dataclasses import replace

import pyarrow as pa
import pytest

from batchinfer import readers, storage
from batchinfer.config import StorageConfig
from batchinfer.plan import InputFile, Piece, Plan, Shard, cut_shards
from batchinfer.readers import InputError, base, openai_batch
from batchinfer.readers.openai_batch import SCHEMA, OpenAIBatchReader


def request(cid, model="m1", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": cid}], **body}})


def write(path, lines, ending=b"\n"):
    """Lines (str or bytes) joined by `ending`, gzipped when the name ends in .gz."""
    data = b"".join((x.encode() if isinstance(x, str) else x) + ending for x in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


def planned(reader, url):
    """Input files as make_plan builds them: listed, then scanned (facts copied in)."""
    loc, infos = reader.list_files(url)
    listed = [InputFile(url=storage.join_protocol(loc.fs, i["name"]), name=i["relative"],
                        version=storage.version_tag(i), size=i["size"], num_rows=0, row_groups=())
              for i in infos]
    facts = reader.scan_files(listed, lambda file, f, read_column: f)
    return [replace(file, num_rows=f.num_rows, row_groups=f.units, offsets=f.offsets, unit_lines=f.unit_lines)
            for file, f in zip(listed, facts, strict=True)]


class Spy(io.BytesIO):
    """An open file that records where it was sought to."""

    path = "spy.jsonl"

    def __init__(self, data):
        super().__init__(data)
        self.seeks = []

    def seek(self, pos, whence=0):
        self.seeks.append(pos)
        return super().seek(pos, whence)


@pytest.fixture
def reader():
    return readers.reader_for("openai_batch")


@pytest.fixture
def small_units(monkeypatch):
    monkeypatch.setattr(openai_batch, "UNIT_ROWS", 3)


def test_registered_and_listed_by_suffix(tmp_path, reader):
    assert type(reader) is OpenAIBatchReader and reader.label == "OpenAI Batch JSONL"
    for name in ["a.jsonl", "b.jsonl.gz", "c.json", "d.gz", "e.jsonl.bak", "f.jsonlgz"]:
        (tmp_path / name).write_bytes(b"")
    assert [i["relative"] for i in reader.list_files(str(tmp_path))[1]] == ["a.jsonl", "b.jsonl.gz"]
    with pytest.raises(storage.StorageError, match=r"no OpenAI Batch JSONL files .*\*\.jsonl, \*\.jsonl\.gz"):
        reader.list_files(str(tmp_path / "*.txt"))


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz"])
def test_plain_and_gzip_files_round_trip(tmp_path, reader, name):
    url = write(tmp_path / name, [request(f"r{i}") for i in range(600)])
    facts = reader.facts(url)
    assert facts.num_rows == 600 and facts.units == (256, 256, 88)
    assert facts.schema == SCHEMA and facts.null_free == {"custom_id", "line", "request"}
    plain = not name.endswith(".gz")
    starts = [sum(len(request(f"r{i}")) + 1 for i in range(row)) for row in (0, 256, 512)]
    assert facts.offsets == (tuple(starts) if plain else ())
    [file] = planned(reader, url)
    assert file.offsets == facts.offsets and file.row_groups == facts.units
    table = reader.read_rows(url, file, 0, 600, ["request", "custom_id", "line"])
    assert table.column_names == ["request", "custom_id", "line"]
    assert table.column("custom_id").to_pylist() == [f"r{i}" for i in range(600)]
    assert table.column("line").to_pylist() == list(range(1, 601))
    assert table.column("request").to_pylist()[7] == request("r7").encode()
    part = reader.read_rows(url, file, 300, 5, ["custom_id", "line"])
    assert part.to_pydict() == {"custom_id": [f"r{i}" for i in range(300, 305)],
                                "line": list(range(301, 306))}


def test_scan_parses_once_and_holds_ids_not_lines(tmp_path, reader, monkeypatch):
    url = write(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(20_000)])
    [file] = planned(reader, url)
    parsed = []
    real = openai_batch._parse
    monkeypatch.setattr(openai_batch, "_parse", lambda raw: parsed.append(1) or real(raw))

    def visit(file, facts, read_column):
        ids = read_column("custom_id")
        return facts.num_rows, ids.num_chunks, ids[19_999].as_py(), read_column("line")[0].as_py()

    assert reader.scan(url, file, visit) == (20_000, 3, "r19999", 1)  # ids in 8,192-row chunks
    assert len(parsed) == 20_000
    assert reader.scan(url, file, lambda f, facts, read_column: read_column("request")[5].as_py()) \
        == request("r5").encode()


def test_shards_seek_to_their_unit_and_read_exactly_their_rows(tmp_path, reader, small_units):
    url = write(tmp_path / "in.jsonl", [request(f"r{i:02d}") for i in range(10)])
    [file] = planned(reader, url)
    assert file.row_groups == (3, 3, 3, 1)
    n = len(request("r00")) + 1
    assert file.offsets == (0, 3 * n, 6 * n, 9 * n)
    data = (tmp_path / "in.jsonl").read_bytes()
    for start in range(10):
        for count in range(0, 11 - start):
            source = Spy(data)
            table = reader.read_rows(source, file, start, count, ["custom_id", "line"])
            assert table.column("custom_id").to_pylist() == [f"r{i:02d}" for i in range(start, start + count)]
            assert table.column("line").to_pylist() == list(range(start + 1, start + count + 1))
            assert source.seeks == [start // 3 * 3 * n]  # straight to its unit, not the start
            assert not source.closed  # a file given is left open
    shards = cut_shards([file], rows_per_shard=2)
    rows = [reader.read_shard([file], s, SCHEMA).column("custom_id").to_pylist() for s in shards]
    assert sum(rows, []) == [f"r{i:02d}" for i in range(10)]


def test_blank_lines_and_crlf(tmp_path, reader, small_units):
    lines = [request("a"), request("b"), request("c"), request("d"), "", "  \t", request("e"),
             request("f"), request("g"), request("h")]
    url = write(tmp_path / "in.jsonl", lines, ending=b"\r\n")
    [file] = planned(reader, url)
    assert file.num_rows == 8 and file.row_groups == (3, 3, 2)
    # Every unit has its offset and its first line's number, blank lines before it or not,
    # so a shard past them still seeks straight to its own lines.
    width = len(request("a")) + 2
    assert file.offsets == (0, 3 * width, 6 * width + 2 + 5) and file.unit_lines == (1, 4, 9)
    table = reader.read_rows(url, file, 0, 8, SCHEMA.names)
    assert table.column("custom_id").to_pylist() == list("abcdefgh")
    assert table.column("line").to_pylist() == [1, 2, 3, 4, 7, 8, 9, 10]
    assert table.column("request").to_pylist() == [request(c).encode() for c in "abcdefgh"]
    for start in range(8):
        assert reader.read_rows(url, file, start, 2, ["line"]).column(0).to_pylist() \
            == [1, 2, 3, 4, 7, 8, 9, 10][start:start + 2]
    (tmp_path / "lead.jsonl").write_bytes(b"\n" + request("x").encode())  # no final newline
    [lead] = planned(reader, str(tmp_path / "lead.jsonl"))
    assert lead.num_rows == 1 and (lead.offsets, lead.unit_lines) == ((1,), (2,))
    assert reader.read_rows(lead.url, lead, 0, 1, ["line", "custom_id"]).to_pylist() \
        == [{"line": 2, "custom_id": "x"}]


def test_bad_lines_get_synthesized_ids_and_keep_their_bytes(tmp_path, reader):
    bad = [b'{"custom_id": "ok", "body": {}}', b'{"custom_id": "half', b'["custom_id", "x"]',
           b'{"body": {"model": "m"}}', b'{"custom_id": 7}', b'{"custom_id": ""}',
           b'{"custom_id": "caf\xe9"}', b'{"custom_id": "\\ud800"}', b"\xef\xbb\xbf" + request("bom").encode()]
    (tmp_path / "sub").mkdir()
    url = write(tmp_path / "sub" / "in.jsonl", bad)
    [file] = planned(reader, str(tmp_path))
    assert file.name == "sub/in.jsonl"
    table = reader.read_rows(url, file, 0, len(bad), ["custom_id", "request"])
    assert table.column("custom_id").to_pylist() == [
        "ok", "sub/in.jsonl:2", "sub/in.jsonl:3", "sub/in.jsonl:4", "sub/in.jsonl:5",
        "sub/in.jsonl:6", "sub/in.jsonl:7", "sub/in.jsonl:8", "bom"]
    assert table.column("request").to_pylist() == bad
    ids = reader.scan(url, file, lambda f, facts, read_column: read_column("custom_id"))
    assert ids.to_pylist() == table.column("custom_id").to_pylist()


def test_census_counts_request_fields(tmp_path, reader, monkeypatch):
    lines = [request("a"), request("b", temperature=0), request("c", model="m2"),
             json.dumps({"custom_id": "d", "method": "GET", "url": "/v1/embeddings",
                         "body": {"model": None, "input": "x"}}),
             json.dumps({"custom_id": "e", "body": "not an object"}), "not json", "[1]"]
    facts = reader.facts(write(tmp_path / "in.jsonl.gz", lines))
    assert facts.census == {
        "method": {"POST": 3, "GET": 1},
        "url": {"/v1/chat/completions": 3, "/v1/embeddings": 1},
        "model": {"m1": 2, "m2": 1},  # a null model is no model, as OpenAI reads it
        "body_field": {"model": 4, "messages": 3, "temperature": 1, "input": 1},
    }
    monkeypatch.setattr(openai_batch, "CENSUS_MAX_VALUES", 2)
    facts = reader.facts(write(tmp_path / "many.jsonl", [request(str(i), model=f"m{i}") for i in range(5)]))
    assert facts.census["model"] == {"m0": 1, "m1": 1, "<other>": 3}


def test_an_unreadable_gzip_file_is_an_input_error(tmp_path, reader):
    (tmp_path / "bad.jsonl.gz").write_bytes(b'{"custom_id": "plain, not gzip"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl.gz' is not a readable gzip file"):
        reader.facts(str(tmp_path / "bad.jsonl.gz"))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(request("a").encode() * 100)[:-20])
    with pytest.raises(InputError, match=r"cut.jsonl.gz' is not a readable gzip file"):
        reader.facts(str(tmp_path / "cut.jsonl.gz"))
    url = write(tmp_path / "in.jsonl", [request("a")])
    with pytest.raises(InputError, match=r"no column 'prompt'; expected one of custom_id, line"):
        reader.read_rows(url, InputFile(url, "in.jsonl", "", 0, 1, (1,)), 0, 1, ["prompt"])


def test_gzip_is_found_by_magic_bytes_too(tmp_path, reader):
    (tmp_path / "in.jsonl").write_bytes(gzip.compress(f"{request('z')}\n".encode()))
    [file] = planned(reader, str(tmp_path))
    assert file.num_rows == 1 and file.offsets == ()
    assert reader.read_rows(file.url, file, 0, 1, ["custom_id"]).column(0).to_pylist() == ["z"]


@pytest.mark.parametrize("whole_file_bytes", [base.WHOLE_FILE_BYTES, 0])  # fetched whole, by URL
def test_read_shard_across_a_plain_and_a_gzip_file(tmp_path, reader, small_units, monkeypatch,
                                                   whole_file_bytes):
    monkeypatch.setattr(base, "WHOLE_FILE_BYTES", whole_file_bytes)
    write(tmp_path / "a.jsonl", [request(f"a{i}") for i in range(7)])
    write(tmp_path / "b.jsonl.gz", [request(f"b{i}") for i in range(5)])
    files = planned(reader, str(tmp_path))
    assert [(f.name, f.num_rows, len(f.offsets)) for f in files] == [("a.jsonl", 7, 3), ("b.jsonl.gz", 5, 0)]
    shard = Shard(0, (Piece(0, 4, 3), Piece(1, 1, 3)))
    schema = pa.schema([("custom_id", pa.large_string()), ("line", pa.int64())])
    table = reader.read_shard(files, shard, schema)
    assert table.schema == schema
    assert table.to_pydict() == {"custom_id": ["a4", "a5", "a6", "b1", "b2", "b3"],
                                 "line": [5, 6, 7, 2, 3, 4]}
    write(tmp_path / "a.jsonl", [request(f"a{i}") for i in range(3)])
    with pytest.raises(storage.InputChanged, match="a.jsonl' changed"):
        reader.read_shard(files, shard, schema)


def test_read_shard_from_s3_seeks_in_the_pinned_object(tmp_path, s3, small_units):
    reader = readers.reader_for("openai_batch", storage=StorageConfig(endpoint_url=s3.endpoint))
    (tmp_path / "local").mkdir()
    write(tmp_path / "local" / "a.jsonl", [request(f"a{i}") for i in range(7)])
    write(tmp_path / "local" / "b.jsonl.gz", [request(f"b{i}") for i in range(5)])
    url = s3.upload_dir(tmp_path / "local", "in/")
    files = planned(reader, url)
    assert [(f.name, f.num_rows, len(f.offsets)) for f in files] == [("a.jsonl", 7, 3), ("b.jsonl.gz", 5, 0)]
    table = reader.read_shard(files, Shard(0, (Piece(0, 6, 1), Piece(1, 0, 2))), SCHEMA)
    assert table.column("custom_id").to_pylist() == ["a6", "b0", "b1"]
    assert table.column("request").to_pylist()[0] == request("a6").encode()


def test_plan_records_offsets_and_reads_older_plans_without_them(tmp_path, reader, small_units):
    url = write(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(7)])
    files = planned(reader, url)
    plan = Plan(files=files, shards=cut_shards(files, 3), settings={}, input_schema="",
                rows_per_shard=3)
    assert Plan.from_json(plan.to_json()).files == files
    record = json.loads(plan.to_json())
    for f in record["files"]:
        del f["offsets"]
    assert Plan.from_json(json.dumps(record)).files[0].offsets == ()
