"""The transformers backend: static batches with `model.generate`, on the CPU or CUDA.

It is the embedded default (the SmolLM2 alias runs on two CPU cores) and a reference
implementation of `BatchEngine`. torch and transformers are imported when an engine is
built, not with this module: the driver imports it for the class's hooks and needs neither.
"""

from __future__ import annotations

import logging

from batchinfer import models
from batchinfer.config import Config
from batchinfer.engines.base import BatchEngine, Request, Result
from batchinfer.prompts import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes engine.dtype may give


class TransformersEngine(BatchEngine):
    name = "transformers"

    def __init__(self, *, config: Config):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(config=config)
        sampling, config = config.sampling, config.engine
        ref = models.resolve(config.model)
        folder = models.materialize(ref, config.cache_dir)
        self.device = self._device(config.device)
        dtype = (getattr(torch, config.dtype) if config.dtype in DTYPES
                 else torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(config)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=config.trust_remote_code
        ).to(self.device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self._max_model_len = min(config.max_model_len or context, context)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
        # Beat as each decoder layer finishes, so a long prefill (one forward pass that may
        # take minutes on a CPU) shows progress to the hang watchdog while it runs.
        for module in _beat_points(self.model):
            module.register_forward_hook(lambda *_: self.beat())
        log.info("transformers engine: %s on %s (%s), max_model_len=%d",
                 config.model, self.device, dtype, self._max_model_len)

    @staticmethod
    def _device(choice: str) -> str:
        import torch

        if choice == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("engine.device is 'cuda' but torch sees no CUDA GPU here")
        if choice == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return choice

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def generate_batch(self, requests: list[Request]) -> list[Result]:
        import torch
        lengths = [len(r.prompt_token_ids) for r in requests]
        width = max(lengths)
        # Each row may generate up to max_tokens but never past the model length.
        limits = [self.max_new_tokens(n) for n in lengths]
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row ends where generation starts
            input_ids[i, width - lengths[i]:] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
            attention[i, width - lengths[i]:] = 1
        kwargs = {}
        if self.sampling.temperature > 0:
            kwargs = {"do_sample": True, "temperature": self.sampling.temperature,
                      "top_p": self.sampling.top_p}
        else:
            kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.sampling.stop:
            kwargs.update(stop_strings=self.sampling.stop, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(limits),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                **kwargs,
            )
        new = out[:, width:].tolist()
        return [self._result(tokens, limit, n) for tokens, limit, n in zip(new, limits, lengths, strict=True)]

    def _result(self, tokens: list[int], limit: int, prompt_tokens: int) -> Result:
        tokens = tokens[:limit]
        finish = "length"
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens, finish = tokens[: i + 1], "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in self.sampling.stop:
            cut = text.find(s)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Result(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                      completion_tokens=len(tokens))


def _beat_points(model) -> list:
    """The model's decoder layers (the ModuleList as long as its layer count); the whole
    model, one beat per forward pass, where no such list is found."""
    import torch

    layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return list(module)
    return [model]
