"""The plan: which input files, which shards, and the fingerprint of everything that shapes results.

`cut_shards` is a pure, deterministic function of file row-group sizes; `make_plan` adds
the I/O (listing, one read of each file for its footer and ids: the input format's reader,
see readers/) around it. A plan is made once per run, saved in the run directory and reused
on resume.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchinfer import model_refs, readers, registry, storage
from batchinfer.config import Config
from batchinfer.fingerprint import fingerprinted
from batchinfer.readers import FileFacts, InputError, ReadColumn, Reader  # also plan.InputError
from batchinfer.readers.openai_batch import SCHEMA as OPENAI_BATCH_SCHEMA
from batchinfer.records import now_iso

log = logging.getLogger(__name__)

PLAN_VERSION = 2


@dataclass(frozen=True)
class InputFile:
    url: str
    """Full URL (or absolute local path) of the file."""
    name: str
    """Path relative to the input root; synthesized ids are "<name>:<row>"."""
    version: str
    """ETag on object stores, size+mtime on local disks."""
    size: int
    """Bytes."""
    num_rows: int
    row_groups: tuple[int, ...]
    """Rows in each row group."""
    offsets: tuple[int, ...] = ()
    """Byte offset where the first row of each row group (read unit) starts, for formats read
    as a byte stream (FileFacts.offsets), so a shard seeks to its rows; none for Parquet and
    compressed files."""
    unit_lines: tuple[int, ...] = ()
    """With `offsets`: the line number of each unit's first row (FileFacts.unit_lines)."""

    def row_groups_for(self, start: int, num_rows: int) -> tuple[list[int], int]:
        """Row groups covering rows [start, start+num_rows) and the offset of `start` in the first."""
        groups, first_row, row = [], 0, 0
        for i, n in enumerate(self.row_groups):
            if row + n > start and row < start + num_rows:
                if not groups:
                    first_row = row
                groups.append(i)
            row += n
        return groups, start - first_row


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one input file."""
    file: int
    """Index into Plan.files."""
    row_start: int
    num_rows: int


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]
    """The shard's rows, in order: row k of the shard is row k of these pieces put end to end.
    Several small files share one shard, so part files follow rows, not files (issue 9)."""

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.pieces)

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"


@dataclass
class Plan:
    files: list[InputFile]
    shards: list[Shard]
    settings: dict[str, Any]
    """Everything that shapes results, except the input files (see `fingerprint`)."""
    input_schema: str
    """Arrow schema (IPC, base64) of the input columns the run reads."""
    rows_per_shard: int
    """The target the shards were cut for."""
    created_at: str = field(default_factory=now_iso)
    version: int = PLAN_VERSION

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files, self.settings)

    @property
    def total_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.input_schema)))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "fingerprint": self.fingerprint}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        if d.get("version") not in (1, PLAN_VERSION):
            raise InputError(f"plan record version {d.get('version')!r} is not supported "
                             f"(expected 1 or {PLAN_VERSION})")
        d.pop("fingerprint", None)
        d["files"] = [InputFile(**{**f, "row_groups": tuple(f["row_groups"]),
                                   "offsets": tuple(f.get("offsets", ())),
                                   "unit_lines": tuple(f.get("unit_lines", ()))}) for f in d["files"]]
        if d["version"] == 1:  # one row range of one file per shard: run directories of older releases
            d["shards"] = [{"index": s["index"], "pieces": [{k: s[k] for k in ("file", "row_start", "num_rows")}]}
                           for s in d["shards"]]
            d["version"] = PLAN_VERSION
        d["shards"] = [Shard(s["index"], tuple(Piece(**p) for p in s["pieces"])) for s in d["shards"]]
        return cls(**d)


def cut_shards(files: list[InputFile], rows_per_shard: int) -> list[Shard]:
    """Cut the files, in order, into shards of whole row groups near `rows_per_shard` rows.

    Row groups are taken one after another across file boundaries, so many small files
    share a shard and the part count follows rows, not files. A row group is added to the
    current shard when that brings it closer to the target; a row group much larger than
    the target is split into even row ranges instead.
    """
    shards: list[Shard] = []
    pieces: list[Piece] = []
    size = 0  # rows in `pieces`

    def add(fi: int, start: int, n: int) -> None:
        nonlocal size
        size += n
        last = pieces[-1] if pieces else None
        if last and last.file == fi and last.row_start + last.num_rows == start:
            pieces[-1] = Piece(fi, last.row_start, last.num_rows + n)
        else:
            pieces.append(Piece(fi, start, n))

    def close() -> None:
        nonlocal size
        size = 0
        if pieces:
            shards.append(Shard(len(shards), tuple(pieces)))
            pieces.clear()

    for fi, f in enumerate(files):
        row = 0
        for n in f.row_groups:
            if n > rows_per_shard * 1.5:
                close()
                count = math.ceil(n / rows_per_shard)
                for k in range(count):
                    a, b = row + n * k // count, row + n * (k + 1) // count
                    shards.append(Shard(len(shards), (Piece(fi, a, b - a),)))
            else:
                if size and abs(size + n - rows_per_shard) > abs(size - rows_per_shard):
                    close()
                if n:
                    add(fi, row, n)
            row += n
    close()
    return shards


def fingerprint(files: list[InputFile], settings: dict[str, Any]) -> str:
    inputs = [[f.name, f.version, f.num_rows] for f in files]
    blob = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def settings_of(cfg: Config) -> dict[str, Any]:
    """What shapes results besides the input files: every config field marked OUTPUT (see
    config.py), the model and tokenizer by their identity, and the backend's own part
    (`Engine.fingerprint`: its options that change outputs)."""
    settings = {}
    for name in Config.model_fields:
        values = fingerprinted(getattr(cfg, name))
        if values:
            settings[name] = values
    engine = settings["engine"]
    engine["model"] = model_refs.resolve(cfg.engine.model).identity
    engine["tokenizer"] = model_refs.resolve(cfg.engine.tokenizer).identity if cfg.engine.tokenizer else None
    engine["options"] = registry.engine_class(cfg.engine.backend).fingerprint(cfg)
    return settings


def id_column(cfg: Config) -> str | None:
    """The column holding each row's id: custom_id for openai_batch input, else input.id_column."""
    return "custom_id" if cfg.input.format == "openai_batch" else cfg.input.id_column


