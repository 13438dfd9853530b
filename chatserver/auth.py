"""Credentials: scrypt password hashes, signed expiring tokens, and the secret that signs them.

Tokens are `<base64url(userId.expiry)>.<base64url(HMAC-SHA256)>`: stateless, checked without the store, and
never logged by anyone. Hashing is CPU-heavy: callers run it off the IOLoop (`AsyncStore.offload`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from chatserver.errors import Unauthorized
from chatserver.lru import LRU

# scrypt with N=2**14, r=8 needs 16 MiB per hash: memory-hard, about 50 ms here.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64url(salt)}${b64url(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(password.encode("utf-8"), salt=unb64url(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(actual, unb64url(digest))


# What a token looks like, for whoever must find one in text it did not parse (log redaction): a base64url body, a
# dot, and the signature: 43 base64url characters (HMAC-SHA256) with letters of both cases in them (32 random bytes
# lack either with odds of one in billions; a long dotted name in a traceback has one case). The signature alone is
# the secret (the body can be guessed), so a signature is found with its body or without, and also where it runs
# on past its 43 characters.
_SIGNATURE_SHAPE = re.compile(r"\.(?=[A-Za-z0-9_-]*[a-z])(?=[A-Za-z0-9_-]*[A-Z])[A-Za-z0-9_-]{43,}")
_BASE64URL = frozenset(string.ascii_letters + string.digits + "-_")


def token_spans(text: str) -> Iterator[tuple[int, int]]:
    """The (start, end) of everything in `text` shaped like a token: its signature, and the body before it."""
    end = 0
    while (found := _SIGNATURE_SHAPE.search(text, end)) is not None:
        start = found.start()
        while start > end and text[start - 1] in _BASE64URL:
            start -= 1
        end = found.end()
        yield start, end


# A hash of nothing in particular, checked when the phone is unknown so that both paths cost the same.
DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


class TokenSigner:
    """Issues and checks bearer tokens signed with the server's secret."""

    def __init__(
        self, secret: str, ttl: int, clock: Callable[[], float] = time.time, *, cache_size: int = 10000
    ) -> None:
        self._key = hashlib.sha256(b"chatserver-token:" + secret.encode("utf-8")).digest()
        self._ttl = ttl
        self._clock = clock
        # Tokens verify_cached has accepted (their signature checked once), with their user and expiry.
        self._verified: LRU[str, tuple[str, int]] = LRU(cache_size)

    def issue(self, user_id: str) -> str:
        body = b64url(f"{user_id}.{int(self._clock()) + self._ttl}".encode())
        return f"{body}.{self._sign(body)}"

    def verify(self, token: str) -> str:
        """The user id the token was issued to; Unauthorized if it is forged, malformed or expired."""
        user_id, expires_at = self._check(token)
        if expires_at <= self._clock():
            raise Unauthorized("token expired")
        return user_id

    def verify_cached(self, token: str) -> str:
        """`verify` for a token that comes back every few seconds (a long-poller's): its signature is checked
        once and remembered in a bounded LRU keyed by the token; its expiry is checked on every call. Only
        tokens that verified are remembered."""
        known = self._verified.get(token)
        if known is None:
            known = self._check(token)
            self._verified.put(token, known)
        user_id, expires_at = known
        if expires_at <= self._clock():
            raise Unauthorized("token expired")
        return user_id

    def _check(self, token: str) -> tuple[str, int]:
        """The user id and expiry of a token signed with this secret; Unauthorized if forged or malformed."""
        body, dot, signature = token.partition(".")
        if not dot or not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            raise Unauthorized("invalid token")
        try:
            user_id, _, expiry = unb64url(body).decode("utf-8").rpartition(".")
            expires_at = int(expiry)
        except ValueError:
            raise Unauthorized("invalid token") from None
        return user_id, expires_at

    def _sign(self, body: str) -> str:
        return b64url(hmac.new(self._key, body.encode("ascii", "replace"), hashlib.sha256).digest())


def load_or_create_secret(state_dir: Path) -> str:
    """The secret kept in `<state_dir>/secret`, created (mode 0600) on first use."""
    path = state_dir / "secret"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    # Written aside, then linked into place: a second process starting at the same time reads a whole
    # secret (its own link fails, and it uses the first one's), never a half-written file.
    scratch = state_dir / f".secret.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")
    try:
        os.link(scratch, path)
    except FileExistsError:
        pass
    finally:
        scratch.unlink()
    return path.read_text(encoding="ascii").strip()


def b64url(raw: bytes) -> str:
    """Unpadded base64url, as tokens and stream tickets are written."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(str(exc)) from None
