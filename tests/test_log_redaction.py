"""No token in the log, whatever shape it arrives in: proven on a real server process's stderr over raw sockets.

A client may put its token where the server does not look for one (`Authorization: Token …`, `Bearer,…`, a
WebSocket subprotocol, a bad `Host`, a path, a cookie). The server refuses such requests, and its log lines
about them (Tornado's own warnings, the access log, transport/http1.py's "malformed HTTP request") must not
carry the token: redaction is by value (anything shaped like a token) and by field (auth-like headers), in the
one formatter every logger goes through.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatserver.auth import TokenSigner
from chatserver.redaction import redact
from tests.process import ROOT, ServerProcess


async def exchange(port: int, request: str) -> bytes:
    """Send one raw request (latin-1, control characters and all) and read the answer's status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


def assert_no_token(text: str, token: str) -> None:
    body, _, signature = token.partition(".")
    assert signature not in text, f"the token's signature is in the log:\n{text}"
    assert body not in text, f"the token's body is in the log:\n{text}"


WS = (
    "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
)


def get(path: str, *headers: str, host: str = "x") -> str:
    return "".join(f"{line}\r\n" for line in (f"GET {path} HTTP/1.1", f"Host: {host}", *headers)) + "\r\n"


def shapes(token: str) -> list[tuple[str, str, bytes]]:
    """(what, raw request, the status it is answered with) for each shape a token can hide in."""
    body, _, signature = token.partition(".")
    encoded = f"%{ord(body[0]):02X}{body[1:]}.{signature[:5]}%{ord(signature[5]):02x}{signature[6:]}"
    return [
        # transport/heads.py's parser ("chatserver.http: malformed HTTP request from ...: Invalid header value char")
        ("Token scheme", get("/api/me", f"Authorization: Token {token}\x00"), b"400"),
        ("Bearer,token", get("/api/me", f"Authorization: Bearer,{token}\x00"), b"400"),
        ("subprotocol", get("/api/me", f"Sec-WebSocket-Protocol: chat, {token}\x01"), b"400"),
        ("cookie", get("/api/me", f"Cookie: session={token}\x00"), b"400"),
        ("X-Auth", get("/api/me", f"X-Auth-Token: {token}\x7f"), b"400"),
        ("bad Host", get("/api/me", host=f"{token}/x"), b"400"),
        ("Host with a prefix", get("/api/me", host=f"evil.{token}/x"), b"400"),
        ("two Hosts", get("/api/me", f"Host: {token}"), b"400"),
        # The hand-over paths: the head is parsed by transport/heads.py before Tornado's own server reads it, so a
        # header value is refused here too; transport/http1.py's delegate on Tornado's connection refuses a Host
        # ("chatserver.http: ... Invalid Host")
        ("subprotocol to /ws", get("/ws", *WS, f"Sec-WebSocket-Protocol: {token}\x01"), b"400"),
        ("bad Host to /ws", get("/ws", *WS, host=f"{token}/x"), b"400"),
        ("bad Host to SSE", get("/api/events", host=f"{token}/x"), b"400"),
        # the access log: the token where no endpoint expects it, plain and percent-encoded
        ("path", get(f"/api/nothing/{token}", "Connection: close"), b"404"),
        ("other parameter", get(f"/api/nothing?t={token}", "Connection: close"), b"404"),
        ("encoded dot", get(f"/static/{body}%2E{signature}", "Connection: close"), b"404"),
        ("encoded letters", get(f"/api/nothing/{encoded}", "Connection: close"), b"404"),
        # answered 401 by the handlers, which do not read these shapes as tokens
        ("Token scheme, clean", get("/api/me", f"Authorization: Token {token}", "Connection: close"), b"401"),
        ("subprotocol, clean", get("/ws", *WS, f"Sec-WebSocket-Protocol: {token}", "Connection: close"), b"401"),
    ]


@pytest.mark.gen_test(timeout=60)
async def test_a_token_in_any_header_path_or_host_never_reaches_the_log(tmp_path: Path) -> None:
    async with await ServerProcess.start(tmp_path, "--demo") as server:
        token = await server.login()
        for what, request, status in shapes(token):
            answer = await exchange(server.port, request)
            assert answer.startswith(b"HTTP/1.1 " + status), (what, answer)
        server.signal(signal.SIGTERM)
        assert await server.exit_code(15) == 0
    log = server.stderr
    # The refusals were logged (so the test looked at real lines), from both HTTP layers ...
    assert log.count("chatserver.http: malformed HTTP request") >= 10, log
    assert "tornado.general: Malformed HTTP message" not in log, log  # Tornado reads no head the parser refused
    assert log.count("Invalid Host header") >= 4 and "404 GET /api/nothing/" in log, log
    # ... and none of them holds the token, or its signature alone.
    assert_no_token(log, token)


