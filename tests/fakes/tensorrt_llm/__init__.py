"""TEST DOUBLE of NVIDIA TensorRT-LLM 1.2.x -- not NVIDIA's package.

TensorRT-LLM cannot be installed where batchinfer's tests run (no CUDA; the PyPI package
is a stub that downloads from NVIDIA's index). This package stands in for the small slice
of its Python API that `batchinfer/engines/trtllm/engine.py` calls, with the same module paths,
class names, signatures, fields and defaults, and the same refusals, as the real 1.2.x
sources, so the backend runs unchanged against it. Generation is done on the CPU by
transformers with the Hugging Face checkpoint an "engine" was built from.

Real sources this mirrors (NVIDIA/TensorRT-LLM, 1.2.x; docs/trtllm-api.md has details):
  tensorrt_llm/__init__.py, version.py          __version__, LLM, SamplingParams
  tensorrt_llm/llmapi/__init__.py               the exported names used here
  tensorrt_llm/llmapi/llm.py                    BaseLLM/_TorchLLM/_TrtLLM: __init__ kwarg checks,
                                                generate_async, _check_arguments, save, shutdown
  tensorrt_llm/_tensorrt_engine/__init__.py     `from tensorrt_llm.llmapi.llm import _TrtLLM as LLM`
  tensorrt_llm/llmapi/llm_args.py               KvCacheConfig, SchedulerConfig,
                                                CapacitySchedulerPolicy, CalibConfig, field names
  tensorrt_llm/builder.py                       BuildConfig
  tensorrt_llm/models/modeling_utils.py         QuantConfig
  tensorrt_llm/quantization/mode.py             QuantAlgo
  tensorrt_llm/sampling_params.py               GuidedDecodingParams, SamplingParams (fields,
                                                defaults, _validate, _setup)
  cpp/tensorrt_llm/executor/executorImpl.cpp    the refusal of a guided request when the TensorRT
                                                LLM has no guided_decoding_backend
  tensorrt_llm/executor/result.py               CompletionOutput, GenerationResult (await, aresult)
  tensorrt_llm/executor/utils.py                RequestError
"""

from tensorrt_llm.llmapi import LLM, BuildConfig, SamplingParams
from tensorrt_llm.version import __version__

TEST_DOUBLE = True

__all__ = ["LLM", "BuildConfig", "SamplingParams", "__version__", "TEST_DOUBLE"]
