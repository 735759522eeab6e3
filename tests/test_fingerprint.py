"""One fingerprint, one source of truth (issue 10, item 3).

Every config field, in every section and in every registered backend's options, carries a
decision: OUTPUT (in the run fingerprint) or Neutral(reason). A field added without one
fails `test_every_config_field_has_a_fingerprint_decision`; and each decision is checked
against behaviour: changing an OUTPUT field changes the fingerprint, changing a Neutral
one does not. For TensorRT-LLM, the engine key comes from the same list.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Gt, Le
from pydantic import BaseModel

from batchinfer import registry
from batchinfer.config import Config
from batchinfer.config_loader import config_from_dict
from batchinfer.engines.trtllm import artifacts
from batchinfer.engines.trtllm.artifacts import GpuIdentity
from batchinfer.engines.trtllm.options import BakedIn, TrtllmOptions
from batchinfer.fingerprint import OUTPUT, Neutral, Output, decision
from batchinfer.plan import settings_of

L40S = GpuIdentity("NVIDIA L40S", "sm_89")


def models() -> list[tuple[str, type[BaseModel]]]:
    """Every config model whose fields need a decision: the sections and each backend's options."""
    found = [(name, f.annotation) for name, f in Config.model_fields.items()]
    return found + [(f"engine.options[{name}]", registry.engine_class(name).Options)
                    for name in registry.names()]


def undecided(model: type[BaseModel]) -> list[str]:
    """Fields of `model` with no fingerprint decision, or a Neutral one without a reason."""
    missing = []
    for name in model.model_fields:
        d = decision(model, name)
        if d is None or (isinstance(d, Neutral) and len(d.reason) < 10):
            missing.append(name)
    return missing


def test_every_config_field_has_a_fingerprint_decision():
    problems = {where: undecided(model) for where, model in models() if undecided(model)}
    assert not problems, f"fields with no fingerprint decision (mark OUTPUT or Neutral(reason)): {problems}"


def test_a_field_added_without_a_decision_is_caught():
    class Grown(TrtllmOptions):
        new_knob: int = 3
        """A setting someone forgot to decide about."""

        reasoned: Annotated[int, Neutral("scheduling only, rows come out the same")] = 1
        """Decided."""

        unreasoned: Annotated[int, Neutral("")] = 1
        """Decided without saying why."""

    assert undecided(Grown) == ["new_knob", "unreasoned"]


# --------------------------------------------------------------------------- decisions match behaviour


SKIP = {
    ("engine", "model"): "by identity: needs a second model folder (tests/test_plan.py)",
    ("engine", "tokenizer"): "by identity: needs a tokenizer folder (tests/test_plan.py)",
    ("engine", "backend"): "another backend has other options; checked by the backend test",
    ("engine", "options"): "the backend's part: checked field by field below",
    ("input", "prompt_column"): "exactly one of prompt/messages column: checked as a pair below",
    ("input", "messages_column"): "exactly one of prompt/messages column: checked as a pair below",
    ("input", "format"): "openai_batch takes no column settings: checked below",
    ("input", "sampling_columns"): "keys must be settings: checked below",
    ("input", "models"): "openai_batch input only: checked below",
    ("sampling", "response_format"): "must be a valid format: checked below",
}


