"""The TensorRT-LLM test double against tests/fakes/trtllm_1_2_api.json (the real 1.2.x names
and defaults batchinfer relies on), and batchinfer's calls against the same file."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

import pytest

from batchinfer.config_loader import config_from_dict
from batchinfer.engines.trtllm.engine import build_args, runtime_args, sampling_params
from batchinfer.sampling import Sampling, parse_response_format

API = json.loads((Path(__file__).parent / "fakes" / "trtllm_1_2_api.json").read_text())
CLASSES = API["classes"]


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _fields(entry: dict) -> dict:
    parent = CLASSES[entry["extends"]]["fields"] if "extends" in entry else {}
    return {**parent, **entry["fields"]}


def _double_defaults(cls) -> dict:
    """{field: default} of a dataclass or pydantic model (factories called; required -> ...)."""
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else
                (f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
                for f in dataclasses.fields(cls)}
    return {name: ... if f.is_required() else f.get_default(call_default_factory=True)
            for name, f in cls.model_fields.items()}


def _plain(value):
    return value.value if isinstance(value, Enum) else value


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_double_has_the_real_fields_and_defaults(trtllm_double, name):
    entry = CLASSES[name]
    cls = _load(entry["double"])
    defaults = _double_defaults(cls)
    for field, spec in _fields(entry).items():
        assert field in defaults, f"{name}.{field} (from {entry['source']['path']}) is missing in the double"
        got = defaults[field]
        if spec.get("required"):
            assert got is ..., f"{name}.{field} should be required"
        elif "default_factory" in spec:
            assert type(got).__name__ == spec["default_factory"], f"{name}.{field}: {got!r}"
        else:
            assert _plain(got) == spec["default"], f"{name}.{field}: double {got!r}, real {spec['default']!r}"
        if "validated_to" in spec:  # a None default that a validator turns into an instance
            assert type(getattr(cls(model="m"), field)).__name__ == spec["validated_to"]


@pytest.mark.parametrize("name", sorted(API["enums"]))
def test_double_enums_have_the_real_members(trtllm_double, name):
    entry = API["enums"][name]
    enum = _load(entry["double"])
    assert {m: enum[m].value for m in entry["members"]} == entry["members"]


def test_quant_config_to_dict_is_the_engine_config_quantization(trtllm_double):
    from tensorrt_llm.llmapi import QuantAlgo, QuantConfig

    written = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8).to_dict()
    assert set(written) == set(CLASSES["QuantConfig"]["fields"])
    assert json.loads(json.dumps(written))["quant_algo"] == "FP8"


def test_kv_cache_dtype_on_the_tensorrt_backend_is_a_validation_error(trtllm_double):
    import pydantic
    from tensorrt_llm.llmapi import KvCacheConfig
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs, TrtLlmArgs

    with pytest.raises(pydantic.ValidationError, match="KvCacheConfig.dtype is not supported by the TensorRT"):
        TrtLlmArgs(model="m", kv_cache_config=KvCacheConfig(dtype="fp8"))
    assert TorchLlmArgs(model="m", kv_cache_config=KvCacheConfig(dtype="fp8")).kv_cache_config.dtype == "fp8"
    with pytest.raises(pydantic.ValidationError):  # StrictBaseModel: unknown fields are refused
        KvCacheConfig(free_gpu_memory_fractio=0.5)


# --------------------------------------------------------------------------- batchinfer's calls


class Recorder:
    """Stands in for one tensorrt_llm class and records the keyword names it was called with."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, **kwargs):
        self.calls.setdefault(self.name, set()).update(kwargs)
        return SimpleNamespace(**kwargs)

    def __getitem__(self, member):  # enums: CapacitySchedulerPolicy[...]
        self.calls.setdefault(self.name, set()).add(member)
        return member

    def __getattr__(self, member):  # QuantAlgo.FP8
        if member.startswith("__"):
            raise AttributeError(member)
        self.calls.setdefault(self.name, set()).add(member)
        return member


def recording_api(calls):
    names = ["BuildConfig", "CalibConfig", "KvCacheConfig", "SchedulerConfig", "CapacitySchedulerPolicy",
             "QuantAlgo", "QuantConfig", "SamplingParams", "GuidedDecodingParams"]
    return SimpleNamespace(**{n: Recorder(n, calls) for n in names})


FORMATS = [{"type": "json_object"}, {"type": "regex", "regex": "(yes|no)"},
           {"type": "choice", "choice": ["a", "b"]},
           {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}]


