"""Parquet input: facts from footers (no row data read), rows by whole row groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer import storage
from batchinfer.readers.base import FileFacts, InputError, Reader

if TYPE_CHECKING:
    from batchinfer.config import StorageConfig
    from batchinfer.plan import InputFile



def open_parquet(source: str | IO[bytes], cfg: StorageConfig | None) -> pq.ParquetFile:
    """A ParquetFile on a URL (pyarrow's native I/O, see storage.arrow_file) or on an open
    binary file (left open when the ParquetFile closes)."""
    if isinstance(source, str):
        filesystem, source = storage.arrow_file(source, cfg)
        return pq.ParquetFile(source, filesystem=filesystem, pre_buffer=True)
    return pq.ParquetFile(source, pre_buffer=True)


class ParquetReader(Reader):
    name = "parquet"
    label = "Parquet"
    suffixes = (".parquet", ".parq", ".pq")

    def facts(self, source: str | IO[bytes]) -> FileFacts:
        """The footer: a ranged read of the file's tail, no row data."""
        try:
            with open_parquet(source, self.storage) as pf:
                meta, schema = pf.metadata, pf.schema_arrow
        except pa.ArrowInvalid as e:
            raise InputError(
                f"input file {_name(source)!r} is not a readable Parquet file ({e}); "
                "expected a complete Parquet file") from None
        return FileFacts(
            num_rows=meta.num_rows,
            units=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
            schema=schema,
            null_free=_null_free(meta, schema),
        )

    def read_rows(self, source: str | IO[bytes], file: InputFile, start: int, num_rows: int,
                  columns: Sequence[str]) -> pa.Table:
        """The row groups holding the rows, sliced to them."""
        groups, skip = file.row_groups_for(start, num_rows)
        with open_parquet(source, self.storage) as pf:
            table = pf.read_row_groups(groups, columns=list(columns))
        return table.slice(skip, num_rows)


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