def needed_columns(cfg: Config) -> list[str]:
    if cfg.input.format == "openai_batch":
        return list(OPENAI_BATCH_SCHEMA.names)  # the reader's own columns: custom_id, line, request
    cols = [cfg.input.id_column, cfg.input.prompt_column, cfg.input.messages_column,
            cfg.input.sampling_column, *cfg.input.sampling_columns.values(), *cfg.input.passthrough_columns]
    return list(dict.fromkeys(c for c in cols if c))


def input_reader(cfg: Config) -> Reader:
    """The reader of the run's input format, input.format (planning, workers, previews)."""
    return readers.reader_for(cfg.input.format, storage=cfg.storage)


def list_inputs(cfg: Config, *, reader: Reader | None = None) -> list[dict[str, Any]]:
    """Info dicts (name, relative, size, version...) of every input file, sorted."""
    reader = reader or input_reader(cfg)
    with storage.errors(cfg.input.path, "input.path"):
        _, infos = reader.list_files(cfg.input.path)
    return infos


TAPER_PARTS = 4
"""The last shards of a big plan are cut into this many smaller ones ..."""
TAPER_MIN_ROWS = 64
"""... if they have at least this many rows (smaller parts would cost more to commit than they save)."""


def taper_end(shards: list[Shard], held: int) -> list[Shard]:
    """Cut the last `held` shards (what the workers hold when the last one is handed out:
    num_workers x shards_per_worker) into TAPER_PARTS row ranges each, so that the end of
    the run waits on short shards; plans under 4 x held shards, and shards under
    TAPER_MIN_ROWS rows, stay as they are.

    The run's tail, from the last shard handed out to the last commit, is the backlog of
    the busiest worker then (issue 11): shards a quarter as long end it about that much sooner.
    """
    if held < 1 or len(shards) < 4 * held:
        return shards
    out = list(shards[:-held])
    for shard in shards[-held:]:
        if shard.num_rows < TAPER_MIN_ROWS:
            out.append(Shard(len(out), shard.pieces))
            continue
        rows = [(p.file, p.row_start + i) for p in shard.pieces for i in range(p.num_rows)]
        n = len(rows)
        for k in range(TAPER_PARTS):
            part = rows[n * k // TAPER_PARTS: n * (k + 1) // TAPER_PARTS]
            if part:
                out.append(Shard(len(out), _pieces(part)))
    return out


def _pieces(rows: list[tuple[int, int]]) -> tuple[Piece, ...]:
    """(file, row) pairs in order, as the fewest contiguous pieces."""
    pieces: list[Piece] = []
    for fi, row in rows:
        last = pieces[-1] if pieces else None
        if last and last.file == fi and last.row_start + last.num_rows == row:
            pieces[-1] = Piece(fi, last.row_start, last.num_rows + 1)
        else:
            pieces.append(Piece(fi, row, 1))
    return tuple(pieces)


def make_plan(cfg: Config, infos: list[dict[str, Any]] | None = None, *,
              reader: Reader | None = None) -> Plan:
    """List inputs, read each file once (its facts, Parquet: the footer, and its id column
    together, see Reader.scan_files) in parallel, check columns and ids, cut shards.

    Files with 0 rows stay in `files` (so resuming sees the same inputs) but are not
    checked: an empty file contributes no shard whatever its columns and types.
    `reader` defaults to `input_reader(cfg)`.
    """
    reader = reader or input_reader(cfg)
    infos = infos if infos is not None else list_inputs(cfg, reader=reader)
    loc = storage.locate(cfg.input.path, cfg.storage)
    listed = [InputFile(url=storage.join_protocol(loc.fs, info["name"]), name=info["relative"],
                        version=storage.version_tag(info), size=info["size"], num_rows=0,
                        row_groups=()) for info in infos]
    scanned = reader.scan_files(listed, _id_scan(cfg))
    columns = needed_columns(cfg)
    files, ids, schemas, censuses = [], [], [], []
    for file, (fact, file_ids) in zip(listed, scanned, strict=True):
        censuses.append(fact.census)
        file = replace(file, num_rows=fact.num_rows, row_groups=fact.units, offsets=fact.offsets,
                       unit_lines=fact.unit_lines)
        if fact.num_rows:
            schemas.append((file.url, _select(fact.schema, columns, file.url, cfg)))
            ids.append(file_ids)
        files.append(file)
    del scanned
    if not schemas:  # an empty file alone just contributes no shard
        raise InputError(f"every input file under {cfg.input.path!r} is empty (0 rows); nothing to do")
    schema = _unify(schemas)
    if id_column(cfg):
        check_ids(cfg, [f for f in files if f.num_rows], ids, reader)
    if cfg.input.format == "openai_batch":
        check_census(cfg, censuses)
    del ids
    return Plan(
        files=files,
        shards=taper_end(cut_shards(files, cfg.run.rows_per_shard),
                         cfg.run.num_workers * (cfg.run.shards_per_worker or 2)),
        settings=settings_of(cfg),
        input_schema=base64.b64encode(schema.serialize().to_pybytes()).decode(),
        rows_per_shard=cfg.run.rows_per_shard,
    )


@dataclass(frozen=True)
class FileIds:
    """What the id check keeps of one file's id column, instead of the ids themselves."""

    nulls: int
    first_null: int | None
    """Row of the first null id (counted from 0), if any."""
    hashes: np.ndarray | None
    """A 64-bit hash of each id, in row order: 8 bytes an id, however long the ids are. None
    when repeats are allowed, or when the file holds a null id (refused before repeats)."""


def _id_scan(cfg: Config) -> Callable[[InputFile, FileFacts, ReadColumn],
                                      tuple[FileFacts, FileIds | None]]:
    """What planning takes from each file in its one pass (Reader.scan): the facts, and
    unless the id check needs nothing of the file, its ids as FileIds.

    Nothing is read of a file that is empty or lacks the id column (refused by `_select`,
    naming every column), nor, with duplicate ids allowed, of one whose facts (Parquet:
    footer statistics) rule out nulls.
    """
    column, allow_repeats = id_column(cfg), cfg.input.allow_duplicate_ids

    def visit(file: InputFile, facts: FileFacts, read_column: ReadColumn
              ) -> tuple[FileFacts, FileIds | None]:
        if not column or not facts.num_rows or column not in facts.schema.names:
            return facts, None
        if allow_repeats and column in facts.null_free:
            return facts, None
        ids = read_column(column)
        nulls = ids.null_count
        return facts, FileIds(
            nulls=nulls,
            first_null=pc.index(pc.is_null(ids), True).as_py() if nulls else None,
            hashes=None if allow_repeats or nulls else _id_hashes(ids))

    return visit


def check_ids(cfg: Config, files: list[InputFile], ids: list[FileIds | None], reader: Reader) -> None:
    """Refuse null ids, and unless input.allow_duplicate_ids, repeated ones.

    `ids` are what each file's scan kept of its id column (`_id_scan`; None where nothing
    was read: with duplicates allowed, files whose facts rule out nulls). Repeats are found
    on 64-bit hashes and confirmed on the ids themselves, read again (at the same versions)
    only from the files holding a hash that occurs twice.
    """
    column = id_column(cfg)
    read = [(f, x) for f, x in zip(files, ids, strict=True) if x is not None]
    _refuse_null_ids(column, read)
    if not cfg.input.allow_duplicate_ids:
        _refuse_repeated_ids(column, read, reader, cfg.input.format == "openai_batch")


def _refuse_null_ids(column: str, read: list[tuple[InputFile, FileIds]]) -> None:
    where = [f"{f.name} ({x.nulls} null, first at row {x.first_null})" for f, x in read if x.nulls]
    if where:
        total = sum(x.nulls for _, x in read)
        raise InputError(
            f"input.id_column {column!r} is null in {total} row(s): {'; '.join(where[:3])}"
            f"{f' and {len(where) - 3} more file(s)' if len(where) > 3 else ''} (rows count from 0); "
            "expected an id in every row, since results are matched to rows by id. Fix the inputs, "
            "or leave input.id_column unset to use \"<file>:<row>\" ids")


def _refuse_repeated_ids(column: str, read: list[tuple[InputFile, FileIds]], reader: Reader,
                         openai: bool = False) -> None:
    if not read:
        return
    ordered = np.concatenate([x.hashes for _, x in read])
    ordered.sort()
    shared = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(shared):
        return
    # Equal hashes nearly always mean equal ids. To be sure, and to name them, the ids whose
    # hash is shared are read again, from the files holding them.
    rows = {f.url: np.flatnonzero(np.isin(x.hashes, shared)) for f, x in read}
    files = [f for f, _ in read if len(rows[f.url])]
    per_file = reader.scan_files(
        files, lambda file, facts, read_column: read_column(column).take(rows[file.url]))
    # Files may hold the id in different string layouts; compare them in the unified one.
    unified = _unified_type(per_file[0].type)
    per_file = [arr.cast(_unified_type(arr.type)) for arr in per_file]
    everything = pa.chunked_array([c for arr in per_file for c in arr.chunks], type=unified)
    counts = pc.value_counts(everything)
    repeated = [v for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                  strict=True) if n > 1]
    if not repeated:  # only the hashes were equal
        return
    examples = []
    for value in repeated[:3]:
        where = [f.name for f, arr in zip(files, per_file, strict=True)
                 if pc.any(pc.equal(arr, pa.scalar(value, type=arr.type))).as_py()]
        examples.append(f"{value!r} (in {', '.join(where)})")
    if openai:
        raise InputError(
            f"custom_id repeats {len(repeated)} value(s), e.g. {'; '.join(examples)}; expected a unique "
            "custom_id per request line, as the OpenAI Batch API requires (results are matched to "
            "requests by it). Fix the input file")
    raise InputError(
        f"input.id_column {column!r} repeats {len(repeated)} value(s), e.g. {'; '.join(examples)}; "
        "each row needs its own id for exactly-once results. Fix the inputs, or set "
        "input.allow_duplicate_ids: true to accept them")


