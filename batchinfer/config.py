"""Typed, validated configuration on pydantic v2: one model per section, loaded from YAML in one place.

Every field has a default and a docstring right under it (pydantic's
`use_attribute_docstrings` makes it the field's description, which `batchinfer validate`
prints). Bounds live in the type (`Annotated[int, Ge(1)]`); validation is strict (no
"yes" for true, no 1.5 for an integer), and `config_from_dict` turns pydantic's errors
into one message per key: the key, the value given, what is allowed, did-you-mean.

Every field also says whether it changes what a run outputs: `OUTPUT` puts it in the run
fingerprint (a resume with another value is refused), `Neutral(reason)` says why not.
A backend's own settings (`engine.options`) are a model of the same kind, declared by
the backend (see `batchinfer.registry`).
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, Field, SecretStr, SerializeAsAny, ValidationError

from batchinfer import registry
from batchinfer.records import RESULT_COLUMNS


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Output:
    """A field that changes what the model outputs: part of the run fingerprint."""


@dataclass(frozen=True)
class Neutral:
    """A field that does not change outputs (scheduling, storage, paths), and why."""

    reason: str


OUTPUT = Output()


def decision(model: type[BaseModel], name: str) -> Output | Neutral | None:
    """The fingerprint decision written on field `name` of `model`, or None if none is."""
    return next((m for m in model.model_fields[name].metadata if isinstance(m, Output | Neutral)), None)


class Section(BaseModel):
    """One config section: unknown keys refused, no type coercion, docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    def fingerprinted(self) -> dict[str, Any]:
        """This section's values that change outputs (fields marked OUTPUT), by name."""
        return {n: getattr(self, n) for n in type(self).model_fields
                if isinstance(decision(type(self), n), Output)}

    def problems(self) -> list[str]:
        """Checks across fields, after each field is valid; each names the key and the value."""
        return []


class EngineOptions(Section):
    """A backend's own settings (`engine.options`); a backend without any uses this empty one."""


class InputConfig(Section):
    path: Annotated[str, Neutral("the input files are fingerprinted by name, version and rows")] = "data/prompts/"
    """A Parquet file, a folder/prefix, or a glob; any fsspec URL."""
    id_column: Annotated[str | None, OUTPUT] = None
    """Column with a unique id per row; if null, ids are synthesized as "<file>:<row>"."""
    prompt_column: Annotated[str | None, OUTPUT] = "prompt"
    """String column holding the user prompt (set null when using messages_column)."""
    messages_column: Annotated[str | None, OUTPUT] = None
    """Column of chat messages [{role, content}, ...], instead of prompt_column."""
    system_prompt: Annotated[str | None, OUTPUT] = None
    """Optional system message; it heads every conversation whose first message is not a system message."""
    passthrough_columns: Annotated[list[str], OUTPUT] = []
    """Input columns copied unchanged into the output rows."""
    allow_duplicate_ids: Annotated[bool, OUTPUT] = False
    """Accept inputs whose id_column repeats a value (refused by default: ids should be unique)."""

    def problems(self) -> list[str]:
        problems = []
        if (self.prompt_column is None) == (self.messages_column is None):
            problems.append(
                "input: set exactly one of prompt_column and messages_column; got "
                f"prompt_column={self.prompt_column!r}, messages_column={self.messages_column!r}"
                " (set prompt_column: null to use messages_column)")
        reserved = set(RESULT_COLUMNS) | {"id"}
        if clash := sorted(reserved.intersection(self.passthrough_columns)):
            problems.append(f"input.passthrough_columns: {clash} would overwrite result columns; "
                            f"passthrough columns must not be named any of {sorted(reserved)}")
        if len(set(self.passthrough_columns)) != len(self.passthrough_columns):
            problems.append(f"input.passthrough_columns: got duplicates in {self.passthrough_columns}")
        return problems


class OutputConfig(Section):
    path: Annotated[str, Neutral("where results go, not what they are")] = "out/run-1/"
    """Run directory (any fsspec URL): result parts, plan record, manifest."""
    compression: Annotated[Literal["zstd", "snappy", "gzip", "none"],
                           Neutral("how parts are encoded; the rows read back the same")] = "zstd"
    """Parquet compression codec of the result parts."""


