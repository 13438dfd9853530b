"""The transport: how bytes reach the application and leave it, apart from what they mean.

What it owns: the HTTP/1.1 connection layer (`http1`: accepting, framing with httptools, keep-alive, bounds,
hand-over of upgrades and streams to Tornado's own server), the long-poll contract and its lean path (`poll`,
`fastpoll`), a connection's bounded outbox and the batching of frames per turn of the loop (`outbox`), the
keep-alive sweeps of WebSockets and SSE streams (`pings`), the reading of a client's WebSocket frames
(`wsframes`), the access line (`access`), and every use of a name Tornado keeps private (`compat`, guarded by
a version check and tests/test_compat.py).

What it never does: decide a domain rule (who may read what, what an event is), or import from handlers/. What
both this package and handlers/ need (the error envelope, log redaction) lives below both, in chatserver/.
"""
