"""The Tornado application: routes, settings, and the HTTP server that carries them.

`build_context` assembles the domain (store, broadcaster, service) from a Config; `make_app` maps URLs to
handlers and hands each the context; `make_http_server` sets the limits and timeouts of the listener. run.py
and the tests build the server the same way, through these three.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.web

from chatserver import eventlog
from chatserver.auth import TokenSigner, load_or_create_secret
from chatserver.broadcaster import Broadcaster
from chatserver.cluster import Peers
from chatserver.config import Config
from chatserver.feed import LogFeed, Membership
from chatserver.metrics import Metrics
from chatserver.service import ChatService
from chatserver.store import Store, open_store
from chatserver.throttle import Throttle
from chatserver.tickets import StreamTickets
from handlers import fastpoll, http1, ops, realtime, rest, web
from handlers.base import AppContext, NotFoundHandler, log_request
from handlers.pings import HeartbeatSweep, PingSweep

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# The OpenAPI document of every route below: a test holds the two to each other (tests/test_openapi.py).
OPENAPI_DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


async def build_context(config: Config, *, store: Store | None = None) -> AppContext:
    """The domain objects for one server, started: the store opened and migrated, the log followed from its head.

    Opening the store may raise StoreError (startup, before serving); the secret's file, OSError.
    """
    store = store or open_store(config.database, pool_size=config.db_pool_size)
    secret = config.secret or load_or_create_secret(config.resolved_state_dir)
    await store.start()
    _, head, _ = await store.read(eventlog.meta)
    broadcaster = Broadcaster(config.history_size, log_id=store.log_id, position=head)
    feed = LogFeed(store, broadcaster, Membership(store), poll_interval=config.log_poll_interval,
                   retention=config.event_retention, prune_interval=config.log_prune_interval)
    throttle = Throttle(config, time.monotonic)
    service = ChatService(store, broadcaster, feed, config, TokenSigner(secret, config.token_ttl),
                          StreamTickets(secret), throttle=throttle)
    peers = Peers(service, feed)
    peers.attach_store(store)
    feed.start()
    metrics = Metrics()
    metrics.observe_broadcaster(broadcaster)
    metrics.observe_throttle(throttle)
    metrics.observe_store(store)
    metrics.observe_receipts(service.receipts)
    ctx = AppContext(service=service, broadcaster=broadcaster, config=config, metrics=metrics, peers=peers)
    ctx.readiness["log"] = lambda: feed.problem
    metrics.requests_in_flight.set_function(lambda: len(ctx.requests))
    return ctx


async def close_context(ctx: AppContext) -> None:
    """Write the receipts that wait, stop following the log and close the store (after the server stopped taking
    work)."""
    await ctx.service.receipts.stop()
    await ctx.service.feed.stop()
    await ctx.service.store.close()


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


def make_http_server(app: tornado.web.Application, config: Config) -> tornado.httpserver.HTTPServer:
    """The listener with bounds on everything a client controls: header size, body size, idle time.

    Connections are handlers/http1.py's; WebSocket upgrades and the SSE stream are handed to Tornado's HTTP/1.1
    server. Common long-polls are answered by handlers/fastpoll.py's lean path; every other request by `app`.
    """
    found = app.settings.get("chatserver_ctx")
    ctx = found if isinstance(found, AppContext) else None
    server = http1.Server(
        fastpoll.LeanRouter(app, ctx) if ctx is not None else app,
        handover_paths=("/ws", "/api/events"),
        max_connections=config.max_connections,
        on_refused=ctx.metrics.count_refused_connection if ctx is not None else None,
        max_header_size=16 * 1024,
        # Bodies over max_body_size get a JSON 413 from the handler; this is the hard stop behind it.
        max_body_size=max(config.max_body_size * 2, 1024 * 1024),
        idle_connection_timeout=75,
        body_timeout=30,
        decompress_request=False,
    )
    if ctx is not None:
        ctx.metrics.connections_open.set_function(server.open_connections)
    return server
