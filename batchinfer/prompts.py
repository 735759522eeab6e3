"""Rows -> conversations -> token ids, through the model's chat template.

A row whose prompt cannot become a request (null, empty, malformed messages, a template
that refuses it) becomes that row's error; the rest of the shard goes on. A file whose
first rows all fail the same way is a wrong column or format, not bad rows: `check_sample`
stops the run on it before any engine loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from batchinfer import model_refs
from batchinfer.config import Config, ConfigError, EngineConfig, InputConfig
from batchinfer.errors import RowError
from batchinfer.openai_batch import Completion, is_request, parse_request
from batchinfer.plan import InputError, Plan, input_reader

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SAMPLE_FILES = 4
"""`check_sample` reads this many input files (the first non-empty ones) ..."""
SAMPLE_ROWS = 8
"""... and this many rows of each, from its first non-empty row group."""


def load_tokenizer(engine: EngineConfig):
    """The Hugging Face tokenizer (with its chat template) for the configured model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_refs.tokenizer_folder(engine),
                                         trust_remote_code=engine.trust_remote_code)


class PromptBuilder:
    """Turns the prompt (or messages) cell of each row into prompt token ids."""

    def __init__(self, tokenizer: Any, cfg: InputConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._frame: tuple[str, str] | None = None  # render() reads it while it is found
        self._frame = self._template_frame() if self.has_template and not cfg.system_prompt else None
        if cfg.messages_column and not self.has_template:
            raise ValueError(
                "input.messages_column is set but the model's tokenizer has no chat template "
                "(use prompt_column for a base model)"
            )

    def conversation(self, cell: Any) -> list[dict[str, str]]:
        """The row as chat messages. input.system_prompt heads every conversation whose first
        message is not a system message; one that opens with its own system message keeps
        it. A system message later in a conversation does not count: without the configured
        one first, the chat template would put its own default system prompt there."""
        if self.cfg.messages_column or isinstance(cell, list):  # a list: an OpenAI batch chat request
            messages = _check_messages(cell)
        else:
            if cell is None:
                raise RowError("empty_prompt", "prompt is null")
            if isinstance(cell, bytes):
                try:
                    cell = cell.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RowError("bad_encoding", f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not isinstance(cell, str):
                raise RowError("bad_prompt", f"prompt is {type(cell).__name__}, expected a string")
            if not cell.strip():
                raise RowError("empty_prompt", "prompt is empty")
            messages = [{"role": "user", "content": cell}]
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        return messages

    def render(self, cell: Any) -> str:
        """The exact text the model sees for one row (a `Completion`: its text as is; a
        RowError, a request that did not parse, is raised)."""
        if isinstance(cell, RowError):
            raise cell
        if isinstance(cell, Completion):
            if not cell.text.strip():
                raise RowError("empty_prompt", "prompt is empty")
            return cell.text
        messages = self.conversation(cell)
        if self._frame is not None and len(messages) == 1 and messages[0]["role"] == "user":
            return self._frame[0] + messages[0]["content"] + self._frame[1]
        if not self.has_template:
            return "\n\n".join(m["content"] for m in messages)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raises its own TemplateError for refused conversations
            raise RowError("bad_messages", f"chat template refused the conversation: {e}") from None

    def _template_frame(self) -> tuple[str, str] | None:
        """The text the chat template puts before and after a lone user message, if the
        template inserts the message verbatim (checked on probes that a template which
        strips, escapes or branches on the content would render differently); rendering a
        plain prompt is then two string joins instead of a jinja render per row. None means
        render each row."""
        marker = "\x00batchinfer-prompt\x00"
        try:
            before, sep, after = self.render(marker).partition(marker)
            if not sep or marker in after:
                return None
            for probe in (" Padded prompt, with {{ braces }} and <tags>\n", "x", "Ünïcödé 😀\t\n\n"):
                if self.render(probe) != before + probe + after:
                    return None
        except RowError:
            return None
        return before, after

    def encode(self, cells: Sequence[Any]) -> list[list[int] | RowError]:
        """Token ids per row, or the RowError that row produced. A cell may already be a
        RowError (a row whose request could not be parsed); it is passed through."""
        texts: list[str | RowError] = []
        for cell in cells:
            try:
                texts.append(self.render(cell))
            except RowError as e:
                texts.append(e)
        # The template already wrote any BOS/special tokens; adding them again would double
        # them. Completion prompts (and every prompt of a model without a template) get them.
        raw = [isinstance(c, Completion) or not self.has_template for c in cells]
        encoded: list[list[int] | RowError] = list(texts)  # type: ignore[arg-type]
        for special in (False, True):
            rows = [i for i, t in enumerate(texts) if isinstance(t, str) and raw[i] == special]
            if rows:
                for i, ids in zip(rows, self._token_ids([texts[i] for i in rows], special), strict=True):
                    encoded[i] = ids
        return encoded

    def _token_ids(self, texts: list[str], special: bool) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        # A fast tokenizer's Rust encode_batch directly: the same ids as calling the tokenizer
        # (no truncation, no padding), without converting every encoding into Python dicts
        # of attention masks and offsets first (a fifth of the worker's time, issue 11).
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]


def _check_messages(cell: Any) -> list[dict[str, str]]:
    if cell is None:
        raise RowError("bad_messages", "messages is null")
    if hasattr(cell, "tolist"):
        cell = cell.tolist()
    if not isinstance(cell, list) or not cell:
        raise RowError("bad_messages", f"expected a non-empty list of {{role, content}}, got {type(cell).__name__}")
    out = []
    for i, m in enumerate(cell):
        if not isinstance(m, dict):
            raise RowError("bad_messages", f"message {i} is {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError("bad_messages", f"message {i} has role {role!r}, expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content_text(i, content)})
    if out[-1]["role"] == "assistant":
        raise RowError("bad_messages", "the last message is from the assistant; expected a user (or tool) turn to answer")
    return out


