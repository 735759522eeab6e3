"""TEST DOUBLE of GuidedDecodingParams and SamplingParams in tensorrt_llm/sampling_params.py
(1.2.0rc2, b35ac1b6): keyword-only slots dataclasses, same fields and defaults (max_tokens=32),
same _validate refusals (SamplingParams._validate also validates its guided_decoding: more than
one guide is a ValueError when the SamplingParams is built), and _setup fills end_id and the
stop word ids in place, once."""
import json
import os
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, List, Optional, Union

from pydantic import BaseModel


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    """Only one of the fields may be set (counted by truthiness, as the real one does:
    json={} or json_object=False count as unset). Not validated on construction; the
    SamplingParams that carries it validates it."""

    json: Optional[Union[str, BaseModel, dict]] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None
    json_object: bool = False
    structural_tag: Optional[str] = None

    def _validate(self):
        num_guides = 0
        for _field in fields(self):
            num_guides += bool(getattr(self, _field.name))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    bad: Optional[Union[str, List[str]]] = None
    bad_token_ids: Optional[List[int]] = None
    _bad_word_ids: Optional[List[List[int]]] = field(default=None, init=False, repr=False)
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    _stop_word_ids: Optional[List[List[int]]] = field(default=None, init=False, repr=False)
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    top_p_min: Optional[float] = None
    top_p_reset_ids: Optional[int] = None
    top_p_decay: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    beam_search_diversity_rate: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    prompt_ignore_length: Optional[int] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None
    min_p: Optional[float] = None
    beam_width_array: Optional[List[int]] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: Optional[List[str]] = None
    lookahead_config: Any = None
    guided_decoding: Optional[GuidedDecodingParams] = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self):
        if self.top_p is not None and (self.top_p < 0 or self.top_p > 1):
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (self.best_of is not None and self.best_of > 1 and self._greedy_decoding
                and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING", None)):
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()

    @staticmethod
    def params_imply_greedy_decoding(*, temperature, top_p, top_k):
        return ((temperature is None and top_p is None and top_k is None) or top_k == 1
                or top_p == 0.0 or temperature == 0)

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def _setup(self, tokenizer, hf_model_config, generation_config, add_special_tokens: bool = False):
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = self.end_id
        if self.stop is not None:
            strs = [self.stop] if isinstance(self.stop, str) else self.stop
            self._stop_word_ids = [tokenizer.encode(s, add_special_tokens=add_special_tokens) for s in strs]
        return self

    def _get_stop_words(self) -> List[List[int]]:
        words = [[i] for i in self.stop_token_ids] if self.stop_token_ids else []
        if self.stop is None:
            return words
        if self._stop_word_ids is None:
            raise RuntimeError(f"{self.__class__.__name__}.stop ({self.stop}) is not processed by "
                               "tokenizer, please call the setup method.")
        return words + self._stop_word_ids

    def _get_guided_decoding_params(self):
        """What the worker puts in the executor request (the real one returns a
        tllme.GuidedDecodingParams(GuideType.X, guide)); same order of precedence, same
        conversion of a pydantic model or a dict schema to JSON text."""
        g = self.guided_decoding
        if g is None:
            return None
        if g.json_object:
            return SimpleNamespace(guide_type="JSON", guide=None)
        if g.json is not None:
            schema = g.json
            if isinstance(schema, BaseModel):
                schema = schema.model_json_schema()
            if isinstance(schema, dict):
                schema = json.dumps(schema)
            return SimpleNamespace(guide_type="JSON_SCHEMA", guide=schema)
        if g.regex is not None:
            return SimpleNamespace(guide_type="REGEX", guide=g.regex)
        if g.grammar is not None:
            return SimpleNamespace(guide_type="EBNF_GRAMMAR", guide=g.grammar)
        if g.structural_tag is not None:
            return SimpleNamespace(guide_type="STRUCTURAL_TAG", guide=g.structural_tag)
        return None
