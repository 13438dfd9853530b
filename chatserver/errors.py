"""Domain errors: what went wrong, in the domain's words.

The core raises these and never knows about HTTP. `handlers/` maps each `code` to an HTTP status and the
WebSocket handler maps it to an error frame, each in one place.
"""

from __future__ import annotations


class ChatError(Exception):
    """Base of every error the domain reports to a caller."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None, dialog_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.dialog_id = dialog_id


class BadRequest(ChatError):
    code = "bad_request"


class Unauthorized(ChatError):
    code = "unauthorized"


class Forbidden(ChatError):
    code = "forbidden"


class NotFound(ChatError):
    code = "not_found"


class Conflict(ChatError):
    code = "conflict"


class TooLarge(ChatError):
    code = "too_large"


class TooManyRequests(ChatError):
    """A limit of chatserver.throttle: `retry_after` whole seconds until the same request would be let through."""

    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ChatError):
    """Something the server needs is away for now (the database); worth trying again shortly."""

    code = "unavailable"
