"""The TensorRT-LLM backend: one FP8 engine per GPU worker, fed through `generate_async`.

This is the only module that imports `tensorrt_llm`, and only inside the worker (or a
build task), after setting the environment it reads at import. Written against the
TensorRT-LLM 1.2.x Python API; every symbol used, and the source file it was checked
in, is listed in docs/trtllm-api.md.

Two modes:
- engine:  `tensorrt_llm._tensorrt_engine.LLM` loads a TensorRT engine folder: a prebuilt
           one (`engine.options.engine_dir`) or the cached one for this GPU, version and settings,
           downloaded once per node or built with FP8 weights and FP8 KV cache.
- pytorch: `tensorrt_llm.LLM` (the PyTorch runtime) on a pre-quantized FP8 checkpoint
           (ModelOpt `hf_quant_config.json`), FP8 KV cache via `KvCacheConfig(dtype="fp8")`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import types
from pathlib import Path
from typing import Any

from batchinfer import model_refs, storage
from batchinfer.config import Config, ConfigError
from batchinfer.engines.base import Cluster, Engine, Request, Result
from batchinfer.engines.trtllm import artifacts, calibration
from batchinfer.engines.trtllm.options import BakedIn, TrtllmOptions, build_settings
from batchinfer.fingerprint import decision, fingerprinted
from batchinfer.sampling import ResponseFormat, Sampling, may_constrain

log = logging.getLogger(__name__)

# Read by tensorrt_llm when it starts its executor (llmapi/utils.py, cached on first
# read): run the executor worker in this process instead of spawning an MPI worker, the
# right shape when one Ray actor owns one GPU.
TRTLLM_ENV = {"TLLM_WORKER_USE_SINGLE_PROCESS": "1"}

PARAMS_KEPT = 4096
"""Greedy SamplingParams kept for reuse (one per distinct setting); rows with ever new settings
(per-row max_tokens, schemas) start the cache over rather than grow it without bound."""


def import_api() -> types.SimpleNamespace:
    """The slice of tensorrt_llm this backend uses, imported after setting its environment."""
    os.environ.update(TRTLLM_ENV)
    import tensorrt_llm
    from tensorrt_llm import _tensorrt_engine
    from tensorrt_llm.llmapi import (
        LLM,
        BuildConfig,
        CalibConfig,
        CapacitySchedulerPolicy,
        GuidedDecodingParams,
        KvCacheConfig,
        QuantAlgo,
        QuantConfig,
        RequestError,
        SamplingParams,
        SchedulerConfig,
    )

    return types.SimpleNamespace(
        version=tensorrt_llm.__version__, TorchLLM=LLM, EngineLLM=_tensorrt_engine.LLM,
        BuildConfig=BuildConfig, CalibConfig=CalibConfig, KvCacheConfig=KvCacheConfig,
        SchedulerConfig=SchedulerConfig, CapacitySchedulerPolicy=CapacitySchedulerPolicy,
        QuantAlgo=QuantAlgo, QuantConfig=QuantConfig, RequestError=RequestError,
        SamplingParams=SamplingParams, GuidedDecodingParams=GuidedDecodingParams)


# --------------------------------------------------------------------------- config -> arguments


def check_config(cfg: Config) -> list[str]:
    """Impossible combinations, found before any GPU is touched."""
    t, e, problems = cfg.engine.options, cfg.engine, []
    if t.engine_cache:  # gs:// without gcsfs: exit 2 with the pip command, before Ray
        storage.check_installed(t.engine_cache, "engine.options.engine_cache")
    if cfg.run.gpus_per_worker < 1:
        problems.append(f"run.gpus_per_worker: got {cfg.run.gpus_per_worker:g}; the trtllm backend "
                        "needs one GPU per worker (set 1)")
    if e.max_model_len is not None:
        if t.max_input_len >= e.max_model_len:
            problems.append(f"engine.options.max_input_len ({t.max_input_len}) must be below engine.max_model_len "
                            f"({e.max_model_len}): the longest prompt needs room for at least one token")
        if cfg.sampling.max_tokens >= e.max_model_len:
            problems.append(f"sampling.max_tokens ({cfg.sampling.max_tokens}) must be below "
                            f"engine.max_model_len ({e.max_model_len})")
    if not t.enable_chunked_prefill and t.max_num_tokens < t.max_input_len:
        problems.append(f"engine.options.max_num_tokens ({t.max_num_tokens}) < engine.options.max_input_len "
                        f"({t.max_input_len}) without chunked prefill: the longest prompt could never "
                        "be scheduled; raise max_num_tokens or set enable_chunked_prefill: true")
    if e.dtype == "float32" and t.quantization == "fp8":
        problems.append("engine.dtype float32 with engine.options.quantization fp8: use auto, bfloat16 or float16")
    if t.mode == "pytorch":
        problems += _check_pytorch(cfg)
    else:
        problems += _check_engine(cfg)
    return problems


def _check_pytorch(cfg: Config) -> list[str]:
    t, problems = cfg.engine.options, []
    if t.engine_dir or t.engine_cache or t.build_on_miss:
        problems.append("engine.options.engine_dir, engine_cache and build_on_miss are for mode: engine; "
                        "mode: pytorch runs the checkpoint in engine.model directly")
    if t.quantization == "fp8":
        folder = Path(cfg.engine.model)
        if folder.is_dir() and not (folder / "hf_quant_config.json").is_file():
            problems.append(
                f"engine.options.mode pytorch with quantization fp8 runs a pre-quantized FP8 checkpoint, but "
                f"{folder} has no hf_quant_config.json (ModelOpt's marker); quantize it with NVIDIA "
                "ModelOpt, or use mode: engine to build an FP8 engine from this checkpoint")
    return problems


def _check_engine(cfg: Config) -> list[str]:
    t, problems = cfg.engine.options, []
    if t.engine_dir:
        if not cfg.engine.tokenizer:
            problems.append("engine.options.engine_dir is set but engine.tokenizer is not: an engine folder has "
                            "no tokenizer; point engine.tokenizer at the model's Hugging Face folder")
        if t.build_on_miss:
            problems.append("engine.options.engine_dir loads a prebuilt engine as is; build_on_miss does not apply")
    elif t.build_on_miss and t.quantization == "fp8" and not t.calib_dataset:
        problems.append("building an FP8 engine (engine.options.build_on_miss) needs calibration data: set "
                        "engine.options.calib_dataset to a local dataset path (no hub is reached)")
    elif t.quantization == "fp8" and t.calib_dataset:  # an FP8 build may calibrate on it
        problems += calibration.check_calib_dataset(t.calib_dataset)
    elif t.calib_dataset and not Path(t.calib_dataset).exists():
        problems.append(f"engine.options.calib_dataset: {t.calib_dataset!r} does not exist")
    return problems


def runtime_args(cfg: Config, api: Any) -> dict[str, Any]:
    """LLM constructor arguments shared by both modes (runtime knobs, no build settings)."""
    t = cfg.engine.options
    kv: dict[str, Any] = {"free_gpu_memory_fraction": t.kv_cache_free_gpu_memory_fraction,
                          "enable_block_reuse": t.enable_block_reuse}
    if t.mode == "pytorch" and t.quantization == "fp8":
        kv["dtype"] = "fp8"  # the TensorRT backend asserts dtype "auto": its FP8 KV is built in
    policy = api.CapacitySchedulerPolicy[t.scheduler_policy.upper()]
    args = {
        "tokenizer": model_refs.tokenizer_folder(cfg.engine),
        "dtype": cfg.engine.dtype,
        "trust_remote_code": cfg.engine.trust_remote_code,
        "max_batch_size": cfg.engine.max_batch_size,
        "max_num_tokens": t.max_num_tokens,
        "enable_chunked_prefill": t.enable_chunked_prefill,
        "kv_cache_config": api.KvCacheConfig(**kv),
        "scheduler_config": api.SchedulerConfig(capacity_scheduler_policy=policy),
    }
    if t.mode == "pytorch":
        args.update(max_input_len=t.max_input_len, max_seq_len=cfg.engine.max_model_len)
    if may_constrain(cfg):
        # Without it the engine fails every guided request ("GuidedDecoder is not setup");
        # xgrammar is the one guided backend of both runtimes (llm_args.py, BaseLlmArgs).
        args["guided_decoding_backend"] = "xgrammar"
    return args


def build_args(cfg: Config, api: Any) -> dict[str, Any]:
    """Extra arguments of the TensorRT backend's LLM when it builds an engine from a checkpoint."""
    t = cfg.engine.options
    args: dict[str, Any] = {"build_config": api.BuildConfig(
        max_batch_size=cfg.engine.max_batch_size, max_num_tokens=t.max_num_tokens,
        max_input_len=t.max_input_len, max_seq_len=cfg.engine.max_model_len)}
    if t.quantization == "fp8":
        args["quant_config"] = api.QuantConfig(quant_algo=api.QuantAlgo.FP8,
                                               kv_cache_quant_algo=api.QuantAlgo.FP8)
        args["calib_config"] = api.CalibConfig(calib_dataset=t.calib_dataset,
                                               calib_batches=t.calib_batches,
                                               calib_max_seq_length=t.calib_max_seq_length)
    return args


