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


def chat(tokenizer, **settings):
    return PromptBuilder(tokenizer, InputConfig(prompt_column=None, messages_column="m", **settings))


def text(t):
    return {"type": "text", "text": t}


@pytest.mark.parametrize("parts, plain", [
    ([text("What is 2+2?")], "What is 2+2?"),
    # joined with "\n", as vLLM joins them (chat_utils._parse_chat_message_content_parts)
    ([text("Read this:"), text("The cat sat."), text("Summarise it.")],
     "Read this:\nThe cat sat.\nSummarise it."),
])
def test_openai_content_parts_render_as_their_joined_text(tokenizer, parts, plain):
    b = chat(tokenizer)
    as_parts = [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": parts}]
    as_plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": plain}]
    assert b.render(as_parts) == b.render(as_plain)
    assert b.encode([as_parts]) == b.encode([as_plain])


def test_content_parts_as_parquet_reads_them(tokenizer):
    """A Parquet struct has every field on every part: the unused ones are null."""
    b = chat(tokenizer)
    part = {"type": "text", "text": "Hi", "image_url": None}
    assert b.render([{"role": "user", "content": [part]}]) == b.render([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("part, kind", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "image_url"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
])
def test_a_non_text_part_is_that_rows_error(tokenizer, part, kind):
    b = chat(tokenizer)
    rows = [[{"role": "user", "content": [text("Hello")]}],
            [{"role": "system", "content": "S"}, {"role": "user", "content": [text("Describe:"), part]}],
            [{"role": "user", "content": "Bye"}]]
    first, bad, last = b.encode(rows)
    assert isinstance(first, list) and isinstance(last, list)
    assert isinstance(bad, RowError) and bad.code == "unsupported_content"
    assert bad.message == f"message 1 has a content part of type {kind!r}; this model takes text only"


@pytest.mark.parametrize("content, error", [
    (["just a string"], "message 0 content part 0 is str, expected {type: 'text', text}"),
    ([{"text": "no type"}], "message 0 content part 0 is a part with type None"),
    ([{"type": "text", "text": None}], "message 0 content part 0 of type 'text' has text of type NoneType"),
    (7, "message 0 has content of type int, expected a string or a list of content parts"),
])
def test_malformed_content_parts_are_bad_messages(tokenizer, content, error):
    [bad] = chat(tokenizer).encode([[{"role": "user", "content": content}]])
    assert isinstance(bad, RowError) and bad.code == "bad_messages" and error in bad.message


SYSTEM = "<|im_start|>system\nAnswer in French.<|im_end|>\n"


def test_system_prompt_heads_a_conversation_with_a_later_system_message(tokenizer):
    """Rule: input.system_prompt heads every conversation whose first message is not a
    system message; a system message further on does not stop it."""
    text_ = chat(tokenizer, system_prompt="Answer in French.").render(
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be terse."},
         {"role": "user", "content": "Again"}])
    assert text_.startswith(SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>system\nBe terse.")
    assert "SmolLM" not in text_  # not the template's default system prompt


def test_a_conversation_opening_with_a_system_message_keeps_it(tokenizer):
    text_ = chat(tokenizer, system_prompt="Answer in French.").render(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert text_.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi")
    assert "Answer in French." not in text_


@pytest.mark.parametrize("template", [True, False])
def test_the_rust_batch_encoder_gives_the_tokenizers_own_ids(tokenizer, template):
    """encode() calls the fast tokenizer's Rust encode_batch directly: the ids must be what
    calling the tokenizer gives, special tokens included (added only without a template)."""
    b = PromptBuilder(tokenizer, InputConfig())
    b.has_template = template
    texts = [b.render("Say hi"), "plain <|im_start|> text with émoji 😀", "x" * 3000]
    assert b._token_ids(texts, not template) == tokenizer(texts, add_special_tokens=not template)["input_ids"]


def test_a_plain_prompt_skips_the_jinja_render_only_where_the_template_keeps_it_verbatim(tokenizer):
    b = PromptBuilder(tokenizer, InputConfig())
    assert b._frame is not None  # SmolLM2's template inserts the message as it is
    jinja = PromptBuilder(tokenizer, InputConfig())
    jinja._frame = None
    prompts = ["Say hi", "  padded  ", "two\n\nlines", "{{ not a template }}", "<|im_end|> inside", "😀"]
    assert [b.render(p) for p in prompts] == [jinja.render(p) for p in prompts]
    original = tokenizer.chat_template
    try:  # a template that trims the content: rows must still be rendered one by one
        tokenizer.chat_template = original.replace("message['content']", "message['content'] | trim")
        trimming = PromptBuilder(tokenizer, InputConfig())
        assert trimming._frame is None and trimming.render("  x  ").count("  x  ") == 0
    finally:
        tokenizer.chat_template = original
