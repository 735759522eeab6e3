"""TEST DOUBLE of the config classes in tensorrt_llm/llmapi/llm_args.py and of the field
names BaseLLM.__init__ checks kwargs against (TorchLlmArgs / TrtLlmArgs model_fields).

Like the real ones these are pydantic models that forbid unknown fields, so a refusal in a
validator (even an `assert`) reaches the caller as a pydantic ValidationError. The LLM args
models type only the fields batchinfer passes (tests/fakes/trtllm_1_2_api.json lists them);
the other field names are in the sets below."""
from enum import StrEnum
from typing import Any, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tensorrt_llm.models.modeling_utils import QuantConfig


class StrictBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvCacheConfig(StrictBaseModel):
    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Optional[List[int]] = None
    sink_token_length: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = 0.9
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: Optional[float] = None
    secondary_offload_min_priority: Optional[int] = None
    event_buffer_max_size: int = 0
    attention_dp_events_gather_period_ms: int = 5
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    mamba_ssm_cache_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    tokens_per_block: int = 32

    @field_validator("free_gpu_memory_fraction")
    @classmethod
    def validate_free_gpu_memory_fraction(cls, v):
        if not 0 <= v <= 1:
            raise ValueError("kv_cache_config.free_gpu_memory_fraction must be a float between 0 and 1")
        return v


class CapacitySchedulerPolicy(StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class SchedulerConfig(StrictBaseModel):
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Optional[ContextChunkingPolicy] = None
    dynamic_batch_config: Optional[Any] = None


class CalibConfig(StrictBaseModel):
    device: Literal["cuda", "cpu"] = "cuda"
    calib_dataset: str = "cnn_dailymail"
    calib_batches: int = 512
    calib_batch_size: int = 1
    calib_max_seq_length: int = 512
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048


# BaseLlmArgs fields (explicit constructor arguments included), then the backend-only ones.
BASE_FIELDS = {
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size", "moe_tensor_parallel_size",
    "moe_expert_parallel_size", "enable_attention_dp", "cp_config", "load_format", "enable_lora",
    "lora_config", "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend",
    "batched_logits_processor", "iter_stats_max_iterations", "request_stats_max_iterations",
    "peft_cache_config", "scheduler_config", "cache_transceiver_config", "speculative_config",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
    "gather_generation_logits", "num_postprocess_workers", "postprocess_tokenizer_dir",
    "reasoning_parser", "backend", "return_perf_metrics", "orchestrator_type",
}
TRT_ONLY_FIELDS = {
    "enable_tqdm", "workspace", "enable_build_cache", "extended_runtime_perf_knob_config",
    "calib_config", "quant_config", "embedding_parallel_mode", "fast_build", "build_config",
    "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type", "normalize_log_probs",
    "fail_fast_on_attention_window_too_large",
}
TORCH_ONLY_FIELDS = {
    "cuda_graph_config", "disable_overlap_scheduler", "attn_backend", "sampler_type",
    "enable_iter_perf_stats", "print_iter_log", "torch_compile_config", "enable_autotuner",
    "stream_interval", "moe_config", "checkpoint_format", "kv_connector_config",
    "garbage_collection_gen0_threshold",
}
TorchLlmArgs_fields = BASE_FIELDS | TORCH_ONLY_FIELDS
TrtLlmArgs_fields = BASE_FIELDS | TRT_ONLY_FIELDS


class BaseLlmArgs(StrictBaseModel):
    """The BaseLlmArgs fields batchinfer passes, with the real defaults; the rest are allowed
    by name (BASE_FIELDS) and checked by BaseLLM.__init__, as the real constructor does."""
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="allow")

    model: Any
    tokenizer: Optional[Any] = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
    enable_chunked_prefill: bool = False
    # "Guided decoding backend. llguidance is supported in PyTorch backend only." Any other
    # string is a pydantic ValidationError, as in the real Literal field.
    guided_decoding_backend: Optional[Literal["xgrammar", "llguidance"]] = None
    scheduler_config: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_batch_size: Optional[int] = None
    max_input_len: Optional[int] = None
    max_seq_len: Optional[int] = None
    max_num_tokens: Optional[int] = 8192


class TrtLlmArgs(BaseLlmArgs):
    calib_config: Optional[CalibConfig] = Field(default=None, validate_default=True)
    quant_config: Optional[QuantConfig] = Field(default=None, validate_default=True)
    build_config: Optional[object] = None

    @field_validator("calib_config", mode="before")
    @classmethod
    def init_calib_config(cls, v):
        return CalibConfig() if v is None else v

    @field_validator("quant_config", mode="before")
    @classmethod
    def validate_quant_config(cls, v):
        return QuantConfig() if v is None else v

    @model_validator(mode="after")
    def validate_kv_cache_dtype(self):
        assert self.kv_cache_config.dtype == "auto", "KvCacheConfig.dtype is not supported by the TensorRT backend."
        return self


class TorchLlmArgs(BaseLlmArgs):
    build_config: Optional[object] = None