HASH_BATCH = 8_192
"""Ids made Python objects at once to be hashed: bounds what hashing takes in each thread."""


def _id_hashes(ids: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each id (none null): equal ids hash equal, whatever layout their file
    wrote them in. Python's own hash (SipHash for text and bytes), salted per process, which
    is all the check needs; floats hash their repr (Python's hash tells NaNs apart, which
    Arrow counts as one value), and lists and structs too, having no hash of their own."""
    ids = ids.cast(_unified_type(ids.type))
    by_repr = pa.types.is_floating(ids.type) or pa.types.is_nested(ids.type)
    out = np.empty(len(ids), np.int64)
    for start in range(0, len(ids), HASH_BATCH):
        values = ids.slice(start, HASH_BATCH).to_pylist()
        out[start:start + len(values)] = [hash(repr(v) if by_repr else v) for v in values]
    return out


def _unified_type(t: pa.DataType) -> pa.DataType:
    """The type a column is read as, whatever layout its writer chose: text of any layout
    or dictionary encoding is `string`, bytes are `binary`, lists are `list`, inside
    lists and structs too; every field nullable."""
    if pa.types.is_dictionary(t):
        return _unified_type(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) \
            or pa.types.is_large_list_view(t):
        return pa.list_(_unified_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _unified_type(f.type)) for f in t])
    return t


def _select(schema: pa.Schema, columns: list[str], url: str, cfg: Config) -> pa.Schema:
    """The columns the run reads, in their unified types (see `_unified_type`); InputError
    naming the file, the column, its type and the type expected."""
    if cfg.input.format == "openai_batch":  # the reader's own columns, always the same types
        return pa.schema([pa.field(c, _unified_type(schema.field(c).type)) for c in columns])
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(
            f"input file {url!r} has no column {', '.join(repr(c) for c in missing)} "
            f"(columns found: {', '.join(schema.names)}); check input.id_column, "
            "input.prompt_column, input.messages_column, input.sampling_column(s) and input.passthrough_columns"
        )
    selected = pa.schema([pa.field(c, _unified_type(schema.field(c).type)) for c in columns])
    if cfg.input.prompt_column:
        t = selected.field(cfg.input.prompt_column).type
        if t not in (pa.string(), pa.binary(), pa.null()):  # null: every prompt null (a row error each)
            raise InputError(
                f"input file {url!r}: prompt column {cfg.input.prompt_column!r} has type "
                f"{schema.field(cfg.input.prompt_column).type}; expected string (or binary holding UTF-8)"
            )
    if cfg.input.messages_column:
        t = selected.field(cfg.input.messages_column).type
        if not pa.types.is_list(t) or not pa.types.is_struct(t.value_type):
            raise InputError(
                f"input file {url!r}: messages column {cfg.input.messages_column!r} has type "
                f"{schema.field(cfg.input.messages_column).type}; "
                "expected list<struct<role: string, content: string>>"
            )
    _check_sampling_columns(selected, url, cfg)
    return selected


SETTING_TYPES = {"max_tokens": "integer", "seed": "integer", "temperature": "number", "top_p": "number",
                 "stop": "string or list<string>", "response_format": "string (JSON) or struct"}
"""What a column holding one per-row setting (input.sampling_columns) may be."""


def _setting_type_ok(setting: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):  # every row null: every row uses the config's value
        return True
    if setting in ("max_tokens", "seed"):
        return pa.types.is_integer(t)
    if setting in ("temperature", "top_p"):
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if setting == "stop":
        return t == pa.string() or (pa.types.is_list(t) and t.value_type == pa.string())
    return t == pa.string() or pa.types.is_struct(t)


def _check_sampling_columns(selected: pa.Schema, url: str, cfg: Config) -> None:
    """input.sampling_column is a struct of settings or a JSON string; each of
    input.sampling_columns holds its setting's type (SETTING_TYPES). Values are checked per
    row (a bad one is that row's bad_sampling error); a wrong column type stops the run here."""
    column = cfg.input.sampling_column
    if column:
        t = selected.field(column).type
        if pa.types.is_struct(t):
            for f in t:
                if f.name not in SETTING_TYPES:
                    raise InputError(
                        f"input file {url!r}: sampling column {column!r} has field {f.name!r}; expected "
                        f"fields among {', '.join(SETTING_TYPES)}")
                if not _setting_type_ok(f.name, f.type):
                    raise InputError(
                        f"input file {url!r}: sampling column {column!r} field {f.name!r} has type {f.type}; "
                        f"expected {SETTING_TYPES[f.name]}")
        elif t not in (pa.string(), pa.null()):
            raise InputError(f"input file {url!r}: sampling column {column!r} has type {t}; expected a "
                             "struct of settings or a string holding a JSON object")
    for setting, col in cfg.input.sampling_columns.items():
        t = selected.field(col).type
        if not _setting_type_ok(setting, t):
            raise InputError(f"input file {url!r}: column {col!r} (input.sampling_columns.{setting}) has type "
                             f"{t}; expected {SETTING_TYPES[setting]}")


CENSUS_REPORTED = 10
"""Ignored body fields named when a plan reports them (the most frequent first)."""


def check_census(cfg: Config, censuses: list[Any]) -> None:
    """What the openai_batch lines asked for, counted while planning (FileFacts.census):
    body.model names not in input.models stop the run (InputError naming them); with
    input.models null the names found are logged once. Body fields batchinfer does not
    apply are logged once with their counts, so none is dropped silently."""
    from batchinfer.openai_batch import KNOWN_FIELDS

    models: dict[str, int] = {}
    fields: dict[str, int] = {}
    for census in censuses:
        for name, n in (census or {}).get("model", {}).items():
            models[name] = models.get(name, 0) + n
        for name, n in (census or {}).get("body_field", {}).items():
            if name not in KNOWN_FIELDS:
                fields[name] = fields.get(name, 0) + n
    if cfg.input.models is not None:
        if unknown := {m: n for m, n in models.items() if m not in cfg.input.models}:
            listed = ", ".join(f"{m!r} ({n} requests)" for m, n in sorted(unknown.items(), key=lambda x: -x[1])[:5])
            raise InputError(f"openai_batch input asks for body.model {listed}; this job serves "
                             f"{cfg.input.models} (input.models) on {cfg.engine.model}. Add the names to "
                             "input.models, or fix the input")
    elif models:
        log.warning("openai_batch input: body.model %s all run on engine.model %s (set input.models to "
                    "accept only some names)", ", ".join(f"{m!r} ({n})" for m, n in sorted(models.items())),
                    cfg.engine.model)
    if fields:
        top = sorted(fields.items(), key=lambda x: -x[1])[:CENSUS_REPORTED]
        log.warning("openai_batch input: body fields not applied by batchinfer (each request is run "
                    "without them): %s", ", ".join(f"{k} ({n} requests)" for k, n in top))


def _unify(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema for all files. A column that is all-null (type `null`) in one file takes
    its type from the others; any other difference is a conflict naming both files."""
    fields: dict[str, tuple[pa.Field, str]] = {}
    for url, schema in schemas:
        for f in schema:
            seen, first = fields.get(f.name, (None, url))
            if seen is None or pa.types.is_null(seen.type):
                fields[f.name] = (f, url)
            elif not pa.types.is_null(f.type) and not f.type.equals(seen.type):
                raise InputError(
                    f"input files disagree on column types: {first!r} and {url!r} differ in "
                    f"{f.name}: {seen.type} vs {f.type}; every input file must have the same types "
                    "for the columns read (string layouts, dictionary encoding and nullability may differ)")
    return pa.schema([f for f, _ in fields.values()])


def verify_inputs(plan: Plan, infos: list[dict[str, Any]]) -> None:
    """Refuse to resume when the input files are not exactly those the plan was made from."""
    now = {i["relative"]: storage.version_tag(i) for i in infos}
    planned = {f.name: f.version for f in plan.files}
    problems = []
    for name, version in planned.items():
        if name not in now:
            problems.append(f"input file {name!r} is gone")
        elif now[name] != version:
            problems.append(f"input file {name!r} changed since the plan was made "
                            f"(version {version} -> {now[name]})")
    problems += [f"input file {name!r} is new since the plan was made"
                 for name in now if name not in planned]
    if problems:
        raise InputError(
            "; ".join(problems) + ". Resuming would mix results of different inputs; "
            "restore the inputs, use another output.path, or pass --new-run to start over"
        )


def diff_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts ("sampling.max_tokens: 64 -> 32")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
