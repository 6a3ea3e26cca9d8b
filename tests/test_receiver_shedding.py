"""A junk flood stops at the receivers: what only the coordinator can judge (handshakes,
unknown sessions, other protocol versions) reaches it within a per-receiver budget,
and what is malformed on its face is dropped where it arrives (issue 11's attack suite:
"with --workers 2 the receivers drop junk themselves")."""

from __future__ import annotations

import marshal
import os
import random
import socket
from collections.abc import Iterator

import pytest

from gwyh_mp.protocol import wire
from gwyh_mp.runtime import receiver as receiver_module
from gwyh_mp.runtime.receiver import BATCH, BATCH_ENTRIES, DUPLICATE, RAW, RAW_PER_S, Receiver
from gwyh_mp.runtime.shm_ring import ShmRing


@pytest.fixture
def rx() -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    tag = f"gwyh_test_{os.getpid()}_{random.getrandbits(32)}"
    up = ShmRing.create(1 << 20, name=f"{tag}_up")
    down = ShmRing.create(1 << 20, name=f"{tag}_down")
    try:
        yield Receiver(0, sock, up, down, os.getpid(), 1000)
    finally:
        sock.close()
        for ring in (up, down):
            ring.close()
            ring.unlink()


def junk(rng: random.Random) -> bytes:
    """An outsider's datagram of every kind that reaches past the header checks."""
    kind = rng.randrange(4)
    if kind == 0:  # a BROADCAST naming a session nobody has
        head = wire.BROADCAST_HEADER.pack(
            wire.VERSION, wire.PacketType.BROADCAST, 1, 0, rng.getrandbits(32), 1, 1
        )
        return head + rng.randbytes(100)
    if kind == 1:  # a CONTROL naming a session nobody has
        head = wire.CONTROL_HEADER.pack(
            wire.VERSION, wire.PacketType.CONTROL, 0, rng.getrandbits(32), 1
        )
        return head + rng.randbytes(60)
    if kind == 2:  # a full-size Hello with garbage inside
        return bytes((wire.VERSION, wire.PacketType.HELLO)) + rng.randbytes(
            wire.HELLO_PADDED_BYTES - 2
        )
    return bytes((wire.VERSION + 1,)) + rng.randbytes(50)  # another protocol version


def test_a_junk_flood_reaches_the_coordinator_only_within_the_budget(rx: Receiver) -> None:
    rng = random.Random(11)
    flood = 20_000
    records = [rx.classify(junk(rng), "127.0.0.1", 9) for _ in range(flood)]
    forwarded = [r for r in records if r is not None]
    assert all(r[0] == RAW for r in forwarded)
    assert len(forwarded) <= RAW_PER_S
    assert rx.stats["drop_raw_shed"] == flood - len(forwarded)
    # The budget refills with time: a real handshake a second later still gets through.
    rx.refill_raw(rx.raw_refilled + 1.0)
    hello = bytes((wire.VERSION, wire.PacketType.HELLO)) + bytes(wire.HELLO_PADDED_BYTES - 2)
    assert rx.classify(hello, "127.0.0.1", 9) is not None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "drop_short"),
        (bytes((wire.VERSION,)), "drop_short"),
        (bytes((wire.VERSION, wire.PacketType.HELLO)) + bytes(10), "drop_malformed"),  # short Hello
        (bytes((wire.VERSION, wire.PacketType.GOTEAM)) + bytes(5), "drop_malformed"),
        (bytes((wire.VERSION, 0x7F)) + bytes(100), "drop_bad_type"),  # no such packet type
    ],
)
def test_malformed_on_its_face_is_dropped_at_the_receiver(
    rx: Receiver, data: bytes, reason: str
) -> None:
    assert rx.classify(data, "127.0.0.1", 9) is None
    assert rx.stats == {reason: 1}  # counted under the core's reason for the same drop
    assert rx.raw_tokens == receiver_module.RAW_PER_S  # no budget spent on it


def test_one_receive_turn_goes_up_in_few_batch_records(rx: Receiver) -> None:
    """Records travel to the coordinator as BATCH records (one ring frame and one
    marshal call for many datagrams), each within its entry count and byte budget,
    and nothing is lost or reordered on the way."""
    small = [(DUPLICATE, 7, "127.0.0.1", 9, seq) for seq in range(BATCH_ENTRIES + 10)]
    big = [(RAW, "127.0.0.1", 9, bytes([k]) * 60_000) for k in range(12)]
    rx.pending = small + big
    rx.flush_up()
    assert rx.pending == []
    records = [marshal.loads(r) for r in rx.up.get_many(1000)]
    assert all(r[0] == BATCH for r in records)
    entries = [tuple(e) for r in records for e in r[1]]
    assert entries == small + big
    assert all(len(r[1]) <= BATCH_ENTRIES for r in records)
    assert all(len(marshal.dumps(r)) <= rx.up.max_record for r in records)
    assert 3 <= len(records) < len(entries) // 10  # split by count and by bytes, still few
    assert "up_ring_dropped" not in rx.stats
