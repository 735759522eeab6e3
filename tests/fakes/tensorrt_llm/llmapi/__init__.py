"""TEST DOUBLE of tensorrt_llm/llmapi/__init__.py (the names batchinfer imports from it)."""
from tensorrt_llm.executor import CompletionOutput, RequestError
from tensorrt_llm.llmapi.llm import LLM, RequestOutput
from tensorrt_llm.llmapi.llm_args import CalibConfig, CapacitySchedulerPolicy, KvCacheConfig, SchedulerConfig
from tensorrt_llm.llmapi.llm_utils import BuildConfig, QuantAlgo, QuantConfig
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "GuidedDecodingParams", "SamplingParams", "KvCacheConfig",
           "SchedulerConfig", "CapacitySchedulerPolicy", "BuildConfig", "QuantConfig", "QuantAlgo",
           "CalibConfig", "RequestError"]
