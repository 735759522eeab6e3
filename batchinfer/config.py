"""Typed, validated configuration: one dataclass per concern, loaded from YAML in one place.

Every field has a default and a one-line docstring right under it; `field_docs` reads
those docstrings so `batchinfer validate` can print a config that explains itself.
Bounds live in the type (`Annotated[int, Bound(ge=1)]`) so one checker produces every
message, each naming the key, what was given and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Bound:
    """Numeric bounds attached to a field's type with `Annotated`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def violation(self, value: float) -> str | None:
        if self.ge is not None and value < self.ge:
            return f">= {self.ge:g}"
        if self.gt is not None and value <= self.gt:
            return f"> {self.gt:g}"
        if self.le is not None and value > self.le:
            return f"<= {self.le:g}"
        return None

    def describe(self) -> str:
        parts = [f">= {self.ge:g}" if self.ge is not None else "",
                 f"> {self.gt:g}" if self.gt is not None else "",
                 f"<= {self.le:g}" if self.le is not None else ""]
        return " and ".join(p for p in parts if p)


@dataclass
class InputConfig:
    path: str = "data/prompts/"
    """A Parquet file, a folder/prefix, or a glob; any fsspec URL."""
    id_column: str | None = None
    """Column with a unique id per row; if null, ids are synthesized as "<file>:<row>"."""
    prompt_column: str | None = "prompt"
    """String column holding the user prompt (set null when using messages_column)."""
    messages_column: str | None = None
    """Column of chat messages [{role, content}, ...], instead of prompt_column."""
    system_prompt: str | None = None
    """Optional system message; it heads every conversation whose first message is not a system message."""
    passthrough_columns: list[str] = field(default_factory=list)
    """Input columns copied unchanged into the output rows."""
    allow_duplicate_ids: bool = False
    """Accept inputs whose id_column repeats a value (refused by default: ids should be unique)."""

    def check(self) -> list[str]:
        problems = []
        if (self.prompt_column is None) == (self.messages_column is None):
            problems.append(
                "input: set exactly one of prompt_column and messages_column; got "
                f"prompt_column={self.prompt_column!r}, messages_column={self.messages_column!r}"
                " (set prompt_column: null to use messages_column)"
            )
        reserved = set(RESULT_COLUMNS) | {"id"}
        clash = sorted(reserved.intersection(self.passthrough_columns))
        if clash:
            problems.append(
                f"input.passthrough_columns: {clash} would overwrite result columns; "
                f"passthrough columns must not be named any of {sorted(reserved)}"
            )
        if len(set(self.passthrough_columns)) != len(self.passthrough_columns):
            problems.append(
                f"input.passthrough_columns: got duplicates in {self.passthrough_columns}"
            )
        return problems


@dataclass
class OutputConfig:
    path: str = "out/run-1/"
    """Run directory (any fsspec URL): result parts, plan record, manifest."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    """Parquet compression codec of the result parts."""


@dataclass
class StorageConfig:
    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. http://127.0.0.1:9000; default AWS (or $AWS_ENDPOINT_URL)."""
    region: str | None = None
    """S3 region; default from the AWS environment or config."""
    profile: str | None = None
    """AWS profile in ~/.aws; default the credential chain (environment, profile, instance role)."""
    anon: bool = False
    """Read public buckets without credentials."""
    retries: Annotated[int, Bound(ge=1)] = 10
    """Attempts per storage request on throttling (SlowDown) and 5xx errors, with backoff."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for every URL (e.g. key, secret, client_kwargs); never logged."""


@dataclass
class EngineConfig:
    backend: str = "transformers"
    """Engine backend, by registry name (see `batchinfer validate`)."""
    model: str = "smollm2-135m"
    """Alias of an embedded model ("smollm2-135m") or a local model folder."""
    tokenizer: str | None = None
    """Tokenizer folder, if not the model's own."""
    max_batch_size: Annotated[int, Bound(ge=1)] = 16
    """Most requests the engine runs together in one batch."""
    max_model_len: Annotated[int, Bound(ge=2)] | None = None
    """Cap on prompt + completion tokens; default: the model's context length."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto = float32 on CPU, bfloat16 on CUDA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the transformers backend runs; auto = CUDA when available."""
    trust_remote_code: bool = False
    """Allow model folders to run their own Python code (off unless you trust the model)."""
    cache_dir: str | None = None
    """Local cache for converted models; default $BATCHINFER_CACHE_DIR or ~/.cache/batchinfer."""


