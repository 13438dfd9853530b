"""Shared fixtures: a real server on a real port over a real store, and small clients for it.

`app` builds the server exactly as run.py does (run.build_context, handlers.app.make_app), with a fresh state
folder per test, on each store (`store_kind`): a real SQLite file, and a real PostgreSQL database made for the
test and dropped after it (on 127.0.0.1:5432 as user postgres, or `CHATSERVER_TEST_POSTGRES`). A module whose
tests do not touch the store or the real-time path overrides `store_kind` with SQLite alone. The `http_server`
fixture of pytest-tornado is replaced so that the listener carries the same limits as production
(`make_http_server`), on each HTTP engine (`http_engine`), the Tornado one on SQLite only. Helpers here wait
with bounds: a lost event fails a test, never hangs it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import requests
import tornado.httpclient
import tornado.httpserver
import tornado.websocket

from chatserver import jsonutil
from chatserver.admin import DEMO_PASSWORD, add_dialog, add_user, ensure_demo
from chatserver.backends import open_store
from chatserver.config import HTTP_ENGINES, Config, load_config
from handlers.app import make_app
from handlers.base import AppContext
from run import build_context, close_context, make_http_server
from tests import pg
from tests.process import ThreadedServer

ALICE_PHONE, BOB_PHONE, CAROL_PHONE = "79111111111", "79777777777", "79000000000"
PASSWORD = "demo-password"

# Tests park many long-polls at once through the loop's shared HTTP client: at its default of 10 connections the
# rest (and a scrape of /metrics behind them) would wait in its queue, never reaching the server.
tornado.httpclient.AsyncHTTPClient.configure(None, max_clients=100)
RECEIPT = "dialog:receipt"


@pytest.fixture
def settings() -> dict[str, Any]:
    """Per-test overrides of the Config; a test may change it before `config` is built."""
    return {}


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: Any) -> str:
    """Which store the test's server runs on: every test that touches the store runs on both."""
    return str(request.param)


@pytest.fixture(params=HTTP_ENGINES)
def http_engine(request: Any) -> str:
    """Which engine reads the test's HTTP requests (the `http_engine` setting): every test over HTTP runs on both,
    so that the suite is the differential test of the lean engine against Tornado's own. The Tornado engine runs
    on SQLite only (see pytest_collection_modifyitems): engines and stores are not crossed."""
    return str(request.param)


# The modules whose tests restart RabbitMQ (`rabbitmqctl stop_app`), or talk to it throughout.
BROKER_MODULES = frozenset(("test_chat3", "test_outbound", "test_soak"))
# Modules whose last test checks what the ones before it did to their shared server: one process, in order.
IN_ORDER_MODULES = frozenset(("test_openapi_fuzz",))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    crossed = [item for item in items if _params(item).get("http_engine") == "tornado"
               and _params(item).get("store_kind", "sqlite") != "sqlite"]
    if crossed:
        config.hook.pytest_deselected(items=crossed)
        items[:] = [item for item in items if item not in set(crossed)]
    # Under pytest-xdist (`--dist loadgroup`) every test that uses the broker runs in one process, one after the
    # other: a test that restarts the broker would otherwise cut off another's connection to it.
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in BROKER_MODULES or "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(name="broker"))
        elif module in IN_ORDER_MODULES:
            item.add_marker(pytest.mark.xdist_group(name=module))


def _params(item: pytest.Item) -> dict[str, Any]:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


@pytest.fixture(autouse=True, scope="session")
def _one_scrypt_per_password() -> Iterator[None]:
    """Users made by the tests in-process share one real scrypt hash per password: a hash costs about 90 ms, and
    most tests make three users. Logins still check the password with scrypt; servers in processes of their own
    hash as they always do."""
    import chatserver.admin

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chatserver.admin, "hash_password", functools.cache(chatserver.admin.hash_password))
        yield


