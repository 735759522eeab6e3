"""Behaviour every engine backend must show, written once and reused per backend.

A backend's test module subclasses `EngineConformance` and provides the fixture
`make_engine(**overrides) -> Engine`, where overrides are EngineConfig/SamplingConfig
fields (max_tokens, stop, max_model_len, ...), and the fixture `encode(text) -> ids`.
"""

from __future__ import annotations

import asyncio

from batchinfer.engines import Engine, Request, Result

FRANCE = "What is the capital of France? Answer in one short sentence."
STORY = "Write a very long story about a dragon who learns to bake bread."


def run_all(engine: Engine, prompts: list[list[int]]) -> list[Result]:
    async def go():
        return await asyncio.gather(*(engine.generate(Request(i, p)) for i, p in enumerate(prompts)))
    return asyncio.run(go())


class EngineConformance:
    def test_each_result_belongs_to_its_request(self, make_engine, encode):
        engine = make_engine(max_tokens=4)
        prompts = [encode(FRANCE + " " + "Please. " * k) for k in range(12)]  # > one batch
        results = run_all(engine, prompts)
        assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
        for r in results:
            assert r.error is None and isinstance(r.text, str)
            assert r.finish_reason in ("stop", "length")
            assert 1 <= r.completion_tokens <= 4

    def test_length_finish_uses_exactly_max_tokens(self, make_engine, encode):
        [r] = run_all(make_engine(max_tokens=3), [encode(STORY)])
        assert (r.finish_reason, r.completion_tokens, r.error) == ("length", 3, None)
        assert r.text

    def test_stop_finish_on_end_of_sequence(self, make_engine, encode):
        [r] = run_all(make_engine(max_tokens=48), [encode(FRANCE)])
        assert r.finish_reason == "stop" and r.completion_tokens < 48
        assert "Paris" in r.text

    def test_stop_strings_end_the_output_and_are_not_included(self, make_engine, encode):
        [r] = run_all(make_engine(max_tokens=48, stop=["Paris"]), [encode(FRANCE)])
        assert r.finish_reason == "stop"
        assert "Paris" not in r.text

    def test_greedy_is_deterministic_within_a_batch(self, make_engine, encode):
        a, b = run_all(make_engine(max_tokens=8), [encode(STORY), encode(STORY)])
        assert a.text == b.text and a.completion_tokens == b.completion_tokens

    def test_too_long_prompt_is_a_row_error_not_a_crash(self, make_engine, encode):
        engine = make_engine(max_tokens=4, max_model_len=64)
        long_prompt = encode("Summarize this: " + "the quick brown fox jumps over the lazy dog " * 20)
        ok, bad = run_all(engine, [encode(FRANCE), long_prompt])
        assert bad.finish_reason == "error" and bad.text is None
        assert bad.error == f"prompt_too_long: {len(long_prompt)} tokens >= 64"
        assert bad.prompt_tokens == len(long_prompt)
        assert ok.error is None and ok.text
