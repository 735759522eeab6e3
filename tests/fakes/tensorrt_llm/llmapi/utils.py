"""TEST DOUBLE of enable_worker_single_process_for_tp1 in tensorrt_llm/llmapi/utils.py: read
when the executor starts (GenerationExecutor.create), cached for the process, not at import."""
import os
from functools import cache


@cache
def enable_worker_single_process_for_tp1() -> bool:
    return os.environ.get("TLLM_WORKER_USE_SINGLE_PROCESS", "0") == "1"
