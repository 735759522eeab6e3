"""One way to put an exception into a log line, a status record or a row error; the row error itself."""

from __future__ import annotations


def describe(error: BaseException) -> str:
    """The error on one line: `Type: first line of its message`, or the type alone.

    An error that carries the real one as `cause` (a Ray task error carries the worker's own
    exception) is described by that one. Ray's own errors (a dead actor) put a traceback or
    advice first and the error last: their last line is the one that says what happened.
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return describe(cause)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if type(error).__module__.split(".")[0] == "ray":
        return lines[-1]
    return f"{type(error).__name__}: {lines[0]}"


def split_error(error: str) -> tuple[str, str]:
    """A row's `error` column, "code: message" (as RowError and Result.failed write it), as
    (code, message)."""
    code, _, message = error.partition(":")
    return code, message.strip()


class RowError(ValueError):
    """A row that cannot be turned into a request (a bad prompt, bad sampling settings, a bad
    OpenAI batch line); `code` is machine-readable and heads the row's `error` column."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
