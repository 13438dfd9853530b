"""The access line and the latency metric of a request, for every HTTP path: the handlers' and the lean poll's.

One line per request at INFO (an answer below 400), WARNING (4xx) or ERROR (5xx), its URI redacted.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from chatserver.metrics import Metrics
from chatserver.redaction import redact

access_log = logging.getLogger("chatserver.access")


class Request(Protocol):
    """What an access line reads of a request (HTTPServerRequest has it, and so does a lean poll)."""

    @property
    def method(self) -> str | None: ...

    @property
    def uri(self) -> str | None: ...

    @property
    def remote_ip(self) -> str | None: ...

    def request_time(self) -> float: ...


def log_access(metrics: Metrics | None, request: Request, status: int, handler_name: str, latency: Any = None
               ) -> None:
    """The access line and the latency metric of one request.

    `latency` is the metric's child for this method and handler where the caller has it at hand.
    """
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):  # redact() is a regex: not run for a line nobody will read
        access_log.log(
            level, "%d %s %s (%s) %.1fms",
            status, request.method, redact(request.uri or ""), request.remote_ip, 1000.0 * request.request_time(),
        )
    if metrics is not None:
        if latency is None:
            latency = metrics.request_latency.labels(request.method or "", handler_name)
        latency.observe(request.request_time())
