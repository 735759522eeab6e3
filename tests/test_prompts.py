"""Rows -> chat template -> token ids, with the real model's tokenizer; bad rows become row errors."""

import pytest

from batchinfer.config import InputConfig
from batchinfer.prompts import PromptBuilder, RowError


def test_prompt_goes_through_the_chat_template(tokenizer):
    b = PromptBuilder(tokenizer, InputConfig())
    text = b.render("Hello there")
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    [ids] = b.encode(["Hello there"])
    assert tokenizer.decode(ids) == text  # no doubled special tokens


def test_system_prompt_is_prepended(tokenizer):
    b = PromptBuilder(tokenizer, InputConfig(system_prompt="Answer in French."))
    assert b.render("Hi").startswith("<|im_start|>system\nAnswer in French.<|im_end|>")


def test_messages_column(tokenizer):
    b = PromptBuilder(tokenizer, InputConfig(prompt_column=None, messages_column="m"))
    text = b.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert "<|im_start|>system\nS<|im_end|>" in text and "<|im_start|>user\nU<|im_end|>" in text


@pytest.mark.parametrize("cell, error", [
    (None, "empty_prompt: prompt is null"),
    ("   ", "empty_prompt: prompt is empty"),
    (b"\xff\xfe", "bad_encoding: prompt is not valid UTF-8"),
    (42, "bad_prompt: prompt is int, expected a string"),
])
def test_bad_prompts_are_row_errors(tokenizer, cell, error):
    b = PromptBuilder(tokenizer, InputConfig())
    good, bad = b.encode(["fine", cell])
    assert isinstance(good, list)
    assert isinstance(bad, RowError) and str(bad).startswith(error)


@pytest.mark.parametrize("cell, error", [
    (None, "messages is null"),
    ([], "expected a non-empty list"),
    ("hi", "expected a non-empty list of {role, content}, got str"),
    ([{"role": "wizard", "content": "x"}], "message 0 has role 'wizard'"),
    ([{"role": "user"}], "message 0 has content of type NoneType"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "the last message is from the assistant"),
])
def test_malformed_messages_are_row_errors(tokenizer, cell, error):
    b = PromptBuilder(tokenizer, InputConfig(prompt_column=None, messages_column="m"))
    [bad] = b.encode([cell])
    assert isinstance(bad, RowError) and bad.code == "bad_messages" and error in bad.message
