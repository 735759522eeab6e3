"""OpenAI Batch API input files: JSONL, one request a line
(`{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`).

This reader is format-level only: a row is a non-blank line, kept as its raw bytes with its
line number and custom_id; what the request asks for is parsed later, and a line that is not a
usable request becomes that row's error then, never an error here. Columns (SCHEMA):

- `custom_id` (string, never null): the line's `custom_id` when the line is a JSON object and
  that is a non-empty string; otherwise (not UTF-8, not JSON, not an object, no such string)
  "<file name>:<line>", the file's name relative to the input root.
- `line` (int64): the line's physical line number in the file, from 1; blank lines count.
- `request` (binary): the line's bytes, without "\\n" or "\\r\\n".

Planning reads each file once, whole (`scan`: facts, census and the custom_id column from one
pass, each line parsed once), keeping the ids and one offset per UNIT_ROWS rows, never the
lines. A shard of a plain file seeks to the unit holding its first row (FileFacts.offsets).
A gzip file (a name ending in ".gz", or gzip's magic bytes first) cannot seek: every shard of
it decompresses it from its start, so a big one costs its shard count times its size in
reads. Split big gzip files, or store them plain.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from batchinfer.readers.base import FileFacts, InputError, ReadColumn, Reader

if TYPE_CHECKING:
    from batchinfer.plan import InputFile

T = TypeVar("T")

UNIT_ROWS = 256
"""Rows in each read unit (FileFacts.units; the last may hold fewer). A shard of a plain file
seeks to the unit holding its first row and skips at most UNIT_ROWS - 1 lines; planning keeps
one offset (an int) a unit."""
READ_BYTES = 1 << 20
"""Bytes read at once; lines are split out of these blocks (fsspec's `readline` reads a whole
block a line, copying megabytes for each)."""
ID_BATCH = 8_192
"""custom_id values held as Python strings at once while planning, before they become one
Arrow chunk."""
CENSUS_MAX_VALUES = 1_000
"""Distinct values counted under each census key; rows with further values count as
CENSUS_OTHER, so the census stays small whatever the file holds."""
CENSUS_OTHER = "<other>"
GZIP_MAGIC = b"\x1f\x8b"

SCHEMA = pa.schema([("custom_id", pa.string()), ("line", pa.int64()), ("request", pa.binary())])
"""The columns of every file of this format."""


class OpenAIBatchReader(Reader):
    """OpenAI Batch JSONL (see the module docstring). FileFacts.census holds, over the lines
    that are JSON objects: {"method": {value: rows}, "url": {...}, "model": {body.model: rows},
    "body_field": {each top-level key of body: rows}}; a string value counts as itself, any
    other as its JSON text ("null"); a line without the key is not counted."""

    name = "openai_batch"
    label = "OpenAI Batch JSONL"
    suffixes = (".jsonl", ".jsonl.gz")

    def facts(self, source: str | IO[bytes]) -> FileFacts:
        """Reads the whole file (decompressing gzip). Raises InputError for a gzip file that
        cannot be decompressed; storage errors propagate."""
        with self.open_binary(source) as f:
            return _read_whole(f, _name(source), None)[0]

    def scan(self, source: str | IO[bytes], file: InputFile,
             visit: Callable[[InputFile, FileFacts, ReadColumn], T]) -> T:
        """One pass over the file for the facts and the custom_id and line columns (kept as
        Arrow arrays, not the lines); any other column is read again from the same file."""
        with self.open_binary(source) as f:
            facts, held = _read_whole(f, _name(source), file.name)
            whole = replace(file, num_rows=facts.num_rows, row_groups=facts.units,
                            offsets=facts.offsets, unit_lines=facts.unit_lines)

            def read_column(name: str) -> pa.ChunkedArray:
                if name in held:
                    return held[name]
                return self.read_rows(f, whole, 0, facts.num_rows, [name]).column(0)

            return visit(file, facts, read_column)

    def read_rows(self, source: str | IO[bytes], file: InputFile, start: int, num_rows: int,
                  columns: Sequence[str]) -> pa.Table:
        """Seeks to the unit holding row `start` (a plain file), or reads from the file's start
        (gzip, or a plan without offsets), skipping lines up to `start`.
        Raises InputError for a column not in SCHEMA or a gzip file that cannot be
        decompressed."""
        if missing := [c for c in columns if c not in SCHEMA.names]:
            raise InputError(f"input file {file.url!r} has no column {', '.join(map(repr, missing))}; "
                             f"expected one of {', '.join(SCHEMA.names)} (OpenAI Batch JSONL)")
        with self.open_binary(source) as f, _rows_from(f, file, start) as rows:
            return _table(file.name, itertools.islice(rows, num_rows)).select(list(columns))


# ---------------------------------------------------------------------- lines


def _physical_lines(f: IO[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes without the "\\n") of every line from f's position on, that
    position being `offset` in the file; a last line without "\\n" too."""
    pending: list[bytes] = []
    while chunk := f.read(READ_BYTES):
        parts = chunk.split(b"\n")
        tail = parts.pop()
        if parts and pending:
            parts[0] = b"".join([*pending, parts[0]])
            pending = []
        for part in parts:
            yield offset, part
            offset += len(part) + 1
        if tail:
            pending.append(tail)
    if pending:
        yield offset, b"".join(pending)


