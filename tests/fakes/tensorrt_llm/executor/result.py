"""TEST DOUBLE of tensorrt_llm/executor/result.py: CompletionOutput (same fields) and the
awaitable result of generate_async (await / aresult / result, prompt_token_ids, finished).
Like the real one, it must be created inside a running event loop to be awaited."""
import asyncio
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Union

from tensorrt_llm.executor.utils import RequestError


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: Optional[List[int]] = field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Any = field(default_factory=list)
    prompt_logprobs: Any = field(default_factory=list)
    finish_reason: Optional[Literal["stop", "length", "timeout", "cancelled"]] = None
    stop_reason: Optional[Union[int, str]] = None
    generation_logits: Any = None
    additional_context_outputs: Any = None
    additional_generation_outputs: Any = None
    disaggregated_params: Any = None
    request_perf_metrics: Any = None

    @property
    def length(self) -> int:
        return len(self.token_ids)


class GenerationResult:
    def __init__(self, request_id: int, prompt_token_ids: List[int], sampling_params):
        self._request_id = request_id
        self._prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self._outputs = [CompletionOutput(index=0)]
        self._done = False
        self._aborted = False
        try:
            self._loop = asyncio.get_running_loop()
            self._future = self._loop.create_future()
        except RuntimeError:
            self._loop = self._future = None

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def prompt_token_ids(self) -> List[int]:
        return self._prompt_token_ids

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def outputs(self) -> List[CompletionOutput]:
        return self._outputs

    def abort(self) -> None:
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    # called from the runtime thread
    def _deliver(self, text: str, token_ids: List[int], finish_reason: str, stop_reason=None,
                 error: Optional[str] = None) -> None:
        out = self._outputs[0]
        out.text, out.token_ids, out.finish_reason, out.stop_reason = text, token_ids, finish_reason, stop_reason
        self._done = True
        if self._future is not None:
            self._loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error):
        if self._future.done():
            return
        if error is not None:
            self._future.set_exception(RequestError(error))
        else:
            self._future.set_result(self)

    async def aresult(self):
        if self._future is None:
            raise AssertionError("The asyncio event loop was not present during initialization, "
                                 "so async operations are not available.")
        return await self._future

    def __await__(self):
        return self.aresult().__await__()
