"""chatserver.throttle without a loop or a socket: the buckets' arithmetic on a clock the test moves, the rules
of docs/protocol.md ("Throttling"), the bound on memory, and how addresses are grouped."""

from __future__ import annotations

from typing import Any

import pytest

from chatserver.config import load_config
from chatserver.errors import TooManyRequests
from chatserver.throttle import Buckets, Throttle, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **settings: Any) -> Throttle:
    flags = {"login_failures": 3, "login_phone_failures": 5, "login_address_failures": 8, "login_window": 60.0,
             "message_rate": 2.0, "message_burst": 4, **settings}
    return Throttle(load_config(flags, {}), clock, size=100)


def attempts(rules: Throttle, phone: str, address: str, count: int) -> None:
    """`count` attempts let through (and not yet known to have succeeded: failures, as far as the rules know)."""
    for _ in range(count):
        rules.admit_login(phone, address)


def refusal(call: Any, *args: Any) -> int:
    with pytest.raises(TooManyRequests) as refused:
        call(*args)
    return refused.value.retry_after


def test_a_bucket_drains_at_its_rate_and_says_how_long_until_one_more_fits() -> None:
    clock = Clock()
    buckets: Buckets[str] = Buckets.per_window(3, 60.0, clock, 10)  # three, drained over a minute
    for _ in range(3):
        assert buckets.wait("k") == 0
        buckets.add("k")
    assert buckets.wait("k") == pytest.approx(20.0)
    clock.now += 5
    assert buckets.wait("k") == pytest.approx(15.0)
    clock.now += 15
    assert buckets.wait("k") == 0
    buckets.add("k", -10)
    assert buckets.level("k") == 0  # never below empty
    assert buckets.wait("other") == 0


def test_failures_of_a_pair_get_refused_with_whole_seconds_and_a_success_resets_the_pair() -> None:
    clock = Clock()
    rules = throttle(clock)
    attempts(rules, "7911", "10.0.0.1", 3)
    assert refusal(rules.admit_login, "7911", "10.0.0.1") == 20  # 60 s / 3 failures
    clock.now += 19.5
    assert refusal(rules.admit_login, "7911", "10.0.0.1") == 1  # half a second left: never 0
    clock.now += 0.5
    attempt = rules.admit_login("7911", "10.0.0.1")
    rules.login_succeeded(attempt)
    attempts(rules, "7911", "10.0.0.1", 3)
    refusal(rules.admit_login, "7911", "10.0.0.1")
    assert rules.refused["login_pair"] == 3


def test_an_attempt_counts_when_it_is_let_through_so_concurrent_ones_cannot_all_pass() -> None:
    rules = throttle(Clock())
    attempts(rules, "7911", "10.0.0.1", 3)  # none of them has failed yet
    refusal(rules.admit_login, "7911", "10.0.0.1")


def test_a_success_takes_back_its_count_from_the_phone_and_the_address() -> None:
    rules = throttle(Clock())
    for n in range(20):
        rules.login_succeeded(rules.admit_login("7911", f"10.0.1.{n}"))
    for n in range(20):
        rules.login_succeeded(rules.admit_login(f"79{n}", "10.0.0.1"))
    assert rules.refused == dict.fromkeys(rules.refused, 0)


def test_the_phone_limit_spares_addresses_the_phone_logged_in_from() -> None:
    rules = throttle(Clock())
    rules.login_succeeded(rules.admit_login("7911", "10.0.0.1"))
    for n in range(5):
        rules.admit_login("7911", f"10.0.2.{n}")
    refusal(rules.admit_login, "7911", "10.0.3.1")
    assert rules.refused["login_phone"] == 1
    # Known: only its pair counts. Three failures there, then that pair too is refused.
    attempts(rules, "7911", "10.0.0.1", 3)
    refusal(rules.admit_login, "7911", "10.0.0.1")
    assert rules.refused["login_pair"] == 1


def test_the_address_limit_holds_one_address_trying_many_phones() -> None:
    rules = throttle(Clock())
    for n in range(8):
        rules.admit_login(f"79{n}", "10.0.0.1")
    refusal(rules.admit_login, "7999", "10.0.0.1")
    rules.admit_login("7999", "10.0.0.2")
    assert rules.refused["login_address"] == 1


def test_an_ipv6_attacker_is_one_address_per_64() -> None:
    rules = throttle(Clock())
    for n in range(8):
        rules.admit_login(f"79{n}", f"2001:db8:1:2::{n:x}")
    refusal(rules.admit_login, "7999", "2001:db8:1:2:ffff::1")
    rules.admit_login("7999", "2001:db8:1:3::1")
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("10.0.0.1") == "10.0.0.1"
    assert address_key("") == ""


def test_memory_is_bounded_whatever_the_keys() -> None:
    rules = throttle(Clock())
    for n in range(1000):
        rules.admit_login(f"79{n}", f"10.{n // 256}.{n % 256}.1")
        rules.admit_write(f"usr_{n}")
    for family in (rules._pairs, rules._phones, rules._addresses, rules._writes):
        assert family is not None and len(family._levels) == 100


def test_writes_have_a_burst_then_a_rate_and_typing_a_bucket_of_its_own() -> None:
    clock = Clock()
    rules = throttle(clock)
    for _ in range(4):
        rules.admit_write("usr_a")
    assert refusal(rules.admit_write, "usr_a") == 1  # 2 a second: half a second to wait, said as 1
    rules.admit_write("usr_b")
    clock.now += 0.5
    rules.admit_write("usr_a")
    assert [rules.admit_typing("usr_a") for _ in range(5)] == [True] * 4 + [False]
    assert rules.refused["message"] == 1 and rules.refused["typing"] == 1


def test_a_message_rate_of_zero_turns_the_write_limits_off() -> None:
    rules = throttle(Clock(), message_rate=0.0)
    for _ in range(1000):
        rules.admit_write("usr_a")
        assert rules.admit_typing("usr_a")