@pytest.mark.gen_test(timeout=30)
async def test_a_token_in_the_journal_format_is_redacted_too(tmp_path: Path) -> None:
    async with await ServerProcess.start(tmp_path, "--demo", journal=True) as server:
        token = await server.login()
        answer = await exchange(server.port, get("/api/me", f"Authorization: Token {token}\x00"))
        assert answer.startswith(b"HTTP/1.1 400")
        server.signal(signal.SIGTERM)
        assert await server.exit_code(15) == 0
    assert "<6>chatserver.http: malformed HTTP request" in server.stderr
    assert_no_token(server.stderr, token)


def test_every_logger_and_stray_traceback_goes_through_the_redacting_formatter(tmp_path: Path) -> None:
    # A real process set up as run.py sets itself up: whatever any library logs (Tornado, asyncio, pika, ours),
    # warnings and tracebacks included, leaves through the one formatter, redacted.
    token = TokenSigner("a secret", 3600).issue("usr_0123456789abcdef")
    script = textwrap.dedent(
        f"""
        import logging, threading, warnings
        import run
        from chatserver.config import load_config
        token = {token!r}
        run.configure_logging(load_config({{"state_dir": {str(tmp_path)!r}}}, {{}}), {{}})
        for name in ("tornado.general", "tornado.application", "tornado.access", "asyncio", "pika",
                     "pika.adapters.utils.io_services_utils", "chatserver", "chatserver.http", "some.library", ""):
            logging.getLogger(name).warning("from %s: Authorization: Token %s", name or "root", token)
        try:
            raise ValueError("bad header " + repr({{"Sec-WebSocket-Protocol": token}}))
        except ValueError:
            logging.getLogger("tornado.application").exception("Uncaught exception")
        warnings.warn("a warning naming " + token)
        thread = threading.Thread(target=lambda: int("x" + token))
        thread.start()
        thread.join()
        print("done", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    log = done.stderr
    for name in ("tornado.general", "tornado.application", "asyncio", "pika", "chatserver.http", "some.library"):
        assert f"from {name}: Authorization: [redacted]" in log, log
    assert "Uncaught exception" in log and "ValueError: bad header" in log, log
    assert "a warning naming" in log and "invalid literal for int()" in log, log
    assert all(line[:4].isdigit() for line in log.splitlines()), f"a line bypassed the formatter:\n{log}"
    assert_no_token(log, token)


def test_redact_by_value_and_by_field_but_not_what_merely_resembles() -> None:
    token = TokenSigner("a secret", 3600).issue("usr_0123456789abcdef")
    body, _, signature = token.partition(".")
    hidden = [
        f"Invalid header value 'Token {token}\\x00'",
        "Invalid header value 'whatever-it-is\\x00'",
        f"Invalid Host header: 'evil.{token}/x'",
        f"GET /api/x/{token}?a=1",
        f"GET /static/{body}%2e{signature}",
        f"GET /static/{body}%252E{signature}",
        f"just the signature .{signature} somewhere",
        "headers {'Authorization': 'Digest u=\"x\", response=\"secret\"', 'Host': 'x'}",
        "Proxy-Authorization: Basic dXNlcjpwYXNzd29yZA==",
        "X-Api-Key: sk_live_secret",
        "Cookie: sid=s3cr3t; other=1 | next part",
        "authorization: Bearer,abc.secret",
    ]
    for line in hidden:
        redacted = redact(line)
        assert "[redacted]" in redacted, line
        for secret in (signature, "secret", "s3cr3t", "dXNlcjpwYXNzd29yZA", "whatever-it-is"):
            assert secret not in redacted, (line, redacted)
    assert redact("Cookie: sid=s3cr3t; other=1 | next part").endswith(" | next part")
    kept = [
        "2026-01-01 10:00:00,123 INFO chatserver.access: 200 GET /api/poll?cursor=5e0c1a2b3c.42 (127.0.0.1) 1.2ms",
        "tests.test_hostile_input.test_a_token_in_a_header_tornado_refuses_is_not_logged failed",
        "File \"/usr/lib/python3.11/asyncio/events.py\", line 80, in _run",
        "the token expired",
        "Invalid Host header: 'example.com/x'",
    ]
    for line in kept:
        assert redact(line) == line
