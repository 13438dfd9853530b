"""transport/outbox.py on a real loop: the fast path, the end-of-turn batching, order, and the bound.

The connection side is recorded (what reached `write_now`, what went through the awaited `send`), so that a
test can tell one joined send from several; the WebSocket tests (test_realtime) prove the same over sockets.
"""

from __future__ import annotations

import asyncio

import pytest

from transport.outbox import Outbox, TurnBatcher


class Wire:
    """Records every write in order: ("now", bytes) for the fast path, ("sent", bytes) for the queued one."""

    def __init__(self, accept_now: bool = True) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self.accept_now = accept_now
        self.overflowed = 0

    def write_now(self, data: bytes) -> bool:
        if not self.accept_now:
            return False
        self.writes.append(("now", data))
        return True

    async def send(self, data: bytes) -> None:
        await asyncio.sleep(0)
        self.writes.append(("sent", data))

    def overflow(self) -> None:
        self.overflowed += 1

    def outbox(self, limit: int = 1 << 20, batcher: TurnBatcher | None = None) -> Outbox:
        return Outbox(limit, self.send, self.overflow, write_now=self.write_now, batcher=batcher)


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.gen_test
async def test_without_a_batcher_each_push_is_written_at_once() -> None:
    wire = Wire()
    box = wire.outbox()
    box.push(b"a")
    box.push(b"b")
    assert wire.writes == [("now", b"a"), ("now", b"b")]


@pytest.mark.gen_test
async def test_the_frames_of_one_turn_leave_joined_in_one_write_at_its_end() -> None:
    wire = Wire()
    batcher = TurnBatcher()
    first, second = wire.outbox(batcher=batcher), Wire()
    other = second.outbox(batcher=batcher)
    for frame in (b"e1", b"e2", b"e3"):
        first.push(frame)
    other.push(b"x1")
    assert wire.writes == [] and second.writes == []  # nothing before the end of the turn
    await turns()
    assert wire.writes == [("now", b"e1e2e3")]
    assert second.writes == [("now", b"x1")]
    first.push(b"e4")  # a later turn is a new batch
    await turns()
    assert wire.writes == [("now", b"e1e2e3"), ("now", b"e4")]


@pytest.mark.gen_test
async def test_a_queued_push_sends_what_waits_first_so_nothing_overtakes() -> None:
    wire = Wire()
    box = wire.outbox(batcher=TurnBatcher())
    box.push(b"event1")
    box.push(b"event2")
    box.push(b"reply", direct=False)  # e.g. a pong or a replay: never ahead of the events before it
    box.push(b"event3")
    await turns(6)
    assert [data for _, data in wire.writes] == [b"event1event2", b"reply", b"event3"]


@pytest.mark.gen_test
async def test_a_closed_outbox_sends_nothing_it_held() -> None:
    wire = Wire()
    box = wire.outbox(batcher=TurnBatcher())
    box.push(b"held")
    box.close()
    await turns()
    assert wire.writes == []
    box.push(b"after")
    await turns()
    assert wire.writes == []


@pytest.mark.gen_test
async def test_a_turns_batch_over_the_bound_cuts_the_connection_off() -> None:
    # The joined frames count against the bound like any other bytes: a batch the socket does not take at once
    # and that is over the limit closes the outbox (the client resumes from its cursor).
    wire = Wire(accept_now=False)
    box = wire.outbox(limit=10, batcher=TurnBatcher())
    for _ in range(4):
        box.push(b"abcd")
    await turns()
    assert wire.overflowed == 1 and box.closed and wire.writes == []


@pytest.mark.gen_test
async def test_a_batcher_is_ignored_without_a_fast_path() -> None:
    # SSE's outbox has no write_now: every push is queued and awaited in order, as before.
    wire = Wire()
    box = Outbox(1 << 20, wire.send, wire.overflow, batcher=TurnBatcher())
    box.push(b"a")
    box.push(b"b")
    await turns(6)
    assert wire.writes == [("sent", b"a"), ("sent", b"b")]


@pytest.mark.gen_test
async def test_a_paced_replay_never_queues_past_the_bound_and_sends_everything_in_order() -> None:
    # Ten frames of 4 bytes through a bound of 10: the replay waits for the wire instead of being cut off.
    wire = Wire(accept_now=False)
    box = wire.outbox(limit=10)
    most = 0
    for n in range(10):
        assert await box.push_paced(b"f%03d" % n, timeout=5)
        most = max(most, box.queued_bytes)
    await box.drained()
    assert most <= 10 and wire.overflowed == 0 and not box.closed
    assert [data for _, data in wire.writes] == [b"f%03d" % n for n in range(10)]


@pytest.mark.gen_test
async def test_a_paced_replay_that_the_client_does_not_take_is_cut_off_after_the_timeout() -> None:
    taken = asyncio.Event()

    async def never(data: bytes) -> None:  # a client that stopped reading: the socket never takes the bytes
        await asyncio.wait_for(taken.wait(), 10)

    overflowed: list[bool] = []
    box = Outbox(10, never, lambda: overflowed.append(True))
    assert await box.push_paced(b"first", timeout=0.1)
    assert await box.push_paced(b"2nd", timeout=0.1)  # still within the bound: queued at once
    assert not await box.push_paced(b"third", timeout=0.1)  # past it: waited 0.1 s for the client, then cut off
    assert box.closed and overflowed == [True]
    taken.set()
    await turns()  # the writer's last send ends, and with it the writer

