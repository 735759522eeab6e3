"""The input-format seam: one `Reader` per file format, found by name in `batchinfer.readers`.

A reader lists the input files a URL names, reports each file's row counts and columns for
planning, and reads the rows of a shard. Subclasses only need to implement `facts` and
`read_rows`, and name their file suffixes; listing (run directories skipped, version tags),
threading, pinned reads, row-count checks and error wrapping are done here, the same way for
every format. A format may also implement `scan`, planning's one pass over a file (facts and
the id column from one open); the default does it with `facts` and `read_rows`.

Rows are always Arrow tables; the planner unifies column types across files (plan.py).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar

import pyarrow as pa

from batchinfer import atomic, storage

if TYPE_CHECKING:  # plan.py imports readers; these are only annotations here
    from batchinfer.config import StorageConfig
    from batchinfer.plan import InputFile, Piece, Shard

FACTS_READ_THREADS = 32
"""Files read at once while planning (facts, such as footers, and ids)."""
PIECE_READ_THREADS = 8
"""Files of one shard read at once (a shard may span many small files)."""
WHOLE_FILE_BYTES = 2 << 20
"""Planning fetches a file of up to this many bytes whole, in one request pinned to its listed
version (`atomic.fetch_pinned`), and takes its facts and id column from memory. Reading a
footer and a column by ranges costs three requests (size, footer, column) on an object store
where each waits ~20-50 ms for its first byte, about what 2 MiB take to arrive; a larger
file is read by ranges, so planning does not download whole datasets of big files. At most
FACTS_READ_THREADS such files are held at once."""

T = TypeVar("T")

ReadColumn = Callable[[str], pa.ChunkedArray]
"""A whole column of the file being scanned, by name, as written."""


class InputError(ValueError):
    """Input files that cannot be used as planned; the message names the file and column."""


@dataclass(frozen=True)
class FileFacts:
    """What planning needs to know of one input file, read without reading its rows where
    the format allows it (Parquet: the footer)."""

    num_rows: int
    units: tuple[int, ...]
    """Rows in each unit the file is read in (Parquet: row groups), in order; they sum to
    `num_rows`. Shards are cut at unit boundaries, and a unit much larger than the shard
    target is split into row ranges (plan.cut_shards), so a format without such units gives
    one unit of `num_rows` (or none for an empty file)."""
    schema: pa.Schema
    """The file's columns as written; the planner checks and unifies their types."""
    null_free: frozenset[str] = frozenset()
    """Columns the file's own metadata proves hold no null (Parquet column statistics):
    the id check need not read them when duplicate ids are allowed."""
    offsets: tuple[int, ...] = ()
    """Byte offset in the file where the first row of each unit starts, for formats read as
    a byte stream, so a shard seeks to its rows (`plan.InputFile.offsets`); none for Parquet
    (row groups are found in the footer) and streams that cannot seek (compressed files)."""
    unit_lines: tuple[int, ...] = ()
    """With `offsets`: the line number (from 1) of each unit's first row, for formats whose
    rows are lines and may skip some (blank lines)."""
    census: Mapping[str, Mapping[str, int]] = field(default_factory=dict, hash=False)
    """Counts of values the format cares about, taken while the file was read whole for its
    facts: {what: {value: rows}}; the reader says which. Empty where nothing was counted."""


class FetchedFile(io.BytesIO):
    """A file fetched whole into memory, named by its URL (`path`) as an open file on
    storage is, so messages about it name the file."""

    def __init__(self, data: bytes, path: str):
        super().__init__(data)
        self.data = data
        """The bytes, for readers that can take them without a Python call per read."""
        self.path = path


