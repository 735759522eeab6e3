"""The transformers backend: static batches on the CPU or CUDA.

Greedy decoding (temperature 0) uses `model.generate`. Sampling uses this module's own
decode loop, because `generate` draws every row from one global random stream, so a row's
text would depend on which rows shared its batch; here each row draws from its own
`torch.Generator`, seeded with the request's seed (issue 9, item 5).

It is the embedded default (the SmolLM2 alias runs on two CPU cores) and a reference
implementation of `BatchEngine`. torch and transformers are imported when an engine is
built, not with this module: the driver imports it for the class's hooks and needs neither.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Annotated, Literal

from batchinfer import model_refs
from batchinfer.config import Config, EngineOptions
from batchinfer.engines.base import BatchEngine, Request, Result
from batchinfer.errors import describe
from batchinfer.fingerprint import OUTPUT
from batchinfer.prompts import load_tokenizer
from batchinfer.sampling import ResponseFormat, Sampling, may_constrain, to_grammar

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes engine.dtype may give
GRAMMARS_KEPT = 256
"""Compiled response formats kept for reuse (a job's rows usually share a few)."""


class TransformersOptions(EngineOptions):
    device: Annotated[Literal["auto", "cpu", "cuda"], OUTPUT] = "auto"
    """Where the model runs; auto = CUDA when workers ask for a GPU (run.gpus_per_worker > 0), else the CPU (engine.dtype auto follows it)."""


def resolved_device(config: Config) -> str:
    """The device a worker runs on: engine.options.device, with auto decided by the config (a
    worker that asks Ray for a GPU runs on CUDA), so the fingerprint holds it (gpus_per_worker)."""
    device = config.engine.options.device
    return device if device != "auto" else "cuda" if config.run.gpus_per_worker > 0 else "cpu"


class TransformersEngine(BatchEngine):
    name = "transformers"
    Options = TransformersOptions

    def __init__(self, *, config: Config):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(config=config)
        config = config.engine
        ref = model_refs.resolve(config.model)
        folder = model_refs.materialize(ref, config.cache_dir)
        self.device = self._device(resolved_device(self.cfg))
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
        # Beat as each decoder layer finishes, so a long prefill (one forward pass that may
        # take minutes on a CPU) shows progress to the hang watchdog while it runs.
        for module in _beat_points(self.model):
            module.register_forward_hook(lambda *_: self.beat())
        # transformers 5 renamed the KV cache argument (and output) past_key_values -> cache.
        forward = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._grammars: dict[ResponseFormat, object] | None = None  # xgrammar loads on first use
        log.info("transformers engine: %s on %s (%s), max_model_len=%d",
                 config.model, self.device, dtype, self._max_model_len)

    @classmethod
    def check_config(cls, config: Config) -> list[str]:
        if may_constrain(config) and importlib.util.find_spec("xgrammar") is None:
            return ["response formats (structured output) on the transformers backend need xgrammar, "
                    "which is not installed here: pip install 'batchinfer[cpu]' (or pip install xgrammar)"]
        return []

    @staticmethod
    def _device(choice: str) -> str:
        import torch

        if choice == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the transformers engine runs on CUDA (engine.options.device, or auto with "
                               "run.gpus_per_worker > 0) but torch sees no CUDA GPU here")
        return choice

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def generate_batch(self, requests: list[Request]) -> list[Result]:
        """One static batch. Rows may differ in every setting (sampling.py): a batch of rows
        that all decode greedily with the same stop strings and no response format goes
        through `model.generate`; any other batch through this module's own decode loop,
        which applies each row's settings, seed and grammar to that row alone, so rows with
        different settings share a batch and the window never drains to regroup them."""
        import torch
        settings = [self.sampling_of(r) for r in requests]
        lengths = [len(r.prompt_token_ids) for r in requests]
        width = max(lengths)
        # Each row may generate up to its max_tokens but never past the model length.
        limits = [self.max_new_tokens(r) for r in requests]
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row ends where generation starts
            input_ids[i, width - lengths[i]:] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
            attention[i, width - lengths[i]:] = 1
        first = settings[0]
        failed: dict[int, Result] = {}  # rows not decoded: a grammar the compiler refused
        if first.greedy and first.response_format is None and all(
                s.greedy and s.stop == first.stop and s.response_format is None for s in settings):
            new = self._generate_greedy(input_ids, attention, limits, first.stop, width)
        else:
            matchers = self._matchers(settings)
            failed = {i: m for i, m in enumerate(matchers) if isinstance(m, Result)}
            for i in failed:
                matchers[i], limits[i] = None, 0
            seeds = [self.seed_of(r) for r in requests]
            new = self._decode(input_ids.to(self.device), attention.to(self.device), limits, settings,
                               seeds, matchers)
        return [failed[i] if i in failed else self._result(tokens, limit, n, s)
                for i, (tokens, limit, n, s) in enumerate(zip(new, limits, lengths, settings, strict=True))]

    def _generate_greedy(self, input_ids, attention, limits: list[int], stop: tuple[str, ...],
                         width: int) -> list[list[int]]:
        import torch

        kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(limits),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                **kwargs,
            )
        return out[:, width:].tolist()

    def _decode(self, input_ids, attention, limits: list[int], settings: list[Sampling],
                seeds: list[int], matchers: list) -> list[list[int]]:
        """Completions of a left-padded batch, each row with its own settings.

        A sampled row draws exactly one token per step from its own `torch.Generator` while
        it runs, and the attention mask keeps padding and other rows out of its logits, so a
        row's tokens depend on its prompt, settings and seed only (up to float rounding that
        differs between batch shapes; README, "Reproducible sampling"). A greedy row takes the
        most likely token. A row with a response format has its logits masked by its xgrammar
        matcher first, so only tokens that keep the output valid can be chosen. A row that ends
        (end of sequence, a stop string, its grammar complete, its limit) stops; the batch runs
        until every row has ended.
        """
        import torch

        rows = len(settings)
        generators = [None if s.greedy else torch.Generator(device=self.device).manual_seed(seed)
                      for s, seed in zip(settings, seeds, strict=True)]
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        bitmask = self._xgr.allocate_token_bitmask(rows, self._token_info.vocab_size) if constrained else None
        tokens: list[list[int]] = [[] for _ in range(rows)]
        live = [limit > 0 for limit in limits]
        # Positions count real tokens only, as `generate` does for left-padded rows.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        step_ids, past = input_ids, None
        cache = self._cache_arg
        with torch.inference_mode():
            while any(live):
                out = self.model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **{cache: past})
                past = getattr(out, cache)
                logits = out.logits[:, -1, :].float()
                masked = [i for i in constrained if live[i]]
                if masked:
                    for i in masked:
                        matchers[i].fill_next_token_bitmask(bitmask, i)
                    self._xgr.apply_token_bitmask_inplace(
                        logits, bitmask.to(logits.device), vocab_size=self._token_info.vocab_size, indices=masked)
                step_ids = torch.full((rows, 1), self.pad_id, dtype=torch.long, device=self.device)
                for i in range(rows):
                    if live[i]:
                        token = self._draw(logits[i], generators[i], settings[i])
                        tokens[i].append(token)
                        step_ids[i, 0] = token
                        live[i] = not self._ended(tokens[i], limits[i], settings[i], matchers[i])
                attention = torch.cat([attention, attention.new_ones((rows, 1))], dim=1)
                positions = positions[:, -1:] + 1
        return tokens

    def _draw(self, logits, generator, s: Sampling) -> int:
        """One token from one row's logits: the most likely (greedy), or temperature, then
        top_p, then its own generator."""
        import torch

        if generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p >= 1:
            return int(torch.multinomial(probs, 1, generator=generator))
        ordered, order = probs.sort(descending=True, stable=True)
        # Keep the most likely tokens until their mass reaches top_p (at least one).
        ordered = ordered * ((ordered.cumsum(0) - ordered) < s.top_p)
        return int(order[torch.multinomial(ordered, 1, generator=generator)])

    def _ended(self, tokens: list[int], limit: int, s: Sampling, matcher) -> bool:
        if matcher is not None and (not matcher.accept_token(tokens[-1]) or matcher.is_terminated()):
            return True
        if len(tokens) >= limit or tokens[-1] in self.eos_ids:
            return True
        if s.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return any(stop in text for stop in s.stop)
        return False

    def _result(self, tokens: list[int], limit: int, prompt_tokens: int, s: Sampling) -> Result:
        tokens = tokens[:limit]
        finish = "length"
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens, finish = tokens[: i + 1], "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in s.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Result(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                      completion_tokens=len(tokens))

    # ------------------------------------------------------------------ structured output

    def _matchers(self, settings: list[Sampling]) -> list:
        """Per row: None (free text), a fresh xgrammar GrammarMatcher for its response
        format, or the `bad_schema` Result of a format the grammar compiler refused."""
        out: list = []
        for s in settings:
            fmt = s.response_format
            if fmt is None:
                out.append(None)
                continue
            compiled = self._compiled(fmt)
            out.append(compiled if isinstance(compiled, Result) else self._xgr.GrammarMatcher(compiled))
        return out

    def _compiled(self, fmt: ResponseFormat):
        """`fmt` compiled for this tokenizer (cached per format), or a bad_schema Result."""
        if self._grammars is None:
            import xgrammar

            self._xgr = xgrammar
            # The model's own end-of-sequence ids end a constrained row, as they end any other.
            self._token_info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.model.config.vocab_size, stop_token_ids=sorted(self.eos_ids))
            self._grammars = {}
            self._compiler = xgrammar.GrammarCompiler(self._token_info)
        if fmt not in self._grammars:
            if len(self._grammars) >= GRAMMARS_KEPT:  # rows with ever new schemas: start over
                self._grammars.clear()
            try:
                self._grammars[fmt] = self._compiler.compile_grammar(to_grammar(self._xgr, fmt))
            except Exception as e:  # the driver checked it; a different xgrammar here may not agree
                self._grammars[fmt] = Result.failed("bad_schema", f"the grammar compiler refused it: {describe(e)}")
        return self._grammars[fmt]


def _beat_points(model) -> list:
    """The model's decoder layers (the ModuleList as long as its layer count); the whole
    model, one beat per forward pass, where no such list is found."""
    import torch

    layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return list(module)
    return [model]