@dataclass
class TrtllmConfig:
    mode: Literal["engine", "pytorch"] = "engine"
    """engine: a TensorRT engine (prebuilt, cached or built, FP8); pytorch: TensorRT-LLM's PyTorch runtime on a pre-quantized checkpoint."""
    engine_dir: str | None = None
    """A prebuilt engine folder (config.json, rank0.engine) to load as is (engine mode)."""
    engine_cache: str | None = None
    """Where built engines are kept and shared (any fsspec URL, e.g. s3://bucket/engines); default: this node's cache only."""
    node_cache_dir: str | None = None
    """Node-local folder for engine copies (fast local disk); default <engine.cache_dir>/engines."""
    build_on_miss: bool = False
    """Build the engine when none is cached for this GPU, TensorRT-LLM version and settings (else: run `batchinfer build-engine`)."""
    quantization: Literal["fp8", "none"] = "fp8"
    """Weights and KV cache in FP8 (Ada/L40S, Hopper) or unquantized in engine.dtype."""
    calib_dataset: str | None = None
    """Local path of the calibration dataset for an FP8 engine build (no hub is reached)."""
    calib_batches: Annotated[int, Bound(ge=1)] = 512
    """Calibration batches for an FP8 build."""
    calib_max_seq_length: Annotated[int, Bound(ge=1)] = 512
    """Longest calibration sample, in tokens."""
    max_num_tokens: Annotated[int, Bound(ge=1)] = 8192
    """Most tokens of all requests together in one engine step."""
    max_input_len: Annotated[int, Bound(ge=1)] = 7168
    """Longest prompt the engine accepts, in tokens (at most engine.max_model_len - 1)."""
    kv_cache_free_gpu_memory_fraction: Annotated[float, Bound(gt=0, le=1)] = 0.9
    """Share of the GPU memory left after loading the weights that the KV cache takes."""
    enable_block_reuse: bool = True
    """Reuse KV-cache blocks across requests that share a prefix (system prompts, few-shot)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across engine steps so they share steps with generation."""
    scheduler_policy: Literal["guaranteed_no_evict", "max_utilization", "static_batch"] = "guaranteed_no_evict"
    """In-flight batching policy; max_utilization packs more requests but may pause some."""


@dataclass
class SamplingConfig:
    max_tokens: Annotated[int, Bound(ge=1)] = 64
    """Most tokens generated per row."""
    temperature: Annotated[float, Bound(ge=0)] = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: Annotated[float, Bound(gt=0, le=1)] = 1.0
    """Nucleus sampling probability mass."""
    seed: int = 0
    """Random seed for sampling."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string itself is not part of the output."""


@dataclass
class RunConfig:
    num_workers: Annotated[int, Bound(ge=1)] = 2
    """Engine actors to start, one model replica each."""
    gpus_per_worker: Annotated[float, Bound(ge=0)] = 0
    """GPUs each worker asks Ray for (1 in production)."""
    cpus_per_worker: Annotated[float, Bound(ge=0)] = 1
    """CPUs each worker asks Ray for."""
    accelerator_type: str | None = None
    """Ray accelerator type workers must run on, e.g. "L40S"."""
    rows_per_shard: Annotated[int, Bound(ge=1)] = 512
    """Target rows per shard (shards are whole row groups, or row ranges of big ones)."""
    shards_per_worker: Annotated[int, Bound(ge=1)] = 2
    """Shards a worker holds at once, so the next is read while the current generates."""
    max_attempts: Annotated[int, Bound(ge=1)] = 3
    """Attempts per shard before it is recorded as failed (the run then ends partial)."""
    hang_timeout_s: Annotated[float, Bound(gt=0)] = 600
    """A worker holding shards whose engine makes no progress this long is replaced; a step
    holding more than one full context of prompt tokens gets this much per context."""
    request_timeout_s: Annotated[float, Bound(gt=0)] | None = None
    """Deadline for one request; one past it becomes a timeout row error, or restarts a stuck engine."""
    engine_restarts: Annotated[int, Bound(ge=0)] = 2
    """Times a worker restarts a failed engine in place, per shard attempt, before giving the shard back."""
    speculative: bool = True
    """When no shard is left to hand out, idle workers re-run stragglers; the first commit wins."""
    speculate_after_s: Annotated[float, Bound(gt=0)] = 120
    """A shard is a straggler after this long and twice the median shard time."""
    worker_start_timeout_s: Annotated[float, Bound(gt=0)] = 1800
    """Most seconds to wait for every worker to load its engine before failing the run."""
    stop_grace_s: Annotated[float, Bound(ge=0)] = 60
    """On SIGTERM/SIGINT, seconds to let shards in flight commit before exiting."""
    progress_interval_s: Annotated[float, Bound(gt=0)] = 30
    """Seconds between progress lines when stderr is not a terminal (job logs, cron)."""
    driver_lease_s: Annotated[float, Bound(ge=5)] = 60
    """Seconds a driver's lease on the run lasts unless renewed; a dead driver on another host blocks reruns this long."""
    ray_address: str | None = None
    """Ray cluster to join; default $RAY_ADDRESS, else a fresh local cluster."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env for the workers (env_vars, pip, ...); its env_vars add to batchinfer's own."""