def sampling_params(api: Any, s: Sampling, max_tokens: int, seed: int) -> Any:
    """A new SamplingParams for requests with settings `s` (the row's own, sampling.py),
    `max_tokens` (cut to fit the engine) and `seed` (Engine.seed_of)."""
    # max_tokens is always set: TensorRT-LLM's default is 32.
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                              "seed": seed, "stop": list(s.stop) or None}
    if s.response_format is not None:
        kwargs["guided_decoding"] = guided_decoding(api, s.response_format)
    return api.SamplingParams(**kwargs)


def guided_decoding(api: Any, fmt: ResponseFormat) -> Any:
    """The GuidedDecodingParams of a response format: one guide each (sampling_params.py
    refuses more than one); a choice is an EBNF grammar of its strings."""
    if fmt.kind == "json_object":
        return api.GuidedDecodingParams(json_object=True)
    if fmt.kind == "json_schema":
        return api.GuidedDecodingParams(json=fmt.schema)
    if fmt.kind == "regex":
        return api.GuidedDecodingParams(regex=fmt.pattern)
    return api.GuidedDecodingParams(grammar=fmt.grammar())


# --------------------------------------------------------------------------- outputs -> rows


def to_result(output: Any) -> Result:
    """One finished `RequestOutput` as a row result (finish_reason timeout/cancelled are errors)."""
    completion = output.outputs[0]
    prompt_tokens = len(output.prompt_token_ids)
    tokens = len(completion.token_ids)
    if completion.finish_reason in ("stop", "length"):
        return Result(text=completion.text, finish_reason=completion.finish_reason,
                      prompt_tokens=prompt_tokens, completion_tokens=tokens)
    reason = completion.finish_reason or "unfinished"
    return Result(None, "error", prompt_tokens, tokens,
                  f"{reason}: the engine ended the request ({reason}) after {tokens} tokens")