_STORAGE = Neutral("how storage is reached, not what is read or written")


class StorageConfig(Section):
    endpoint_url: Annotated[str | None, _STORAGE] = None
    """S3-compatible endpoint, e.g. http://127.0.0.1:9000; default AWS (or $AWS_ENDPOINT_URL)."""
    region: Annotated[str | None, _STORAGE] = None
    """S3 region; default from the AWS environment or config."""
    profile: Annotated[str | None, _STORAGE] = None
    """AWS profile in ~/.aws; default the credential chain (environment, profile, instance role)."""
    anon: Annotated[bool, _STORAGE] = False
    """Read public buckets without credentials."""
    retries: Annotated[int, Ge(1), _STORAGE] = 10
    """Attempts per storage request on throttling (SlowDown) and 5xx errors, with backoff."""
    options: Annotated[dict[str, Any], _STORAGE] = {}
    """Extra fsspec options for every URL (e.g. key, secret, client_kwargs); secret-looking values are never printed."""

    def model_post_init(self, _context: Any) -> None:
        self.options = _secrets_hidden(self.options)

    def fsspec_options(self) -> dict[str, Any]:
        """`options` with every secret revealed, for the filesystem that needs them."""
        return _secrets_revealed(self.options)


class EngineConfig(Section):
    backend: Annotated[str, OUTPUT] = "transformers"
    """Engine backend: a registered name (see `batchinfer validate`) or "package.module:Class"."""
    model: Annotated[str, OUTPUT] = "smollm2-135m"
    """Alias of an embedded model ("smollm2-135m") or a local model folder."""
    tokenizer: Annotated[str | None, OUTPUT] = None
    """Tokenizer folder, if not the model's own."""
    max_batch_size: Annotated[int, Ge(1), Neutral(
        "how many requests share a step; a backend that compiles it into its engine puts it in its own part")] = 16
    """Most requests the engine runs together in one batch."""
    max_model_len: Annotated[Annotated[int, Ge(2)] | None, OUTPUT] = None
    """Cap on prompt + completion tokens; default: the model's context length."""
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], OUTPUT] = "auto"
    """Weight dtype; auto = float32 on CPU, bfloat16 on CUDA."""
    trust_remote_code: Annotated[bool, Neutral("permission to run the model folder's code")] = False
    """Allow model folders to run their own Python code (off unless you trust the model)."""
    cache_dir: Annotated[str | None, Neutral("where converted models are kept")] = None
    """Local cache for converted models; default $BATCHINFER_CACHE_DIR or ~/.cache/batchinfer."""
    options: Annotated[SerializeAsAny[EngineOptions], OUTPUT] = Field(default_factory=EngineOptions)
    """The backend's own settings (`batchinfer validate` lists them); its fields say which change outputs."""


class SamplingConfig(Section):
    max_tokens: Annotated[int, Ge(1), OUTPUT] = 64
    """Most tokens generated per row."""
    temperature: Annotated[float, Ge(0), OUTPUT] = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: Annotated[float, Gt(0), Le(1), OUTPUT] = 1.0
    """Nucleus sampling probability mass."""
    seed: Annotated[int, OUTPUT] = 0
    """Random seed for sampling."""
    stop: Annotated[list[str], OUTPUT] = []
    """Strings that end generation; the stop string itself is not part of the output."""


_SCHEDULING = Neutral("where and when rows run; every row's output is the same")


