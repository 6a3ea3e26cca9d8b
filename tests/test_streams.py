"""Per-consumer streams of the library API: every ``messages()`` / ``member_events()``
call sees everything from the moment it is made, a slow backpressure stream holds the
node up (and only until it drains or is dropped), a lossy stream that overflows is told
how many it lost. Real in-process nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from gwyh_mp import Config, MemberUp, Node
from gwyh_mp.api import StreamOverflow

KEY = b"streams-test-key-0123456789abcdef"


def local(**kw: object) -> Config:
    return Config.local(bind=("127.0.0.1", 0), psks=[KEY], **kw)


async def pair() -> tuple[Node, Node]:
    a = await Node(local()).start()
    b = await Node(local(bootstrap=[a.address])).start()
    await asyncio.gather(a.wait_for_members(1), b.wait_for_members(1))
    # Wait until b receives from a (a is its provider), so broadcasts reach it.
    deadline = time.monotonic() + 30
    while a.node_id not in b.providers and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return a, b


async def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def take(stream, n: int, timeout: float = 30.0) -> list:  # type: ignore[no-untyped-def]
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(stream))
    return out


async def test_two_consumers_each_get_every_message() -> None:
    # Regression: one shared queue split 10 broadcasts between two readers (10 and 0).
    a, b = await pair()
    try:
        first, second = b.messages(), b.messages()
        sent = [await a.broadcast(b"m%d" % i) for i in range(10)]
        got1, got2 = await asyncio.gather(take(first, 10), take(second, 10))
        assert [m.id for m in got1] == sent
        assert [m.id for m in got2] == sent
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_member_events_start_when_the_stream_is_made() -> None:
    # Regression: events were replayed from node start to whoever read first.
    a, b = await pair()
    c = None
    try:
        early = b.member_events()
        late_before = b.member_events()
        c = await Node(local(bootstrap=[a.address])).start()
        got = await take(early, 1)
        assert isinstance(got[0], MemberUp) and got[0].member.node_id == c.node_id
        got = await take(late_before, 1)
        assert got[0].member.node_id == c.node_id  # a second stream gets the same event
        fresh = b.member_events()
        await c.stop()
        event = (await take(fresh, 1))[0]
        assert event.member.node_id == c.node_id and not isinstance(event, MemberUp)
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_lossy_stream_is_told_how_many_it_lost() -> None:
    a, b = await pair()
    try:
        reader = b.messages()
        lossy = b.messages(backpressure=False, queue_size=3)
        sent = [await a.broadcast(b"m%d" % i) for i in range(10)]
        assert [m.id for m in await take(reader, 10)] == sent
        assert [m.id for m in await take(lossy, 3)] == sent[:3]
        with pytest.raises(StreamOverflow) as info:
            await anext(lossy)
        assert info.value.lost == 7
        again = await a.broadcast(b"after the gap")
        assert (await take(lossy, 1))[0].id == again  # the stream stays usable
        assert b.stats()["reading_paused"] == 0  # lossy streams never hold the node up
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_slow_backpressure_stream_pauses_until_it_drains_or_goes_away() -> None:
    a, b = await pair()
    try:
        fast = b.messages()
        slow = b.messages(queue_size=4)
        sent: list[bytes] = []
        for i in range(50):  # bounded: the slow stream fills after about 4
            sent.append(await a.broadcast(b"m%d" % i))
            await take(fast, 1)  # delivered to both: the fast one gets it at once
            if b.stats()["reading_paused"]:
                break
        assert b.stats()["reading_paused"] == 1
        # Draining the slow stream to half its bound resumes reading; nothing was lost.
        got = [m.id for m in await take(slow, len(sent))]
        assert got == sent
        await until(lambda: b.stats()["reading_paused"] == 0)
        # An abandoned backpressure stream holds nothing up.
        for _ in range(6):
            await a.broadcast(b"more")
        await until(lambda: b.stats()["reading_paused"] == 1)
        del slow
        gc.collect()
        await until(lambda: b.stats()["reading_paused"] == 0)
        assert b.stats()["message_streams"] == 1
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_messages_before_the_first_reader_wait_for_it() -> None:
    a, b = await pair()
    try:
        sent = [await a.broadcast(b"early %d" % i) for i in range(3)]
        await until(lambda: b.stats()["messages_unclaimed"] == 3)
        assert [m.id for m in await take(b.messages(), 3)] == sent
        # receive() in a row loses nothing either: what one call did not read is kept.
        more = [await a.broadcast(b"late %d" % i) for i in range(2)]
        await until(lambda: b.stats()["messages_unclaimed"] == 2)
        assert (await b.receive(timeout=10)).id == more[0]
        assert (await b.receive(timeout=10)).id == more[1]
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_streams_end_when_the_node_stops() -> None:
    a, b = await pair()
    messages, events = b.messages(), b.member_events()
    sent = await a.broadcast(b"last words")
    await until(lambda: len(messages) == 1)
    await asyncio.gather(a.stop(), b.stop())
    async with asyncio.timeout(30):
        assert [m.id async for m in messages] == [sent]  # what was queued, then the end
        # a's goodbye may or may not reach b before b stops; either way the stream ends.
        assert all(e.member.node_id == a.node_id for e in [e async for e in events])
