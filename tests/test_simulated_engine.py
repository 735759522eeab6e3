"""The simulated engine (issue 11, item 1): its pure performance model against NVIDIA's
published L40S figures, the engine through the shared conformance suite, its accounting,
and a whole job on it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import zlib

import pandas as pd
import pytest

from batchinfer import runner
from batchinfer.config import EngineConfig
from batchinfer.config_loader import config_from_dict
from batchinfer.engines import Request, get_engine_class
from batchinfer.engines.simulated.engine import SimulatedEngine
from batchinfer.engines.simulated.model import BLOCK_TOKENS, Simulator, drive, saturated_throughput
from batchinfer.engines.simulated.profiles import CALIBRATION_REQUESTS, PROFILES, PUBLISHED
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import REPO, assert_exactly_once, ids_of, make_config
from tests.engine_conformance import EngineConformance, LocalEngine, generate_all

L40S = PROFILES["l40s-llama-3.1-8b-fp8"]
ENGINE_FIELDS = set(EngineConfig.model_fields)
FAST = 10_000  # times real time: a simulated minute in 6 ms

# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize(("shape", "published"), sorted(PUBLISHED[L40S.name].items()))
def test_saturated_throughput_is_within_15_percent_of_the_published_figure(shape, published):
    simulated = saturated_throughput(L40S, *shape, CALIBRATION_REQUESTS)
    assert 0.85 <= simulated / published <= 1.15, f"{shape}: {simulated:.0f} vs {published} tokens/s"


def _run(sim: Simulator) -> list[tuple]:
    """Each iteration's (running, waiting, cost) until idle."""
    trace = []
    while not sim.idle():
        sim.step()
        trace.append((sim.running, sim.waiting, sim.last_cost))
    return trace


def test_batch_slots_kv_blocks_and_the_token_budget_bound_every_iteration():
    sim = Simulator(L40S, max_batch_size=8, kv_cache_tokens=BLOCK_TOKENS * 40, max_num_tokens=100)
    for i in range(20):
        sim.submit(i, 150, 10)  # 160 tokens: 5 blocks each, so 8 fit the cache at once
    trace = _run(sim)
    assert max(running for running, *_ in trace) == 8
    assert max(cost.prefill_tokens for *_, cost in trace) == 100  # prompts go in chunks
    assert sim.counters.finished == 20 and sim.counters.output_tokens == 200
    assert sim.counters.prefill_tokens == 20 * 150
    assert sim._used_blocks == 0 and sim._context == 0  # everything freed at completion

    tight = Simulator(L40S, max_batch_size=8, kv_cache_tokens=BLOCK_TOKENS * 12)
    for i in range(6):
        tight.submit(i, 150, 10)
    assert max(running for running, *_ in _run(tight)) == 2  # the cache, not the slots, binds


def test_requests_are_admitted_first_come_first_served():
    sim = Simulator(L40S, max_batch_size=1)
    for i in range(4):
        sim.submit(i, 10, 3)
    finished = []
    while not sim.idle():
        finished += sim.step()[1]
    assert finished == [0, 1, 2, 3]


def test_a_shared_prompt_prefix_is_computed_once_while_its_blocks_stay_cached():
    prefix = list(range(10 * BLOCK_TOKENS))
    sim = Simulator(L40S, max_batch_size=1)
    sim.submit("a", len(prefix) + 5, 4, prefix + [1, 2, 3, 4, 5])
    sim.submit("b", len(prefix) + 3, 4, prefix + [7, 8, 9])
    sim.submit("c", 40, 4, [5] * 40)
    drive(sim)
    assert sim.counters.reused_tokens == len(prefix)
    assert sim.counters.prefill_tokens == len(prefix) + 5 + 3 + 40

    # The same prompt again after its blocks were evicted is computed in full.
    small = Simulator(L40S, max_batch_size=1, kv_cache_tokens=12 * BLOCK_TOKENS)
    for i, ids in enumerate([prefix + [1], [9] * 300, prefix + [1]]):
        small.submit(i, len(ids), 4, ids)
    drive(small)
    assert small.counters.reused_tokens == 0