def rejected(error: Exception, prompt_tokens: int) -> Result:
    """A request refused by generate_async: ValueError (TensorRT backend's length check, bad
    sampling parameters) or RequestError (PyTorch backend's length check; a failure building
    the executor request, raised at once in single-process mode)."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    code = "prompt_too_long" if "should not exceed" in message else "rejected"
    return Result.failed(code, message, prompt_tokens)


# --------------------------------------------------------------------------- the engine


class TrtLlmEngine(Engine):
    name = "trtllm"
    Options = TrtllmOptions

    @classmethod
    def check_config(cls, config: Config) -> list[str]:
        return check_config(config)

    @classmethod
    def fingerprint(cls, config: Config) -> dict[str, Any]:
        """What the engine key holds (`options.build_settings`, the one list of what a build
        compiles in) and the other options that change outputs. The GPU type is
        run.accelerator_type, in the fingerprint's run part."""
        runtime = {name: value for name, value in fingerprinted(config.engine.options).items()
                   if not isinstance(decision(TrtllmOptions, name), BakedIn)}
        return {**build_settings(config), **runtime}

    @classmethod
    def prepare(cls, config: Config, cluster: Cluster) -> None:
        """Engine mode: once, on a GPU node of the workers' type, find (or build) the engine,
        so a missing or mismatched engine stops the run before any worker starts."""
        if config.engine.options.mode != "engine":
            return
        info = cluster.run_on_worker_node(ensure_engine, config)
        log.info("engine %s: %s (%s)", info["key"], info["how"], info["gpu"])

    @classmethod
    def build(cls, config: Config, cluster: Cluster) -> dict[str, str]:
        """Find or build the engine on a GPU node of the workers' type and publish it to
        engine.options.engine_cache; ConfigError when this config loads no built engine.
        Returns what `batchinfer build-engine` prints: engine key, status, where it is stored."""
        t = config.engine.options
        if t.mode != "engine" or t.engine_dir:
            raise ConfigError("build-engine needs engine.options.mode: engine and no engine.options.engine_dir "
                              f"(got mode {t.mode!r}, engine_dir {t.engine_dir!r}): mode pytorch runs the "
                              "checkpoint as is, and engine_dir is an engine already built")
        t.build_on_miss = True
        info = cluster.run_on_worker_node(ensure_engine, config)
        stored = (f"{t.engine_cache.rstrip('/')}/{info['key']}" if t.engine_cache else
                  f"{info['folder']} (node-local only: set engine.options.engine_cache to share it)")
        return {"engine": info["key"], "status": f"{info['how']} on {info['gpu']}", "stored": stored,
                "local": info["folder"]}

    def __init__(self, *, config: Config):
        super().__init__(config=config)
        api = import_api()
        self.api = api
        t = config.engine.options
        if t.mode == "pytorch":
            model = model_refs.resolve(config.engine.model).path
            self.llm = api.TorchLLM(model=model, **runtime_args(config, api))
            self.engine_source = "checkpoint"
            build_config: dict[str, Any] = {}
        else:
            engine_dir, _, self.engine_source, engine_config = find_engine(
                config, api, artifacts.detect_gpu())
            build_config = engine_config["build_config"]
            self.llm = api.EngineLLM(model=str(engine_dir), **runtime_args(config, api))
        self._max_model_len = (build_config.get("max_seq_len") or config.engine.max_model_len
                               or _context_length(config))
        self._max_input_len = build_config.get("max_input_len") or t.max_input_len
        # Greedy: one SamplingParams per distinct setting (max_tokens, stop, format...), made
        # fresh: generate_async completes an instance in place the first time (end_id, stop
        # word ids), so never copy one. Sampling: a fresh one per request, with the row's seed.
        self._params: dict[tuple[Sampling, int], Any] = {}
        # Prompt tokens of the requests in the engine, for busy(): without streaming the first
        # token is not seen, so a request counts as unprefilled until it finishes (an upper
        # bound on the prefill work in hand, which errs towards waiting, not killing).
        self._unfinished: dict[int, int] = {}
        self._keys = itertools.count()
        self._since = time.monotonic()
        log.info("trtllm engine (%s, %s): max_model_len=%d, max_prompt_len=%d",
                 t.mode, self.engine_source, self._max_model_len, self.max_prompt_len)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_prompt_len(self) -> int:
        limit = min(self._max_input_len, self._max_model_len - 1)
        t = self.cfg.engine.options
        if t.mode == "pytorch" and not t.enable_chunked_prefill:
            limit = min(limit, t.max_num_tokens)  # generate_async refuses longer prompts
        return limit

    async def generate(self, request: Request) -> Result:
        refused = self.check_length(request)
        if refused is not None:
            return refused
        n = len(request.prompt_token_ids)
        params = self._sampling_params(request)
        try:
            pending = self.llm.generate_async(request.prompt_token_ids, sampling_params=params)
        except (ValueError, self.api.RequestError) as e:
            return rejected(e, n)
        key = next(self._keys)
        if not self._unfinished:
            self._since = time.monotonic()
        self._unfinished[key] = n
        try:
            output = await pending
        except self.api.RequestError as e:  # this request failed; the engine goes on
            return Result.failed("request_failed", str(e).splitlines()[0], n)
        except asyncio.CancelledError:  # past its deadline, or its shard was given up
            pending.abort()
            raise
        finally:
            del self._unfinished[key]
        self.beat()
        self._since = time.monotonic()
        return to_result(output)

    def _sampling_params(self, request: Request) -> Any:
        s = self.sampling_of(request)
        max_tokens = self.max_new_tokens(request)  # prompt + completion stays within the engine
        if not s.greedy:
            return sampling_params(self.api, s, max_tokens, self.seed_of(request))
        key = (s, max_tokens)
        params = self._params.get(key)
        if params is None:
            if len(self._params) >= PARAMS_KEPT:
                self._params.clear()
            params = self._params[key] = sampling_params(self.api, s, max_tokens, self.cfg.sampling.seed)
        return params

    def busy(self) -> dict[str, Any]:
        """Continuous batching has no batch boundary: the engine is "in a step" while it holds
        requests, running since the last one finished. The step counts the longest prompt in
        hand, not their sum: in-flight batching prefills requests side by side at GPU speed
        (thousands of tokens/s), and the sum over a full window (2 x max_batch_size long
        prompts) would stretch the hang limit to hours and blind the watchdog."""
        if not self._unfinished:
            return super().busy()
        return {"in_step": True, "step_tokens": max(self._unfinished.values()),
                "step_s": round(time.monotonic() - self._since, 1)}

    def shutdown(self) -> None:
        self.llm.shutdown()


