"""Reading a config: YAML, `--set` overrides and `{date}`, validated by the models in
config.py, with one message per problem that names the key, the value given, what is
allowed, and did-you-mean; and printing a config back with every key's description.

pydantic does the validating; this module only turns its errors into those messages
(STYLE.md item 7) and finds the backend's own options model through the registry.
"""

from __future__ import annotations

import contextlib
import difflib
import types
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, SecretStr, ValidationError

from batchinfer import registry, sampling
from batchinfer.config import Config, ConfigError, EngineOptions, Section, is_secret
from batchinfer.errors import RowError

# Keys that moved, so an old config gets a pointer instead of a bare "unknown key"; a
# top-level section named after a backend (an older release's layout) moved to engine.options.
MOVED = {"engine.device": "engine.options.device"}
DATE_PLACEHOLDER = "{date}"


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (),
                date: str | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply `key=value` overrides,
    and put `date` (YYYY-MM-DD, default today in UTC) wherever a path says `{date}`.

    Raises ConfigError naming every problem found."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (expected a YAML file)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top "
                              f"level, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return with_date(config_from_dict(raw), date)


def with_date(cfg: Config, date: str | None) -> Config:
    """Substitute `{date}` in input.path and output.path (nightly batches)."""
    if date is None:
        date = datetime.now(timezone.utc).date().isoformat()
    else:
        try:
            date = datetime.strptime(date, "%Y-%m-%d").date().isoformat()
        except ValueError:
            raise ConfigError(f"--date: got {date!r}; expected a date as YYYY-MM-DD") from None
    cfg.input.path = cfg.input.path.replace(DATE_PLACEHOLDER, date)
    cfg.output.path = cfg.output.path.replace(DATE_PLACEHOLDER, date)
    return cfg