def _rows(f: IO[bytes], offset: int, line: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes without "\\n" or "\\r\\n") of every non-blank line from
    f's position on, that position being `offset` in the file and the start of line `line`."""
    for number, (at, raw) in enumerate(_physical_lines(f, offset), start=line):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw and not raw.isspace():
            yield number, at, raw


@contextlib.contextmanager
def _decoded(f: IO[bytes], url: str) -> Iterator[tuple[IO[bytes], bool]]:
    """`f` from its start, decompressed if it is gzip (by name or magic bytes), and whether it
    is plain (its offsets are positions in the file). `f` stays open. Raises InputError for
    a gzip stream that cannot be decompressed."""
    f.seek(0)
    compressed = url.endswith(".gz") or f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    f.seek(0)
    if not compressed:
        yield f, True
        return
    with gzip.GzipFile(fileobj=f, mode="rb") as stream:  # closing it leaves `f` open
        try:
            yield stream, False
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InputError(f"input file {url!r} is not a readable gzip file ({e}); expected "
                             "complete gzip-compressed OpenAI Batch JSONL") from None


@contextlib.contextmanager
def _rows_from(f: IO[bytes], file: InputFile, start: int) -> Iterator[Iterator[tuple[int, int, bytes]]]:
    """The rows of `file` (`_rows`) from row `start` on, through the closest offset."""
    if not file.offsets or len(file.unit_lines) != len(file.offsets):
        with _decoded(f, file.url) as (stream, _):
            yield itertools.islice(_rows(stream, 0, 1), start, None)
        return
    offset, line, first, row = file.offsets[0], file.unit_lines[0], 0, 0
    for at, number, n in zip(file.offsets, file.unit_lines, file.row_groups, strict=False):
        if row > start:
            break
        offset, line, first = at, number, row
        row += n
    f.seek(offset)
    yield itertools.islice(_rows(f, offset, line), start - first, None)


# ---------------------------------------------------------------------- rows


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The line's JSON object, or None (not UTF-8, not JSON, not an object). A UTF-8 byte
    order mark before it is ignored."""
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _custom_id(obj: dict[str, Any] | None, name: str, line: int) -> str:
    """The request's custom_id, or "<name>:<line>" when it has no usable one."""
    value = obj.get("custom_id") if obj is not None else None
    if isinstance(value, str) and value:
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" escaped): not Arrow text
            pass
    return f"{name}:{line}"


def _table(name: str, rows: Iterator[tuple[int, int, bytes]]) -> pa.Table:
    """SCHEMA's columns of these rows (`_rows`) of the file named `name`."""
    lines: list[int] = []
    raws: list[bytes] = []
    for line, _, raw in rows:
        lines.append(line)
        raws.append(raw)
    ids = [_custom_id(_parse(raw), name, line) for line, raw in zip(lines, raws, strict=True)]
    return pa.table([pa.array(ids, pa.string()), pa.array(lines, pa.int64()),
                     pa.array(raws, pa.binary())], schema=SCHEMA)


