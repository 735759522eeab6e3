"""TEST DOUBLE package (see tensorrt_llm/__init__.py)."""
from tensorrt_llm.quantization.mode import QuantAlgo

__all__ = ["QuantAlgo"]
