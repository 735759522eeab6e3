"""The OpenAI Batch API file format: request lines in, result lines out.

Input (https://platform.openai.com/docs/guides/batch, "Preparing your batch file"): JSONL,
one request per line,

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [...], "max_tokens": 100}}

`parse_request` turns one line into a prompt (chat messages for /v1/chat/completions, the raw
text of `prompt` for /v1/completions) and the row's own settings (sampling.py): max_tokens
(or max_completion_tokens), temperature, top_p, seed, stop, response_format. A line that is
not such a request is that row's error `bad_request`, naming its line number.
readers/openai_batch.py reads the lines; planning refuses repeated custom_ids, as OpenAI does.

Output (the Batch API's output and error files, "Retrieving the results"): one line per
request,

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": <chat.completion>},
     "error": null}

with `body` a `chat.completion` (or `text_completion`) object: choices[0].message.content
(text), finish_reason, usage. A request that failed has `response: null` and
`error: {code, message}` (batchinfer's row error code, e.g. prompt_too_long); one whose output
exists but does not satisfy its response format (incomplete_json) has both. Every failed
request is also written to the shard's error file (_errors/part-NNNNNN.jsonl), so the
output and error files load with the same code as the Batch API's.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from batchinfer.errors import RowError

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)

SETTINGS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
            "response_format")
"""Body fields that become the row's own settings (sampling.py)."""
KNOWN_FIELDS = frozenset({"model", "messages", "prompt", "n", *SETTINGS})
"""Body fields batchinfer reads; the plan reports any other field once (they are not applied)."""


@dataclass(frozen=True)
class Completion:
    """A /v1/completions prompt: the text as is, tokenized without a chat template."""

    text: str


@dataclass(frozen=True)
class ParsedRequest:
    custom_id: str
    kind: str
    """"chat" or "completion"."""
    prompt: list[dict[str, Any]] | Completion
    """Chat messages (prompts.py checks them) or a completion prompt."""
    settings: dict[str, Any]
    """The row's own settings, by sampling.py's names (max_completion_tokens -> max_tokens)."""
    model: str | None


def parse_request(raw: bytes | str | None, line: int) -> ParsedRequest:
    """One request line as a prompt and settings; RowError `bad_request` ("line N: ...") for
    a line that is not an OpenAI batch request batchinfer can run."""
    def bad(message: str) -> RowError:
        return RowError("bad_request", f"line {line}: {message}")

    request = _json_object(raw, bad)
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise bad(f"custom_id is {_short(custom_id)}; expected a non-empty string")
    if request.get("method", "POST") != "POST":
        raise bad(f"method is {_short(request.get('method'))}; expected \"POST\"")
    url = request.get("url")
    if url not in URLS:
        raise bad(f"url is {_short(url)}; expected {CHAT_URL} or {COMPLETIONS_URL}")
    body = request.get("body")
    if not isinstance(body, dict):
        raise bad(f"body is {_short(body)}; expected an object")
    if body.get("n") not in (None, 1):
        raise bad(f"body.n is {_short(body.get('n'))}; batchinfer returns one choice per request (expected 1)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"body.model is {_short(model)}; expected a string")
    if url == CHAT_URL:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad(f"body.messages is {_short(messages)}; expected a non-empty list of messages")
        return ParsedRequest(custom_id, "chat", [_message(m) for m in messages], _settings(body, bad), model)
    prompt = Completion(_completion_prompt(body.get("prompt"), bad))
    return ParsedRequest(custom_id, "completion", prompt, _settings(body, bad), model)


def is_request(raw: bytes | str | None) -> bool:
    """Whether a line is an OpenAI batch request at all (a JSON object with custom_id, url and
    body), however bad its parts: telling a wrong file from bad requests."""
    try:
        request = _json_object(raw, lambda message: RowError("bad_request", message))
    except RowError:
        return False
    return {"custom_id", "url", "body"} <= request.keys()


def _json_object(raw: bytes | str | None, bad) -> dict[str, Any]:
    if raw is None:
        raise bad("empty line")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        request = json.loads(text.removeprefix("\ufeff"))  # a byte order mark, as Windows tools write
    except UnicodeDecodeError as e:
        raise bad(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(request, dict):
        raise bad(f"a JSON {type(request).__name__}; expected an object {{custom_id, method, url, body}}")
    return request


def _message(m: Any) -> Any:
    """OpenAI's newer "developer" role is the system message of the model's chat template."""
    if isinstance(m, dict) and m.get("role") == "developer":
        return {**m, "role": "system"}
    return m


def _completion_prompt(prompt: Any, bad) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad(f"body.prompt is {_short(prompt)}; expected a string (one prompt per request)")
    return prompt


def _settings(body: dict[str, Any], bad) -> dict[str, Any]:
    settings = {k: body[k] for k in SETTINGS if body.get(k) is not None}
    if "max_completion_tokens" in settings:
        limit = settings.pop("max_completion_tokens")
        if settings.get("max_tokens", limit) != limit:
            raise bad(f"body.max_tokens ({settings['max_tokens']}) and max_completion_tokens ({limit}) "
                      "disagree; set one")
        settings["max_tokens"] = limit
    return settings


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- output lines


@dataclass(frozen=True)
class Row:
    """What one output line says: the request's id, kind and model, and its result."""

    custom_id: str | None
    kind: str | None
    """"chat", "completion", or None for a line that never parsed (then: chat)."""
    model: str | None
    text: str | None
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None


def result_line(row: Row, run: str, default_model: str, created: int | None = None) -> dict[str, Any]:
    """The Batch API output line of one request. Ids are stable: a hash of the run's
    fingerprint and the custom_id, so a rerun of the same plan writes the same ids."""
    key = hashlib.sha256(f"{run}:{row.custom_id}".encode()).hexdigest()
    response = None
    if row.text is not None:
        response = {"status_code": 200, "request_id": key[:32],
                    "body": _body(row, key, row.model or default_model, created or int(time.time()))}
    error = None
    if row.error is not None:
        code, _, message = row.error.partition(": ")
        error = {"code": code, "message": message or code}
    return {"id": f"batch_req_{key[:24]}", "custom_id": row.custom_id, "response": response, "error": error}


def _body(row: Row, key: str, model: str, created: int) -> dict[str, Any]:
    usage = {"prompt_tokens": row.prompt_tokens or 0, "completion_tokens": row.completion_tokens or 0,
             "total_tokens": (row.prompt_tokens or 0) + (row.completion_tokens or 0)}
    if row.kind == "completion":
        choice = {"text": row.text, "index": 0, "logprobs": None, "finish_reason": row.finish_reason}
        return {"id": f"cmpl-{key[:24]}", "object": "text_completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": row.text, "refusal": None},
              "logprobs": None, "finish_reason": row.finish_reason}
    return {"id": f"chatcmpl-{key[:24]}", "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def to_jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


def read_jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    for raw in data.splitlines():
        if raw.strip():
            yield json.loads(raw)
