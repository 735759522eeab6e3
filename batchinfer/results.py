"""Result rows -> one part per shard, in the output format (output.format).

parquet: columns `id`, the passthrough columns, then `output`, `finish_reason`,
`prompt_tokens`, `completion_tokens`, `latency_s`, `error`, the same schema in every part. The
shard's summary rides along in the file's key-value metadata so a part describes itself.

openai_batch: JSONL in the OpenAI Batch API's output shape (openai_batch.py), one line per
request. JSONL has nowhere to keep the summary, so a part whose commit record was lost to a
crash is summarized from its lines.

Either way, a shard with failed rows also gets a failed-rows file (`_errors/<part name>`, in
the part's format): Parquet rows `id, error_code, error_message, shard, attempt`; JSONL the
OpenAI error lines (what the Batch API's error file holds). It is a function of the
committed part alone (`failed_rows`), so a crash between the two is repaired from the part.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer import openai_batch
from batchinfer.errors import split_error
from batchinfer.plan import id_column
from batchinfer.records import RESULT_COLUMNS, RowCounts, ShardSummary, now_iso

if TYPE_CHECKING:  # annotations only
    from batchinfer.config import Config
    from batchinfer.engines.base import Result
    from batchinfer.rows import RowRequests

SUMMARY_KEY = b"batchinfer.shard"
ERROR_COLUMNS = ("error_code", "error_message", "shard", "attempt")
"""The columns of a Parquet failed-rows file, after `id`."""

_RESULT_TYPES = {"output": pa.string(), "finish_reason": pa.string(), "prompt_tokens": pa.int64(),
                 "completion_tokens": pa.int64(), "latency_s": pa.float64(), "error": pa.string()}
RESULT_FIELDS = [pa.field(name, _RESULT_TYPES[name]) for name in RESULT_COLUMNS]
"""The result columns (records.RESULT_COLUMNS, the one list of their names) with their types."""


def output_schema(input_schema: pa.Schema, cfg: Config) -> pa.Schema:
    column = id_column(cfg)
    id_type = input_schema.field(column).type if column else pa.string()
    passthrough = [input_schema.field(c) for c in cfg.input.passthrough_columns]
    return pa.schema([pa.field("id", id_type), *passthrough, *RESULT_FIELDS])


@dataclass
class RowOutcome:
    """One row's result as the worker saw it."""

    result: Result
    latency_s: float | None