@pytest.fixture
def database(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The `db` setting of the test's server: a SQLite file, or a PostgreSQL database of its own."""
    if store_kind == "sqlite":
        yield str(tmp_path / "state" / "chatserver.db")
        return
    require_service("PostgreSQL", pg.reachable())
    spares = request.getfixturevalue("_pg_spares")
    name = spares.take()
    try:
        yield pg.url(name)
    finally:
        spares.give_back(name)


@pytest.fixture(scope="session")
def _pg_spares() -> Iterator[pg.Spares]:
    spares = pg.Spares("chatserver_test_")
    yield spares
    spares.close()


@pytest.fixture
def config(tmp_path: Path, settings: dict[str, Any], database: str) -> Config:
    flags = {"state_dir": str(tmp_path / "state"), "port": 0, "ws_ping_interval": 5.0, "db": database, **settings}
    return load_config(flags, {})


@pytest.fixture
def ctx(config: Config, io_loop: Any) -> Iterator[AppContext]:
    context = io_loop.run_sync(lambda: build_context(config))
    yield context
    io_loop.run_sync(lambda: close_context(context))


@pytest.fixture
def seed(ctx: AppContext, io_loop: Any) -> dict[str, Any]:
    """Alice and Bob in the dialog "Demo"; Carol in no dialog."""
    store = ctx.service.store

    async def make() -> dict[str, Any]:
        return {
            "alice": await add_user(store, ALICE_PHONE, "Alice", PASSWORD),
            "bob": await add_user(store, BOB_PHONE, "Bob", PASSWORD),
            "carol": await add_user(store, CAROL_PHONE, "Carol", PASSWORD),
            "dialog": await add_dialog(store, "Demo", [ALICE_PHONE, BOB_PHONE]),
        }

    return io_loop.run_sync(make)  # type: ignore[no-any-return]


@pytest.fixture
def app(ctx: AppContext) -> Any:
    return make_app(ctx)


@pytest.fixture
def http_server(request: Any, io_loop: Any, _unused_port: Any, app: Any, config: Config, http_engine: str
                ) -> Iterator[Any]:
    server: tornado.httpserver.HTTPServer = make_http_server(app, attrs.evolve(config, http_engine=http_engine))
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


class Client:
    """A user's view of the server: REST calls with its token, and its real-time connections."""

    def __init__(self, base_url: str, ctx: AppContext, user_id: str, *, token: str | None = None) -> None:
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://")
        self.ctx = ctx
        self.user_id = user_id
        self.token = token or ctx.service.tokens.issue(user_id)
        self.http = tornado.httpclient.AsyncHTTPClient()
        self.sockets: list[Socket] = []

    def close(self) -> None:
        """Close every WebSocket this client opened (an unclosed one warns when collected)."""
        for sock in self.sockets:
            sock.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, Any]:
        all_headers = {"Authorization": f"Bearer {token or self.token}"} if token != "" else {}
        all_headers.update(headers or {})
        data = raw if raw is not None else (jsonutil.dumps_bytes(body) if body is not None else None)
        if data is None and method in ("POST", "PATCH", "PUT"):
            data = b""
        response = await self.http.fetch(
            self.base_url + path,
            method=method,
            body=data,
            headers=all_headers,
            raise_error=False,
            request_timeout=timeout,
        )
        parsed = jsonutil.loads(response.body) if response.body else None
        return response.code, parsed

    async def post_message(self, dialog_id: str, content: str, **extra: Any) -> dict[str, Any]:
        status, body = await self.call("POST", f"/api/messages/dialog/{dialog_id}", {"content": content, **extra})
        assert status == 201, body
        return body["data"]

    async def websocket(self, cursor: str | None = None, **headers: str) -> Socket:
        url = f"{self.ws_url}/ws?token={self.token}" + (f"&cursor={cursor}" if cursor else "")
        request = tornado.httpclient.HTTPRequest(url, headers=headers or None)
        conn = await tornado.websocket.websocket_connect(request)
        socket = Socket(conn)
        self.sockets.append(socket)
        socket.ready = await socket.next()
        assert socket.ready["type"] == "ready", socket.ready
        return socket

    async def poll(self, cursor: str | None = None, **params: str) -> tuple[int, Any]:
        query = "&".join(f"{k}={v}" for k, v in {"cursor": cursor, **params}.items() if v is not None)
        return await self.call("GET", f"/api/poll?{query}", timeout=70)


