"""Throttling: how often a login may be tried, how fast one user may write, how often one may open a stream.

It owns leaky buckets in bounded memory (one LRU per kind of key, nothing written to the store) and the rules of
docs/protocol.md, "Throttling": a login is let through or refused before its password is hashed, a message or an
edit before it is stored, a typing event before it is fanned out, a stream ticket before it is issued. A refusal
is `TooManyRequests` with the seconds to wait; HTTP never appears here (handlers/base.py turns it into 429 and
`Retry-After`). The clock is handed in.

Logins, three limits, each a bucket of failures that drains fully over `login_window` seconds:
- a phone from one address (`login_failures`): a guesser at one address is slowed, nobody else is;
- an address, whatever the phones (`login_address_failures`): one address trying many phones;
- a phone from every address (`login_phone_failures`): many addresses trying one phone.
Every attempt is counted when it is let through (so concurrent attempts cannot all slip past before the first
fails), and a success takes its count back and forgets the (phone, address) pair's failures. An address a phone
has logged in from is remembered: from there, only the first limit applies, so an attacker elsewhere who
exhausts the phone's or an address's bucket cannot lock the user out of where they log in from.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import attrs

from chatserver.config import Config
from chatserver.errors import TooManyRequests
from chatserver.lru import LRU

# Keys remembered per kind (pairs, phones, addresses, known pairs, writers, typists): the bound on memory, about
# 60 MB with every kind full. Past it the least recently seen is forgotten, and starts afresh if it comes back; it
# takes this many others to push one out.
TRACKED = 50_000

K = TypeVar("K", bound=Hashable)

LOGIN_PAIR, LOGIN_PHONE, LOGIN_ADDRESS, MESSAGE, TYPING, TICKET = (
    "login_pair", "login_phone", "login_address", "message", "typing", "ticket",
)
REFUSALS = (LOGIN_PAIR, LOGIN_PHONE, LOGIN_ADDRESS, MESSAGE, TYPING, TICKET)


class Buckets(Generic[K]):
    """Leaky buckets by key: each holds at most `capacity` units and drains `rate` units a second.

    A bucket that would overflow with one more unit refuses it; `wait` says how long until it would not.
    """

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float], size: int = TRACKED) -> None:
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._levels: LRU[K, tuple[float, float]] = LRU(size)  # key -> (level, when it was that)

    @classmethod
    def per_window(cls, count: int, window: float, clock: Callable[[], float], size: int) -> Buckets[K]:
        """Buckets that hold `count` units and drain them all in `window` seconds."""
        return cls(count, count / window, clock, size)

    def level(self, key: K) -> float:
        found = self._levels.get(key)
        if found is None:
            return 0.0
        level, at = found
        return max(0.0, level - (self._clock() - at) * self.rate)

    def wait(self, key: K) -> float:
        """Seconds until one more unit fits in the key's bucket: 0 when it fits now."""
        excess = self.level(key) + 1 - self.capacity
        return excess / self.rate if excess > 0 else 0.0

    def add(self, key: K, units: float = 1.0) -> None:
        """Pour units in (a negative amount takes them back), never below empty."""
        self._levels.put(key, (max(0.0, self.level(key) + units), self._clock()))

    def forget(self, key: K) -> None:
        self._levels.pop(key)


@attrs.frozen(slots=True)
class LoginAttempt:
    """A login let through: what `login_succeeded` must take back. `known`: only the pair's bucket was counted."""

    phone: str
    address: str
    known: bool


class Throttle:
    def __init__(self, config: Config, clock: Callable[[], float], size: int = TRACKED) -> None:
        window = config.login_window
        self._pairs: Buckets[tuple[str, str]] = Buckets.per_window(config.login_failures, window, clock, size)
        self._phones: Buckets[str] = Buckets.per_window(config.login_phone_failures, window, clock, size)
        self._addresses: Buckets[str] = Buckets.per_window(config.login_address_failures, window, clock, size)
        self._known: LRU[tuple[str, str], bool] = LRU(size)
        self._writes: Buckets[str] | None = None
        self._typing: Buckets[str] | None = None
        if config.message_rate > 0:
            self._writes = Buckets(config.message_burst, config.message_rate, clock, size)
            self._typing = Buckets(config.message_burst, config.message_rate, clock, size)
        self._tickets: Buckets[str] | None = None
        if config.ticket_rate > 0:
            self._tickets = Buckets(config.ticket_burst, config.ticket_rate, clock, size)
        # Requests refused, by what refused them (read by chatserver.metrics at each scrape).
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)

    # -- logins ------------------------------------------------------------------------------------------

    def admit_login(self, phone: str, address: str) -> LoginAttempt:
        """Let a login attempt through, counted as a failure until `login_succeeded`; TooManyRequests otherwise."""
        address = address_key(address)
        pair = (phone, address)
        known = pair in self._known
        waits = [(self._pairs.wait(pair), LOGIN_PAIR)]
        if not known:
            waits += [(self._phones.wait(phone), LOGIN_PHONE), (self._addresses.wait(address), LOGIN_ADDRESS)]
        wait, what = max(waits)
        if wait > 0:
            self.refused[what] += 1
            seconds = retry_after(wait)
            raise TooManyRequests(f"too many failed logins: try again in {seconds} s", retry_after=seconds)
        self._pairs.add(pair)
        if not known:
            self._phones.add(phone)
            self._addresses.add(address)
        return LoginAttempt(phone, address, known)

    def login_succeeded(self, attempt: LoginAttempt) -> None:
        """The attempt was right: it was no failure, the pair's failures are forgotten and its address known."""
        pair = (attempt.phone, attempt.address)
        self._pairs.forget(pair)
        if not attempt.known:
            self._phones.add(attempt.phone, -1)
            self._addresses.add(attempt.address, -1)
        self._known.put(pair, True)

    # -- writes ------------------------------------------------------------------------------------------

    def admit_write(self, user_id: str) -> None:
        """Count a message or an edit of the user's; TooManyRequests past `message_burst` at `message_rate`."""
        self._admit(self._writes, user_id, MESSAGE, "messages")

    def admit_ticket(self, user_id: str) -> None:
        """Count a stream ticket issued to the user; TooManyRequests past `ticket_burst` at `ticket_rate`."""
        self._admit(self._tickets, user_id, TICKET, "stream tickets")

    def _admit(self, buckets: Buckets[str] | None, user_id: str, what: str, things: str) -> None:
        if buckets is None:
            return
        wait = buckets.wait(user_id)
        if wait > 0:
            self.refused[what] += 1
            seconds = retry_after(wait)
            raise TooManyRequests(f"too many {things}: try again in {seconds} s", retry_after=seconds)
        buckets.add(user_id)

    def admit_typing(self, user_id: str) -> bool:
        """Whether a typing event of the user's may go out, at the rate of messages (in a bucket of its own)."""
        typing = self._typing
        if typing is None:
            return True
        if typing.wait(user_id) > 0:
            self.refused[TYPING] += 1
            return False
        typing.add(user_id)
        return True


def retry_after(seconds: float) -> int:
    """Whole seconds to wait, at least one: what `Retry-After` can say."""
    return max(1, math.ceil(seconds))


def address_key(address: str) -> str:
    """The unit an address is throttled by: an IPv4 address, or an IPv6 /64 (what one subscriber is given, so one
    attacker holds a whole /64). An IPv4-mapped IPv6 address is its IPv4 address; anything else is itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
