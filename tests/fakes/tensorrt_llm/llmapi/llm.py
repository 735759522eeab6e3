"""TEST DOUBLE of tensorrt_llm/llmapi/llm.py: BaseLLM, _TorchLLM (= LLM), _TrtLLM, RequestOutput.

Mirrors what batchinfer relies on: the constructor's kwarg checks (unknown argument,
TensorRT-only argument on the PyTorch backend), the TensorRT backend's build from a
checkpoint or load of an engine folder (config.json with version, pretrained_config,
build_config; rank0.engine), `save`, `generate_async` with its synchronous length check
(`_check_arguments`), results awaited in the caller's event loop, `shutdown`, and the
refusal to be pickled, and guided decoding's refusals: the TensorRT backend takes
guided_decoding_backend="xgrammar" only (ValueError from LLM(...) otherwise), and its C++
executor answers a request carrying SamplingParams.guided_decoding with an error response when
the LLM was built without a backend (RequestError when awaited). Generation itself runs on the
CPU with transformers (see _runtime.py) and is NOT constrained by a guide; the "engine" file
records which checkpoint it stands for.
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Union

from tensorrt_llm.builder import BuildConfig
from tensorrt_llm.executor.result import GenerationResult
from tensorrt_llm.executor.utils import RequestError
from tensorrt_llm.llmapi import _runtime
from tensorrt_llm.llmapi.llm_args import (
    TORCH_ONLY_FIELDS, TRT_ONLY_FIELDS, TorchLlmArgs, TorchLlmArgs_fields, TrtLlmArgs, TrtLlmArgs_fields,
)
from tensorrt_llm.llmapi.utils import enable_worker_single_process_for_tp1
from tensorrt_llm.quantization.quantize_by_modelopt import get_calib_dataloader
from tensorrt_llm.sampling_params import SamplingParams
from tensorrt_llm.version import __version__


# cpp/tensorrt_llm/executor/executorImpl.cpp (b35ac1b6), Executor::Impl::fetchNewRequests:
# TLLM_CHECK_WITH_INFO(mModel->hasGuidedDecoder(), "Request is specified with ...") inside a
# per-request try; the catch enqueues an error response "Encountered an error when fetching new
# request: " + e.what(). TllmException's what() is "[TensorRT-LLM][ERROR] Assertion failed: <info>
# (<absolute source path>:<line>)" followed by a stack trace; the path here is shortened.
GUIDED_DECODER_NOT_SETUP = (
    "Encountered an error when fetching new request: [TensorRT-LLM][ERROR] Assertion failed: "
    "Request is specified with GuidedDecodingParams, but GuidedDecoder is not setup. Please provide "
    "a valid GuidedDecodingConfig to setup GuidedDecoder. (cpp/tensorrt_llm/executor/executorImpl.cpp)")


class RequestOutput(GenerationResult):
    """The awaitable result of generate_async (request_id, prompt_token_ids, outputs, finished)."""

    prompt: Optional[str] = None


class BaseLLM:
    _valid_fields: set = set()
    _args_cls: Any = None

    def __init__(self, model: Union[str, Path], tokenizer=None, tokenizer_mode="auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, dtype: str = "auto", revision=None,
                 tokenizer_revision=None, **kwargs: Any) -> None:
        valid = set(self._valid_fields) | {"_mpi_session", "backend"}
        for key in kwargs:
            if key not in valid:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        # pydantic: a failing validator (the TensorRT backend's KV-cache dtype assert included)
        # raises pydantic.ValidationError here, as the real args class does.
        self.args = self._args_cls(model=str(model), tokenizer=tokenizer, dtype=dtype,
                                   trust_remote_code=trust_remote_code, **kwargs)
        self.kv_cache_config = self.args.kv_cache_config
        self.scheduler_config = self.args.scheduler_config
        self.enable_chunked_prefill = self.args.enable_chunked_prefill
        self.max_batch_size = self.args.max_batch_size or 2048  # BuildConfig's default
        self.max_num_tokens = self.args.max_num_tokens or 8192
        self._next_id = 0
        self._runtime: Optional[_runtime.CpuRuntime] = None

    def _start(self, checkpoint: str, tokenizer: Optional[str]) -> None:
        # GenerationExecutor.create reads TLLM_WORKER_USE_SINGLE_PROCESS here, not at import.
        self._single_process = enable_worker_single_process_for_tp1()
        self._runtime = _runtime.CpuRuntime(checkpoint, tokenizer or checkpoint, self.max_batch_size)

    @property
    def tokenizer(self):
        return self._runtime.tokenizer if self._runtime else None

    def generate_async(self, inputs: Union[str, List[int]], sampling_params: Optional[SamplingParams] = None,
                       lora_request=None, prompt_adapter_request=None, streaming: bool = False,
                       kv_cache_retention_config=None, disaggregated_params=None,
                       _postproc_params=None, scheduling_params=None, cache_salt=None) -> RequestOutput:
        if self._runtime is None:
            raise RuntimeError("LLM is shutting down")
        if isinstance(inputs, str):
            prompt_token_ids = self.tokenizer.encode(inputs)
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            prompt_token_ids = inputs
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        sampling_params = sampling_params or SamplingParams()
        if sampling_params.end_id is None:
            sampling_params._setup(self.tokenizer, None, None)
        self._check_arguments(len(prompt_token_ids), 0, sampling_params, is_gen_only=False)
        result = RequestOutput(self._next_id, prompt_token_ids, sampling_params)
        self._next_id += 1
        try:  # executor/base_worker.py _enqueue_request: building the executor request
            guide = sampling_params._get_guided_decoding_params()  # e.g. json.dumps of a dict schema
            sampling_params._get_stop_words()  # refuses a params copy never set up
        except Exception as e:  # ... wraps any failure: `raise RequestError(str(e)) from e`
            if self._single_process:  # the worker runs in this process: submit() raises
                raise RequestError(str(e)) from e
            result._deliver("", [], None, error=str(e))  # proxy: an error response for this request
            return result
        refusal = self._guided_decoding_refusal(guide)
        if refusal is not None:  # the executor's own thread refuses it: always an error response
            result._deliver("", [], None, error=refusal)
            return result
        self._runtime.submit(result, sampling_params, self._max_input_len())
        return result

    def _guided_decoding_refusal(self, guide) -> Optional[str]:
        return None

    def _check_arguments(self, prompt_len, query_len, sampling_params, is_gen_only) -> None:
        raise NotImplementedError

    def _max_input_len(self) -> Optional[int]:
        return None

    def shutdown(self) -> None:
        if self._runtime is not None:
            self._runtime.shutdown()
            self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self.shutdown()
        return False

    def __getstate__(self):
        raise RuntimeError("LLM object can not be pickled.")


class _TorchLLM(BaseLLM):
    _valid_fields = TorchLlmArgs_fields
    _args_cls = TorchLlmArgs

    def __init__(self, model, tokenizer=None, **kwargs):
        trt_args = [k for k in kwargs if k in TRT_ONLY_FIELDS and k not in TORCH_ONLY_FIELDS]
        if trt_args:
            raise ValueError(
                f"The following arguments are specific to TensorRT backend and cannot be used with "
                f"PyTorch backend: {trt_args}.\nPlease use 'from tensorrt_llm._tensorrt_engine import "
                "LLM' instead to use the TensorRT backend.")
        kwargs.pop("backend", None)
        super().__init__(model, tokenizer, **kwargs)
        self._start(str(model), tokenizer)

    # No _guided_decoding_refusal here: no check was found in the 1.2-era PyTorch path (the
    # PyExecutor only builds a GuidedDecoder when guided_decoding_backend is set), so a guided
    # request on an LLM without a backend is taken and runs unconstrained, as in this double.

    def _check_arguments(self, prompt_len, query_len, sampling_params, is_gen_only) -> None:
        if not self.enable_chunked_prefill and self.max_num_tokens and prompt_len + query_len > self.max_num_tokens:
            # PyTorch backend: RequestError (the TensorRT backend below still raises ValueError)
            raise RequestError(f"The sum of prompt length ({prompt_len}), query length ({query_len}) should "
                               f"not exceed max_num_tokens ({self.max_num_tokens})")


class LLM(_TorchLLM):
    pass


class _TrtLLM(BaseLLM):
    _valid_fields = TrtLlmArgs_fields
    _args_cls = TrtLlmArgs

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        config_file = Path(model) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if "pretrained_config" in config and "build_config" in config:  # an engine folder
            self._engine_dir = Path(model)
        else:  # a checkpoint: "build" an engine into a workspace
            self._engine_dir = Path(tempfile.mkdtemp(prefix="trtllm-test-double-"))
            self._build(Path(model), kwargs)
            config = json.loads((self._engine_dir / "config.json").read_text())
        self.build_config = config["build_config"]
        self.max_batch_size = min(self.max_batch_size, self.build_config["max_batch_size"])
        # _TrtLLM._build_model, when it fills the ExecutorConfig (after the engine is built or
        # loaded): "xgrammar" -> GuidedDecodingConfig(XGRAMMAR, **_xgrammar_tokenizer_info(...)).
        backend = self.args.guided_decoding_backend
        if backend is not None and backend != "xgrammar":
            raise ValueError(f"Unsupported guided decoding backend {backend}")
        engine = json.loads((self._engine_dir / "rank0.engine").read_text())
        self._start(engine["checkpoint"], tokenizer)

    def _build(self, checkpoint: Path, kwargs: dict) -> None:
        build = kwargs.get("build_config") or BuildConfig(
            max_batch_size=kwargs.get("max_batch_size") or 2048,
            max_num_tokens=kwargs.get("max_num_tokens") or 8192,
            max_input_len=kwargs.get("max_input_len") or 1024, max_seq_len=kwargs.get("max_seq_len"))
        hf = json.loads((checkpoint / "config.json").read_text())
        if build.max_seq_len is None:
            build.max_seq_len = hf.get("max_position_embeddings", 2048)
        quant, calib = self.args.quant_config, self.args.calib_config
        if quant.quant_algo is not None or quant.kv_cache_quant_algo is not None:
            # ModelLoader -> quantize_and_export -> get_calib_dataloader (modelopt calibration)
            get_calib_dataloader(calib.calib_dataset, batch_size=calib.calib_batch_size,
                                 calib_size=calib.calib_batches * calib.calib_batch_size,
                                 block_size=calib.calib_max_seq_length)
        quantization = quant.to_dict()  # PretrainedConfig.to_dict: QuantConfig as a dict
        config = {"version": __version__,
                  "pretrained_config": {"architecture": hf.get("architectures", ["?"])[0],
                                        "dtype": self.args.dtype, "quantization": quantization,
                                        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}},
                  "build_config": build.to_dict()}
        (self._engine_dir / "config.json").write_text(json.dumps(config, indent=4))
        (self._engine_dir / "rank0.engine").write_text(json.dumps(
            {"test_double": "not a TensorRT plan; generation runs the checkpoint on the CPU",
             "checkpoint": str(checkpoint)}))

    def save(self, engine_dir: str) -> None:
        """Save the built engine to the given path."""
        if self._engine_dir is None:
            raise RuntimeError("The engine is not built yet.")
        if Path(engine_dir).resolve() != self._engine_dir.resolve():
            shutil.copytree(self._engine_dir, engine_dir, dirs_exist_ok=True)

    def _guided_decoding_refusal(self, guide) -> Optional[str]:
        if guide is not None and self.args.guided_decoding_backend is None:
            return GUIDED_DECODER_NOT_SETUP
        return None

    def _check_arguments(self, prompt_len, query_len, sampling_params, is_gen_only) -> None:
        max_seq_len = self.build_config["max_seq_len"]
        if not self.enable_chunked_prefill and prompt_len + query_len + (sampling_params.max_tokens or 0) > max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({prompt_len}) and query length ({query_len}) max_tokens "
                f"({sampling_params.max_tokens}) should not exceed max_seq_len ({max_seq_len})")

    def _max_input_len(self) -> Optional[int]:
        return self.build_config["max_input_len"]
