"""The TensorRT-LLM backend, against the TensorRT-LLM test double (tests/fakes/tensorrt_llm).

Everything outside the tensorrt_llm calls is tested here for real: config checks and
their translation to TensorRT-LLM arguments, engine cache keys, mismatch errors, the
shared engine cache and the once-per-node download, the in-flight window across shards,
output mapping and rejected requests. The backend then runs the engine conformance suite
inside real Ray workers, and a whole job, with the double in place of the library.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from batchinfer import runner
from batchinfer.config_loader import config_from_dict
from batchinfer.engines import EngineUnavailable
from batchinfer.engines.base import Engine, Request
from batchinfer.engines.trtllm import artifacts
from batchinfer.engines.trtllm.artifacts import EngineArtifactError, GpuIdentity
from batchinfer.engines.trtllm.engine import (
    TrtLlmEngine,
    build_args,
    check_config,
    rejected,
    runtime_args,
    sampling_params,
    to_result,
)
from batchinfer.sampling import Sampling, resolve
from scripts.sample_prompts import prompt, write_sample_prompts
from tests.conftest import REPO, TRTLLM_DOUBLE_ENV, hold_run, ids_of, write_yaml
from tests.engine_conformance import EngineConformance, RayEngine, generate_all

L40S = GpuIdentity("NVIDIA L40S", "sm_89")
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "sm_90")


def trt(tmp_path, model_folder, **sections):
    """A trtllm config on the small model: engine mode, built on a miss, node cache in tmp."""
    raw = {
        "input": {"path": str(tmp_path / "prompts"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"backend": "trtllm", "model": model_folder, "max_batch_size": 8, "max_model_len": 512},
        "trtllm": {"quantization": "none", "max_input_len": 400, "max_num_tokens": 1024,
                   "build_on_miss": True, "node_cache_dir": str(tmp_path / "node")},
        "sampling": {"max_tokens": 4},
        "run": {"num_workers": 1, "gpus_per_worker": 1, "rows_per_shard": 20},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    raw["engine"]["options"] = raw.pop("trtllm")  # the backend's own settings
    return config_from_dict(raw)


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("sections, message", [
    ({"run": {"gpus_per_worker": 0}}, "the trtllm backend needs one GPU per worker"),
    ({"trtllm": {"max_input_len": 512}}, "engine.options.max_input_len (512) must be below engine.max_model_len (512)"),
    ({"sampling": {"max_tokens": 600}}, "sampling.max_tokens (600) must be below engine.max_model_len (512)"),
    ({"trtllm": {"enable_chunked_prefill": False, "max_num_tokens": 256}},
     "engine.options.max_num_tokens (256) < engine.options.max_input_len (400) without chunked prefill"),
    ({"trtllm": {"quantization": "fp8"}, "engine": {"dtype": "float32"}}, "engine.dtype float32 with engine.options.quantization fp8"),
    ({"trtllm": {"quantization": "fp8"}}, "building an FP8 engine (engine.options.build_on_miss) needs calibration data"),
    ({"trtllm": {"calib_dataset": "/nonexistent/calib", "build_on_miss": False}},
     "engine.options.calib_dataset: '/nonexistent/calib' does not exist"),
    ({"trtllm": {"engine_dir": "/engines/x", "build_on_miss": False}},
     "engine.options.engine_dir is set but engine.tokenizer is not"),
    ({"trtllm": {"engine_dir": "/engines/x"}, "engine": {"tokenizer": "smollm2-135m"}},
     "engine.options.engine_dir loads a prebuilt engine as is; build_on_miss does not apply"),
    ({"trtllm": {"mode": "pytorch", "build_on_miss": False, "engine_cache": "s3://b/e"}},
     "engine.options.engine_dir, engine_cache and build_on_miss are for mode: engine"),
    ({"trtllm": {"mode": "pytorch", "build_on_miss": False, "quantization": "fp8"}},
     "has no hf_quant_config.json (ModelOpt's marker)"),
])
def test_impossible_settings_are_refused_before_any_gpu(tmp_path, model_folder, sections, message):
    problems = check_config(trt(tmp_path, model_folder, **sections))
    assert any(message in p for p in problems), problems


def test_shipped_l40s_config_is_valid():
    from batchinfer.config_loader import load_config

    cfg = load_config(REPO / "configs" / "l40s-llama-3.1-8b-fp8.yaml")
    assert cfg.engine.backend == "trtllm" and cfg.run.accelerator_type == "L40S"
    assert cfg.run.gpus_per_worker == 1 and cfg.engine.options.quantization == "fp8"
    problems = [p for p in check_config(cfg) if "does not exist" not in p]  # paths of the target cluster
    assert problems == []


def test_run_without_tensorrt_llm_fails_before_workers_with_install_hint(tmp_path, model_folder):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=4)
    config = write_yaml(tmp_path / "c.yaml", trt(tmp_path, model_folder))
    proc = subprocess.run([sys.executable, "-m", "batchinfer.cli", "run", str(config),
                           "--set", "run.ray_address=127.0.0.1:1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 2, proc.stderr
    assert "engine backend 'trtllm' needs tensorrt_llm, which is not installed here" in proc.stderr
    assert "pip install tensorrt-llm==1.2.1 --extra-index-url https://pypi.nvidia.com" in proc.stderr
    with pytest.raises(EngineUnavailable):
        runner.preflight(trt(tmp_path, model_folder))


# --------------------------------------------------------------------------- translation to TensorRT-LLM


@pytest.fixture
def api(trtllm_double):
    from batchinfer.engines.trtllm.engine import import_api

    return import_api()


def test_engine_mode_arguments(tmp_path, model_folder, api):
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs_fields, TrtLlmArgs_fields

    calib = tmp_path / "calib"
    calib.mkdir()
    cfg = trt(tmp_path, model_folder, trtllm={"quantization": "fp8", "calib_dataset": str(calib),
                                               "scheduler_policy": "max_utilization",
                                               "kv_cache_free_gpu_memory_fraction": 0.85})
    run_args, build = runtime_args(cfg, api), build_args(cfg, api)
    assert set(run_args) | set(build) <= TrtLlmArgs_fields
    assert run_args["kv_cache_config"].dtype == "auto"  # TRT engines carry their FP8 KV cache
    assert run_args["kv_cache_config"].free_gpu_memory_fraction == 0.85
    assert run_args["kv_cache_config"].enable_block_reuse is True
    assert run_args["scheduler_config"].capacity_scheduler_policy == api.CapacitySchedulerPolicy.MAX_UTILIZATION
    assert (run_args["max_batch_size"], run_args["max_num_tokens"], run_args["enable_chunked_prefill"]) == (8, 1024, True)
    b = build["build_config"]
    assert (b.max_batch_size, b.max_num_tokens, b.max_input_len, b.max_seq_len) == (8, 1024, 400, 512)
    assert build["quant_config"].quant_algo == api.QuantAlgo.FP8 == "FP8"
    assert build["quant_config"].kv_cache_quant_algo == api.QuantAlgo.FP8
    assert (build["calib_config"].calib_dataset, build["calib_config"].calib_batches) == (str(calib), 512)
    assert not (set(build) & TorchLlmArgs_fields)  # build-only arguments: TensorRT backend only


def test_pytorch_mode_arguments(tmp_path, model_folder, api):
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs_fields

    cfg = trt(tmp_path, model_folder, trtllm={"mode": "pytorch", "build_on_miss": False, "quantization": "fp8"})
    args = runtime_args(cfg, api)
    assert set(args) <= TorchLlmArgs_fields
    assert args["kv_cache_config"].dtype == "fp8"
    assert (args["max_input_len"], args["max_seq_len"]) == (400, 512)


def test_sampling_params_always_set_max_tokens(tmp_path, model_folder, api):
    cfg = trt(tmp_path, model_folder, sampling={"max_tokens": 100, "stop": ["###"], "seed": 7})
    p = sampling_params(api, Sampling.from_config(cfg.sampling), 100, 7)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (100, 0.0, 1.0, 7, ["###"])
    assert p.guided_decoding is None
    assert api.SamplingParams().max_tokens == 32  # what we would get without it


def test_each_request_gets_its_own_settings_and_seed(tmp_path, model_folder, api):
    """A row's own settings reach TensorRT-LLM: one SamplingParams per distinct greedy setting
    (never shared across settings, never copied), a fresh one per sampled request with its
    seed; a request without a seed of its own (the canary) uses sampling.seed."""
    cfg = trt(tmp_path, model_folder, sampling={"temperature": 0.0, "seed": 7, "max_tokens": 20})
    engine = TrtLlmEngine.__new__(TrtLlmEngine)
    Engine.__init__(engine, config=cfg)
    engine.api, engine._params, engine._max_model_len, engine._max_input_len = api, {}, 512, 400
    defaults = engine.sampling
    own = resolve(defaults, {"max_tokens": 5, "stop": "!", "temperature": 0.7, "top_p": 0.9, "seed": 3})
    greedy_json = resolve(defaults, {"response_format": {"type": "json_object"}})
    a = engine._sampling_params(Request(0, [1, 2], 11))
    b = engine._sampling_params(Request(1, [1, 2, 3], 12))
    assert a is b and (a.max_tokens, a.temperature, a.seed) == (20, 0.0, 7)  # greedy: one object
    c = engine._sampling_params(Request(2, [1], 3, own))
    assert (c.max_tokens, c.temperature, c.top_p, c.seed, c.stop) == (5, 0.7, 0.9, 3, ["!"])
    assert engine._sampling_params(Request(3, [1], 3, own)) is not c  # sampled: fresh each time
    j = engine._sampling_params(Request(4, [1], 9, greedy_json))
    assert j is not a and j.guided_decoding.json_object is True
    assert engine._sampling_params(Request(5, [1], None, own)).seed == 3  # the row's own seed


@pytest.mark.parametrize("fmt, guide", [
    ({"type": "json_object"}, {"json_object": True}),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
     {"json": '{"properties": {"a": {"type": "integer"}}, "type": "object"}'}),
    ({"type": "regex", "regex": "(yes|no)"}, {"regex": "(yes|no)"}),
    ({"type": "choice", "choice": ["pos", 'say "neg"']}, {"grammar": 'root ::= "pos" | "say \\"neg\\""'}),
])
def test_response_formats_become_one_guide_each(tmp_path, model_folder, api, fmt, guide):
    """Each response format is exactly one GuidedDecodingParams guide (the real class refuses
    two), and an LLM that may see one is built with guided_decoding_backend xgrammar."""
    cfg = trt(tmp_path, model_folder, sampling={"response_format": fmt})
    p = sampling_params(api, Sampling.from_config(cfg.sampling), 10, 0)
    set_guides = {k: v for k, v in dataclasses.asdict(p.guided_decoding).items() if v not in (None, False)}
    assert set_guides == guide
    assert runtime_args(cfg, api)["guided_decoding_backend"] == "xgrammar"
    assert "guided_decoding_backend" not in runtime_args(trt(tmp_path, model_folder), api)


# --------------------------------------------------------------------------- outputs and refusals


def output(finish, text="hi", tokens=(5, 6), prompt=(1, 2, 3)):
    completion = SimpleNamespace(text=text, token_ids=list(tokens), finish_reason=finish)
    return SimpleNamespace(outputs=[completion], prompt_token_ids=list(prompt))


@pytest.mark.parametrize("finish, expected", [
    ("stop", ("hi", "stop", 3, 2, None)),
    ("length", ("hi", "length", 3, 2, None)),
    ("timeout", (None, "error", 3, 2, "timeout: the engine ended the request (timeout) after 2 tokens")),
    ("cancelled", (None, "error", 3, 2, "cancelled: the engine ended the request (cancelled) after 2 tokens")),
])
def test_outputs_map_to_the_row_contract(finish, expected):
    r = to_result(output(finish))
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error) == expected


def test_synchronous_refusals_become_row_errors():
    too_long = ValueError("The sum of prompt length (900) and query length (0) max_tokens (64) should "
                          "not exceed max_seq_len (512)")
    r = rejected(too_long, 900)
    assert r.finish_reason == "error" and r.error.startswith("prompt_too_long: The sum of prompt length (900)")
    assert rejected(ValueError("require 0 <= top_p <= 1, got top_p=2"), 3).error == \
        "rejected: require 0 <= top_p <= 1, got top_p=2"


# --------------------------------------------------------------------------- engine artifacts


def test_engine_key_covers_gpu_version_settings_and_model(tmp_path, model_folder):
    cfg = trt(tmp_path, model_folder)
    key = artifacts.engine_key(cfg, L40S, "1.2.1")
    assert key == artifacts.engine_key(trt(tmp_path, model_folder), L40S, "1.2.1")
    assert key.startswith("smollm2-135m-") and "-sm_89-trtllm1.2.1-" in key
    others = {
        artifacts.engine_key(cfg, H100, "1.2.1"),
        artifacts.engine_key(cfg, L40S, "1.2.0"),
        artifacts.engine_key(trt(tmp_path, model_folder, engine={"max_batch_size": 16}), L40S, "1.2.1"),
        artifacts.engine_key(trt(tmp_path, model_folder, trtllm={"max_input_len": 300}), L40S, "1.2.1"),
        artifacts.engine_key(trt(tmp_path, model_folder, engine={"max_model_len": 1024}), L40S, "1.2.1"),
        artifacts.engine_key(trt(tmp_path, model_folder, engine={"dtype": "float16"}), L40S, "1.2.1"),
    }
    assert key not in others and len(others) == 6


def fake_build(out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": {},
                                                 "build_config": {"max_seq_len": 512, "max_input_len": 400}}))
    (out / "rank0.engine").write_bytes(os.urandom(4096))


def test_engine_folders_that_do_not_fit_are_explained(tmp_path, model_folder):
    cfg = trt(tmp_path, model_folder)
    engine = tmp_path / "engine"
    engine.mkdir()
    fake_build(engine)
    artifacts.write_sidecar(engine, cfg, H100, "1.2.0", "k")
    cfgfile = json.loads((engine / "config.json").read_text())
    cfgfile["version"] = "1.2.0"
    (engine / "config.json").write_text(json.dumps(cfgfile))
    with pytest.raises(EngineArtifactError) as e:
        artifacts.check_compat(engine, L40S, "1.2.1")
    assert str(e.value).startswith(
        f"the engine at {engine} was built for TensorRT-LLM 1.2.0 (this worker has 1.2.1) and "
        "NVIDIA H100 80GB HBM3 (sm_90) (this worker has NVIDIA L40S (sm_89)); a TensorRT engine "
        "only runs on the GPU architecture and TensorRT-LLM version it was built with.")
    (engine / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    with pytest.raises(EngineArtifactError, match="is not a TensorRT engine config"):
        artifacts.check_compat(engine, L40S, "1.2.1")
    with pytest.raises(EngineArtifactError, match="is not a TensorRT engine folder"):
        artifacts.check_compat(tmp_path, L40S, "1.2.1")


def test_build_publish_download_and_miss(tmp_path, model_folder):
    shared = tmp_path / "shared"
    cfg = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared)})
    builds = []

    def build(out):
        builds.append(out)
        fake_build(out)

    folder, key, how = artifacts.resolve(cfg, L40S, "1.2.1", build)
    assert how == "built" and len(builds) == 1
    assert (shared / key / "manifest.json").is_file()
    again = artifacts.resolve(cfg, L40S, "1.2.1", build)
    assert again[2] == "node-cache" and len(builds) == 1

    other_node = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared), "build_on_miss": False,
                                                     "node_cache_dir": str(tmp_path / "node2")})
    folder2, _, how2 = artifacts.resolve(other_node, L40S, "1.2.1", build)
    assert how2 == "downloaded" and len(builds) == 1
    assert (folder2 / "rank0.engine").read_bytes() == (folder / "rank0.engine").read_bytes()

    elsewhere = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared), "build_on_miss": False,
                                                    "node_cache_dir": str(tmp_path / "node3")})
    with pytest.raises(EngineArtifactError) as e:
        artifacts.resolve(elsewhere, H100, "1.2.1", build)
    text = str(e.value)
    assert f"in {shared}: none was built for NVIDIA H100 80GB HBM3 (sm_90) with TensorRT-LLM 1.2.1" in text
    assert "batchinfer build-engine CONFIG" in text
    assert "The cache has engines of this model for other GPUs, versions or settings, which cannot " \
           "run here: NVIDIA L40S (sm_89), TensorRT-LLM 1.2.1" in text


def test_the_first_published_build_of_a_key_wins(tmp_path, model_folder):
    shared = tmp_path / "shared"
    cfg = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared)})
    firsts = []
    for i in range(2):
        out = tmp_path / f"build{i}"
        out.mkdir()
        fake_build(out)
        artifacts.write_sidecar(out, cfg, L40S, "1.2.1", "k1")
        firsts.append(artifacts.publish(cfg, "k1", out))
    manifest = json.loads((shared / "k1" / "manifest.json").read_text())
    assert firsts[0].endswith(manifest["build_id"])
    assert sorted(p.name for p in (shared / "k1").iterdir() if p.name.startswith("build-")) == [manifest["build_id"]]


def test_a_corrupted_download_is_refused_and_leaves_nothing(tmp_path, model_folder):
    shared = tmp_path / "shared"
    cfg = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared)})
    _, key, _ = artifacts.resolve(cfg, L40S, "1.2.1", fake_build)
    manifest = json.loads((shared / key / "manifest.json").read_text())
    (shared / key / manifest["build_id"] / "rank0.engine").write_bytes(b"truncated")
    fresh = trt(tmp_path, model_folder, trtllm={"engine_cache": str(shared), "build_on_miss": False,
                                                "node_cache_dir": str(tmp_path / "fresh")})
    with pytest.raises(EngineArtifactError, match="does not match its recorded checksum"):
        artifacts.resolve(fresh, L40S, "1.2.1", fake_build)
    assert not (tmp_path / "fresh" / key).exists()


# --------------------------------------------------------------------------- the engine in a worker


def test_rejections_and_request_failures_are_row_errors(tmp_path, model_folder, trtllm_double, encode):
    from tensorrt_llm.executor import RequestError

    from batchinfer.engines.trtllm.engine import TrtLlmEngine

    engine = TrtLlmEngine(config=trt(tmp_path, model_folder))
    try:
        prompt = encode("Hello")

        def refuse(inputs, sampling_params):
            raise ValueError("The sum of prompt length (9) and query length (0) max_tokens (4) should "
                             "not exceed max_seq_len (8)")
        engine.llm.generate_async = refuse
        [r] = asyncio.run(generate_all(engine, [prompt]))
        assert r.error.startswith("prompt_too_long: The sum of prompt length (9)")

        class Failing:
            def __await__(self):
                async def fail():
                    raise RequestError("Encountered an error in forwardAsync")
                return fail().__await__()
        engine.llm.generate_async = lambda inputs, sampling_params: Failing()
        [r] = asyncio.run(generate_all(engine, [prompt]))
        assert r.error == "request_failed: Encountered an error in forwardAsync"
    finally:
        engine.shutdown()


def test_guided_requests_need_the_guided_decoder_the_engine_sets_up(tmp_path, model_folder, trtllm_double, encode):
    """A config that may constrain rows builds its LLM with guided_decoding_backend xgrammar, and
    a row with a response format runs; the same row on an LLM without it is the row error the
    real executor gives ("GuidedDecoder is not setup"), never the engine's failure."""
    from batchinfer.engines.trtllm.engine import TrtLlmEngine

    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    row = Request(0, encode("Hello"), 1, resolve(Sampling(4, 0.0, 1.0, ()), {"response_format": fmt}))
    engine = TrtLlmEngine(config=trt(tmp_path, model_folder, sampling={"response_format": fmt}))
    try:
        assert engine.llm.args.guided_decoding_backend == "xgrammar"
        [r] = asyncio.run(generate_all(engine, [row]))
        assert r.error is None and r.completion_tokens > 0
    finally:
        engine.shutdown()
    plain = TrtLlmEngine(config=trt(tmp_path, model_folder))
    try:
        assert plain.llm.args.guided_decoding_backend is None
        [r] = asyncio.run(generate_all(plain, [row]))
        assert r.error.startswith("request_failed: ") and "GuidedDecoder is not setup" in r.error
        [ok] = asyncio.run(generate_all(plain, [encode("Hello")]))  # the engine goes on
        assert ok.error is None
    finally:
        plain.shutdown()