def _units(num_rows: int) -> tuple[int, ...]:
    full, rest = divmod(num_rows, UNIT_ROWS)
    return (UNIT_ROWS,) * full + ((rest,) if rest else ())


# ---------------------------------------------------------------------- planning


@dataclass
class _Census:
    """Counts of request fields (see OpenAIBatchReader), at most CENSUS_MAX_VALUES each."""

    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {} for k in ("method", "url", "model", "body_field")})

    def add(self, obj: dict[str, Any]) -> None:
        self._value("method", obj, "method")
        self._value("url", obj, "url")
        body = obj.get("body")
        if isinstance(body, dict):
            self._value("model", body, "model")
            for key in body:
                self._count("body_field", key)

    def _value(self, what: str, obj: dict[str, Any], key: str) -> None:
        if obj.get(key) is not None:  # null is no value, as OpenAI reads it
            value = obj[key]
            self._count(what, value if isinstance(value, str) else json.dumps(value))

    def _count(self, what: str, value: str) -> None:
        counts = self.counts[what]
        if value not in counts and len(counts) >= CENSUS_MAX_VALUES:
            value = CENSUS_OTHER
        counts[value] = counts.get(value, 0) + 1


@dataclass
class _Pass:
    """What one pass over a whole file collects: rows, offsets, census, and where `name` (the
    file's name, for synthesized ids) is given, the custom_id and line columns."""

    name: str | None
    plain: bool
    num_rows: int = 0
    offsets: list[int] = field(default_factory=list)
    unit_lines: list[int] = field(default_factory=list)
    census: _Census = field(default_factory=_Census)
    ids: list[str] = field(default_factory=list)
    id_chunks: list[pa.Array] = field(default_factory=list)
    lines: array = field(default_factory=lambda: array("q"))

    def add(self, line: int, offset: int, raw: bytes) -> None:
        row = self.num_rows
        if self.plain and row % UNIT_ROWS == 0:  # a unit starts: where, and at which line
            self.offsets.append(offset)
            self.unit_lines.append(line)
        obj = _parse(raw)
        if obj is not None:
            self.census.add(obj)
        if self.name is not None:
            self.ids.append(_custom_id(obj, self.name, line))
            self.lines.append(line)
            if len(self.ids) >= ID_BATCH:
                self._flush()
        self.num_rows += 1

    def _flush(self) -> None:
        self.id_chunks.append(pa.array(self.ids, pa.string()))
        self.ids = []

    def facts(self) -> FileFacts:
        return FileFacts(num_rows=self.num_rows, units=_units(self.num_rows), schema=SCHEMA,
                         null_free=frozenset(SCHEMA.names), offsets=tuple(self.offsets),
                         unit_lines=tuple(self.unit_lines),
                         census={k: dict(v) for k, v in self.census.counts.items()})

    def columns(self) -> dict[str, pa.ChunkedArray]:
        """custom_id and line, when kept (`name` given)."""
        if self.name is None:
            return {}
        self._flush()
        return {"custom_id": pa.chunked_array(self.id_chunks, pa.string()),
                "line": pa.chunked_array([np.frombuffer(self.lines, np.int64)], pa.int64())}


def _read_whole(f: IO[bytes], url: str, name: str | None
                ) -> tuple[FileFacts, dict[str, pa.ChunkedArray]]:
    """The facts of the whole of `f` (the file at `url`) and, where `name` is given, its
    custom_id and line columns. Raises InputError for a gzip file that cannot be read."""
    with _decoded(f, url) as (stream, plain):
        one = _Pass(name, plain)
        for row in _rows(stream, 0, 1):
            one.add(*row)
    return one.facts(), one.columns()


def _name(source: str | IO[bytes]) -> str:
    return source if isinstance(source, str) else str(getattr(source, "path", source))