def test_virtual_time_is_the_coefficients_dot_the_counted_terms():
    sim = Simulator(L40S)
    for i in range(50):
        sim.submit(i, 300, 40)
    seconds = drive(sim)
    coef = (L40S.base_s, L40S.prefill_s_per_token, L40S.decode_s_per_seq, L40S.attn_s_per_ctx_token)
    assert seconds == pytest.approx(sum(c * t for c, t in zip(coef, sim.counters.terms(), strict=True)))


# --------------------------------------------------------------------------- the engine


def encode(text: str) -> list[int]:
    """Word ids: the simulated engine never decodes, so any stable tokenization will do."""
    return [zlib.crc32(w.encode()) % 50_000 for w in text.split()]


def simulated_config(**overrides):
    options = overrides.pop("options", {})
    engine = {"backend": "simulated", "max_batch_size": 8, "options": {"speed": FAST, **options},
              **{k: v for k, v in overrides.items() if k in ENGINE_FIELDS}}
    sampling = {k: v for k, v in overrides.items() if k not in ENGINE_FIELDS}
    return config_from_dict({"engine": engine, "sampling": sampling})


class TestSimulatedEngine(EngineConformance):
    @pytest.fixture
    def make_engine(self):
        made = []

        def make(**overrides):
            made.append(LocalEngine(SimulatedEngine(config=simulated_config(**overrides))))
            return made[-1]

        yield make
        for engine in made:
            engine.shutdown()

    @pytest.fixture
    def encode(self):
        return encode

    def test_stop_finish_on_end_of_sequence(self):
        pytest.skip("a simulated engine has no model to answer 'Paris' or to end on its own")

    def test_stop_strings_end_the_output_and_are_not_included(self):
        pytest.skip("a simulated engine's text is a label; stop strings never occur in it")

    def test_rows_say_their_text_is_synthetic_and_seeded_lengths_agree_across_runs(self, make_engine):
        [r] = make_engine(max_tokens=5).run([encode("hello there")])
        assert (r.text, r.finish_reason, r.completion_tokens) == ("[simulated: 5 tokens]", "length", 5)
        rows = [Request(i, encode("a b c"), seed=1000 + i) for i in range(40)]
        first = make_engine(max_tokens=50, options={"output_lengths": "seeded"}).run(rows)
        again = make_engine(max_tokens=50, options={"output_lengths": "seeded"}).run(rows[::-1])[::-1]
        assert [r.completion_tokens for r in first] == [r.completion_tokens for r in again]
        assert len({r.completion_tokens for r in first}) > 10
        assert all(r.finish_reason == ("length" if r.completion_tokens == 50 else "stop") for r in first)


def test_the_engine_runs_at_speed_and_accounts_for_its_time():
    engine = SimulatedEngine(config=simulated_config(max_batch_size=16, max_tokens=64, options={"speed": 100}))
    try:
        started = time.monotonic()
        asyncio.run(generate_all(engine, [[1] * 100] * 64))  # 4 full batches, all waiting at once
        wall = time.monotonic() - started
        a = engine.accounting()
        assert a["virtual_s"] / 100 == pytest.approx(wall, rel=0.25)
        assert a["output_tokens"] == 64 * 64 and a["iterations"] >= 4 * 64
        assert a["starved_s"] + a["idle_s"] < 0.2 * a["wall_s"] and a["busy_fraction"] > 0.8
        assert a["full_s"] > 0.7 * a["wall_s"] and a["mean_occupancy"] > 0.8
        assert engine.heartbeat == a["iterations"] and not engine.busy()["in_step"]

        # One request at a time: the batch is mostly empty and the engine says it was starved.
        async def one_by_one():
            for i in range(3):
                await engine.generate(Request(i, [1] * 10))
                await asyncio.sleep(0.05)

        asyncio.run(one_by_one())
        b = engine.accounting()
        assert b["starved_s"] > a["starved_s"] and b["idle_s"] >= a["idle_s"] + 0.05
        # A report that ends earlier (e.g. at the last shard handed out) leaves the later part out.
        assert engine.stats(until=time.time() - 60)["wall_s"] == 0.0
        window = engine.stats(until=time.time() - (time.monotonic() - (started + wall)))
        assert window["starved_s"] <= a["starved_s"] + 1e-9 and window["iterations"] <= a["iterations"]
        assert window["wall_s"] == pytest.approx(a["wall_s"], abs=0.06)
    finally:
        engine.shutdown()