def _context_length(cfg: Config) -> int:
    config = Path(model_refs.resolve(cfg.engine.model).path) / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings", 8192)


def find_engine(cfg: Config, api: Any, gpu: artifacts.GpuIdentity) -> tuple[Path, str, str, dict]:
    """The engine folder for this node (engine.options.engine_dir, or the cached engine fetched or
    built on a miss), its key, how it got here, and its config.json, checked against this
    GPU and TensorRT-LLM version."""
    if cfg.engine.options.engine_dir:
        folder, key, how = Path(cfg.engine.options.engine_dir), cfg.engine.options.engine_dir, "engine_dir"
    else:
        folder, key, how = artifacts.resolve(cfg, gpu, api.version,
                                             build=lambda out: build_engine(cfg, api, out))
    return folder, key, how, artifacts.check_compat(folder, gpu, api.version)


def build_engine(cfg: Config, api: Any, out: Path) -> None:
    """Build an engine from the Hugging Face checkpoint in engine.model and save it to `out`."""
    checkpoint = model_refs.materialize(model_refs.resolve(cfg.engine.model), cfg.engine.cache_dir)
    llm = api.EngineLLM(model=checkpoint, **runtime_args(cfg, api), **build_args(cfg, api))
    try:
        llm.save(str(out))
    finally:
        llm.shutdown()


def ensure_engine(cfg: Config) -> dict[str, str]:
    """A GPU task: make sure this node (and the shared cache) has the engine; say how."""
    api = import_api()
    gpu = artifacts.detect_gpu()
    folder, key, how, _ = find_engine(cfg, api, gpu)
    info = {"key": key, "how": how, "gpu": gpu.describe()}
    if not cfg.engine.options.engine_dir:
        info["folder"] = str(folder)
    return info