def test_busy_reports_the_longest_prompt_of_unfinished_requests(tmp_path, model_folder, trtllm_double, encode):
    """For the hang watchdog: requests in the engine are a step holding the longest prompt."""
    from batchinfer.engines.base import Request
    from batchinfer.engines.trtllm.engine import TrtLlmEngine

    engine = TrtLlmEngine(config=trt(tmp_path, model_folder))
    prompts = [encode("Hello"), encode("Tell me about the sea, the sky and the long road home.")]
    submit = engine.llm.generate_async

    async def held_in_the_engine():
        gate = asyncio.Event()

        class Held:  # a request the engine has taken but not finished until the gate opens
            def __init__(self, inner):
                self.inner = inner

            def __await__(self):
                async def wait():
                    await gate.wait()
                    return await self.inner
                return wait().__await__()

        engine.llm.generate_async = lambda inputs, sampling_params: Held(submit(inputs, sampling_params))
        tasks = [asyncio.ensure_future(engine.generate(Request(i, p))) for i, p in enumerate(prompts)]
        await asyncio.sleep(0.2)
        busy = engine.busy()
        gate.set()
        return busy, await asyncio.gather(*tasks)

    try:
        assert engine.busy()["in_step"] is False
        busy, results = asyncio.run(held_in_the_engine())
        assert busy["in_step"] and busy["step_tokens"] == max(map(len, prompts))
        assert all(r.error is None for r in results)
        assert engine.busy()["in_step"] is False and engine.heartbeat == 2
    finally:
        engine.shutdown()


