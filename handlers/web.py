"""The chat page at `/` and its static files under `/static/` (PROTOCOL section 8).

It owns the security headers of everything the browser renders: a strict Content-Security-Policy (no inline
script or style, scripts only from this server, WebSocket and fetch only back to this server), no MIME sniffing,
no referrer, no framing. The files themselves live in `web/` (handlers.app.WEB_ROOT); nothing here reads the
store or needs a token: the page logs in over the REST API like any other client.
"""

from __future__ import annotations

import re
from typing import Any

import tornado.web

from chatserver.jsonutil import error_body
from handlers.base import implemented_methods
from transport import compat

# A Host header we are willing to echo into connect-src; anything else gets 'self' alone.
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def content_security_policy(host: str) -> str:
    """The page's policy. connect-src names this host's ws:/wss: explicitly: older browsers' 'self' omits them."""
    connect = "'self'"
    if _HOST.match(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


class WebFileHandler(tornado.web.StaticFileHandler):
    """A file of web/ (or index.html for `/`), with the page's security headers and revalidation on every load.

    `no-cache` rather than a max-age: the files carry no version in their names, and the ETag that
    StaticFileHandler sets makes each revalidation a 304 without a body.
    """

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", content_security_policy(self.request.host or ""))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")

    def parse_url_path(self, url_path: str) -> str:
        # A NUL byte makes the file system calls behind StaticFileHandler raise ValueError (a 500): no file has one.
        if "\x00" in url_path:
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Refusals (404, 403 outside web/, 405) are JSON like every other error of the server, not an HTML page.
        if status_code == 405:
            self.set_header("Allow", ", ".join(implemented_methods(type(self))))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(error_body(compat.status_reason(self)))

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def get_content_type(self) -> str:
        # JavaScript modules must be served as JavaScript whatever the machine's mimetypes table says.
        if self.absolute_path and self.absolute_path.endswith((".js", ".mjs")):
            return "text/javascript; charset=utf-8"
        if self.absolute_path and self.absolute_path.endswith(".html"):
            return "text/html; charset=utf-8"
        return super().get_content_type()
