"""FAILING TEST ENGINES for the fault-injection tests, named as such.

Each is the real transformers backend (the small model on the CPU) with one fault added.
A test selects one with engine.backend "tests.fault_engines:<Class>" and arms it with a
marker file named by $BATCHINFER_TEST_FAULT_FILE (passed to the workers through
run.runtime_env); faults that happen once are "claimed" by renaming the marker, which
only one process can do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from batchinfer.engines.base import Engine, Request, Result
from batchinfer.engines.transformers import TransformersEngine, TransformersOptions

MARKER_ENV = "BATCHINFER_TEST_FAULT_FILE"


def armed() -> bool:
    path = os.environ.get(MARKER_ENV)
    return bool(path) and os.path.exists(path)


def claim() -> bool:
    """True for exactly one process: the one that renames the marker first."""
    path = os.environ.get(MARKER_ENV)
    try:
        os.rename(path, f"{path}.claimed-by-{os.getpid()}")
        return True
    except (TypeError, OSError):
        return False


class _WordEngine(TransformersEngine):
    word = ""

    def hit(self, requests: list[Request]) -> bool:
        return any(self.word in self.tokenizer.decode(r.prompt_token_ids) for r in requests)


class PoisonRowEngine(_WordEngine):
    """TEST ENGINE: raises, as a CUDA fault would, for any batch holding the word POISON."""

    word = "POISON"

    def generate_batch(self, requests):
        if self.hit(requests):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test engine)")
        return super().generate_batch(requests)


class CrashOnRowEngine(_WordEngine):
    """TEST ENGINE: kills its whole worker process for a batch holding the word CRASH,
    while the marker file exists."""

    word = "CRASH"

    def generate_batch(self, requests):
        if armed() and self.hit(requests):
            os._exit(17)
        return super().generate_batch(requests)


class KillerRowEngine(_WordEngine):
    """TEST ENGINE: SIGKILLs its own worker process (as the kernel's OOM killer would) for
    any batch holding the word KILLER, every time: a poison row no retry survives."""

    word = "KILLER"

    def generate_batch(self, requests):
        if self.hit(requests):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate_batch(requests)


class HangOnceEngine(TransformersEngine):
    """TEST ENGINE: the first worker to claim the marker hangs forever in its first batch."""

    def generate_batch(self, requests):
        if claim():
            while True:
                time.sleep(60)
        return super().generate_batch(requests)


class BrokenUntilRestartEngine(TransformersEngine):
    """TEST ENGINE: the first engine built in each worker process fails every batch (a wedged
    engine); an engine built again in the same process (a restart in place) works."""

    built = 0

    def __init__(self, *, config):
        super().__init__(config=config)
        type(self).built += 1
        self.wedged = type(self).built == 1

    def generate_batch(self, requests):
        if self.wedged:
            raise RuntimeError("engine wedged: the device stopped responding (test engine)")
        return super().generate_batch(requests)


class SlowRowEngine(Engine):
    """TEST ENGINE: a continuous-batching engine (async, per request) over the transformers
    backend, where a prompt holding the word SLOW takes `slow_s` seconds (forever by
    default; only in the worker that claims the marker, if SLOW_ONCE)."""

    Options = TransformersOptions  # it runs a transformers engine inside

    name = "slow-row-test-engine"
    slow_s = 3600.0
    once = False

    def __init__(self, *, config):
        super().__init__(config=config)
        self.inner = TransformersEngine(config=config)
        self.slow_here = None

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    async def generate(self, request: Request) -> Result:
        if "SLOW" in self.inner.tokenizer.decode(request.prompt_token_ids):
            if self.slow_here is None:
                self.slow_here = claim() if self.once else True
            if self.slow_here:
                await asyncio.sleep(self.slow_s)
        result = await self.inner.generate(request)
        self.beat()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


class SlowOnceRowEngine(SlowRowEngine):
    """TEST ENGINE: SLOW rows take 60 s, only in the one worker that claims the marker."""

    slow_s = 60.0
    once = True


class FlakyRequestEngine(SlowRowEngine):
    """TEST ENGINE: a request whose prompt holds the word FLAKY fails its first `failures`
    times in this worker (as a TensorRT-LLM RequestError would: that request fails, the
    engine goes on), then succeeds. Other requests run as usual."""

    name = "flaky-request-test-engine"
    failures = 1

    def __init__(self, *, config):
        super().__init__(config=config)
        self.seen: dict[tuple[int, ...], int] = {}

    async def generate(self, request: Request) -> Result:
        if "FLAKY" in self.inner.tokenizer.decode(request.prompt_token_ids):
            key = tuple(request.prompt_token_ids)
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.failures:
                return Result.failed("request_failed", f"executor dropped the request (test engine, "
                                     f"failure {self.seen[key]} of {self.failures})",
                                     len(request.prompt_token_ids))
        result = await self.inner.generate(request)
        self.beat()
        return result
