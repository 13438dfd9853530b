"""chatserver's entry point: wiring only.

    python run.py [--demo] [--host H] [--port N] [--db PATH] [--config FILE]
    python run.py users add --phone P --name N --password W [--db PATH] [--config FILE]
    python run.py dialogs add --title T --member PHONE --member PHONE ... [--db PATH] [--config FILE]

config -> store -> broadcaster -> service -> app -> listen; signals. Every failure the operator can cause
(a bad setting, a taken port, an unreadable database) is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

import tornado.netutil

from chatserver import jsonutil
from chatserver.admin import add_dialog, add_user, ensure_demo
from chatserver.chat3 import start_amqp
from chatserver.config import Config, ConfigError, load_config
from chatserver.errors import ChatError
from chatserver.store import SQLiteStore, StoreError
from handlers.app import build_context, make_app, make_http_server

log = logging.getLogger("chatserver")

class Fatal(Exception):
    """An error the operator must fix; printed as one line, exit code 1."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own (absent) --db must not overwrite one given before the subcommand.
    common.add_argument("--db", default=argparse.SUPPRESS, help="SQLite file (default <state_dir>/chatserver.db)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (see conf/chatserver.toml)")
    parser = argparse.ArgumentParser(prog="run.py", description="chatserver: real-time chat gateway",
                                     parents=[common])
    parser.add_argument("--demo", action="store_true", help="create the demo users and dialog if missing")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    # Parsed with the other settings, so that a bad value is the same one-line ConfigError.
    parser.add_argument("--port", help="port to listen on (default 8888)")
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
    return parser.parse_args(argv)


def configure_logging(config: Config, environ: dict[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("JOURNAL_STREAM"):
        # journald adds its own timestamps; <N> is the syslog priority it understands.
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # Tornado's own access log prints query strings (tokens): ours (handlers.base.log_request) replaces it.
    logging.getLogger("tornado.access").disabled = True


_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{text}"


# -- commands -------------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config)
    try:
        if args.command == "users":
            user = add_user(store, args.phone, args.name, args.password)
            print(jsonutil.dumps(user.to_json()))
        else:
            dialog = add_dialog(store, args.title, args.member)
            print(jsonutil.dumps(dialog.to_json(last_message=None, unread_count=0)))
    finally:
        store.close()
    return 0


def open_store(config: Config) -> SQLiteStore:
    try:
        return SQLiteStore(config.db_path)
    except StoreError as exc:
        raise Fatal(str(exc)) from None


# -- serving --------------------------------------------------------------------------------------------


def bind(config: Config) -> list[socket.socket]:
    try:
        return tornado.netutil.bind_sockets(config.port, config.host, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Fatal(f"port {config.port} on {config.host} is already in use") from None
        raise Fatal(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


async def serve(config: Config, *, demo: bool) -> None:
    store = open_store(config)
    if demo:
        ensure_demo(store)
    try:
        ctx = build_context(config, store=store)
    except (OSError, StoreError) as exc:
        raise Fatal(f"cannot prepare state in {config.resolved_state_dir}: {exc}") from None
    sockets = bind(config)
    server = make_http_server(make_app(ctx), config)
    server.add_sockets(sockets)
    amqp = start_amqp(ctx.service, config, ctx.metrics, ctx.readiness)
    address = sockets[0].getsockname()
    log.info("listening on http://%s:%d", address[0], address[1])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    ctx.shutting_down = True
    server.stop()
    for connection in list(ctx.connections):
        connection.shutdown()
    try:
        await asyncio.wait_for(server.close_all_connections(), config.shutdown_grace)
    except TimeoutError:
        log.warning("connections still open after %.1fs; exiting anyway", config.shutdown_grace)
    if amqp is not None:
        await amqp.stop(min(5.0, config.shutdown_grace))
    ctx.service.db.close()


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ) if environ is None else environ
    flags: dict[str, Any] = {"db": getattr(args, "db", None)}
    if args.command is None:
        flags.update(port=args.port, host=args.host)
    try:
        config = load_config(flags, environ, getattr(args, "config", None))
        configure_logging(config, environ)
        if args.command is not None:
            return run_command(args, config)
        asyncio.run(serve(config, demo=args.demo))
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
