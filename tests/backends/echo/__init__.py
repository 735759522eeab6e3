"""A test backend in one folder: its settings, its checks, its part of the fingerprint.

`engine.backend: tests.backends.echo:EchoEngine` runs it; nothing outside this folder
names it (issue 10: a new backend touches one folder). It answers each row with a fixed
prefix and the row's prompt length, without a model, so a whole job takes seconds.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from annotated_types import Ge

from batchinfer.config import Config, EngineOptions
from batchinfer.engines import BatchEngine, Request, Result
from batchinfer.fingerprint import OUTPUT, Neutral


class EchoOptions(EngineOptions):
    prefix: Annotated[str, OUTPUT] = "echo"
    """Text that starts every answer."""
    repeat: Annotated[int, Ge(1), OUTPUT] = 1
    """Times the prefix is said."""
    step_delay_s: Annotated[float, Ge(0), Neutral("slows each batch down; the rows come out the same")] = 0.0
    """Seconds each batch takes, to stand in for a slow GPU."""


class EchoEngine(BatchEngine):
    name = "echo"
    Options = EchoOptions

    @classmethod
    def check_config(cls, config: Config) -> list[str]:
        options = config.engine.options
        if len(options.prefix) * options.repeat > 200:
            return [f"engine.options.prefix x repeat: got {len(options.prefix) * options.repeat} characters; "
                    "expected at most 200"]
        return []

    @classmethod
    def fingerprint(cls, config: Config) -> dict[str, Any]:
        return {**super().fingerprint(config), "echo_format": 1}

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or 2048

    def generate_batch(self, requests: list[Request]) -> list[Result]:
        options = self.config.options
        time.sleep(options.step_delay_s)
        return [Result(text=" ".join([options.prefix] * options.repeat) + f" {len(r.prompt_token_ids)}",
                       finish_reason="stop", prompt_tokens=len(r.prompt_token_ids), completion_tokens=2)
                for r in requests]
