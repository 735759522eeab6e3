"""The TensorRT-LLM backend's own settings (`engine.options` with `engine.backend: trtllm`).

Each field says whether it changes outputs (`OUTPUT`), is baked into a built engine
(`BAKED_IN`: part of the engine key, and so of the run fingerprint, from the one list),
or neither (`Neutral`, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le

from batchinfer.config import Config, EngineOptions
from batchinfer.fingerprint import OUTPUT, Neutral, Output, decision


@dataclass(frozen=True)
class BakedIn(Output):
    """A setting a build compiles into the TensorRT engine: in the engine key and the fingerprint."""


BAKED_IN = BakedIn()

COMMON_BAKED_IN = ("dtype", "max_batch_size", "max_model_len")
"""`engine.*` fields a TensorRT engine build compiles in (BuildConfig and the weight dtype)."""

CALIBRATION = ("calib_dataset", "calib_batches", "calib_max_seq_length")
"""Fields that matter to a build only when it quantizes to FP8."""

_WHERE = Neutral("where engines are kept or found, not what they compute")


class TrtllmOptions(EngineOptions):
    mode: Annotated[Literal["engine", "pytorch"], OUTPUT] = "engine"
    """engine: a TensorRT engine (prebuilt, cached or built, FP8); pytorch: TensorRT-LLM's PyTorch runtime on a pre-quantized checkpoint."""
    engine_dir: Annotated[str | None, OUTPUT] = None
    """A prebuilt engine folder (config.json, rank0.engine) to load as is (engine mode)."""
    engine_cache: Annotated[str | None, _WHERE] = None
    """Where built engines are kept and shared (any fsspec URL, e.g. s3://bucket/engines); default: this node's cache only."""
    node_cache_dir: Annotated[str | None, _WHERE] = None
    """Node-local folder for engine copies (fast local disk); default <engine.cache_dir>/engines."""
    build_on_miss: Annotated[bool, Neutral("whether a missing engine is built; the engine key says which")] = False
    """Build the engine when none is cached for this GPU, TensorRT-LLM version and settings (else: run `batchinfer build-engine`)."""
    quantization: Annotated[Literal["fp8", "none"], BAKED_IN] = "fp8"
    """Weights and KV cache in FP8 (Ada/L40S, Hopper) or unquantized in engine.dtype."""
    calib_dataset: Annotated[str | None, BAKED_IN] = None
    """Local path of the calibration dataset for an FP8 engine build (no hub is reached)."""
    calib_batches: Annotated[int, Ge(1), BAKED_IN] = 512
    """Calibration batches for an FP8 build."""
    calib_max_seq_length: Annotated[int, Ge(1), BAKED_IN] = 512
    """Longest calibration sample, in tokens."""
    max_num_tokens: Annotated[int, Ge(1), BAKED_IN] = 8192
    """Most tokens of all requests together in one engine step."""
    max_input_len: Annotated[int, Ge(1), BAKED_IN] = 7168
    """Longest prompt the engine accepts, in tokens (at most engine.max_model_len - 1)."""
    kv_cache_free_gpu_memory_fraction: Annotated[float, Gt(0), Le(1), Neutral(
        "how many requests fit at once; under guaranteed_no_evict no request is paused")] = 0.9
    """Share of the GPU memory left after loading the weights that the KV cache takes."""
    enable_block_reuse: Annotated[bool, Neutral("a reused block holds the same keys and values")] = True
    """Reuse KV-cache blocks across requests that share a prefix (system prompts, few-shot)."""
    enable_chunked_prefill: Annotated[bool, OUTPUT] = True
    """Split long prompts across engine steps so they share steps with generation."""
    scheduler_policy: Annotated[Literal["guaranteed_no_evict", "max_utilization", "static_batch"],
                                Neutral("which requests share a step")] = "guaranteed_no_evict"
    """In-flight batching policy; max_utilization packs more requests but may pause some."""


def build_settings(cfg: Config) -> dict[str, Any]:
    """Everything a build bakes into the engine besides the model, GPU and version: the
    common fields in COMMON_BAKED_IN and the options marked BAKED_IN (calibration only for FP8)."""
    options: TrtllmOptions = cfg.engine.options  # type: ignore[assignment]
    settings = {name: getattr(cfg.engine, name) for name in COMMON_BAKED_IN}
    for name in TrtllmOptions.model_fields:
        if isinstance(decision(TrtllmOptions, name), BakedIn):
            settings[name] = getattr(options, name)
    if options.quantization != "fp8":
        for name in CALIBRATION:
            settings.pop(name)
    return settings
