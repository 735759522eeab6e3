"""The engine protocol: one model replica that turns prompt token ids into completions.

A continuous-batching backend implements `async generate(request)` and batches inside
the engine; a static-batching backend subclasses `BatchEngine` and implements only
`generate_batch(requests)`. Either way the worker keeps up to `max_in_flight` requests
submitted, from the current shard and the next, so the engine never drains at a shard
boundary.

A request the engine refuses (prompt too long, bad parameter) comes back as a `Result`
with `error` set: it is that row's error, never the job's. An exception out of
`generate` means the engine itself failed.

For the driver's hang watchdog an engine reports progress two ways: `heartbeat`, a
counter it moves while it works (`beat()`), and `busy()`, whether it is inside a step and
how many prompt tokens that step holds (`BatchEngine` reports its batches by itself).
A long prefill is legal work, not a hang: the watchdog gives a step time in proportion
to its prompt tokens, and a backend that can see progress inside a step (the
transformers backend beats as each decoder layer finishes) beats during it.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from batchinfer.config import Config, EngineOptions
from batchinfer.fingerprint import fingerprinted
from batchinfer.sampling import Sampling

T = TypeVar("T")


class Cluster(Protocol):
    """What a backend's driver-side step may ask of the cluster; the runner hands one in, so
    a backend never imports the scheduler."""

    def run_on_worker_node(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` once as a task with one worker's resources (its GPU and
        accelerator type) and return its result; the task's exception is raised here."""


class EngineSetupError(RuntimeError):
    """A backend's setup that cannot succeed as configured (e.g. a missing or mismatched
    compiled engine); the message says what to do. The run stops with exit 2."""


@dataclass
class Request:
    """One row's prompt, already rendered through the chat template and tokenized.

    `seed` is this row's own sampling seed (its `sampling.seed`, else `row_seed`); a backend
    that samples draws the row's tokens from a generator seeded with it, so the row's text
    does not depend on which rows share its batch. None (e.g. the worker's canary) means
    `sampling.seed`. `sampling` is the row's settings (sampling.py: the config's, with the
    row's own overrides); None means the config's.
    """

    id: int
    prompt_token_ids: list[int]
    seed: int | None = None
    sampling: Sampling | None = None


