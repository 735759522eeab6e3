"""An engine that answers at once, for the framework-ceiling benchmark (part c).

Every request completes the moment it is submitted, with `max_new_tokens` completion
tokens and a short synthetic text, so whatever limits rows/s is the framework around the
engine: reading, chat template, tokenizing, scheduling, writing, committing. No thread,
no model, no sleep. Used as the backend `scripts.benchlib.instant:InstantEngine` (the
registry imports it by that name; workers need the repository on PYTHONPATH).
"""

from __future__ import annotations

from batchinfer.engines.base import Engine, Request, Result

MAX_MODEL_LEN = 1 << 20
"""Long enough that no benchmark prompt is refused unless engine.max_model_len says so."""


class InstantEngine(Engine):
    name = "instant"

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or MAX_MODEL_LEN

    async def generate(self, request: Request) -> Result:
        refused = self.check_length(request)
        if refused is not None:
            return refused
        n = len(request.prompt_token_ids)
        tokens = self.max_new_tokens(request)
        self.beat()
        return Result(text=f"[instant: {tokens} tokens]", finish_reason="length", prompt_tokens=n,
                      completion_tokens=tokens)
