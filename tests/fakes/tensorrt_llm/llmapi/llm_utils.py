"""TEST DOUBLE: the re-exports of tensorrt_llm/llmapi/llm_utils.py used by llmapi/__init__.py."""
from tensorrt_llm.builder import BuildConfig
from tensorrt_llm.models.modeling_utils import QuantConfig
from tensorrt_llm.quantization.mode import QuantAlgo

__all__ = ["BuildConfig", "QuantAlgo", "QuantConfig"]