def row_seed(seed: int, row_id: object) -> int:
    """The sampling seed of one row: a stable hash of `sampling.seed` and the row's id (the
    id column's value, or the synthesized "<file>:<row>"), 63 bits so that every backend
    takes it as a non-negative int64. It depends on nothing else, so a row samples the same
    text whatever its batch, shard, worker or attempt (issue 9, item 5)."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Result:
    """What the engine made of one request."""

    text: str | None
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None

    @classmethod
    def failed(cls, code: str, message: str, prompt_tokens: int | None = None) -> Result:
        return cls(None, "error", prompt_tokens, 0 if prompt_tokens is not None else None,
                   f"{code}: {message}")


class Engine(ABC):
    """One model replica owned by one worker. Constructed inside the worker process.

    The constructor takes the whole run config (`config.engine`, its backend's own
    `config.engine.options`, `config.sampling`); the class attributes and class methods
    run on the driver, before any worker starts, and must not import the engine library.
    A backend is one folder (or module) that defines its `Options`, and overrides the hooks
    it needs: `check_config`, `fingerprint`, `prepare`, `build`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[EngineOptions]] = EngineOptions
    """The backend's own settings model (`engine.options`): every field with a default, a
    docstring and its fingerprint decision (`OUTPUT` or `Neutral(reason)`)."""

    def __init__(self, *, config: Config):
        self.cfg = config
        self.config = config.engine
        self.sampling = Sampling.from_config(config.sampling)
        """The config's sampling settings: what a request without its own `sampling` gets."""
        self._heartbeat = 0
        self._step: tuple[int, float] | None = None  # (prompt tokens, monotonic start) of a running step

    @classmethod
    def check_config(cls, config: Config) -> list[str]:
        """Problems with `config` for this backend, found without a GPU or the engine library."""
        return []

    @classmethod
    def fingerprint(cls, config: Config) -> dict[str, Any]:
        """The backend's part of the run fingerprint: its options marked as changing outputs.
        A backend that bakes a common setting into a compiled engine adds it here."""
        return fingerprinted(config.engine.options)

    @classmethod
    def prepare(cls, config: Config, cluster: Cluster) -> None:  # noqa: B027 - optional hook
        """Driver-side work before workers start (e.g. find or build an engine once); default none."""
        return None

    @classmethod
    def build(cls, config: Config, cluster: Cluster) -> dict[str, str] | None:
        """`batchinfer build-engine`: build and publish what the workers will load; returns the
        lines to print, label -> text (e.g. {"engine": key, "stored": url}). A backend without a
        build step keeps this default, and build-engine says so."""
        return None

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Most prompt + completion tokens one request may use."""

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt accepted, in tokens."""
        return self.max_model_len - 1

    @property
    def max_in_flight(self) -> int:
        """Requests the worker keeps submitted; enough to refill a batch as one finishes."""
        return 2 * self.config.max_batch_size

    @abstractmethod
    async def generate(self, request: Request) -> Result:
        """Run one request to completion."""

    def check_length(self, request: Request) -> Result | None:
        """The prompt_too_long error for a prompt the engine cannot take, else None."""
        n = len(request.prompt_token_ids)
        if n > self.max_prompt_len:
            return Result.failed("prompt_too_long", f"{n} tokens > {self.max_prompt_len}", n)
        return None

    def sampling_of(self, request: Request) -> Sampling:
        """The request's sampling settings (its own, else the config's)."""
        return request.sampling or self.sampling

    def seed_of(self, request: Request) -> int:
        """The seed a sampled request draws with: its own (`Request.seed`), else the config's."""
        if request.seed is not None:
            return request.seed
        own = self.sampling_of(request).seed
        return self.cfg.sampling.seed if own is None else own

    def max_new_tokens(self, request: Request) -> int:
        """The request's max_tokens, cut so prompt + completion stays within max_model_len."""
        return min(self.sampling_of(request).max_tokens, self.max_model_len - len(request.prompt_token_ids))

    @property
    def heartbeat(self) -> int:
        """A counter that moves while the engine makes progress (steps, batches or requests);
        the driver replaces a worker whose engine holds work and stops moving."""
        return self._heartbeat

    def beat(self) -> None:
        self._heartbeat += 1

    def busy(self) -> dict[str, Any]:
        """Whether the engine is inside a step, the prompt tokens the step holds and how long
        it has run; the watchdog allows a step time in proportion to its prompt tokens."""
        step = self._step
        if step is None:
            return {"in_step": False, "step_tokens": 0, "step_s": 0.0}
        return {"in_step": True, "step_tokens": step[0], "step_s": round(time.monotonic() - step[1], 1)}

    @contextmanager
    def step(self, prompt_tokens: int) -> Iterator[None]:
        """Mark a step (e.g. one static batch) that holds `prompt_tokens` for `busy()`."""
        self._step = (prompt_tokens, time.monotonic())
        try:
            yield
        finally:
            self._step = None

    def stats(self, until: float | None = None) -> dict[str, Any]:
        """The engine's own accounting of how it spent its time, for the run's manifest
        (`this_run.engines`); `until` (a `time.time()`) ends the window it covers, e.g. when
        the driver handed out the last shard. The default keeps none: {}."""
        return {}

    def shutdown(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the model; the default has nothing to release."""


class BatchEngine(Engine):
    """An engine that runs static batches; subclasses implement only `generate_batch`.

    Requests queue up from any number of shards; a single thread takes whatever is
    pending (up to `max_batch_size`) as soon as the previous batch is done. A batch that
    raises is split in halves until the requests that fail on their own are found, so one
    row that breaks the engine does not take its batch with it.
    """

    def __init__(self, *, config: Config):
        super().__init__(config=config)
        self._pending: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def generate_batch(self, requests: list[Request]) -> list[Result]:
        """Results for `requests`, in the same order."""

    async def generate(self, request: Request) -> Result:
        refused = self.check_length(request)
        if refused is not None:
            return refused
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"{self.name}-batcher", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.put((request, future, loop))
        return await future

    def _loop(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.config.max_batch_size:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._pending.put(None)
                    break
                batch.append(item)
            requests = [req for req, _, _ in batch]
            with self.step(sum(len(r.prompt_token_ids) for r in requests)):
                results = self._isolating(requests)
            self.beat()
            settle_from_thread([(fut, loop, result) for (_, fut, loop), result in zip(batch, results, strict=True)])

    def _isolating(self, requests: list[Request]) -> list[Result | Exception]:
        """generate_batch, bisecting a batch that raises down to the requests that fail alone."""
        try:
            results = self.generate_batch(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"{self.name}.generate_batch returned {len(results)} results "
                                   f"for {len(requests)} requests")
            return results
        except Exception as e:
            if len(requests) == 1:
                return [e]
            half = len(requests) // 2
            return self._isolating(requests[:half]) + self._isolating(requests[half:])

    def shutdown(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout=60)
            self._thread = None


def settle_from_thread(settled: list[tuple[asyncio.Future, asyncio.AbstractEventLoop, Result | Exception]]) -> None:
    """Resolve many futures from an engine thread: one wake-up of each event loop for all
    of its futures, not one per request (each call_soon_threadsafe writes to the loop's
    self-pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Result | Exception]]] = {}
    for future, loop, result in settled:
        by_loop.setdefault(loop, []).append((future, result))
    for loop, items in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle_all, items)


def _settle_all(items: list[tuple[asyncio.Future, Result | Exception]]) -> None:
    for future, result in items:
        settle_future(future, result)


def settle_future(future: asyncio.Future, result: Result | Exception) -> None:
    """Resolve `future` with a result or an exception, unless it is already done (call it on
    the future's loop, e.g. through `loop.call_soon_threadsafe`)."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
