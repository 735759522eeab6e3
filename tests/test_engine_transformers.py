"""The transformers backend on the real SmolLM2-135M-Instruct model, CPU (CUDA where present)."""

from __future__ import annotations

import pytest

from batchinfer.config import EngineConfig
from batchinfer.config_loader import config_from_dict
from batchinfer.engines import get_engine_class
from tests.engine_conformance import FRANCE, POEM, STORY, EngineConformance, LocalEngine

ENGINE_FIELDS = set(EngineConfig.model_fields)


@pytest.fixture(scope="module")
def make_engine(model_folder):
    cls = get_engine_class("transformers")
    made = {}

    def make(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in made:
            engine = {"max_batch_size": 8, **{k: v for k, v in overrides.items() if k in ENGINE_FIELDS}}
            sampling = {k: v for k, v in overrides.items() if k not in ENGINE_FIELDS}
            made[key] = LocalEngine(cls(config=config_from_dict({"engine": engine, "sampling": sampling})))
        return made[key]

    yield make
    for engine in made.values():
        engine.shutdown()


class TestTransformersEngine(EngineConformance):
    def test_model_length_comes_from_the_model_and_can_be_capped(self, make_engine):
        assert make_engine().max_model_len == 8192
        assert make_engine(max_model_len=64).max_model_len == 64
        assert make_engine(max_model_len=64).max_prompt_len == 63

    def test_sampling_with_a_tiny_top_p_is_greedy(self, make_engine, encode):
        # The sampling decode loop (own KV cache, positions, padding) against `generate`.
        prompts = [encode(FRANCE), encode(STORY), encode("Hi")]
        greedy = make_engine(max_tokens=8).run(prompts)
        sampled = make_engine(max_tokens=8, temperature=1.0, top_p=1e-6).run(prompts)
        assert [r.text for r in sampled] == [r.text for r in greedy]
        assert [r.completion_tokens for r in sampled] == [r.completion_tokens for r in greedy]

    def test_sampling_ends_rows_at_stop_strings_and_max_tokens(self, make_engine, encode):
        engine = make_engine(max_tokens=12, temperature=1.0, stop=["e"])
        results = engine.run([encode(STORY), encode(POEM)])
        for r in results:
            assert r.error is None and "e" not in r.text
            assert r.finish_reason == "stop" and 1 <= r.completion_tokens <= 12