RESULT_COLUMNS = (
    "output", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error",
)


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    """Where prompts come from and how rows become conversations."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """How to reach object storage (applies to input and output URLs)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Which model runs and how."""
    trtllm: TrtllmConfig = field(default_factory=TrtllmConfig)
    """TensorRT-LLM settings, used when engine.backend is trtllm."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How tokens are generated."""
    run: RunConfig = field(default_factory=RunConfig)
    """Workers, shards and the Ray cluster."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (),
                date: str | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply `key=value` overrides,
    and put `date` (YYYY-MM-DD, default today in UTC) wherever a path says `{date}`."""
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
            raise ConfigError(
                f"config file {str(p)!r}: expected a mapping of sections at the top level, "
                f"got {type(raw).__name__}"
            )
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


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`null`, 3, [a])."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. sampling.max_tokens=32), got {item!r}")
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        parsed = text
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {item!r}: section {parts[0]!r} is not a mapping in the config")
    section[parts[1]] = Override(text, parsed)


@dataclass(frozen=True)
class Override:
    """A --set value: parsed as YAML, but kept as text for string fields ("a: b" is a string)."""

    text: str
    parsed: Any


def config_from_dict(raw: dict[str, Any]) -> Config:
    problems: list[str] = []
    sections = {}
    for f in dataclasses.fields(Config):
        sections[f.name] = _build(_hints(Config)[f.name], raw.get(f.name) or {}, f.name, problems)
    for key in raw:
        if key not in sections:
            problems.append(_unknown(key, list(sections), "top level"))
    if problems:
        raise ConfigError(_join(problems))
    cfg = Config(**sections)
    problems = cfg.input.check()
    if problems:
        raise ConfigError(_join(problems))
    return cfg


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def _unknown(key: str, allowed: list[str], where: str) -> str:
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {key!r} at {where}{maybe} (allowed: {', '.join(allowed)})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {_show(raw)}")
        return cls()
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(_unknown(key, names, where))
            continue
        ok, coerced, expected = _coerce(_hints(cls)[key], value)
        if not ok and isinstance(value, Override):
            ok, coerced, _ = _coerce(_hints(cls)[key], value.text)
            value = value.parsed
        if ok:
            values[key] = coerced
        else:
            problems.append(f"{where}.{key}: got {_show(value)}; expected {expected}")
    return cls(**values)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(tp: Any, value: Any) -> tuple[bool, Any, str]:
    """Check `value` against type `tp`; return (ok, value, description of what is allowed)."""
    if isinstance(value, Override):
        value = value.parsed
    bound = None
    if typing.get_origin(tp) is Annotated:
        tp, *extras = typing.get_args(tp)
        bound = next((e for e in extras if isinstance(e, Bound)), None)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return True, None, ""
        ok, v, expected = _coerce(inner[0], value)
        return ok, v, f"{expected} or null"
    if origin is Literal:
        return value in args, value, "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return ok, list(value) if ok else value, "a list of strings"
    if origin is dict:
        return isinstance(value, dict), value, "a mapping"
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if tp in (int, float):
        return _coerce_number(tp, value, bound)
    raise TypeError(f"config type {tp!r} is not supported by the loader")


def _coerce_number(tp: type, value: Any, bound: Bound | None) -> tuple[bool, Any, str]:
    kind = "an integer" if tp is int else "a number"
    expected = f"{kind} {bound.describe()}" if bound else kind
    numeric = isinstance(value, int) or (tp is float and isinstance(value, float))
    if isinstance(value, bool) or not numeric or (bound and bound.violation(value)):
        return False, value, expected
    return True, tp(value), expected


# --------------------------------------------------------------------------- self-description


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written right under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-looking mapping entry replaced by '***'."""
    if isinstance(value, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) and v else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def to_commented_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its one-line description; secrets hidden."""
    lines = []
    for section in dataclasses.fields(Config):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}:  # {field_docs(Config)[section.name]}")
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = yaml.safe_dump(redact(getattr(obj, f.name)), default_flow_style=True,
                                   width=1000).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {value}  # {docs.get(f.name, '')}")
    return "\n".join(lines) + "\n"
