"""The TensorRT-LLM backend: its settings, its engine, and the engine artifact cache.

Only `engine.py` imports `tensorrt_llm` (lazily, inside the worker); everything else here
runs on a plain CPU machine.
"""