def _content_text(i: int, content: Any) -> str:
    r"""Message i's content as text: a string, or a list of OpenAI content parts
    [{"type": "text", "text": ...}, ...] whose texts are joined with "\n", as vLLM does
    (vllm/entrypoints/chat_utils.py, `_parse_chat_message_content_parts`:
    `text_prompt = "\n".join(texts)`). A part of any other type (image_url, input_audio,
    ...) is the row's error `unsupported_content`: the engines here take text only."""
    if isinstance(content, str):
        return content
    if hasattr(content, "tolist"):
        content = content.tolist()
    if not isinstance(content, list):
        raise RowError("bad_messages", f"message {i} has content of type {type(content).__name__}, "
                       "expected a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise RowError("bad_messages", f"message {i} content part {j} is {_describe(part)}, "
                           "expected {type: 'text', text}")
        if kind != "text":
            raise RowError("unsupported_content", f"message {i} has a content part of type {kind!r}; "
                           "this model takes text only")
        text = part.get("text")
        if not isinstance(text, str):
            raise RowError("bad_messages", f"message {i} content part {j} of type 'text' has text of "
                           f"type {type(text).__name__}, expected a string")
        texts.append(text)
    return "\n".join(texts)


def _describe(part: Any) -> str:
    return f"a part with type {part.get('type')!r}" if isinstance(part, dict) else type(part).__name__


def check_sample(cfg: Config, plan: Plan) -> None:
    """Refuse inputs whose prompts cannot be made at all, before any engine loads.

    Renders the first SAMPLE_ROWS rows of the first SAMPLE_FILES non-empty input files with
    the real tokenizer. When every sampled row of a file fails with the same error code, the
    column or its format is wrong (every row of the run would be that error, found only
    after the engines loaded): raises InputError naming the file, the column and the reason
    with an example. Shared by `run` (before the plan is recorded) and `plan`. Skipped, with
    a warning, when the driver cannot load the tokenizer (transformers not installed there).
    """
    try:
        builder = PromptBuilder(load_tokenizer(cfg.engine), cfg.input)
    except (ImportError, OSError) as e:
        log.warning("prompts not checked before the run: cannot load the tokenizer here (%s)", e)
        return
    except ValueError as e:  # messages_column with a model that has no chat template
        raise ConfigError(str(e)) from None
    column = cfg.input.prompt_column or cfg.input.messages_column
    setting = "input.prompt_column" if cfg.input.prompt_column else "input.messages_column"
    reader = input_reader(cfg)
    if cfg.input.format == "openai_batch":
        _check_openai_sample(plan, reader)
        return
    for f in [f for f in plan.files if f.num_rows][:SAMPLE_FILES]:
        # Rows of the first read unit (Parquet: row group) only, so the check reads one unit.
        cells = first_cells(cfg, reader, f, min(SAMPLE_ROWS, next(n for n in f.row_groups if n)))
        errors = []
        for cell in cells:
            try:
                builder.render(cell)
            except RowError as e:
                errors.append(e)
        if len(errors) == len(cells) and len({e.code for e in errors}) == 1:
            raise InputError(
                f"input file {f.name!r}: none of the first {len(cells)} rows of column {column!r} "
                f"becomes a prompt, all fail with {errors[0].code} (first row: {errors[0].message}); "
                f"every row of the run would be that error. Fix the inputs or {setting}")


def _check_openai_sample(plan: Plan, reader: Any) -> None:
    """An OpenAI batch file none of whose first lines is a request at all ({custom_id, url,
    body}) is the wrong file or format, not bad requests: InputError naming it. Requests that
    are malformed one by one (n: 2, bad messages, bad settings) are their rows' errors."""
    for f in [f for f in plan.files if f.num_rows][:SAMPLE_FILES]:
        batch = reader.first_rows(f, ["request", "line"], min(SAMPLE_ROWS, f.num_rows))
        raws, lines = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        if any(is_request(raw) for raw in raws):
            continue
        try:
            parse_request(raws[0], lines[0])
            why = "it has no custom_id, url and body"
        except RowError as e:
            why = e.message
        raise InputError(
            f"input file {f.name!r}: none of the first {len(raws)} lines is an OpenAI batch request "
            f'{{"custom_id", "method", "url", "body"}} (first: {why}); every line of the run would be a '
            "bad_request error. Check the file, or input.format (parquet for Parquet prompts)")


def first_cells(cfg: Config, reader: Any, file: Any, n: int) -> list[Any]:
    """The prompt cells of a file's first `n` rows, as `PromptBuilder.render` takes them: the
    prompt or messages column's values, or each OpenAI batch line's prompt (or its RowError)."""
    if cfg.input.format != "openai_batch":
        column = cfg.input.prompt_column or cfg.input.messages_column
        return reader.first_rows(file, [column], n).column(0).to_pylist()
    batch = reader.first_rows(file, ["request", "line"], n)
    cells: list[Any] = []
    for raw, line in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
        try:
            cells.append(parse_request(raw, line).prompt)
        except RowError as e:
            cells.append(e)
    return cells
