"""Result rows -> one Parquet part per shard, with a schema that is the same for every part.

Columns: `id`, the passthrough columns, then `output`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `latency_s`, `error`. The shard's summary rides along in the file's
key-value metadata so a part describes itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer.records import RESULT_COLUMNS, RowCounts, ShardSummary

if TYPE_CHECKING:  # annotations only
    from batchinfer.config import Config
    from batchinfer.engines.base import Result

SUMMARY_KEY = b"batchinfer.shard"

_RESULT_TYPES = {"output": pa.string(), "finish_reason": pa.string(), "prompt_tokens": pa.int64(),
                 "completion_tokens": pa.int64(), "latency_s": pa.float64(), "error": pa.string()}
RESULT_FIELDS = [pa.field(name, _RESULT_TYPES[name]) for name in RESULT_COLUMNS]
"""The result columns (records.RESULT_COLUMNS, the one list of their names) with their types."""


def output_schema(input_schema: pa.Schema, cfg: Config) -> pa.Schema:
    id_type = input_schema.field(cfg.input.id_column).type if cfg.input.id_column else pa.string()
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
            code = r.result.error.split(":", 1)[0]
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