def config(tmp_path, model_folder, **trtllm):
    return config_from_dict({
        "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
        "engine": {"backend": "trtllm", "model": model_folder, "max_batch_size": 8, "max_model_len": 512,
                   "options": {"max_input_len": 400, "max_num_tokens": 1024, "calib_dataset": str(tmp_path),
                               **trtllm}},
        "sampling": {"max_tokens": 4, "stop": ["###"], "temperature": 0.5,
                     "response_format": {"type": "json_object"}},
        "run": {"gpus_per_worker": 1}})


@pytest.mark.parametrize("mode, args_class", [("engine", "TrtLlmArgs"), ("pytorch", "TorchLlmArgs")])
def test_batchinfer_passes_only_fields_of_the_data_file(tmp_path, model_folder, mode, args_class):
    calls: dict[str, set] = {}
    api = recording_api(calls)
    cfg = config(tmp_path, model_folder, mode=mode, quantization="fp8")
    llm_kwargs = {"model"} | set(runtime_args(cfg, api))
    if mode == "engine":
        llm_kwargs |= set(build_args(cfg, api))
    for fmt in FORMATS:  # every guide batchinfer may pass, with the LLM's guided decoding set up
        sampling_params(api, Sampling.from_config(cfg.sampling).__class__(
            max_tokens=4, temperature=0.5, top_p=1.0, stop=("###",), response_format=parse_response_format(fmt)), 4, 1)
    assert llm_kwargs <= set(_fields(CLASSES[args_class]))
    for name, used in calls.items():
        known = API["enums"][name]["members"] if name in API["enums"] else CLASSES[name]["fields"]
        assert used <= set(known), f"batchinfer uses {sorted(used - set(known))} of {name}"


# --------------------------------------------------------------------------- errors as the real library


def test_stop_word_failure_is_a_request_error(model_folder, trtllm_double, monkeypatch):
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import RequestError, SamplingParams, utils

    utils.enable_worker_single_process_for_tp1.cache_clear()
    monkeypatch.setenv("TLLM_WORKER_USE_SINGLE_PROCESS", "1")

    llm = LLM(model=model_folder, max_input_len=64, max_seq_len=128, max_batch_size=2)
    try:
        used = SamplingParams(max_tokens=2, stop=["###"])
        copy = dataclasses.replace(used, end_id=0)  # keeps end_id, loses _stop_word_ids
        with pytest.raises(RequestError, match="is not processed by tokenizer"):
            asyncio.run(_submit(llm, copy))  # single process (batchinfer's setting): raised at once
        llm._single_process = False  # through the proxy the same failure arrives when awaited
        with pytest.raises(RequestError, match="is not processed by tokenizer"):
            asyncio.run(_await(llm, dataclasses.replace(used, end_id=0)))
    finally:
        llm.shutdown()
        utils.enable_worker_single_process_for_tp1.cache_clear()


async def _submit(llm, params):
    return llm.generate_async([1, 2, 3], sampling_params=params)


async def _await(llm, params):
    return await llm.generate_async([1, 2, 3], sampling_params=params)


def test_too_long_prompts_pytorch_request_error_tensorrt_value_error(model_folder, trtllm_double):
    from tensorrt_llm._tensorrt_engine import LLM as TrtLLM
    from tensorrt_llm.llmapi import LLM, RequestError, SamplingParams

    torch_llm = LLM(model=model_folder, max_num_tokens=2)
    trt_llm = TrtLLM(model=model_folder, max_input_len=64, max_seq_len=8, max_batch_size=2)
    try:
        with pytest.raises(RequestError, match="should not exceed max_num_tokens"):
            asyncio.run(_submit(torch_llm, SamplingParams(max_tokens=2)))
        with pytest.raises(ValueError, match="should not exceed max_seq_len") as refused:
            asyncio.run(_submit(trt_llm, SamplingParams(max_tokens=6)))
        assert not isinstance(refused.value, RequestError)
    finally:
        torch_llm.shutdown()
        trt_llm.shutdown()


def test_single_process_setting_is_read_when_the_executor_starts(model_folder, trtllm_double, monkeypatch):
    from tensorrt_llm.llmapi import utils

    utils.enable_worker_single_process_for_tp1.cache_clear()
    monkeypatch.setenv("TLLM_WORKER_USE_SINGLE_PROCESS", "0")  # after import: still honoured
    from tensorrt_llm.llmapi import LLM

    llm = LLM(model=model_folder)
    try:
        assert llm._single_process is False
    finally:
        llm.shutdown()
        utils.enable_worker_single_process_for_tp1.cache_clear()
