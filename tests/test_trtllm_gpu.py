"""GPU tests of the TensorRT-LLM backend with the real library: build engines from the small
model's checkpoint and run a shard through a worker.

They skip unless the real `tensorrt_llm` (not the test double) and a CUDA GPU are present.
The FP8 build needs calibration data on local disk (no hub is reached): set
BATCHINFER_CALIB_DATASET to a local dataset folder TensorRT-LLM's calibration accepts
(e.g. a saved copy of cnn_dailymail); FP8 also needs an Ada or Hopper GPU (sm_89+).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pandas as pd
import pytest

from batchinfer.config_loader import config_from_dict
from batchinfer.run_store import RunStore
from scripts.sample_prompts import write_sample_prompts
from tests.conftest import hold_run


def _real_trtllm_with_cuda() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed"
    import tensorrt_llm

    if getattr(tensorrt_llm, "TEST_DOUBLE", False):
        return "tensorrt_llm is the test double"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


SKIP = _real_trtllm_with_cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=f"needs the real TensorRT-LLM and a GPU: {SKIP}")]


def gpu_config(tmp_path, model_folder, **trtllm):
    return config_from_dict({
        "input": {"path": str(tmp_path / "prompts"), "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "engine": {"backend": "trtllm", "model": model_folder, "max_batch_size": 8, "max_model_len": 512,
                   "dtype": "float16",
                   "options": {"max_input_len": 400, "max_num_tokens": 1024, "build_on_miss": True,
                               "node_cache_dir": str(tmp_path / "engines"), **trtllm}},
        "sampling": {"max_tokens": 16},
        "run": {"num_workers": 1, "gpus_per_worker": 1, "rows_per_shard": 16},
    })


def run_one_shard(cfg):
    from batchinfer.plan import make_plan
    from batchinfer.worker import ShardWorker

    write_sample_prompts(cfg.input.path, files=1, rows_per_file=16, row_group_size=16)
    plan = RunStore(cfg.output.path).write_plan(make_plan(cfg))
    worker = ShardWorker(config=cfg, plan=plan, worker_index=0, generation=hold_run(cfg.output.path))
    try:
        summary = asyncio.run(worker.process(0, 1)).summary
    finally:
        worker.engine.shutdown()
    df = pd.read_parquet(cfg.output.path)
    return worker, summary, df


def test_build_an_engine_and_run_a_shard(tmp_path, model_folder):
    cfg = gpu_config(tmp_path, model_folder, quantization="none")
    worker, summary, df = run_one_shard(cfg)
    assert worker.engine.engine_source == "built"
    assert summary.rows_ok == 16 and len(df) == 16
    assert df.output.str.len().min() > 0 and set(df.finish_reason) <= {"stop", "length"}
    assert (df.completion_tokens <= 16).all()


@pytest.mark.skipif(not os.environ.get("BATCHINFER_CALIB_DATASET"), reason="set BATCHINFER_CALIB_DATASET "
                    "to a local calibration dataset to build an FP8 engine")
def test_build_a_tiny_fp8_engine_and_run_a_shard(tmp_path, model_folder):
    import torch

    if torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("FP8 needs an Ada (sm_89, e.g. L40S) or Hopper GPU")
    cfg = gpu_config(tmp_path, model_folder, quantization="fp8",
                     calib_dataset=os.environ["BATCHINFER_CALIB_DATASET"], calib_batches=8,
                     calib_max_seq_length=128)
    worker, summary, df = run_one_shard(cfg)
    folder = next((tmp_path / "engines").iterdir())
    import json

    quant = json.loads((folder / "config.json").read_text())["pretrained_config"]["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    assert summary.rows_ok == 16 and df.output.str.len().min() > 0
