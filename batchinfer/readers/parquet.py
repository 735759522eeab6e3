"""Parquet input: facts from footers (no row data read), rows by whole row groups; planning's
one pass takes the footer and the id column from one open file."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer import storage
from batchinfer.readers.base import FetchedFile, FileFacts, InputError, ReadColumn, Reader

if TYPE_CHECKING:
    from batchinfer.config import StorageConfig
    from batchinfer.plan import InputFile

T = TypeVar("T")


def open_parquet(source: str | IO[bytes], cfg: StorageConfig | None) -> pq.ParquetFile:
    """A ParquetFile on a URL (pyarrow's native I/O, see storage.arrow_file) or on an open
    binary file (left open when the ParquetFile closes)."""
    if isinstance(source, str):
        filesystem, source = storage.arrow_file(source, cfg)
        return pq.ParquetFile(source, filesystem=filesystem, pre_buffer=True)
    if isinstance(source, FetchedFile):  # in memory: read in place, not through Python calls
        return pq.ParquetFile(pa.BufferReader(source.data), pre_buffer=True)
    return pq.ParquetFile(source, pre_buffer=True)


class ParquetReader(Reader):
    name = "parquet"
    label = "Parquet"
    suffixes = (".parquet", ".parq", ".pq")

    def facts(self, source: str | IO[bytes]) -> FileFacts:
        """The footer: a ranged read of the file's tail, no row data."""
        with contextlib.ExitStack() as stack:
            return _open(stack, source, self.storage)[1]

    def scan(self, source: str | IO[bytes], file: InputFile,
             visit: Callable[[InputFile, FileFacts, ReadColumn], T]) -> T:
        """Facts from the footer and columns read through the same open file (one footer
        read, where `facts` then `read_rows` would read it twice)."""
        with contextlib.ExitStack() as stack:
            pf, facts = _open(stack, source, self.storage)
            return visit(file, facts, lambda name: pf.read(columns=[name]).column(0))

    def read_rows(self, source: str | IO[bytes], file: InputFile, start: int, num_rows: int,
                  columns: Sequence[str]) -> pa.Table:
        """The row groups holding the rows, sliced to them."""
        groups, skip = file.row_groups_for(start, num_rows)
        with open_parquet(source, self.storage) as pf:
            table = pf.read_row_groups(groups, columns=list(columns))
        return table.slice(skip, num_rows)


def _open(stack: contextlib.ExitStack, source: str | IO[bytes],
          cfg: StorageConfig | None) -> tuple[pq.ParquetFile, FileFacts]:
    """`open_parquet` (closed with `stack`) and the facts in its footer; InputError naming
    the file if the footer cannot be read."""
    try:
        pf = stack.enter_context(open_parquet(source, cfg))
        return pf, _facts(pf)
    except pa.ArrowInvalid as e:
        raise InputError(
            f"input file {_name(source)!r} is not a readable Parquet file ({e}); "
            "expected a complete Parquet file") from None


def _facts(pf: pq.ParquetFile) -> FileFacts:
    meta, schema = pf.metadata, pf.schema_arrow
    return FileFacts(
        num_rows=meta.num_rows,
        units=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
        schema=schema,
        null_free=_null_free(meta, schema),
    )


def _null_free(meta: pq.FileMetaData, schema: pa.Schema) -> frozenset[str]:
    """Top-level columns whose statistics, in every row group, count zero nulls."""
    free = set(schema.names)
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        chunks = {group.column(j).path_in_schema: group.column(j) for j in range(group.num_columns)}
        for name in list(free):
            chunk = chunks.get(name)
            stats = chunk.statistics if chunk is not None else None
            if stats is None or not stats.has_null_count or stats.null_count:
                free.discard(name)
    return frozenset(free)


def _name(source: str | IO[bytes]) -> str:
    return source if isinstance(source, str) else str(getattr(source, "path", source))