@dataclass(frozen=True)
class Override:
    """A --set value: parsed as YAML, but kept as text for string fields ("a: b" is a string)."""

    text: str
    parsed: Any


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` (or `engine.options.key=value`) override; the value is
    parsed as YAML (`null`, 3, [a])."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    nested = len(parts) == 3 and parts[:2] == ["engine", "options"]
    if not sep or not (len(parts) == 2 or nested) or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. sampling.max_tokens=32, "
                          f"engine.options.mode=engine), got {item!r}")
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        parsed = text
    where = raw
    for depth, part in enumerate(parts[:-1]):
        if where.get(part) is None:  # an empty section in the YAML (`engine:`) is an empty mapping
            where[part] = {}
        where = where[part]
        if not isinstance(where, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])!r} is not a mapping in the config")
    where[parts[-1]] = Override(text, parsed)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate plain data (a parsed YAML file) into a Config; ConfigError names every problem."""
    problems = [_unknown(key, list(Config.model_fields), "top level") for key in raw
                if key not in Config.model_fields]
    sections: dict[str, Any] = {}
    for name, field in Config.model_fields.items():
        value = raw.get(name) or {}
        if name == "engine" and isinstance(value, dict):  # the backend's model checks its options
            value = {k: v for k, v in value.items() if k != "options"}
        sections[name], more = _validate(field.annotation, value, name)
        problems += more
    model = _options_model(sections["engine"].backend, problems) if sections["engine"] else None
    if model is not None:  # with an unknown backend its options cannot be checked
        options = (raw.get("engine") or {}).get("options") or {}
        sections["engine"].options, more = _validate(model, options, "engine.options")
        problems += more
    for section in [*sections.values(), getattr(sections["engine"], "options", None)]:
        problems += section.problems() if isinstance(section, Section) else []
    if sections["sampling"] is not None:
        problems += _response_format_problems(sections["sampling"].response_format)
    if sections["input"] is not None and sections["output"] is not None:
        problems += _passthrough_problems(sections["input"], sections["output"])
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems in the config:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return Config(**sections)


def _response_format_problems(value: Any) -> list[str]:
    """A global response format that cannot be compiled stops the run before any engine starts."""
    try:
        sampling.parse_response_format(value)
    except RowError as e:
        return [f"sampling.response_format: {e.message}"]
    return []


def _passthrough_problems(input_cfg: Any, output_cfg: Any) -> list[str]:
    if output_cfg.format == "openai_batch" and input_cfg.passthrough_columns:
        return [f"input.passthrough_columns {input_cfg.passthrough_columns}: output.format openai_batch writes "
                "the OpenAI Batch API's line shape, which has no place for input columns; remove them, or "
                "use output.format parquet"]
    return []


def _options_model(backend: str, problems: list[str]) -> type[EngineOptions] | None:
    try:
        model = getattr(registry.engine_class(backend), "Options", None)
    except registry.EngineUnavailable as e:
        problems.append(f"engine.backend: {e}")
        return None
    if not (isinstance(model, type) and issubclass(model, EngineOptions)):
        problems.append(f"engine.backend: {backend!r} is not an engine backend (expected a subclass of "
                        "batchinfer.engines.Engine, whose Options is its settings model)")
        return None
    return model


def _validate(model: type[BaseModel], raw: Any, where: str) -> tuple[Any, list[str]]:
    """`model` validated from `raw` (or None and the problems); an override the field refuses
    as YAML is tried again as its text."""
    if isinstance(raw, Override):
        raw = raw.parsed
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping of keys, got {_show(raw)}"]
    parsed = {k: v.parsed if isinstance(v, Override) else v for k, v in raw.items()}
    try:
        return model.model_validate(parsed), []
    except ValidationError as e:
        errors = e.errors()
    refused = {str(err["loc"][0]) for err in errors if err["loc"]}
    as_text = {k: raw[k].text for k in refused if isinstance(raw.get(k), Override)}
    if as_text:
        with contextlib.suppress(ValidationError):
            return model.model_validate(parsed | as_text), []
    return None, list(dict.fromkeys(_message(model, err, where) for err in errors))


def _message(model: type[BaseModel], err: dict[str, Any], where: str) -> str:
    key = str(err["loc"][0])
    if err["type"] == "extra_forbidden":
        return _unknown(key, list(model.model_fields), where)
    field = model.model_fields[key]
    return f"{where}.{key}: got {_show(err['input'])}; expected {_expected(field.annotation, field.metadata)}"


def _unknown(key: str, allowed: list[str], where: str) -> str:
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    moved = MOVED.get(f"{where}.{key}")
    if where == "top level" and key in registry.names():
        moved = f"engine.options (with engine.backend: {key})"
    return (f"unknown key {key!r} at {where}{maybe} (allowed: {', '.join(allowed) or 'none'})"
            + (f"; it moved to {moved}" if moved else ""))


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _expected(tp: Any, metadata: typing.Iterable[Any] = ()) -> str:
    """What a field of type `tp` (with `metadata` bounds) accepts, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _expected(args[0], [*metadata, *args[1:]])
    if origin in (Union, types.UnionType):
        return _expected(next(a for a in args if a is not type(None)), metadata) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    words = {list: "a list of strings", dict: "a mapping", bool: "true or false", str: "a string",
             int: "an integer", float: "a number"}
    text = words.get(origin or tp, "a mapping of keys")
    bounds = [f">= {m.ge:g}" if isinstance(m, Ge) else f"> {m.gt:g}" if isinstance(m, Gt) else f"<= {m.le:g}"
              for m in metadata if isinstance(m, Ge | Gt | Le)]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


# --------------------------------------------------------------------------- printing it back


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-looking mapping entry (and every SecretStr) shown as '***'."""
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, dict):
        return {k: "***" if is_secret(k) and v else redact(v) for k, v in value.items()}
    return [redact(v) for v in value] if isinstance(value, list) else value


def to_commented_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its one-line description; secrets hidden."""
    lines = []
    for name, field in Config.model_fields.items():
        lines.append(f"{name}:  # {field.description}")
        lines += _commented(getattr(cfg, name), "  ")
    return "\n".join(lines) + "\n"


def _commented(section: BaseModel, indent: str) -> list[str]:
    lines = []
    for name, field in type(section).model_fields.items():
        value, doc = getattr(section, name), " ".join((field.description or "").split())
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:  # {doc}")
            lines += _commented(value, indent + "  ") or [f"{indent}  {{}}  # this backend has no options"]
            continue
        text = yaml.safe_dump(redact(value), default_flow_style=True, width=1000).strip()
        lines.append(f"{indent}{name}: {text.removesuffix('...').strip()}  # {doc}")
    return lines
