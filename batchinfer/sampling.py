"""Per-request sampling: the config's defaults, a row's own settings, and the response format.

The `sampling:` section holds every row's defaults. A row may carry its own `max_tokens`,
`temperature`, `top_p`, `seed`, `stop` and `response_format` (an input column, or an OpenAI
batch line's body); `resolve` checks them against the same bounds as the config and returns
one `Sampling` per row, frozen and hashable, so engines can group or cache by it. A value
of the wrong type or out of range is that row's error `bad_sampling`; a response format
that cannot be compiled is `bad_schema` (a global one stops the run before any engine starts).

Response formats, in OpenAI's shape (https://platform.openai.com/docs/api-reference/chat/create,
`response_format`) plus two for classification jobs:

    {"type": "text"}                                   free text (the same as none)
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": "person", "schema": {...}, "strict": true}}
    {"type": "regex", "regex": "(yes|no)"}             text matching the pattern
    {"type": "choice", "choice": ["positive", "negative"]}   exactly one of the strings

Both backends constrain tokens with the same grammar library, xgrammar (TensorRT-LLM's
guided decoding backend): a schema is accepted when JSON Schema's meta-schema accepts it and,
where xgrammar is installed, when xgrammar compiles it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from batchinfer.config import SAMPLING_KEYS, Config, SamplingConfig
from batchinfer.errors import RowError

ROW_SETTINGS = SAMPLING_KEYS
"""What a row may set for itself; everything else is the config's."""