class RunConfig(Section):
    num_workers: Annotated[int, Ge(1), _SCHEDULING] = 2
    """Engine actors to start, one model replica each."""
    gpus_per_worker: Annotated[float, Ge(0), _SCHEDULING] = 0
    """GPUs each worker asks Ray for (1 in production)."""
    cpus_per_worker: Annotated[float, Ge(0), _SCHEDULING] = 1
    """CPUs each worker asks Ray for."""
    accelerator_type: Annotated[str | None, _SCHEDULING] = None
    """Ray accelerator type workers must run on, e.g. "L40S"."""
    rows_per_shard: Annotated[int, Ge(1), Neutral("fixed by the plan when the run starts")] = 512
    """Target rows per shard (shards are whole row groups, or row ranges of big ones)."""
    shards_per_worker: Annotated[int, Ge(1), _SCHEDULING] = 2
    """Shards a worker holds at once, so the next is read while the current generates."""
    max_attempts: Annotated[int, Ge(1), _SCHEDULING] = 3
    """Attempts per shard before it is recorded as failed (the run then ends partial)."""
    hang_timeout_s: Annotated[float, Gt(0), _SCHEDULING] = 600
    """A worker holding shards whose engine makes no progress this long is replaced; a step
    holding more than one full context of prompt tokens gets this much per context."""
    request_timeout_s: Annotated[Annotated[float, Gt(0)] | None, Neutral(
        "a row past it is a timeout error, which a rerun of failed rows retries")] = None
    """Deadline for one request; one past it becomes a timeout row error, or restarts a stuck engine."""
    engine_restarts: Annotated[int, Ge(0), _SCHEDULING] = 2
    """Times a worker restarts a failed engine in place, per shard attempt, before giving the shard back."""
    speculative: Annotated[bool, _SCHEDULING] = True
    """When no shard is left to hand out, idle workers re-run stragglers; the first commit wins."""
    speculate_after_s: Annotated[float, Gt(0), _SCHEDULING] = 120
    """A shard is a straggler after this long and twice the median shard time."""
    worker_start_timeout_s: Annotated[float, Gt(0), _SCHEDULING] = 1800
    """Most seconds to wait for every worker to load its engine before failing the run."""
    stop_grace_s: Annotated[float, Ge(0), _SCHEDULING] = 60
    """On SIGTERM/SIGINT, seconds to let shards in flight commit before exiting."""
    progress_interval_s: Annotated[float, Gt(0), _SCHEDULING] = 30
    """Seconds between progress lines when stderr is not a terminal (job logs, cron)."""
    driver_lease_s: Annotated[float, Ge(5), _SCHEDULING] = 60
    """Seconds a driver's lease on the run lasts unless renewed; a dead driver on another host blocks reruns this long."""
    ray_address: Annotated[str | None, _SCHEDULING] = None
    """Ray cluster to join; default $RAY_ADDRESS, else a fresh local cluster."""
    runtime_env: Annotated[dict[str, Any], _SCHEDULING] = {}
    """Ray runtime_env for the workers (env_vars, pip, ...); its env_vars add to batchinfer's own."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    input: InputConfig = Field(default_factory=InputConfig)
    """Where prompts come from and how rows become conversations."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where results go."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How to reach object storage (applies to input and output URLs)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """Which model runs and how."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """How tokens are generated."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Workers, shards and the Ray cluster."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (secrets revealed), as `config_from_dict` takes it back."""
        return _secrets_revealed(self.model_dump())


# Keys that moved, so an old config gets a pointer instead of a bare "unknown key".
MOVED = {"trtllm": "engine.options (with engine.backend: trtllm)", "engine.device": "engine.options.device"}


# --------------------------------------------------------------------------- loading


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


DATE_PLACEHOLDER = "{date}"


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
        where = where.setdefault(part, {})
        if not isinstance(where, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])!r} is not a mapping in the config")
    where[parts[-1]] = Override(text, parsed)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate plain data (a parsed YAML file) into a Config; ConfigError names every problem."""
    raw, options = dict(raw), None
    if isinstance(raw.get("engine"), dict):  # the backend's options are checked by the backend's model
        raw["engine"] = dict(raw["engine"])
        options = raw["engine"].pop("options", None)
    cfg, problems = _validate(Config, raw, "")
    if cfg is not None:
        backend_options, more = _validate_options(cfg.engine.backend, options)
        problems += more
        cfg.engine.options = backend_options
        for section in (cfg.input, cfg.output, cfg.storage, cfg.engine, cfg.sampling, cfg.run,
                        cfg.engine.options):
            problems += section.problems()
    if problems:
        raise ConfigError(_join(problems))
    return cfg


def _validate_options(backend: str, options: Any) -> tuple[EngineOptions, list[str]]:
    try:
        model = registry.engine_class(backend).Options
    except registry.EngineUnavailable as e:
        return EngineOptions(), [f"engine.backend: {e}"]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return model(), [f"engine.options: expected a mapping of keys, got {_show(options)}"]
    value, problems = _validate(model, options, "engine.options")
    return value or model(), problems


