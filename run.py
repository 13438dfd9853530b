"""chatserver's entry point: wiring only.

    python run.py [--demo] [--host H] [--port N] [--workers N|auto] [--db PATH] [--config FILE]
    python run.py users add --phone P --name N --password W [--db PATH] [--config FILE]
    python run.py dialogs add --title T --member PHONE --member PHONE ... [--db PATH] [--config FILE]
    python run.py dialogs members --dialog ID [--add PHONE ...] [--remove PHONE ...] [--db PATH] [--config FILE]

--db is a SQLite file or a postgresql://user@host:port/dbname URL.

config -> store -> broadcaster -> service -> app -> listen; signals. With `workers` above 1 this process is the
supervisor (chatserver/supervisor.py) and each worker is `run.py --worker SPEC`, serving as above. Every failure
the operator can cause (a bad setting, a taken port, an unreadable database) is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from chatserver import eventlog, jsonutil, systemd
from chatserver.admin import add_dialog, add_user, change_members, ensure_demo
from chatserver.auth import TokenSigner, load_or_create_secret
from chatserver.backends import open_store
from chatserver.broadcaster import Broadcaster
from chatserver.chat3 import Amqp, prepare_outbound, start_amqp
from chatserver.cluster import Peers
from chatserver.config import Config, ConfigError, load_config
from chatserver.errors import ChatError
from chatserver.feed import LogFeed, Membership
from chatserver.metrics import Metrics
from chatserver.redaction import redact
from chatserver.service import ChatService
from chatserver.siblings import WorkerLink
from chatserver.store import Store, StoreError
from chatserver.supervisor import Supervisor, WorkerHandoff
from chatserver.throttle import Throttle
from chatserver.tickets import StreamTickets
from handlers.app import make_app
from handlers.base import AppContext
from transport import fastpoll, http1

log = logging.getLogger("chatserver")

# How often shutdown looks whether what was in flight has finished.
DRAIN_STEP = 0.02

async def build_context(config: Config, *, store: Store | None = None) -> AppContext:
    """The domain objects for one server, started: the store opened and migrated, the log followed from its head.

    Opening the store may raise StoreError (startup, before serving); the secret's file, OSError.
    """
    store = store or open_store(config.database, pool_size=config.db_pool_size)
    secret = config.secret or load_or_create_secret(config.state_path)
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



def make_http_server(app: tornado.web.Application, config: Config) -> tornado.httpserver.HTTPServer:
    """The listener with bounds on everything a client controls: header size, body size, idle time, connections.

    With the lean engine, connections are transport/http1.py's; WebSocket upgrades and the SSE stream are handed to
    Tornado's HTTP/1.1 server, common long-polls are answered by transport/fastpoll.py's lean path, every other
    request by `app`. With the Tornado engine, Tornado's HTTP/1.1 server reads every connection, and `app`
    answers every request.
    """
    found = app.settings.get("chatserver_ctx")
    ctx = found if isinstance(found, AppContext) else None
    lean = config.http_engine == "lean"
    server = http1.Server(
        fastpoll.LeanRouter(app, ctx) if ctx is not None and lean else app,
        tornado_only=not lean,
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


class Fatal(Exception):
    """An error the operator must fix; printed as one line, exit code 1."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own (absent) --db must not overwrite one given before the subcommand.
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="SQLite file or postgresql:// URL (default <state_dir>/chatserver.db)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (see conf/chatserver.toml)")
    parser = argparse.ArgumentParser(prog="run.py", description="chatserver: real-time chat gateway",
                                     parents=[common])
    parser.add_argument("--demo", action="store_true", help="create the demo users and dialog if missing")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    # Parsed with the other settings, so that a bad value is the same one-line ConfigError.
    parser.add_argument("--port", help="port to listen on (default 8888)")
    parser.add_argument("--workers", help="worker processes: a number, or auto for one per usable core (default 1)")
    # Set by the supervisor on the workers it starts (chatserver/supervisor.py, WorkerHandoff); not for people.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command")
    users = commands.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    add_user = users.add_parser("add", parents=[common], help="create a user and print its JSON")
    add_user.add_argument("--phone", required=True)
    add_user.add_argument("--name", required=True)
    add_user.add_argument("--password", required=True)
    dialogs = commands.add_parser("dialogs", help="manage dialogs").add_subparsers(dest="action", required=True)
    add_dialog = dialogs.add_parser("add", parents=[common], help="create a dialog and print its JSON")
    add_dialog.add_argument("--title", required=True)
    add_dialog.add_argument("--member", action="append", required=True, help="a member's phone (repeat)")
    members = dialogs.add_parser("members", parents=[common], help="add or remove members; print the dialog's JSON")
    members.add_argument("--dialog", required=True, help="the dialog's id (dlg_...)")
    members.add_argument("--add", action="append", help="a phone to add (repeat)")
    members.add_argument("--remove", action="append", help="a phone to remove (repeat)")
    return parser.parse_args(argv)


