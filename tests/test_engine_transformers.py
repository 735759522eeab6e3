"""The transformers backend on the real SmolLM2-135M-Instruct model, CPU (CUDA where present)."""

from __future__ import annotations

import dataclasses

import pytest

from batchinfer.config import EngineConfig, config_from_dict
from batchinfer.engines import get_engine_class
from tests.engine_conformance import EngineConformance, LocalEngine

ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


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
