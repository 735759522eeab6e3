"""Input rows -> what each row asks for: its prompt and its own sampling settings.

Parquet rows take their prompt from input.prompt_column (or messages_column) and their own
settings from input.sampling_column (a struct, or a JSON object string) and
input.sampling_columns (one column per setting, which win). OpenAI batch rows take both from
their line (openai_batch.py). Either way the settings are checked against the config's own
bounds (sampling.resolve); a row whose request or settings are bad carries its RowError in
place of its prompt, and the rest of the shard goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from batchinfer.config import Config
from batchinfer.errors import RowError
from batchinfer.openai_batch import ParsedRequest, parse_request
from batchinfer.sampling import Sampling, resolve


@dataclass
class RowRequests:
    """One shard's rows as requests, in row order."""

    cells: list[Any]
    """The prompt cell of each row (prompts.PromptBuilder renders it), or its RowError."""
    sampling: list[Sampling]
    """Each row's settings (the defaults for a row that failed)."""
    kinds: list[str | None]
    """openai_batch: "chat" or "completion" (None: the line did not parse); else all None."""
    models: list[str | None]
    """openai_batch: each request's body.model; else all None."""
    lines: list[int | None]
    """openai_batch: each request's line number in its file; else all None."""

    def at_line(self, error: RowError, i: int) -> RowError:
        """Row `i`'s error naming its line, as bad_request errors do (openai_batch only)."""
        return _at_line(error, self.lines[i])


class RowRequestBuilder:
    """Builds `RowRequests` from a shard's table (the plan's input columns)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.input
        self.defaults = Sampling.from_config(cfg.sampling)

    def build(self, table: pa.Table) -> RowRequests:
        if self.cfg.format == "openai_batch":
            return self._openai(table)
        column = self.cfg.prompt_column or self.cfg.messages_column
        cells = table.column(column).to_pylist()
        sampling = [self.defaults] * len(cells)
        for i, overrides in enumerate(self._overrides(table)):
            if isinstance(overrides, RowError):
                cells[i] = overrides
                continue
            try:
                sampling[i] = resolve(self.defaults, overrides)
            except RowError as e:
                cells[i] = e
        return RowRequests(cells, sampling, [None] * len(cells), [None] * len(cells), [None] * len(cells))

    def _overrides(self, table: pa.Table) -> list[dict[str, Any] | RowError | None]:
        """Each row's own settings from the sampling column(s); None: the row sets none."""
        rows: list[dict[str, Any] | RowError | None] = [None] * table.num_rows
        if self.cfg.sampling_column:
            rows = [_setting_object(v) for v in table.column(self.cfg.sampling_column).to_pylist()]
        for setting, column in self.cfg.sampling_columns.items():
            for i, value in enumerate(table.column(column).to_pylist()):
                if value is not None and not isinstance(rows[i], RowError):
                    rows[i] = {**(rows[i] or {}), setting: value}
        return rows

    def _openai(self, table: pa.Table) -> RowRequests:
        cells: list[Any] = []
        sampling: list[Sampling] = []
        kinds: list[str | None] = []
        models: list[str | None] = []
        lines = table.column("line").to_pylist()
        for raw, line in zip(table.column("request").to_pylist(), lines, strict=True):
            settings = self.defaults
            try:
                request: ParsedRequest | None = parse_request(raw, line)
            except RowError as e:
                request, cell = None, e
            if request is not None:
                cell = request.prompt
                try:
                    settings = resolve(self.defaults, request.settings)
                except RowError as e:
                    cell = _at_line(e, line)
            cells.append(cell)
            sampling.append(settings)
            kinds.append(request.kind if request else None)
            models.append(request.model if request else None)
        return RowRequests(cells, sampling, kinds, models, lines)


def _at_line(error: RowError, line: int | None) -> RowError:
    """`error` naming its line ("line N: ..."), unless it has none or already does."""
    if line is None or error.message.startswith("line "):
        return error
    return RowError(error.code, f"line {line}: {error.message}")


def _setting_object(value: Any) -> dict[str, Any] | RowError | None:
    """A sampling column cell: a struct (a dict, nulls = unset), a JSON object string, or null."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            return RowError("bad_sampling", f"the sampling column is not valid JSON ({e.msg} at {e.pos}); "
                            "expected an object such as {\"max_tokens\": 64}")
        if parsed is None or isinstance(parsed, dict):
            return parsed
        value = parsed
    return RowError("bad_sampling", f"the sampling column holds a {type(value).__name__}; expected an "
                    "object of settings (a struct, or a JSON object string)")
