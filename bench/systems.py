"""The systems under test, each started fresh as a child process on loopback and stopped after its run.

- `ours`: `python run.py --port P --db <tmp>` with a temp state folder, a known secret (the generator mints
  tokens with `TokenSigner`), and N users plus one dialog of all of them written through the store's own write
  path beforehand (`seed_store`: all users in one write, a dummy hash instead of scrypt; nobody logs in).
- `ours-pg`: the same on PostgreSQL, a database of its own made for the run and dropped after it (on
  `CHATSERVER_BENCH_POSTGRES`, default the machine's 127.0.0.1:5432 as user postgres). Skipped with a message
  where PostgreSQL is not reachable.
- `sio-tornado`, `sio-aiohttp`: `bench/peer_sio.py` (python-socketio 5).
- `nchan`: Debian's nginx with libnginx-mod-nchan, from a private nginx.conf in a temp folder, not daemonized,
  its own pid, log and temp paths. Skipped with a message where it is not installed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SECRET = "bench-secret-not-for-production"
NGINX = "/usr/sbin/nginx"
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
POSTGRES = os.environ.get("CHATSERVER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def raise_nofile() -> None:
    """preexec_fn of every server: as many open files as the hard limit allows."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server not listening on {port} after {limit:.0f}s")


def seed_store(db: str, users: int) -> dict[str, Any]:
    """`users` users and a publisher in one dialog of all of them, on the store `db` (made and migrated here)."""
    return asyncio.run(_seed(db, users))


async def _insert_users(tx: Any, rows: list[tuple[str, str, str, str, str]]) -> None:
    for row in rows:
        await tx.execute(
            "INSERT INTO users (user_id, phone, name, password_hash, created_at) VALUES (?, ?, ?, ?, ?)", *row
        )


async def _seed(db: str, users: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from chatserver import queries
    from chatserver.auth import DUMMY_HASH
    from chatserver.backends import open_store
    from chatserver.models import Dialog, new_id, now_iso

    store = open_store(db)
    await store.start()
    try:
        user_ids = [new_id("usr") for _ in range(users)]
        publisher = new_id("usr")
        stamp = now_iso()
        # One write for every user (scrypt and a commit per user would take minutes for 10,000).
        rows = [(uid, f"7{n:010d}", f"bench {n}", DUMMY_HASH, stamp) for n, uid in enumerate([*user_ids, publisher])]
        await store.write(_insert_users, rows)
        dialog = Dialog(new_id("dlg"), "bench", (publisher, *user_ids), stamp, stamp)
        await store.write(queries.save_dialog, dialog)
    finally:
        await store.close()
    return {"users": user_ids, "publisher": publisher, "dialog": dialog.dialog_id, "secret": SECRET}


def postgres(sql: str, url: str = POSTGRES) -> Any:
    """Run one statement on PostgreSQL (the maintenance database unless `url`), returning its rows."""
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def postgres_url(name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(POSTGRES)._replace(path="/" + name))


class System:
    name = ""
    kind = ""  # the generator's Target: ours, sio, nchan
    root = ROOT  # the checkout the server runs from

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.tmp / "server.log"

    @staticmethod
    def available() -> str | None:
        """None when the system can run here, else why not."""
        return None

    def prepare(self, users: int) -> dict[str, Any]:
        """Whatever the generator needs to know beyond the address (users, tokens' secret)."""
        return {}

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=raise_nofile,
            )
        wait_listening(self.port, self.proc, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Ours(System):
    name = "ours"
    kind = "ours"

    def __init__(self, db: str | None = None) -> None:
        """A server on its own new database, or (`db`) on one that another server of the run shares."""
        super().__init__()
        self.state = self.tmp / "state"
        self.shared = db is not None
        self.db = db if db is not None else str(self.state / "bench.db")

    def prepare(self, users: int) -> dict[str, Any]:
        return seed_store(self.db, users)

    def command(self) -> list[str]:
        return [sys.executable, str(self.root / "run.py"), "--port", str(self.port), "--db", self.db]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CHATSERVER_STATE_DIR=str(self.state),
            CHATSERVER_SECRET=SECRET,
            # Access lines per poll would be a figure of the logging setup, not of the server (nginx: off).
            CHATSERVER_LOG_LEVEL="warning",
            CHATSERVER_HISTORY_SIZE="50000",
            CHATSERVER_SHUTDOWN_GRACE="3",
            # One publisher posts the whole workload: no per-user message rate.
            CHATSERVER_MESSAGE_RATE="0",
            # The idle run holds 5,000 WebSockets and 5,000 polls besides its publisher (default limit 10,000).
            CHATSERVER_MAX_CONNECTIONS="19950",
        )
        return env


class OursPostgres(Ours):
    name = "ours-pg"

    def __init__(self, db: str | None = None) -> None:
        self.database_name = "" if db is not None else f"chatserver_bench_{uuid.uuid4().hex[:12]}"
        super().__init__(db if db is not None else postgres_url(self.database_name))

    @staticmethod
    def available() -> str | None:
        try:
            postgres("SELECT 1")
        except Exception as exc:
            return f"PostgreSQL not reachable at {POSTGRES} ({type(exc).__name__}; set CHATSERVER_BENCH_POSTGRES)"
        return None

    def prepare(self, users: int) -> dict[str, Any]:
        if self.database_name:
            postgres(f'CREATE DATABASE "{self.database_name}"')
        return super().prepare(users)

    def cleanup(self) -> None:
        super().cleanup()
        if self.database_name:
            postgres(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')


class SocketIOPeer(System):
    kind = "sio"
    mode = ""

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH / "peer_sio.py"), self.mode, str(self.port)]

    @staticmethod
    def available() -> str | None:
        try:
            import aiohttp  # noqa: F401
            import socketio  # noqa: F401
        except ImportError:
            return "python-socketio/aiohttp not installed: pip install -r bench/requirements.txt"
        return None


class SocketIOTornado(SocketIOPeer):
    name = "sio-tornado"
    mode = "tornado"


class SocketIOAiohttp(SocketIOPeer):
    name = "sio-aiohttp"
    mode = "aiohttp"


NGINX_CONF = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    # nginx closes a keep-alive connection after 1,000 requests by default: the publisher's must stay up.
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    nchan_max_reserved_memory 256M;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/pub/(\\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 50000;
            nchan_message_timeout 1h;
        }}
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}
    }}
}}
"""


class Nchan(System):
    name = "nchan"
    kind = "nchan"

    @staticmethod
    def available() -> str | None:
        if not os.path.exists(NGINX) or not os.path.exists(NCHAN_MODULE):
            return "nginx + Nchan not installed: apt-get install nginx libnginx-mod-nchan"
        return None

    def command(self) -> list[str]:
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(module=NCHAN_MODULE, tmp=self.tmp, port=self.port))
        user = "" if os.geteuid() else "user root;\n"
        if user and not conf.read_text().startswith("user"):
            conf.write_text(user + conf.read_text())
        return [NGINX, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")]


SYSTEMS: dict[str, type[System]] = {
    "ours": Ours,
    "ours-pg": OursPostgres,
    "nchan": Nchan,
    "sio-aiohttp": SocketIOAiohttp,
    "sio-tornado": SocketIOTornado,
}
