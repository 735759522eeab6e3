"""TEST DOUBLE of tensorrt_llm/_tensorrt_engine/__init__.py (same single line)."""
from tensorrt_llm.llmapi.llm import _TrtLLM as LLM

__all__ = ["LLM"]