def _validate(model: type[BaseModel], raw: Any, where: str) -> tuple[Any, list[str]]:
    """`model` validated from `raw`; a --set value that fails as YAML is retried as its text."""
    try:
        return model.model_validate(_parsed(raw)), []
    except ValidationError as e:
        errors = e.errors()
    retry = _as_text(raw, [err["loc"] for err in errors])
    if retry is not raw:
        try:
            return model.model_validate(_parsed(retry)), []
        except ValidationError as e:
            errors = e.errors()
    problems: list[str] = []
    for err in errors:
        message = _message(model, err, where)
        if message not in problems:
            problems.append(message)
    return None, problems


def _parsed(raw: Any) -> Any:
    if isinstance(raw, Override):
        return raw.parsed
    if isinstance(raw, dict):
        return {k: _parsed(v) for k, v in raw.items()}
    return raw


def _as_text(raw: Any, locs: list[tuple]) -> Any:
    """`raw` with each Override at one of `locs` replaced by its text (or `raw` itself if none)."""
    changed = dict(raw) if isinstance(raw, dict) else raw
    hit = False
    for loc in locs:
        where = changed
        for part in loc[:-1]:
            if not isinstance(where, dict) or not isinstance(where.get(part), dict):
                where = None
                break
            where[part] = dict(where[part])
            where = where[part]
        if isinstance(where, dict) and isinstance(where.get(loc[-1]), Override):
            where[loc[-1]] = where[loc[-1]].text
            hit = True
    return changed if hit else raw


def _message(model: type[BaseModel], err: dict[str, Any], where: str) -> str:
    loc = [str(p) for p in err["loc"]]
    owner, path = model, [where] if where else []
    for part in loc[:-1]:  # walk down to the model that owns the last key
        field = owner.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        owner, path = field.annotation, [*path, part]
        loc = loc[1:]
    key, here = loc[0], ".".join(path) or "top level"
    moved = MOVED.get(f"{'.'.join(path)}.{key}" if path else key)
    if err["type"] == "extra_forbidden":
        return _unknown(key, list(owner.model_fields), here) + (f"; it moved to {moved}" if moved else "")
    if err["type"] == "model_type" and len(loc) == 1 and key in owner.model_fields:
        return f"{'.'.join([*path, key])}: expected a mapping of keys, got {_show(err['input'])}"
    field = owner.model_fields[key]
    return f"{'.'.join([*path, key])}: got {_show(err['input'])}; expected {_expected(field.annotation, field.metadata)}"


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def _unknown(key: str, allowed: list[str], where: str) -> str:
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {key!r} at {where}{maybe} (allowed: {', '.join(allowed) or 'none'})"


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


# --------------------------------------------------------------------------- secrets and self-description


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def _is_secret(name: object) -> bool:
    return any(w in str(name).lower() for w in SECRET_WORDS)


def _secrets_hidden(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: SecretStr(v) if _is_secret(k) and isinstance(v, str) else _secrets_hidden(v)
                for k, v in value.items()}
    return value


def _secrets_revealed(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _secrets_revealed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_secrets_revealed(v) for v in value]
    return value


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-looking mapping entry (and every SecretStr) shown as '***'."""
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, dict):
        return {k: "***" if _is_secret(k) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def to_commented_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its one-line description; secrets hidden."""
    lines = []
    for name, section_field in Config.model_fields.items():
        lines.append(f"{name}:  # {section_field.description}")
        lines += _commented(getattr(cfg, name), "  ")
    return "\n".join(lines) + "\n"


def _commented(section: BaseModel, indent: str) -> list[str]:
    lines = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        doc = (field.description or "").replace("\n", " ")
        doc = " ".join(doc.split())
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:  # {doc}")
            lines += _commented(value, indent + "  ") or [f"{indent}  {{}}  # this backend has no options"]
            continue
        text = yaml.safe_dump(redact(value), default_flow_style=True, width=1000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{indent}{name}: {text}  # {doc}")
    return lines
