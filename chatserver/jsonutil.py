"""The one JSON codec of the server: ujson, with strict checks on what comes in.

Every body, frame and AMQP payload is decoded by `loads` and every answer and event is encoded by `dumps`,
so the rules (valid UTF-8, no NaN, no lone surrogates) live here once.
"""

from __future__ import annotations

import math
from typing import Any

import ujson

from chatserver.errors import BadRequest


def dumps(obj: Any) -> str:
    """Encode compactly, keeping non-ASCII text as is (inputs are validated, so no lone surrogates)."""
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


def dumps_bytes(obj: Any) -> bytes:
    return dumps(obj).encode("utf-8")


def error_body(message: str) -> bytes:
    """PROTOCOL section 2's error envelope, as every refusal carries it (the handlers', and the HTTP layer's own)."""
    return dumps_bytes({"success": False, "error": message})


def loads(raw: bytes | str) -> Any:
    """Decode JSON, raising BadRequest for anything that is not strict, valid JSON text.

    A value that decodes but is not valid (a lone surrogate, NaN, nesting too deep) is named by its path in
    the error, `'content'` or `'meta.a[2]'`, and its top-level key is the error's `field`.
    """
    try:
        value = ujson.loads(raw)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    try:
        _check_value(value, 0)
    except _Invalid as exc:
        path = exc.path[::-1]
        if not path:
            raise BadRequest(f"malformed JSON: the body {exc.reason}") from None
        field = path[0] if isinstance(path[0], str) else None
        raise BadRequest(f"malformed JSON: '{_path_name(path)}' {exc.reason}", field=field) from None
    return value


def loads_object(raw: bytes | str) -> dict[str, Any]:
    value = loads(raw)
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def is_valid_text(value: str) -> bool:
    """True when the string is encodable as UTF-8 (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MAX_DEPTH = 64


class _Invalid(Exception):
    """A decoded value that is not valid; `path` is filled in, innermost first, as it propagates out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str | int] = []


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Invalid(f"is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if not is_valid_text(value):
            raise _Invalid("is not valid Unicode (it holds a lone surrogate)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("is not a finite number (NaN and Infinity are not JSON)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not is_valid_text(key):
                # The key itself cannot go into the error text: it is not encodable.
                raise _Invalid("has a key that is not valid Unicode (it holds a lone surrogate)")
            try:
                _check_value(item, depth + 1)
            except _Invalid as exc:
                exc.path.append(key)
                raise
    elif isinstance(value, list):
        for index, item in enumerate(value):
            try:
                _check_value(item, depth + 1)
            except _Invalid as exc:
                exc.path.append(index)
                raise


def _path_name(path: list[str | int], limit: int = 80) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"