def other_value(annotation, metadata, value):
    """A valid value of this field's type that differs from `value`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return other_value(args[0], [*metadata, *args[1:]], value)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is not None:
            return None
        inner = next(a for a in args if a is not type(None))
        sample = {int: 999, float: 99.0}.get(typing.get_args(inner)[0] if typing.get_origin(inner) is Annotated else inner)
        return other_value(inner, metadata, sample)
    if origin is Literal:
        return next(a for a in args if a != value)
    if origin is list:
        return [*value, "zz"]
    if origin is dict:
        return {**value, "extra_key": 1}
    if annotation is bool:
        return not value
    if annotation is str:
        return "x" if value != "x" else "y"
    if annotation in (int, float):
        upper = next((m.le for m in metadata if isinstance(m, Le)), None)
        lower = next((m.ge for m in metadata if isinstance(m, Ge)),
                     next((m.gt for m in metadata if isinstance(m, Gt)), 0))
        candidate = annotation(value + 1) if upper is None else annotation((lower + upper) / 2)
        return candidate if candidate != value else annotation(value) / 2
    raise AssertionError(f"no other value for {annotation!r}")


def changes(base_raw: dict, section: str, name: str, new, options: bool = False) -> bool:
    """Whether setting `section.name` (or engine.options.name) to `new` changes the fingerprint."""
    changed = {k: dict(v) for k, v in base_raw.items()}
    if options:
        changed["engine"]["options"] = {**changed["engine"].get("options", {}), name: new}
    else:
        changed.setdefault(section, {})[name] = new
    return settings_of(config_from_dict(base_raw)) != settings_of(config_from_dict(changed))


@pytest.mark.parametrize("section", [n for n in Config.model_fields])
def test_output_fields_change_the_fingerprint_and_neutral_fields_do_not(section):
    base = {"engine": {"backend": "transformers"}}
    model = Config.model_fields[section].annotation
    defaults = model()
    for name, field in model.model_fields.items():
        if (section, name) in SKIP:
            continue
        new = other_value(field.annotation, field.metadata, getattr(defaults, name))
        expected = isinstance(decision(model, name), Output)
        assert changes(base, section, name, new) == expected, (
            f"{section}.{name}: changing it {'did not change' if expected else 'changed'} the fingerprint")


def test_prompt_or_messages_column_changes_the_fingerprint():
    base = {"input": {"prompt_column": "prompt"}}
    assert changes(base, "input", "prompt_column", "text")
    to_messages = {"input": {"prompt_column": None, "messages_column": "messages"}}
    assert settings_of(config_from_dict(base)) != settings_of(config_from_dict(to_messages))


def test_request_settings_and_formats_change_the_fingerprint():
    """Per-row settings' columns, the response format and the OpenAI batch formats all change
    what a row's output is, so a resume with another value is refused (issue 12)."""
    base = {"input": {"prompt_column": "prompt"}}
    assert changes(base, "input", "sampling_columns", {"max_tokens": "limit"})
    assert changes(base, "sampling", "response_format", {"type": "json_object"})
    assert changes(base, "sampling", "response_format",
                   {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}})
    openai = {"input": {"format": "openai_batch"}}
    assert settings_of(config_from_dict(base)) != settings_of(config_from_dict(openai))
    assert changes(openai, "input", "models", ["gpt-4o-mini"])


@pytest.mark.parametrize("backend", ["transformers", "trtllm"])
def test_backend_options_fields_follow_their_decisions(backend):
    base = {"engine": {"backend": backend}}
    model = registry.engine_class(backend).Options
    for name, field in model.model_fields.items():
        new = other_value(field.annotation, field.metadata, getattr(model(), name))
        if name in ("calib_dataset",) and new is not None:
            new = "/data/cnn_dailymail"
        expected = isinstance(decision(model, name), Output)
        assert changes(base, "engine", name, new, options=True) == expected, f"engine.options.{name}"


def test_trtllm_engine_key_and_fingerprint_come_from_one_list(tmp_path):
    """Every setting baked into the engine changes both the engine key and the fingerprint:
    a resume with another calibration or max_input_len is refused, not mixed (the bug)."""
    base = {"engine": {"backend": "trtllm", "max_model_len": 8192}}
    key = artifacts.engine_key(config_from_dict(base), L40S, "1.2.1")
    baked = [n for n in TrtllmOptions.model_fields if isinstance(decision(TrtllmOptions, n), BakedIn)]
    assert {"max_input_len", "calib_dataset", "calib_batches", "calib_max_seq_length",
            "quantization", "max_num_tokens"} == set(baked)
    for name in baked:
        field = TrtllmOptions.model_fields[name]
        new = other_value(field.annotation, field.metadata, getattr(TrtllmOptions(), name))
        other = {"engine": {**base["engine"], "options": {name: new}}}
        assert artifacts.engine_key(config_from_dict(other), L40S, "1.2.1") != key, name
        assert changes(base, "engine", name, new, options=True), name
    for name in ("dtype", "max_batch_size", "max_model_len"):
        field = Config.model_fields["engine"].annotation.model_fields[name]
        new = other_value(field.annotation, field.metadata, getattr(config_from_dict(base).engine, name))
        other = {"engine": {**base["engine"], name: new}}
        assert artifacts.engine_key(config_from_dict(other), L40S, "1.2.1") != key, name
        assert settings_of(config_from_dict(other)) != settings_of(config_from_dict(base)), name


def test_markers_are_the_only_way_in():
    """OUTPUT is an Output; BakedIn is one too, so baked-in settings are always fingerprinted."""
    assert isinstance(OUTPUT, Output) and isinstance(BakedIn(), Output)
