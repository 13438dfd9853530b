"""A peer for the benchmark: python-socketio 5 on Tornado or on aiohttp, with the same publish path as ours.

    python bench/peer_sio.py tornado|aiohttp PORT

Every client that connects joins one room; `POST /publish` with a JSON body emits it to that room as the
event "message" (socket.io encodes it once per emit). This is what a user would build instead of chatserver
with python-socketio: no auth, no history, no cursor, which makes it a lower bound on what those cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
from typing import Any

import socketio

ROOM = "all"


def make_sio(mode: str) -> socketio.AsyncServer:
    sio = socketio.AsyncServer(async_mode=mode, cors_allowed_origins="*", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        await sio.enter_room(sid, ROOM)

    return sio


def serve_tornado(port: int) -> None:
    import tornado.web

    sio = make_sio("tornado")

    class Publish(tornado.web.RequestHandler):
        async def post(self) -> None:
            await sio.emit("message", json.loads(self.request.body), room=ROOM)
            self.set_status(202)
            self.finish(b'{"ok":true}')

    app = tornado.web.Application(
        [(r"/socket.io/", socketio.get_tornado_handler(sio)), (r"/publish", Publish)], log_function=lambda h: None
    )

    async def main() -> None:
        app.listen(port, "127.0.0.1", backlog=4096)
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    sio = make_sio("aiohttp")
    app = web.Application()
    sio.attach(app)

    async def publish(request: web.Request) -> web.Response:
        await sio.emit("message", json.loads(await request.read()), room=ROOM)
        return web.Response(status=202, body=b'{"ok":true}', content_type="application/json")

    app.router.add_post("/publish", publish)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING)
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "tornado":
        serve_tornado(port)
    elif mode == "aiohttp":
        serve_aiohttp(port)
    else:
        sys.exit(f"unknown mode {mode!r}: tornado or aiohttp")


if __name__ == "__main__":
    main()
