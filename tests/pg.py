"""PostgreSQL for the tests: a database of its own per test (or per server process group), made and dropped here.

The server is the machine's PostgreSQL 15 (127.0.0.1:5432, trust auth, user postgres), or the one named by
`CHATSERVER_TEST_POSTGRES` (a URL of its maintenance database). Databases are made with the cluster's defaults
(its locale included: the schema must not depend on it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import os
import socket
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ADMIN_URL = os.environ.get("CHATSERVER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@functools.cache
def reachable() -> bool:
    parts = urlsplit(ADMIN_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2):
            pass
    except OSError:
        return False
    try:
        _run(lambda conn: conn.fetchval("SELECT 1"))
    except Exception:
        return False
    return True


def url(name: str) -> str:
    """The URL of database `name` on the test server."""
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))


def create_database(name: str) -> None:
    _run(lambda conn: conn.execute(f'CREATE DATABASE "{name}"'))


def drop_database(name: str) -> None:
    _run(lambda conn: conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Databases being made, or made and not yet taken, at any time (and threads making and dropping them).
AHEAD = 2


class Spares:
    """Databases made ahead and dropped behind, in threads of their own, while the tests run: PostgreSQL takes
    about 0.2 s to make one (it copies its template) and 0.1 s to drop one, time in which a test's own work goes
    on. `close()` drops what is left at the end of the session."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=AHEAD, thread_name_prefix="pg-spares")
        self._ahead: collections.deque[concurrent.futures.Future[str]] = collections.deque()
        self._lock = threading.Lock()

    def _make(self) -> str:
        name = f"{self._prefix}{uuid.uuid4().hex[:12]}"
        create_database(name)
        return name

    def take(self) -> str:
        """A new, empty database of its own (made earlier, or now); the next one is started at once."""
        with self._lock:
            while len(self._ahead) < AHEAD + 1:
                self._ahead.append(self._pool.submit(self._make))
            made = self._ahead.popleft()
        return made.result(timeout=60)

    def give_back(self, name: str) -> None:
        """Drop `name` once the thread is free (a test's teardown does not wait for it)."""
        self._pool.submit(drop_database, name)

    def close(self) -> None:
        with self._lock:
            for made in self._ahead:
                with contextlib.suppress(Exception):
                    self._pool.submit(drop_database, made.result(timeout=60))
            self._ahead.clear()
        self._pool.shutdown(wait=True)


def execute(name: str, sql: str, *args: Any) -> Any:
    """Run one statement on database `name` (a test's look behind the server's back), returning its rows."""
    return _run(lambda conn: conn.fetch(sql, *args), url(name))


def _run(action: Any, target: str = ADMIN_URL) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(target, timeout=5)
        try:
            return await action(conn)
        finally:
            await conn.close()

    # A loop of its own, in a thread of its own: callers may be inside a running loop (a test's).
    result: list[Any] = []
    error: list[BaseException] = []

    def target_thread() -> None:
        try:
            result.append(asyncio.run(run()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target_thread)
    thread.start()
    thread.join(30)
    if error:
        raise error[0]
    return result[0] if result else None
