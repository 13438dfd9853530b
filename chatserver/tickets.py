"""Stream tickets (PROTOCOL section 12): short-lived, single-use credentials for the URLs of `/ws` and `/api/events`.

A browser cannot put a header on a WebSocket or an EventSource, so whatever authenticates them travels in the URL,
where proxies and servers log it. A ticket is what goes there instead of the 7-day token: it names the user it was
issued to, expires `TICKET_TTL` seconds after issue, and is accepted once.

A ticket is `<base64url(userId.expiresAt.nonce)>.<base64url(HMAC-SHA256)>`, signed with a key derived from the
server's secret (another derivation than the tokens', so neither passes for the other). It is checked without the
store and without memory shared between processes: every process with the same secret accepts a ticket that any of
them issued. Single use is enforced by the process that redeems it, which remembers the nonces it has accepted until
they expire (bounded by `max_redeemed`; at that bound it refuses new redemptions rather than forget a nonce that is
still valid). docs/protocol.md states what that means with several processes (a **decision** there).

Owns: issuing and redeeming tickets. Never: HTTP, the store, logging a ticket.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from chatserver.auth import b64url, unb64url
from chatserver.errors import Unauthorized
from chatserver.numbers import is_ascii_decimal

TICKET_TTL = 30
# Characters a ticket may hold (base64url and the dot): anything else is refused before any decoding.
_TICKET_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_TICKET_LENGTH = 512


class StreamTickets:
    """Issues and redeems stream tickets; `clock` is wall-clock seconds (tickets cross processes)."""

    def __init__(
        self,
        secret: str,
        *,
        ttl: int = TICKET_TTL,
        clock: Callable[[], float] = time.time,
        max_redeemed: int = 100_000,
    ) -> None:
        self._key = hashlib.sha256(b"chatserver-stream-ticket:" + secret.encode("utf-8")).digest()
        self.ttl = ttl
        self._clock = clock
        self._max_redeemed = max_redeemed
        # Nonces accepted here and not yet expired, oldest redemption first: nonce -> expiry.
        self._redeemed: OrderedDict[str, int] = OrderedDict()

    def issue(self, user_id: str) -> str:
        nonce = secrets.token_urlsafe(12)
        body = b64url(f"{user_id}.{int(self._clock()) + self.ttl}.{nonce}".encode())
        return f"{body}.{self._sign(body)}"

    def redeem(self, ticket: str) -> str:
        """The user the ticket was issued to, once; Unauthorized if it is unknown, expired or used."""
        if not ticket or len(ticket) > _MAX_TICKET_LENGTH or not _TICKET_ALPHABET.issuperset(ticket):
            raise Unauthorized("invalid stream ticket")
        body, dot, signature = ticket.partition(".")
        if not dot or not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            raise Unauthorized("invalid stream ticket")
        try:
            user_id, expiry, nonce = unb64url(body).decode("utf-8").rsplit(".", 2)
        except ValueError:
            raise Unauthorized("invalid stream ticket") from None
        if not is_ascii_decimal(expiry):
            raise Unauthorized("invalid stream ticket")
        now = self._clock()
        expires_at = int(expiry)
        if expires_at <= now:
            raise Unauthorized("stream ticket expired: ask for a new one")
        self._forget_expired(now)
        if nonce in self._redeemed:
            raise Unauthorized("stream ticket already used: ask for a new one")
        if len(self._redeemed) >= self._max_redeemed:
            raise Unauthorized("too many stream tickets redeemed just now: ask for a new one")
        self._redeemed[nonce] = expires_at
        return user_id

    @property
    def remembered(self) -> int:
        """How many redeemed nonces are held (they are dropped as they expire)."""
        return len(self._redeemed)

    def _forget_expired(self, now: float) -> None:
        # Every ticket lives `ttl` seconds, so redemption order is close to expiry order: dropping from the front
        # while the front has expired keeps each nonce at most `ttl` seconds past its expiry.
        redeemed = self._redeemed
        while redeemed:
            nonce, expires_at = next(iter(redeemed.items()))
            if expires_at > now:
                break
            del redeemed[nonce]

    def _sign(self, body: str) -> str:
        return b64url(hmac.new(self._key, body.encode("ascii", "replace"), hashlib.sha256).digest())

