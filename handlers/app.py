"""The Tornado application: its routes and settings.

`make_app` maps URLs to handlers and hands each the context (run.py's `build_context` makes it); run.py's
`make_http_server` puts the application behind the transport's HTTP/1.1 listener.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tornado.web

from handlers import ops, realtime, rest, web
from handlers.base import AppContext, NotFoundHandler, log_request
from transport.pings import HeartbeatSweep, PingSweep

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# The OpenAPI document of every route below: a test holds the two to each other (tests/test_openapi.py).
OPENAPI_DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def make_app(ctx: AppContext, **settings: Any) -> tornado.web.Application:
    c = {"ctx": ctx}
    # One ping timer for every WebSocket (Tornado's websocket_ping_interval would run a task per connection).
    pings = PingSweep(ctx.config.ws_ping_interval, ctx.config.ws_ping_timeout)
    heartbeats = HeartbeatSweep(ctx.config.sse_heartbeat)  # and one for every SSE stream's keep-alive comment
    dialog = r"([^/]+)"
    routes: list[Any] = [
        (r"/api/auth/login", rest.LoginHandler, c),
        (r"/api/me", rest.MeHandler, c),
        (r"/api/stream-ticket", rest.StreamTicketHandler, c),
        (r"/api/users", rest.UsersHandler, c),
        (r"/api/dialogs", rest.DialogsHandler, c),
        (rf"/api/dialogs/{dialog}", rest.DialogHandler, c),
        (rf"/api/dialogs/{dialog}/typing", rest.TypingHandler, c),
        (rf"/api/dialogs/{dialog}/read", rest.ReadHandler, c),
        (r"/api/ack", rest.AckHandler, c),
        (rf"/api/messages/dialog/{dialog}", rest.DialogMessagesHandler, c),
        (r"/api/messages/([^/]+)", rest.MessageHandler, c),
        (r"/api/poll", realtime.PollHandler, c),
        (r"/api/events", realtime.EventStreamHandler, {**c, "heartbeats": heartbeats}),
        (r"/ws", realtime.EventSocket, {**c, "pings": pings}),
        (r"/healthz", ops.HealthHandler, c),
        (r"/readyz", ops.ReadyHandler, c),
        (r"/metrics", ops.MetricsHandler, c),
        (r"/api/openapi.json", ops.OpenApiHandler, {**c, "document": OPENAPI_DOCUMENT.read_bytes()}),
        (r"/()", web.WebFileHandler, {"path": str(WEB_ROOT), "default_filename": "index.html"}),
        (r"/static/(.*)", web.WebFileHandler, {"path": str(WEB_ROOT)}),
    ]
    config = ctx.config
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=c,
        log_function=log_request,
        websocket_max_message_size=config.max_body_size,
        # No websocket_ping_interval: the PingSweep above pings, with the same interval and timeout.
        compress_response=False,
        chatserver_ctx=ctx,
        **settings,
    )