FORMAT_KINDS = ("json_object", "json_schema", "regex", "choice")


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on a completion, normalized: one of FORMAT_KINDS with its one argument."""

    kind: str
    schema: str | None = None
    """json_schema: the JSON schema as canonical JSON text (sorted keys)."""
    name: str | None = None
    """json_schema: the schema's name (OpenAI's `json_schema.name`)."""
    pattern: str | None = None
    """regex: the pattern the whole completion matches."""
    choices: tuple[str, ...] = ()
    """choice: the completions allowed."""

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")

    def grammar(self) -> str:
        """choice: the EBNF grammar (xgrammar's dialect, GBNF-like) of the allowed strings."""
        return "root ::= " + " | ".join(_ebnf_literal(c) for c in self.choices)


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one request.

    `seed` is the row's own seed, or None: the worker then derives one from `sampling.seed`
    and the row id (engines.row_seed), and hands it over as `Request.seed`.
    """

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None = None
    response_format: ResponseFormat | None = None

    @classmethod
    def from_config(cls, s: SamplingConfig) -> Sampling:
        """The defaults every row starts from (a bad global response format raises
        RowError; config validation reports it first)."""
        return cls(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                   stop=tuple(s.stop), response_format=parse_response_format(s.response_format))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_STRICT = ConfigDict(strict=True)


@functools.cache
def _checker(name: str) -> TypeAdapter:
    """The config field's own type and bounds (SamplingConfig), as a validator of one value."""
    field = SamplingConfig.model_fields[name]
    return TypeAdapter(field.rebuild_annotation(), config=_STRICT)


def resolve(defaults: Sampling, overrides: Mapping[str, Any] | None) -> Sampling:
    """`defaults` with a row's own settings (None values and a None mapping mean "not set").

    `stop` may be one string or a list of strings, as OpenAI allows. Raises RowError
    `bad_sampling` naming the setting, the value found and what was expected (an unknown
    setting, a wrong type, a value out of the config's bounds), or `bad_schema` for a
    response format that cannot be used.
    """
    if not overrides:
        return defaults
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in ROW_SETTINGS:
            raise RowError("bad_sampling", f"unknown setting {name!r}; expected any of {', '.join(ROW_SETTINGS)}")
        if name == "response_format":
            changes[name] = parse_response_format(value)
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        try:
            value = _checker(name).validate_python(value)
        except ValidationError as e:
            raise RowError("bad_sampling", f"{name}: got {_short(value)}; {_expected(e)}") from None
        changes[name] = tuple(value) if name == "stop" else value
    return dataclasses.replace(defaults, **changes) if changes else defaults


def _expected(error: ValidationError) -> str:
    msg = error.errors()[0]["msg"]
    if msg.startswith("Input should be "):
        return "expected " + msg.removeprefix("Input should be ")
    return "expected: " + msg[0].lower() + msg[1:]  # e.g. "string should have at least 1 character"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- response formats


def parse_response_format(value: Any) -> ResponseFormat | None:
    """An OpenAI-shaped response format (a mapping, or its JSON text) as a ResponseFormat;
    None for no format or {"type": "text"}. Raises RowError `bad_schema` naming what was
    found against what was expected."""
    if value is None:
        return None
    value = _parsed(value, "response_format")
    if not isinstance(value, Mapping):
        raise RowError("bad_schema", f"response_format is {type(value).__name__}; expected an object "
                       "with a type (text, json_object, json_schema, regex or choice)")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        return _json_schema(value.get("json_schema"))
    if kind == "regex":
        pattern = value.get("regex")
        if not isinstance(pattern, str) or not pattern:
            raise RowError("bad_schema", f"response_format regex: got {_short(pattern)}; expected a non-empty pattern string")
        return _checked(ResponseFormat("regex", pattern=pattern))
    if kind == "choice":
        choices = value.get("choice")
        if (not isinstance(choices, list | tuple) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise RowError("bad_schema", f"response_format choice: got {_short(choices)}; expected a "
                           "non-empty list of non-empty strings")
        return _checked(ResponseFormat("choice", choices=tuple(dict.fromkeys(choices))))
    raise RowError("bad_schema", f"response_format type {kind!r}; expected one of text, {', '.join(FORMAT_KINDS)}")


def _parsed(value: Any, what: str) -> Any:
    """`value`, or the JSON it holds if it is a string (a format or schema kept in a string
    column); RowError bad_schema for a string that is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError("bad_schema", f"{what} is not valid JSON ({e.msg} at {e.pos})") from None


def _json_schema(spec: Any) -> ResponseFormat:
    if not isinstance(spec, Mapping):
        raise RowError("bad_schema", f"response_format json_schema: got {_short(spec)}; expected "
                       '{"name": ..., "schema": {...}}')
    schema = _parsed(spec.get("schema"), "json_schema.schema")
    if not isinstance(schema, Mapping):
        raise RowError("bad_schema", f"json_schema.schema: got {_short(schema)}; expected a JSON Schema object")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise RowError("bad_schema", f"json_schema.name: got {_short(name)}; expected a string")
    return _checked(ResponseFormat("json_schema", schema=json.dumps(schema, sort_keys=True), name=name))


def _checked(fmt: ResponseFormat) -> ResponseFormat:
    problem = _problem(fmt)
    if problem:
        raise RowError("bad_schema", problem)
    return fmt


@functools.lru_cache(maxsize=1024)
def _problem(fmt: ResponseFormat) -> str | None:
    """Why `fmt` cannot constrain a completion, or None. Cached: a job's rows usually share
    one schema."""
    if fmt.kind == "json_schema":
        import jsonschema

        try:
            jsonschema.validators.validator_for(json.loads(fmt.schema)).check_schema(json.loads(fmt.schema))
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            return f"json_schema.schema at {where}: {e.message}"
    elif fmt.kind == "regex":
        try:
            re.compile(fmt.pattern)
        except re.error as e:
            return f"regex {_short(fmt.pattern)}: {e}"
    return _compile_problem(fmt)


def _compile_problem(fmt: ResponseFormat) -> str | None:
    """What xgrammar says of `fmt`, or None when it compiles (or xgrammar is not installed
    here: the engine's own compile then reports it, per row)."""
    try:
        import xgrammar
    except ImportError:
        return None
    try:
        to_grammar(xgrammar, fmt)
    except Exception as e:  # xgrammar raises RuntimeError with its C++ location first
        return f"{fmt.kind} is not supported by the grammar compiler (xgrammar): {_xgrammar_message(e)}"
    return None


def to_grammar(xgrammar: Any, fmt: ResponseFormat) -> Any:
    """`fmt` as an `xgrammar.Grammar` (tokenizer-independent), compiled the way TensorRT-LLM's
    guided decoder compiles each guide, with xgrammar's default options
    (cpp/tensorrt_llm/batch_manager/guidedDecoder.cpp: CompileBuiltinJSONGrammar for
    json_object, CompileJSONSchema, CompileRegex, CompileGrammar for EBNF), so both backends
    accept the same formats and allow the same tokens. xgrammar's built-in JSON grammar takes
    any JSON value; `output_problem` then refuses a json_object completion that is not an object."""
    if fmt.kind == "json_object":
        return xgrammar.Grammar.builtin_json_grammar()
    if fmt.kind == "json_schema":
        return xgrammar.Grammar.from_json_schema(fmt.schema)
    if fmt.kind == "regex":
        return xgrammar.Grammar.from_regex(fmt.pattern)
    return xgrammar.Grammar.from_ebnf(fmt.grammar())


def _xgrammar_message(error: Exception) -> str:
    """xgrammar's message without its "[time] /project/cpp/file.cc:line: " prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)


def _ebnf_literal(text: str) -> str:
    """A string literal of xgrammar's EBNF: double quotes, backslash escapes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


# --------------------------------------------------------------------------- checking outputs


def output_problem(text: str | None, finish_reason: str, completion_tokens: int | None,
                   fmt: ResponseFormat) -> str | None:
    """The row error (`code: message`) of a completion that does not satisfy its response
    format, or None. The text must parse (`invalid_json`), match its schema
    (`schema_mismatch`, checked with the `jsonschema` package), be one of the choices
    (`invalid_choice`) or match the whole regex (`pattern_mismatch`, checked with Python's
    `re`). Text that does not, cut by max_tokens (finish_reason `length`, left as it is), is
    `incomplete_json` or `incomplete_output`; text that does is complete, even when it used
    every token allowed. The engine's grammar makes the other failures rare (a stop string cut
    the text, or a schema keyword the grammar does not enforce)."""
    if text is None:
        return None
    problem = _mismatch(text, fmt)
    if problem is not None and finish_reason == "length":
        code = "incomplete_json" if fmt.is_json else "incomplete_output"
        what = "JSON value" if fmt.is_json else f"{fmt.kind} output"
        return (f"{code}: the completion reached its max_tokens ({completion_tokens}) before the "
                f"{what} was complete")
    return problem


def _mismatch(text: str, fmt: ResponseFormat) -> str | None:
    if fmt.kind == "choice":
        return None if text in fmt.choices else f"invalid_choice: {_short(text)} is not one of {list(fmt.choices)}"
    if fmt.kind == "regex":
        return None if re.fullmatch(fmt.pattern, text) else \
            f"pattern_mismatch: {_short(text)} does not match {_short(fmt.pattern)}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid_json: the completion is not valid JSON ({e.msg} at {e.pos})"
    if fmt.kind == "json_object" and not isinstance(value, dict):
        return f"invalid_json: the completion is a JSON {type(value).__name__}, expected an object"
    if fmt.kind == "json_schema":
        import jsonschema

        schema = json.loads(fmt.schema)
        error = jsonschema.validators.validator_for(schema)(schema).iter_errors(value)
        first = next(error, None)
        if first is not None:
            where = "/".join(str(p) for p in first.absolute_path) or "(root)"
            return f"schema_mismatch: at {where}: {first.message}"
    return None


def may_constrain(cfg: Config) -> bool:
    """Whether any row of this config's runs may carry a response format (a global one, a
    sampling column, OpenAI batch bodies): the TensorRT-LLM backend then sets up its guided
    decoder, and the transformers backend needs xgrammar."""
    i = cfg.input
    return (cfg.sampling.response_format is not None or i.format == "openai_batch"
            or i.sampling_column is not None or "response_format" in i.sampling_columns)