def test_in_flight_window_spans_shards(tmp_path, model_folder, trtllm_double):
    """Rows of the next shard are submitted while the current shard's rows still run."""
    from batchinfer.run_store import RunStore
    from batchinfer.worker import ShardWorker

    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=10, row_group_size=5)
    cfg = trt(tmp_path, model_folder, engine={"max_batch_size": 4}, run={"rows_per_shard": 5})
    plan = RunStore(cfg.output.path).write_plan(runner.planning.make_plan(cfg))
    worker = ShardWorker(config=cfg, plan=plan, worker_index=0, generation=hold_run(cfg.output.path))
    assert worker.engine.max_in_flight == 8  # 2 x max_batch_size
    submitted, release = [], threading.Event()
    submit = worker.engine.llm.generate_async
    runtime = worker.engine.llm._runtime
    generate = runtime._generate

    def held(batch):  # the engine stays busy until we have seen what was submitted
        release.wait(timeout=60)
        generate(batch)

    runtime._generate = held

    def recording(inputs, sampling_params):
        submitted.append(inputs)
        if len(submitted) == 8:
            release.set()
        return submit(inputs, sampling_params)

    worker.engine.llm.generate_async = recording
    shard_of = {tuple(worker.prompts.encode([prompt(i)])[0]): i // 5 for i in range(10)}

    async def both():
        return await asyncio.gather(worker.process(0, 1), worker.process(1, 1))

    try:
        summaries = asyncio.run(both())
    finally:
        worker.engine.shutdown()
    assert [a.summary.rows_ok for a in summaries] == [5, 5]
    assert [shard_of[tuple(ids)] for ids in submitted[:8]] == [0] * 5 + [1] * 3
    assert sorted(pd.read_parquet(tmp_path / "out").id) == ids_of(10)


@pytest.fixture(scope="class")
def ray_trtllm_engines(tmp_path_factory, model_folder, ray_cluster):
    """A trtllm engine in one Ray worker, rebuilt in place when a test asks for other settings."""
    tmp_path = tmp_path_factory.mktemp("trtllm-conformance")
    host: dict[str, RayEngine] = {}
    current: list[str] = []

    def make(**overrides):
        key = json.dumps(overrides, sort_keys=True)
        engine = {k: overrides.pop(k) for k in ("max_model_len",) if k in overrides}
        trtllm = {"max_input_len": engine["max_model_len"] - 1} if engine else {}
        cfg = trt(tmp_path, model_folder, engine=engine, trtllm=trtllm, sampling=overrides)
        if "engine" not in host:
            host["engine"] = RayEngine("trtllm", cfg, num_gpus=1, runtime_env=TRTLLM_DOUBLE_ENV)
        elif current != [key]:
            host["engine"].rebuild(cfg)
        current[:] = [key]
        return host["engine"]

    yield make
    if "engine" in host:
        host["engine"].shutdown()


class TestTrtLlmEngineInRay(EngineConformance):
    """The shared conformance suite, with the backend inside a real Ray worker process."""

    @pytest.fixture
    def make_engine(self, ray_trtllm_engines):
        return ray_trtllm_engines


# --------------------------------------------------------------------------- whole jobs


def test_job_on_trtllm_workers_downloads_the_engine_once_per_node(tmp_path, model_folder, trtllm_double,
                                                                   ray_cluster, s3):
    import ray

    from batchinfer.engines.trtllm.engine import TrtLlmEngine
    from batchinfer.worker import ShardWorker

    write_sample_prompts(str(tmp_path / "prompts"), files=2, rows_per_file=20, row_group_size=10)
    cache_url = s3.url("engines")
    common = {"trtllm": {"engine_cache": cache_url, "build_on_miss": False},
              "storage": {"endpoint_url": s3.endpoint},
              "run": {"num_workers": 2, "runtime_env": trtllm_double, "rows_per_shard": 10}}

    # No engine anywhere yet: the run stops before any worker, explaining what to do.
    with pytest.raises(EngineArtifactError, match="batchinfer build-engine CONFIG"):
        runner.run(trt(tmp_path, model_folder, **common), progress=False)

    # Build it once, as `batchinfer build-engine` does, into a node cache we then drop.
    built = runner.build_engine(trt(tmp_path, model_folder, **{**common, "trtllm": {
        **common["trtllm"], "node_cache_dir": str(tmp_path / "builder-node")}}))
    assert built["status"].startswith("built on ") and f"engines/{built['engine']}/manifest.json" in " ".join(s3.keys("engines/"))

    # Two workers on one node, an empty node cache: exactly one of them downloads.
    cfg = trt(tmp_path, model_folder, **common)
    plan = runner.planning.make_plan(cfg)
    actor = ray.remote(ShardWorker).options(num_gpus=1, runtime_env=trtllm_double)
    workers = [actor.remote(config=cfg, plan=plan, worker_index=i, generation=0) for i in range(2)]
    try:
        sources = sorted(i.engine_source for i in ray.get([w.ready.remote() for w in workers]))
    finally:
        for w in workers:
            ray.kill(w)
    assert sources == ["downloaded", "node-cache"]

    # And the whole job, on two trtllm workers, with the node copy now in place.
    report = runner.run(cfg, progress=False)
    assert report.exit_code == 0, report.manifest
    df = pd.read_parquet(tmp_path / "out")
    assert sorted(df.id) == ids_of(40)
    assert df.output.str.len().min() > 0 and set(df.finish_reason) <= {"stop", "length"}
    assert TrtLlmEngine.name == "trtllm"


def test_build_engine_cli(tmp_path, model_folder, trtllm_double, ray_cluster):
    write_sample_prompts(str(tmp_path / "prompts"), files=1, rows_per_file=2)
    calib = tmp_path / "calib"
    calib.mkdir()  # the layout TensorRT-LLM calibrates on: a train split with a text column
    pd.DataFrame({"text": ["The quick brown fox.", "Jumps over the lazy dog."]}).to_parquet(calib / "train.parquet")
    cfg = trt(tmp_path, model_folder, trtllm={"quantization": "fp8", "calib_dataset": str(calib),
                                               "engine_cache": str(tmp_path / "shared")},
              run={"runtime_env": trtllm_double})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": trtllm_double["env_vars"]["PYTHONPATH"], "RAY_ADDRESS": ray_cluster}
    cli = [sys.executable, "-m", "batchinfer.cli", "build-engine", str(config)]
    first = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "status   built on NVIDIA L40S (TensorRT-LLM test double) (sm_89)" in first.stdout
    key = first.stdout.split("engine   ", 1)[1].split()[0]
    manifest = json.loads((tmp_path / "shared" / key / "manifest.json").read_text())
    assert manifest["build"]["quantization"] == "fp8" and manifest["tensorrt_llm"] == "1.2.1"
    engine_config = json.loads((tmp_path / "shared" / key / manifest["build_id"] / "config.json").read_text())
    quantization = engine_config["pretrained_config"]["quantization"]  # QuantConfig.to_dict(): ten keys
    assert (quantization["quant_algo"], quantization["kv_cache_quant_algo"]) == ("FP8", "FP8")
    assert {"group_size", "exclude_modules", "mamba_ssm_cache_dtype"} <= set(quantization)
    time.sleep(0.1)
    second = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "status   node-cache" in second.stdout