def configure_logging(config: Config, environ: dict[str, str], tag: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(systemd.is_journal_stream(environ, sys.stderr.fileno()), tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # Tornado's own access log prints query strings (tokens): ours (handlers.base.log_request) replaces it.
    logging.getLogger("tornado.access").disabled = True
    route_stray_output()


def route_stray_output() -> None:
    """What Python would print to stderr by itself (warnings, the traceback of an exception nobody caught, in any
    thread, or raised where it cannot be, as in a finalizer) goes through the log instead: one line, redacted."""
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
    log.critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as Python's own hook: a thread that exits is not an error
    name = args.thread.name if args.thread is not None else "?"
    log.error("uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(unraisable: Any) -> None:
    exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
    log.error("%s: %s", unraisable.err_msg or "Exception ignored in", _describe(unraisable.object), exc_info=exc_info)


def _describe(thing: object) -> str:
    try:
        return repr(thing)
    except Exception:
        return f"<{type(thing).__name__} object>"


_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def log_formatter(journal: bool, tag: str = "") -> logging.Formatter:
    """Under journald (which adds its own timestamps) `<N>` priority prefixes; elsewhere timestamps. `tag` (a
    worker's "worker 2") follows the logger's name."""
    name = f"%(name)s[{tag}]" if tag else "%(name)s"
    if journal:
        return OneLineFormatter(f"{name}: %(message)s", journal=True)
    return OneLineFormatter(f"%(asctime)s %(levelname)s {name}: %(message)s")


class OneLineFormatter(logging.Formatter):
    """One line per record, tracebacks included (folded at ' | '), with token-like values redacted."""

    def __init__(self, fmt: str, *, journal: bool = False) -> None:
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = redact(" | ".join(super().format(record).splitlines()))
        if self._journal:
            return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


# -- commands -------------------------------------------------------------------------------------------


async def run_command(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config.database, pool_size=1)
    try:
        await store.start()
        if args.command == "users":
            user = await add_user(store, args.phone, args.name, args.password)
            print(jsonutil.dumps(user.to_json()))
        else:
            if args.action == "add":
                dialog = await add_dialog(store, args.title, args.member)
            else:
                dialog = await change_members(store, args.dialog, args.add or [], args.remove or [])
            print(jsonutil.dumps(dialog.to_json(last_message=None, unread_count=0)))
    finally:
        await store.close()
    return 0


# -- serving --------------------------------------------------------------------------------------------


def bind(config: Config) -> list[socket.socket]:
    try:
        return tornado.netutil.bind_sockets(config.port, config.host, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Fatal(f"port {config.port} on {config.host} is already in use") from None
        raise Fatal(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


def adopt_sockets(environ: dict[str, str]) -> list[socket.socket]:
    """The listening sockets of a systemd `.socket` unit, if this process was started by one."""
    try:
        sockets = systemd.inherited_sockets(environ, os.getpid())
    except ValueError as exc:
        raise Fatal(str(exc)) from None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # meant for this process only, never for a child
    return sockets


class StopSignal:
    """SIGTERM and SIGINT as an awaitable: the first starts the shutdown, later ones are logged and ignored.

    Installed with `signal.signal`, not `loop.add_signal_handler`, so that it outlives the loop: a signal that
    arrives while asyncio.run() tears down is ignored too, never a KeyboardInterrupt traceback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self.name = ""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: we are exiting anyway
            self._loop.call_soon_threadsafe(self._received, signal.Signals(signum).name)

    def trigger(self, name: str) -> None:
        """Start the shutdown as a signal would (a worker whose supervisor is gone)."""
        self._received(name)

    def _received(self, name: str) -> None:
        if self._event.is_set():
            log.info("%s received while shutting down; still finishing what is in flight", name)
            return
        self.name = name
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


# Descriptors kept for what is not a client connection: the listener, the database and its journal, the broker,
# the log, the loop's own.
RESERVED_DESCRIPTORS = 64


def raise_descriptor_limit(max_connections: int) -> None:
    """The soft limit on open files raised to the hard one (a soft limit of 1024 is common, and meant for programs
    that open a few files); a warning where `max_connections` does not fit under it, since a process out of
    descriptors pauses accepting rather than refusing with an answer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.info("could not raise the limit on open files from %d to %d: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and max_connections + RESERVED_DESCRIPTORS > soft:
        log.warning(
            "max_connections is %d but this process may open only %d files: past about %d connections it "
            "cannot accept more (raise LimitNOFILE=, or lower max_connections)",
            max_connections, soft, max(soft - RESERVED_DESCRIPTORS, 0),
        )


def connection_status(ctx: AppContext) -> str:
    """The connection counts for systemd's status line and the shutdown log."""
    counts = collections.Counter(getattr(c, "transport", "other") for c in ctx.connections)
    return (f"{counts['websocket']} websocket, {counts['sse']} sse, {counts['longpoll']} polls parked; "
            f"{len(ctx.requests)} requests in flight")


# The cyclic GC's young generation collects after this many net allocations (CPython's default: 700). A server
# holding thousands of connections allocates a few objects per delivery; at 700 it ran a collection every few
# hundred deliveries and, through the older generations, walked every connection object again and again.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """After start-up: everything built so far (modules, routes, the domain) is frozen out of the collector's
    walks for good, and collections run less often. Connections are long-lived objects too: fewer collections
    means they are walked less often, while short-lived cycles (a closed handler) are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def listening_url(sockets: Sequence[socket.socket]) -> str:
    address = sockets[0].getsockname()
    host = f"[{address[0]}]" if ":" in address[0] else address[0]  # an IPv6 address in a URL takes brackets
    return f"http://{host}:{address[1]}"


async def serve(
    config: Config, *, demo: bool, environ: dict[str, str], handoff: WorkerHandoff | None = None
) -> None:
    """Serve clients until SIGTERM: the whole server, or one worker of a supervisor's (`handoff`)."""
    loop = asyncio.get_running_loop()
    stop = StopSignal(loop)
    raise_descriptor_limit(config.max_connections)
    link = WorkerLink(handoff) if handoff is not None else None
    notifier = link.notifier if link is not None else systemd.Notifier.from_environ(environ)
    try:
        ctx = await build_context(config)
    except OSError as exc:
        raise Fatal(f"cannot prepare state in {config.state_path}: {exc}") from None
    if demo:
        await ensure_demo(ctx.service.store)
    await prepare_outbound(ctx.service.store, config)
    sockets = link.sockets if link is not None else adopt_sockets(environ) or bind(config)
    server = make_http_server(make_app(ctx), config)
    server.add_sockets(sockets)
    amqp = start_amqp(ctx.service, ctx.peers, config, ctx.metrics, ctx.readiness)
    url = listening_url(sockets)
    if link is not None:
        await link.start(ctx.peers, ctx.metrics, lambda: stop.trigger("supervisor gone"))
        log.info("%s (pid %d) serving %s", link.name, os.getpid(), url)
    else:
        log.info("listening on %s", url)
    tune_gc()

    heartbeat = systemd.Heartbeat(
        notifier,
        # A worker's status is one part of its supervisor's line, which names the address once.
        (lambda: connection_status(ctx)) if link is not None else (lambda: f"serving {url}: {connection_status(ctx)}"),
        systemd.watchdog_interval(environ, os.getpid()),
    )
    heartbeat.start(loop, "READY=1")  # with the first status line and watchdog ping
    await stop.wait()
    heartbeat.stop()
    log.info("%s: shutting down (%s)", stop.name, connection_status(ctx))
    notifier.stopping(f"stopping: {connection_status(ctx)}")
    await shut_down(ctx, server, amqp, config.shutdown_grace)
    if link is not None:
        await link.close()
    notifier.close()


async def supervise(config: Config, args: argparse.Namespace, environ: dict[str, str]) -> int:
    """Prepare the state once (the store's schema, the demo, the secret), bind or adopt the listening sockets,
    and run `workers` workers on them until SIGTERM (chatserver/supervisor.py)."""
    stop = StopSignal(asyncio.get_running_loop())
    raise_descriptor_limit(config.max_connections)
    store = open_store(config.database, pool_size=1)
    try:
        await store.start()
        if args.demo:
            await ensure_demo(store)
    finally:
        await store.close()
    try:
        if not config.secret:
            load_or_create_secret(config.state_path)
    except OSError as exc:
        raise Fatal(f"cannot prepare state in {config.state_path}: {exc}") from None
    sockets = adopt_sockets(environ) or bind(config)
    options = [arg for name in ("config", "db", "host", "port") if getattr(args, name, None) is not None
               for arg in (f"--{name}", str(getattr(args, name)))]
    supervisor = Supervisor(
        count=config.worker_count,
        command=lambda handoff: [sys.executable, os.path.abspath(__file__), *options, "--worker", handoff.to_arg()],
        sockets=sockets,
        notifier=systemd.Notifier.from_environ(environ),
        watchdog=systemd.watchdog_interval(environ, os.getpid()),
        grace=config.shutdown_grace,
        url=listening_url(sockets),
        environ=environ,
    )
    return await supervisor.run(stop)


async def shut_down(
    ctx: AppContext, server: tornado.httpserver.HTTPServer, amqp: Amqp | None, grace: float
) -> None:
    """PROTOCOL section 7, all within `grace` seconds: stop accepting, close WebSockets with 1001, answer parked
    polls with their cursor, finish the requests in flight and the listener's events in hand, close the store."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + grace
    ctx.shutting_down = True
    server.stop()
    # The listener stops taking broker messages now and finishes those in hand while the HTTP side drains.
    listener = loop.create_task(amqp.stop(grace)) if amqp is not None else None
    if not await finish_in_flight(ctx, deadline):
        log.warning("still open after the %.1fs grace: %s; closing them", grace, connection_status(ctx))
    try:
        if listener is not None:
            await asyncio.wait_for(listener, max(deadline - loop.time(), 0.1))
    except TimeoutError:
        log.warning("the Chat3 listener did not stop within the grace; exiting anyway")
    try:
        # What is left are idle kept-alive connections (and, past the grace, whatever did not finish).
        await asyncio.wait_for(server.close_all_connections(), max(deadline - loop.time(), 0.5))
    except TimeoutError:
        log.warning("connections did not close in time; exiting anyway")
    await close_context(ctx)
    log.info("stopped in %.2fs", loop.time() - started)


async def finish_in_flight(ctx: AppContext, deadline: float) -> bool:
    """Wait until no request is in flight and no real-time connection is open; False at the deadline.

    Every pass asks the open connections to end (a WebSocket closes with 1001, a parked poll answers at once,
    an SSE stream ends), so that one that arrived on a kept-alive connection meanwhile ends as well.
    """
    loop = asyncio.get_running_loop()
    while True:
        for connection in list(ctx.connections):
            connection.shutdown()
        if not ctx.connections and not ctx.requests:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(DRAIN_STEP)


def worker_handoff(args: argparse.Namespace) -> WorkerHandoff | None:
    if not getattr(args, "worker", None):
        return None
    try:
        return WorkerHandoff.parse(args.worker)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ) if environ is None else environ
    flags: dict[str, Any] = {"db": getattr(args, "db", None)}
    if args.command is None:
        flags.update(port=args.port, host=args.host, workers=args.workers)
    try:
        config = load_config(flags, environ, getattr(args, "config", None))
        handoff = worker_handoff(args)
        configure_logging(config, environ, f"worker {handoff.index}" if handoff is not None else "")
        if args.command is not None:
            return asyncio.run(run_command(args, config))
        if handoff is None and config.worker_count > 1:
            return asyncio.run(supervise(config, args, environ))
        asyncio.run(serve(config, demo=args.demo and handoff is None, environ=environ, handoff=handoff))
    except (ConfigError, Fatal, StoreError) as exc:
        print(f"chatserver: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except ChatError as exc:
        print(f"chatserver: {exc.message}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        # A database that opened but then fails (locked, read-only, corrupt past its header): still one line.
        print(f"chatserver: database error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