def test_check_config_names_the_known_profiles_and_the_kv_bound():
    cls = get_engine_class("simulated")
    assert cls is SimulatedEngine
    assert cls.check_config(simulated_config()) == []
    [problem] = cls.check_config(simulated_config(options={"profile": "h100-llama"}))
    assert problem == ("engine.options.profile: unknown simulated profile 'h100-llama'; "
                       "known profiles: l40s-llama-3.1-8b-fp8")
    [problem] = cls.check_config(simulated_config(max_model_len=4096, options={"kv_cache_tokens": 1000}))
    assert problem.startswith("engine.options.kv_cache_tokens: got 1000; expected at least max_model_len (4096)")
    assert SimulatedEngine(config=simulated_config()).max_model_len == 8192


def test_the_backend_imports_without_torch():
    code = ("import sys; import batchinfer.engines.simulated.engine; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.slow
def test_a_whole_job_on_the_simulated_engine_completes_exactly_once(tmp_path, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=30, row_group_size=10)
    cfg = make_config(tmp_path, engine={"backend": "simulated", "options": {"speed": 1000}},
                      sampling={"max_tokens": 16}, run={"num_workers": 2, "rows_per_shard": 20})
    report = runner.run(cfg, progress=False)
    assert (report.status, report.exit_code) == ("completed", 0)
    assert_exactly_once(tmp_path / "out", ids_of(60))
    df = pd.read_parquet(tmp_path / "out")
    assert (df.output == "[simulated: 16 tokens]").all() and (df.completion_tokens == 16).all()
    this_run = report.manifest.this_run  # each engine's own accounting, and the end of the run
    assert [e["worker"] for e in this_run.engines] == [0, 1] and this_run.tail_s >= 0
    assert all(0 <= e["busy_fraction"] <= 1 and e["wall_s"] >= 0 for e in this_run.engines)
    # at least every row once: an idle worker may also run a copy of a shard queued on the other
    assert sum(e["output_tokens"] for e in this_run.engines) >= 60 * 16


def test_an_iteration_that_uses_its_whole_token_budget_is_not_starved():
    """A prefill chunk of max_num_tokens is as busy as the GPU gets, however few requests
    it holds: the accounting must not blame the framework for it."""
    engine = SimulatedEngine(config=simulated_config(max_batch_size=64, max_tokens=2,
                                                     options={"speed": 1000, "max_num_tokens": 512}))
    try:
        asyncio.run(generate_all(engine, [[1] * 4000]))  # one request: eight full prompt chunks
        a = engine.accounting()
        assert a["iterations"] >= 8 and a["full_s"] > 0.6 * a["wall_s"]
    finally:
        engine.shutdown()


def test_an_aborted_request_frees_its_slot_blocks_and_context_wherever_it_is():
    sim = Simulator(L40S, max_batch_size=2, kv_cache_tokens=64 * BLOCK_TOKENS, max_num_tokens=64)
    for i, prompt in enumerate((40, 200, 30)):  # 1 decodes soon, 2 is still prefilling, 3 waits
        sim.submit(i, prompt, 20, list(range(1000 * i, 1000 * i + prompt)))
    for _ in range(2):
        sim.step()
    assert (sim.running, sim.waiting) == (2, 1)
    assert sim.abort(0) and sim.abort(1) and sim.abort(2) and not sim.abort(2)
    assert sim.idle() and sim._context == 0 and sim._used_blocks == 0
    sim.submit(9, 100, 5)  # the freed capacity is usable again
    drive(sim)
    assert sim.counters.finished == 1 and sim._context == 0


def test_a_cancelled_generate_aborts_its_request_in_the_engine():
    engine = SimulatedEngine(config=simulated_config(max_batch_size=4, max_tokens=1000, options={"speed": 1}))

    async def cancel_one():
        task = asyncio.ensure_future(engine.generate(Request(0, [1] * 10)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the engine thread drops it at its next iteration
            if engine.sim.idle():
                return
            await asyncio.sleep(0.02)

    try:
        asyncio.run(cancel_one())
        assert engine.sim.idle() and not engine._pending and engine.sim.counters.finished == 0
    finally:
        engine.shutdown()
