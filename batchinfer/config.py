"""The configuration's schema on pydantic v2: one model per section (loading: config_loader.py).

Every field has a default and a docstring right under it (pydantic's
`use_attribute_docstrings` makes it the field's description, which `batchinfer validate`
prints). Bounds live in the type (`Annotated[int, Ge(1)]`); validation is strict (no
"yes" for true, no 1.5 for an integer).

Every field also says whether it changes outputs (fingerprint.py): `OUTPUT` puts it in the
run fingerprint, `Neutral(reason)` says why not; so do a backend's own `engine.options`.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, MinLen
from pydantic import BaseModel, ConfigDict, Field, SecretStr, SerializeAsAny, model_validator

from batchinfer import registry
from batchinfer.fingerprint import OUTPUT, Neutral
from batchinfer.records import RESULT_COLUMNS


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


class Section(BaseModel):
    """One config section: unknown keys refused, no type coercion, docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    def problems(self) -> list[str]:
        """Checks across fields, after each field is valid; each names the key and the value."""
        return []


class EngineOptions(Section):
    """A backend's own settings (`engine.options`); a backend without any uses this empty one."""


INPUT_FORMATS = ("parquet", "openai_batch")
"""input.format and output.format values (readers/ registers a reader per input format)."""

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "response_format")
"""The settings a row may override (input.sampling_column, input.sampling_columns)."""


class InputConfig(Section):
    path: Annotated[str, Neutral("the input files are fingerprinted by name, version and rows")] = "data/prompts/"
    """A file, a folder/prefix, or a glob of the input format's files (.parquet, or .jsonl/.jsonl.gz); any fsspec URL."""
    format: Annotated[Literal["parquet", "openai_batch"], OUTPUT] = "parquet"
    """parquet: a prompt or messages column per row; openai_batch: OpenAI Batch API JSONL lines {custom_id, method, url, body} (chat and completions), custom_id as the row id and the body's settings per row (the column settings below do not apply)."""
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
    sampling_column: Annotated[str | None, OUTPUT] = None
    """Column of per-row request settings: a struct, or a JSON object string, with any of max_tokens, temperature, top_p, seed, stop, response_format; a null setting (or row) uses the sampling section's."""
    sampling_columns: Annotated[dict[str, str], OUTPUT] = {}
    """Per-row settings each from a column of its own: setting -> column, e.g. {max_tokens: max_new_tokens}; a null cell uses the sampling section's value. Wins over sampling_column."""
    models: Annotated[list[str] | None, OUTPUT] = None
    """openai_batch: the body.model names this job serves (all run on engine.model); any other name stops the run before engines start. null: any name, reported once."""

    def problems(self) -> list[str]:
        if self.format == "openai_batch":
            return self._openai_batch_problems()
        problems = self._sampling_problems()
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
        if self.models is not None:
            problems.append("input.models applies to input.format openai_batch only; remove it")
        return problems

    def _sampling_problems(self) -> list[str]:
        problems = []
        if unknown := sorted(set(self.sampling_columns) - set(SAMPLING_KEYS)):
            problems.append(f"input.sampling_columns: unknown setting(s) {unknown}; expected any of "
                            f"{', '.join(SAMPLING_KEYS)}")
        used = {self.prompt_column, self.messages_column, self.id_column}
        if clash := sorted(c for c in [self.sampling_column, *self.sampling_columns.values()] if c and c in used):
            problems.append(f"input.sampling_column(s): {clash} is also the prompt, messages or id column")
        return problems

    def _openai_batch_problems(self) -> list[str]:
        """openai_batch lines carry their own id, prompt and settings: the column settings
        must stay unset (prompt_column keeps its default, which does not apply)."""
        set_columns = {name: getattr(self, name) for name in
                       ("id_column", "messages_column", "sampling_column", "sampling_columns",
                        "passthrough_columns") if getattr(self, name)}
        if set_columns:
            return [f"input.format openai_batch takes each row's id, prompt and settings from its "
                    f"line (custom_id, body); remove {', '.join(f'input.{k}' for k in set_columns)}"]
        return []


class OutputConfig(Section):
    path: Annotated[str, Neutral("where results go, not what they are")] = "out/run-1/"
    """Run directory (any fsspec URL): result parts, plan record, manifest."""
    format: Annotated[Literal["parquet", "openai_batch"], OUTPUT] = "parquet"
    """parquet: one Parquet part per shard (id, output, finish_reason, tokens, error); openai_batch: JSONL parts in the OpenAI Batch API's output shape, failed requests also under _errors/."""
    compression: Annotated[Literal["zstd", "snappy", "gzip", "none"],
                           Neutral("how parts are encoded; the rows read back the same")] = "zstd"
    """Parquet compression codec of the result parts (openai_batch parts are plain JSONL)."""


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
        self.options = _secrets(self.options, hide=True)

    def fsspec_options(self) -> dict[str, Any]:
        """`options` with every secret revealed, as new mappings and lists the caller may change."""
        return _secrets(self.options, hide=False)


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

    @model_validator(mode="after")
    def _backend_defaults(self) -> EngineConfig:
        """Unset `options` hold the backend's defaults, however the config was built."""
        if type(self.options) is EngineOptions:
            with contextlib.suppress(registry.EngineUnavailable, AttributeError, TypeError):
                self.options = registry.engine_class(self.backend).Options()
        return self


