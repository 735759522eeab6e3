"""Behaviour every engine backend must show, written once and reused per backend.

A backend's test module subclasses `EngineConformance` and provides two fixtures:
`make_engine(**overrides)`, returning a `LocalEngine` or `RayEngine` around the backend
built with those config fields (max_tokens, stop, max_model_len, ...), and
`encode(text) -> ids`.
"""

from __future__ import annotations

import asyncio
import dataclasses

from batchinfer.engines import Engine, Request, Result, row_seed
from batchinfer.sampling import Sampling

FRANCE = "What is the capital of France? Answer in one short sentence."
STORY = "Write a very long story about a dragon who learns to bake bread."
COLORS = "Name three colors and say why you like them."
POEM = "Write a poem about the sea."


async def generate_all(engine: Engine, prompts: list[list[int] | Request]) -> list[Result]:
    """Submit every prompt (token ids, or a whole Request) at once, as a worker does."""
    return list(await asyncio.gather(*(engine.generate(p if isinstance(p, Request) else Request(i, p))
                                       for i, p in enumerate(prompts))))


class LocalEngine:
    """An engine in this process."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.max_prompt_len = engine.max_prompt_len

    def run(self, prompts: list[list[int] | Request]) -> list[Result]:
        return asyncio.run(generate_all(self.engine, prompts))

    def shutdown(self) -> None:
        self.engine.shutdown()


class EngineHost:
    """A Ray actor that owns one engine, as a worker does (async actor, one event loop)."""

    def __init__(self, backend: str, config):
        from batchinfer.engines import get_engine_class

        self.engine_class = get_engine_class(backend)
        self.engine = self.engine_class(config=config)

    async def rebuild(self, config) -> tuple[int, int]:
        """Shut the engine down and build it again with other settings, in this process
        (as a worker restarts its engine in place)."""
        self.engine.shutdown()
        self.engine = self.engine_class(config=config)
        return await self.limits()

    async def limits(self) -> tuple[int, int]:
        return self.engine.max_model_len, self.engine.max_prompt_len

    async def run(self, prompts: list[list[int] | Request]) -> list[Result]:
        return await generate_all(self.engine, prompts)

    async def shutdown(self) -> None:
        self.engine.shutdown()


class RayEngine:
    """An engine inside a real Ray actor process."""

    def __init__(self, backend: str, config, **actor_options):
        import ray

        self.actor = ray.remote(EngineHost).options(**actor_options).remote(backend, config)
        self.max_model_len, self.max_prompt_len = ray.get(self.actor.limits.remote())

    def rebuild(self, config) -> RayEngine:
        import ray

        self.max_model_len, self.max_prompt_len = ray.get(self.actor.rebuild.remote(config))
        return self

    def run(self, prompts: list[list[int] | Request]) -> list[Result]:
        import ray

        return ray.get(self.actor.run.remote(prompts))

    def shutdown(self) -> None:
        import ray

        ray.get(self.actor.shutdown.remote())
        ray.kill(self.actor)


class EngineConformance:
    def test_each_result_belongs_to_its_request(self, make_engine, encode):
        engine = make_engine(max_tokens=4)
        prompts = [encode(FRANCE + " " + "Please. " * k) for k in range(12)]  # > one batch
        results = engine.run(prompts)
        assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
        for r in results:
            assert r.error is None and isinstance(r.text, str)
            assert r.finish_reason in ("stop", "length")
            assert 1 <= r.completion_tokens <= 4

    def test_length_finish_uses_exactly_max_tokens(self, make_engine, encode):
        [r] = make_engine(max_tokens=3).run([encode(STORY)])
        assert (r.finish_reason, r.completion_tokens, r.error) == ("length", 3, None)
        assert r.text

    def test_stop_finish_on_end_of_sequence(self, make_engine, encode):
        [r] = make_engine(max_tokens=48).run([encode(FRANCE)])
        assert r.finish_reason == "stop" and r.completion_tokens < 48
        assert "Paris" in r.text

    def test_stop_strings_end_the_output_and_are_not_included(self, make_engine, encode):
        [r] = make_engine(max_tokens=48, stop=["Paris"]).run([encode(FRANCE)])
        assert r.finish_reason == "stop"
        assert "Paris" not in r.text

    def test_greedy_is_deterministic_within_a_batch(self, make_engine, encode):
        a, b = make_engine(max_tokens=8).run([encode(STORY), encode(STORY)])
        assert a.text == b.text and a.completion_tokens == b.completion_tokens

    def test_too_long_prompt_is_a_row_error_not_a_crash(self, make_engine, encode):
        engine = make_engine(max_tokens=4, max_model_len=64)
        long_prompt = encode("Summarize this: " + "the quick brown fox jumps over the lazy dog " * 20)
        ok, bad = engine.run([encode(FRANCE), long_prompt])
        assert bad.finish_reason == "error" and bad.text is None
        assert bad.error == f"prompt_too_long: {len(long_prompt)} tokens > {engine.max_prompt_len}"
        assert bad.prompt_tokens == len(long_prompt)
        assert ok.error is None and ok.text

    def test_completion_is_cut_to_fit_the_model_length(self, make_engine, encode):
        engine = make_engine(max_tokens=48, max_model_len=64)
        prompt = encode(STORY)  # about 40 tokens: less room than max_tokens
        [r] = engine.run([prompt])
        assert r.error is None
        assert r.completion_tokens <= 64 - len(prompt)

    def test_each_request_keeps_its_own_settings_in_a_shared_batch(self, make_engine, encode):
        # Issue 12: rows with their own max_tokens, temperature and seed share one submission
        # (one batch, or one in-flight window) and each gets exactly what it asked for.
        engine = make_engine(max_tokens=10)
        base = Sampling(max_tokens=10, temperature=0.0, top_p=1.0, stop=())
        short = dataclasses.replace(base, max_tokens=3)
        sampled = dataclasses.replace(base, temperature=1.0, seed=5)
        rows = [Request(0, encode(STORY), None, short), Request(1, encode(STORY)),
                Request(2, encode(STORY), 5, sampled), Request(3, encode(POEM), 5, sampled),
                Request(4, encode(STORY), 5, sampled)]
        r = engine.run(rows)
        assert (r[0].completion_tokens, r[0].finish_reason) == (3, "length")
        assert (r[1].completion_tokens, r[1].finish_reason) == (10, "length")
        assert r[2].text == r[4].text  # a row's own seed: the same sample wherever it sits
        assert all(x.error is None for x in r)

    def test_sampling_with_a_seed_gives_each_row_its_own_text_whatever_its_batch(self, make_engine, encode):
        # Issue 9, item 5: a row's sampled text depends on the config, the model and the row
        # (its id, hence its seed, and its prompt), not on which rows share its batch.
        engine = make_engine(max_tokens=8, temperature=1.0, seed=7)
        prompts = [encode(p) for p in (STORY, COLORS, POEM, "Hi")] * 3  # each prompt, three ids
        rows = [Request(i, p, row_seed(7, f"prompts.parquet:{i}")) for i, p in enumerate(prompts)]

        def texts(order: list[int]) -> dict[int, str]:
            return {i: r.text for i, r in zip(order, engine.run([rows[i] for i in order]), strict=True)}

        in_order = texts(list(range(12)))  # more than one batch
        assert texts(list(reversed(range(12)))) == in_order  # other batch mates, positions, padding
        assert texts([5, 2, 11, 8]) == {i: in_order[i] for i in (5, 2, 11, 8)}
        assert texts([3]) == {3: in_order[3]}  # alone: no padding at all
        for i in range(4):  # the same open-ended prompt under three ids: three seeds, three texts
            assert len({in_order[i], in_order[i + 4], in_order[i + 8]}) == 3, [in_order[i + k] for k in (0, 4, 8)]