class Socket:
    """A WebSocket client that reads frames with a bound on every wait.

    `next` and `nothing_within` pass over `dialog:receipt` frames (PROTOCOL section 11: any poll or resume may
    cause one, a second later) unless a test asks for them by type with `next_of`.
    """

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.ready: dict[str, Any] = {}

    async def _read(self, timeout: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        assert raw is not None, f"the socket closed ({self.conn.close_code} {self.conn.close_reason})"
        return jsonutil.loads(raw)

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self._read(max(0.0, deadline - asyncio.get_running_loop().time()))
            if frame.get("type") != RECEIPT:
                return frame

    async def next_of(self, *types: str, timeout: float = 5) -> dict[str, Any]:
        """The next frame of one of these types, skipping others (pong, typing, receipts)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self._read(max(0.0, deadline - asyncio.get_running_loop().time()))
            if frame["type"] in types:
                return frame

    async def nothing_within(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            try:
                raw = await asyncio.wait_for(self.conn.read_message(),
                                             max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                return
            frame = jsonutil.loads(raw) if raw is not None else None
            if frame is None or frame.get("type") != RECEIPT:
                raise AssertionError(f"expected no frame, got {raw!r}")

    def send(self, frame: dict[str, Any]) -> None:
        self.conn.write_message(jsonutil.dumps(frame))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def alice(base_url: str, ctx: AppContext, seed: dict[str, Any], http_server: Any) -> Iterator[Client]:
    client = Client(base_url, ctx, seed["alice"].user_id)
    yield client
    client.close()


@pytest.fixture
def bob(base_url: str, ctx: AppContext, seed: dict[str, Any], http_server: Any) -> Iterator[Client]:
    client = Client(base_url, ctx, seed["bob"].user_id)
    yield client
    client.close()


@pytest.fixture
def carol(base_url: str, ctx: AppContext, seed: dict[str, Any], http_server: Any) -> Iterator[Client]:
    client = Client(base_url, ctx, seed["carol"].user_id)
    yield client
    client.close()


@pytest.fixture
def dialog_id(seed: dict[str, Any]) -> str:
    return str(seed["dialog"].dialog_id)


@attrs.frozen
class Live:
    """A server process on a real port, for synchronous clients (schemathesis, Hypothesis): the demo users Alice
    (whose `token` this is) and Bob in the dialog "Demo" with one message of Alice's, and Carol in no dialog."""

    server: ThreadedServer
    token: str
    dialog_id: str
    message_id: str

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        """A call that must succeed: its `data`."""
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        response = requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        assert response.status_code in (200, 201), (response.status_code, response.text)
        return response.json()["data"]


@pytest.fixture(scope="module", params=HTTP_ENGINES)
def live(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live")

    async def seed() -> None:
        store = open_store(str(tmp / "state" / "chatserver.db"))  # where ServerProcess's state folder keeps it
        await store.start()
        try:
            await ensure_demo(store)
            await add_user(store, CAROL_PHONE, "Carol", DEMO_PASSWORD)
        finally:
            await store.close()

    asyncio.run(seed())
    server = ThreadedServer(tmp, env={"CHATSERVER_HTTP_ENGINE": request.param})
    try:
        login = requests.post(server.url + "/api/auth/login", json={"phone": ALICE_PHONE, "password": DEMO_PASSWORD},
                              timeout=10)
        assert login.status_code == 200, login.text
        seeded = Live(server, login.json()["data"]["token"], "", "")
        dialog_id = seeded.call("GET", "/api/dialogs")[0]["dialogId"]
        message = seeded.call("POST", f"/api/messages/dialog/{dialog_id}", json={"content": "seed"})
        yield attrs.evolve(seeded, dialog_id=dialog_id, message_id=message["messageId"])
    finally:
        server.close()


def require_service(name: str, reachable: bool) -> None:
    """Skip where a service is missing on a developer's machine; fail under CI, where it must be there."""
    if reachable:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not reachable, and CI must provide it")
    pytest.skip(f"{name} is not reachable on this machine")