class SamplingConfig(Section):
    max_tokens: Annotated[int, Ge(1), OUTPUT] = 64
    """Most tokens generated per row."""
    temperature: Annotated[float, Ge(0), Le(2), OUTPUT] = 0.0
    """Sampling temperature, 0 to 2 (OpenAI's range); 0 = greedy."""
    top_p: Annotated[float, Gt(0), Le(1), OUTPUT] = 1.0
    """Nucleus sampling probability mass."""
    seed: Annotated[int, Ge(0), Le(2**63 - 1), OUTPUT] = 0
    """Random seed for sampling; each row samples with a seed made from it and the row id, unless the row sets its own."""
    stop: Annotated[list[Annotated[str, MinLen(1)]], OUTPUT] = []
    """Strings that end generation; the stop string itself is not part of the output."""
    response_format: Annotated[dict[str, Any] | None, OUTPUT] = None
    """Constrain every completion (rows may set their own): {type: json_object}, {type: json_schema, json_schema: {name, schema}} (OpenAI's shape), {type: regex, regex: ...} or {type: choice, choice: [...]}; null: free text. Checked when the config loads (sampling.py)."""


_SCHEDULING = Neutral("where and when rows run; every row's output is the same")


class RunConfig(Section):
    num_workers: Annotated[int, Ge(1), _SCHEDULING] = 2
    """Engine actors to start, one model replica each."""
    gpus_per_worker: Annotated[float, Ge(0), OUTPUT] = 0
    """GPUs each worker asks Ray for (1 in production); CPU and GPU runs differ in their numbers."""
    cpus_per_worker: Annotated[float, Ge(0), _SCHEDULING] = 1
    """CPUs each worker asks Ray for."""
    accelerator_type: Annotated[str | None, OUTPUT] = None
    """Ray accelerator type workers must run on, e.g. "L40S" (a compiled engine is built per GPU type)."""
    rows_per_shard: Annotated[int, Ge(1), Neutral("fixed by the plan when the run starts")] = 512
    """Target rows per shard (shards are whole row groups, or row ranges of big ones)."""
    shards_per_worker: Annotated[Annotated[int, Ge(1)] | None, _SCHEDULING] = None
    """Shards a worker holds at once; null: 2, or more (up to 16) to keep its engine's window full and prefetch_s of work queued."""
    prefetch_s: Annotated[float, Ge(0), _SCHEDULING] = 10
    """With shards_per_worker null: seconds of a worker's work (at its measured rate) to keep queued behind its current shard."""
    prefix_order: Annotated[bool, _SCHEDULING] = True
    """Submit each shard's rows sorted by prompt tokens, so rows sharing a prefix (a system prompt, few-shot examples) run back to back and the engine reuses their KV cache blocks; results keep the input order."""
    max_attempts: Annotated[int, Ge(1), _SCHEDULING] = 3
    """Attempts per shard before it is recorded as failed (the run then ends partial)."""
    hang_timeout_s: Annotated[float, Gt(0), _SCHEDULING] = 600
    """A worker holding shards whose engine makes no progress this long is replaced; a step
    holding more than one full context of prompt tokens gets this much per context."""
    request_timeout_s: Annotated[Annotated[float, Gt(0)] | None, Neutral(
        "a row past it is a timeout error, which a rerun of failed rows retries")] = None
    """Deadline for one request; one past it becomes a timeout row error, or restarts a stuck engine."""
    row_retries: Annotated[int, Ge(0), _SCHEDULING] = 2
    """Times a request that failed with a retryable error (timeout, engine_error, request_failed) is run again within its shard attempt before the row is recorded as failed."""
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
    name: Annotated[str | None, _SCHEDULING] = None
    """The job's name in metrics and JSON logs (their `run` label), e.g. "nightly-summaries": stable across nights, so dashboards compare them; null: the output folder's name and a hash of its path."""
    gpu_hour_cost: Annotated[Annotated[float, Ge(0)] | None, _SCHEDULING] = None
    """Price of one GPU-hour (e.g. 1.86 for an on-demand L40S in USD); the manifest, summary and report then show the run's cost and its cost per 1M output tokens. A CPU worker counts as one GPU."""
    metrics_export_port: Annotated[Annotated[int, Ge(1), Le(65535)] | None, _SCHEDULING] = None
    """Port of Ray's Prometheus endpoint (http://<node>:<port>/metrics) on the local cluster batchinfer starts; null: Ray picks one (logged). A joined cluster exports where `ray start --metrics-export-port` said."""
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
        """Plain data (secrets revealed), as `config_loader.config_from_dict` takes it back."""
        return _secrets(self.model_dump(), hide=False)


SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def is_secret(name: object) -> bool:
    """Whether a mapping key names a secret (its value is never printed)."""
    return any(w in str(name).lower() for w in SECRET_WORDS)


def _secrets(value: Any, hide: bool) -> Any:
    """`value` with secret-looking strings wrapped in SecretStr (hide) or unwrapped (not hide)."""
    if isinstance(value, SecretStr):
        return value if hide else value.get_secret_value()
    if isinstance(value, dict):
        return {k: SecretStr(v) if hide and is_secret(k) and isinstance(v, str) else _secrets(v, hide)
                for k, v in value.items()}
    return [_secrets(v, hide) for v in value] if isinstance(value, list) else value
