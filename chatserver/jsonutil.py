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


def loads(raw: bytes | str) -> Any:
    """Decode JSON, raising BadRequest for anything that is not strict, valid JSON text."""
    try:
        value = ujson.loads(raw)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    _check_value(value)
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


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise BadRequest("malformed JSON: nested too deeply")
    if isinstance(value, str):
        if not is_valid_text(value):
            raise BadRequest("malformed JSON: a string holds a lone surrogate")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest("malformed JSON: NaN and Infinity are not JSON")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(key, depth + 1)
            _check_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
