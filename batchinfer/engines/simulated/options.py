"""The simulated engine's own settings (`engine.options` with `engine.backend: simulated`)."""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Gt

from batchinfer.config import EngineOptions
from batchinfer.fingerprint import OUTPUT, Neutral

_TIMING = Neutral("changes when rows finish, never their text or token counts")


class SimulatedOptions(EngineOptions):
    profile: Annotated[str, OUTPUT] = "l40s-llama-3.1-8b-fp8"
    """GPU and model simulated (profiles.py); its context length is max_model_len when engine.max_model_len is unset."""
    # OUTPUT although a profile is mostly timing: its context length decides which prompts
    # are too long and where completions are cut, so another profile may give other rows.
    speed: Annotated[float, Gt(0), _TIMING] = 1.0
    """Run this many times faster than the simulated GPU in real time (virtual seconds per wall second)."""
    output_lengths: Annotated[Literal["max_tokens", "seeded"], OUTPUT] = "max_tokens"
    """Tokens each row generates: sampling.max_tokens (cut to fit max_model_len), or drawn uniformly from 1 up to that, seeded by the row, so reruns agree."""
    kv_cache_tokens: Annotated[Annotated[int, Ge(32)] | None, _TIMING] = None
    """KV cache capacity in tokens; default the profile's."""
    max_num_tokens: Annotated[Annotated[int, Ge(1)] | None, _TIMING] = None
    """Most tokens computed in one iteration (prompt chunks plus one per decoding request); default the profile's."""
    prefix_caching: Annotated[bool, _TIMING] = True
    """Reuse cached 32-token blocks of shared prompt prefixes instead of computing them again."""