class Reader:
    """Reads one input file format. Subclasses only need to implement `facts` and
    `read_rows`, and set `name`, `label` and `suffixes`.

    `source`, in the methods to implement, is either the file's URL (open it through
    `open_binary` or `storage`, with `self.storage` settings) or an already open binary file
    (an S3 object pinned to the planned version, see `atomic.read_pinned`, or a small file
    fetched whole while planning, a `FetchedFile`); do not close a file you were given. An
    open file's `path`, where it has one, names it in messages.
    """

    name: ClassVar[str] = ""
    """The registry name (`batchinfer.readers.READERS`)."""
    label: ClassVar[str] = ""
    """The format as messages name it ("Parquet")."""
    suffixes: ClassVar[tuple[str, ...]] = ()
    """File name endings listed as input under a folder or glob (".parquet")."""

    def __init__(self, *, storage: StorageConfig | None = None):
        self.storage = storage

    # ------------------------------------------------------------------ to implement

    def facts(self, source: str | IO[bytes]) -> FileFacts:
        """Row counts, read units and columns of one file.

        Raises InputError when the file is not of this format (name the file and say what
        was expected); storage errors propagate (the caller names the setting).
        """
        raise NotImplementedError

    def read_rows(self, source: str | IO[bytes], file: InputFile, start: int, num_rows: int,
                  columns: Sequence[str]) -> pa.Table:
        """Rows [start, start + num_rows) of `file` (its facts are in `file.row_groups`), with
        only `columns`, in that order, as written (no type unification). Fewer rows than
        asked means the file changed; the caller reports it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ may implement

    def scan(self, source: str | IO[bytes], file: InputFile,
             visit: Callable[[InputFile, FileFacts, ReadColumn], T]) -> T:
        """Planning's one pass over a file: `visit(file, facts, read_column)` while the file
        is open, where `read_column(name)` is a whole column as written; returns what `visit`
        returns. `file` is passed through (its own facts may not be filled in yet).

        This default is `facts`, then `read_rows` on the same source (an open file is
        rewound first); a format that can take both from one open of the file (Parquet: one
        footer) overrides it.
        """
        facts = self.facts(source)
        whole = replace(file, num_rows=facts.num_rows, row_groups=facts.units)

        def read_column(name: str) -> pa.ChunkedArray:
            if not isinstance(source, str):
                source.seek(0)
            return self.read_rows(source, whole, 0, facts.num_rows, [name]).column(0)

        return visit(file, facts, read_column)

    # ------------------------------------------------------------------ provided

    def list_files(self, url: str) -> tuple[storage.Location, list[dict[str, Any]]]:
        """Every input file of this format a URL names (storage.list_files with this reader's
        suffixes), sorted, with its fsspec info; `storage.version_tag(info)` is its version."""
        return storage.list_files(url, self.storage, self.suffixes, self.label)

    def read_facts(self, urls: Sequence[str]) -> list[FileFacts]:
        """`facts` of many files, read in parallel (FACTS_READ_THREADS), in order; storage
        errors become StorageError naming the file and input.path."""
        def one(url: str) -> FileFacts:
            with storage.errors(url, "input.path"):
                return self.facts(url)

        with ThreadPoolExecutor(min(FACTS_READ_THREADS, max(len(urls), 1))) as pool:
            return list(pool.map(one, urls))

    def scan_files(self, files: Sequence[InputFile],
                   visit: Callable[[InputFile, FileFacts, ReadColumn], T]) -> list[T]:
        """`scan` every file, FACTS_READ_THREADS at once, in order: planning's one read of
        each file (facts and the id column together). Storage errors become StorageError
        naming the file and input.path.

        A file of up to WHOLE_FILE_BYTES (by `file.size`) is fetched whole in one request at
        exactly `file.version` (InputChanged otherwise) and scanned in memory; a larger one is
        scanned through its URL, by ranges, as `facts` and `read_rows` read it.
        """
        def one(file: InputFile) -> T:
            with storage.errors(file.url, "input.path"):
                if file.size is None or file.size > WHOLE_FILE_BYTES:
                    return self.scan(file.url, file, visit)
                data = atomic.fetch_pinned(file.url, file.version, self.storage, planning=True)
                return self.scan(FetchedFile(data, file.url), file, visit)

        with ThreadPoolExecutor(min(FACTS_READ_THREADS, max(len(files), 1))) as pool:
            return list(pool.map(one, files))

    def read_column(self, file: InputFile, column: str) -> pa.ChunkedArray:
        """One column of a whole file, as written."""
        with storage.errors(file.url, "input.path"):
            return self.read_rows(file.url, file, 0, file.num_rows, [column]).column(0)

    def first_rows(self, file: InputFile, columns: Sequence[str], n: int) -> pa.Table:
        """Up to `n` first rows of a file, with `columns` as written (previews, prompt checks)."""
        with storage.errors(file.url, "input.path"):
            return self.read_rows(file.url, file, 0, min(n, file.num_rows), columns)

    def read_shard(self, files: Sequence[InputFile], shard: Shard, schema: pa.Schema) -> pa.Table:
        """A shard's rows with the columns of `schema`, cast to it (the plan's unified types).

        Each file is read at exactly the version the plan recorded (storage.InputChanged
        otherwise, which stops the run); a shard of many small files reads them
        PIECE_READ_THREADS at a time.
        """
        if len(shard.pieces) == 1:
            return self._read_piece(files, shard, shard.pieces[0], schema)
        with ThreadPoolExecutor(min(PIECE_READ_THREADS, len(shard.pieces))) as pool:
            return pa.concat_tables(pool.map(lambda p: self._read_piece(files, shard, p, schema),
                                             shard.pieces))

    def _read_piece(self, files: Sequence[InputFile], shard: Shard, piece: Piece,
                    schema: pa.Schema) -> pa.Table:
        file = files[piece.file]
        table = atomic.read_pinned(
            file.url, file.version, self.storage,
            lambda source: self.read_rows(source, file, piece.row_start, piece.num_rows, schema.names))
        if table.num_rows != piece.num_rows:
            raise storage.InputChanged(
                f"input file {file.url!r} has {table.num_rows} rows from row {piece.row_start} where "
                f"shard {shard.name} expects {piece.num_rows}; it changed since the plan was made")
        return table.cast(schema)

    @contextlib.contextmanager
    def open_binary(self, source: str | IO[bytes]) -> Iterator[IO[bytes]]:
        """A binary file for `source`: the one given, or the URL opened through fsspec
        (closed afterwards). For formats read as a byte stream."""
        if not isinstance(source, str):
            yield source
            return
        loc = storage.locate(source, self.storage)
        with loc.fs.open(loc.path, "rb") as f:
            yield f