def build_table(schema: pa.Schema, ids: pa.Array, passthrough: dict[str, pa.Array],
                rows: list[RowOutcome]) -> pa.Table:
    columns: dict[str, Any] = {"id": ids, **passthrough}
    columns["output"] = [r.result.text for r in rows]
    columns["finish_reason"] = [r.result.finish_reason for r in rows]
    columns["prompt_tokens"] = [r.result.prompt_tokens for r in rows]
    columns["completion_tokens"] = [r.result.completion_tokens for r in rows]
    columns["latency_s"] = [r.latency_s for r in rows]
    columns["error"] = [r.result.error for r in rows]
    arrays = [pa.array(columns[f.name], type=f.type) if not isinstance(columns[f.name], (pa.Array, pa.ChunkedArray))
              else columns[f.name].cast(f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def summarize(rows: list[RowOutcome]) -> RowCounts:
    errors: dict[str, int] = {}
    for r in rows:
        if r.result.error:
            code = split_error(r.result.error)[0]
            errors[code] = errors.get(code, 0) + 1
    return RowCounts(
        rows=len(rows),
        rows_ok=sum(1 for r in rows if r.result.error is None),
        rows_failed=sum(errors.values()),
        prompt_tokens=sum(r.result.prompt_tokens or 0 for r in rows),
        completion_tokens=sum(r.result.completion_tokens or 0 for r in rows),
        errors=errors,
    )


def to_parquet(table: pa.Table, summary: ShardSummary, compression: str) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[SUMMARY_KEY] = summary.to_json(indent=None).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf,
                   compression=None if compression == "none" else compression)
    return buf.getvalue()


# --------------------------------------------------------------------------- part writers


@dataclass(frozen=True)
class EncodedPart:
    data: bytes
    """The part file's bytes: what the commit makes visible."""
    errors: bytes | None = None
    """openai_batch: the shard's error file (its failed requests), None when none failed."""


class ParquetParts:
    suffix = ".parquet"

    def __init__(self, cfg: Config, input_schema: pa.Schema):
        self.cfg = cfg
        self.schema = output_schema(input_schema, cfg)

    def encode(self, table: pa.Table, ids: pa.Array, requests: RowRequests, rows: list[RowOutcome],
               summary: ShardSummary) -> EncodedPart:
        """The shard's result part as Parquet bytes (run in a thread: building columns of many
        rows must not hold up the event loop that feeds the engine)."""
        passthrough = {c: table.column(c) for c in self.cfg.input.passthrough_columns}
        result = build_table(self.schema, ids, passthrough, rows)
        return EncodedPart(to_parquet(result, summary, self.cfg.output.compression),
                           failed_parquet(result.column("id"), result.column("error"), summary))


class OpenAIBatchParts:
    suffix = ".jsonl"

    def __init__(self, cfg: Config, fingerprint: str):
        self.model = cfg.engine.model
        self.fingerprint = fingerprint

    def encode(self, table: pa.Table, ids: pa.Array, requests: RowRequests, rows: list[RowOutcome],
               summary: ShardSummary) -> EncodedPart:
        """One OpenAI batch output line per row, in row order; the failed ones also in `errors`."""
        lines = [openai_batch.result_line(
                     openai_batch.Row(custom_id=None if i is None else str(i), kind=kind, model=model,
                                      text=r.result.text, finish_reason=r.result.finish_reason,
                                      prompt_tokens=r.result.prompt_tokens,
                                      completion_tokens=r.result.completion_tokens, error=r.result.error),
                     self.fingerprint, self.model)
                 for i, kind, model, r in zip(ids.to_pylist(), requests.kinds, requests.models, rows, strict=True)]
        return EncodedPart(openai_batch.to_jsonl(lines), _failed_jsonl(lines))


def part_writer(cfg: Config, input_schema: pa.Schema, fingerprint: str) -> ParquetParts | OpenAIBatchParts:
    """The writer of output.format."""
    if cfg.output.format == "openai_batch":
        return OpenAIBatchParts(cfg, fingerprint)
    return ParquetParts(cfg, input_schema)


def suffix_of(output_format: str) -> str:
    """The part file suffix of an output.format."""
    return OpenAIBatchParts.suffix if output_format == "openai_batch" else ParquetParts.suffix


def summary_from_part(name: str, f: IO[bytes]) -> ShardSummary:
    """The summary a committed part (`f`, open) holds: Parquet metadata (the footer alone is
    read), or, for a JSONL part, the one its lines give: counts, tokens and error codes;
    attempt, worker and timings are unknown (0, -1), the fingerprint absent."""
    if name.endswith(ParquetParts.suffix):
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        return ShardSummary.from_json(meta[SUMMARY_KEY])
    errors: dict[str, int] = {}
    rows = prompt = completion = 0
    for line in openai_batch.read_jsonl(f.read()):
        rows += 1
        if line.get("error"):
            code = line["error"].get("code") or "error"
            errors[code] = errors.get(code, 0) + 1
        usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
        prompt += usage.get("prompt_tokens", 0)
        completion += usage.get("completion_tokens", 0)
    failed = sum(errors.values())
    return ShardSummary(shard=int(name.split("-")[1].split(".")[0]), part=name, rows=rows,
                        rows_ok=rows - failed, rows_failed=failed, prompt_tokens=prompt,
                        completion_tokens=completion, errors=errors, attempt=0, worker=-1,
                        generate_s=0.0, committed_at=now_iso())


def failed_parquet(ids: pa.ChunkedArray | pa.Array, errors: pa.ChunkedArray | pa.Array,
                   summary: ShardSummary) -> bytes | None:
    """A Parquet part's failed-rows file: one row per failed row, `id` (the part's id type),
    `error_code` (the error before its first colon), `error_message` (the rest), `shard`,
    `attempt`; None when no row failed."""
    failed = [(i, e) for i, e in zip(ids.to_pylist(), errors.to_pylist(), strict=True) if e]
    if not failed:
        return None
    codes, messages = zip(*(split_error(e) for _, e in failed), strict=True)
    table = pa.table({
        "id": pa.array([i for i, _ in failed], type=ids.type),
        "error_code": pa.array(codes, pa.string()),
        "error_message": pa.array(messages, pa.string()),
        "shard": pa.array([summary.shard] * len(failed), pa.int64()),
        "attempt": pa.array([summary.attempt] * len(failed), pa.int64()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def failed_rows(name: str, f: IO[bytes], summary: ShardSummary) -> bytes | None:
    """The failed-rows file of a committed part (`f`, open), None when no row failed: what
    the winner of its commit writes, rebuilt when a crash came between the two."""
    if name.endswith(ParquetParts.suffix):
        table = pq.read_table(f, columns=["id", "error"])
        return failed_parquet(table.column("id"), table.column("error"), summary)
    return _failed_jsonl(openai_batch.read_jsonl(f.read()))


def _failed_jsonl(lines: Iterable[dict[str, Any]]) -> bytes | None:
    """The lines whose request failed, as JSONL; None when none did."""
    failed = [line for line in lines if line.get("error")]
    return openai_batch.to_jsonl(failed) if failed else None
