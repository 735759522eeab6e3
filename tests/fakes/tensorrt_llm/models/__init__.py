"""TEST DOUBLE package (see tensorrt_llm/__init__.py)."""
