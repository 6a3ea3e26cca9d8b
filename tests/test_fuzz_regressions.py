"""Regression tests for what the fuzzing harness (bench/fuzz.py) and issue 11 found.

Each test pins one input that once broke an invariant the node relies on, so the fix
cannot silently regress even when nobody runs the fuzzer.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest

from bench import fuzz_targets
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.framing import (
    DEFAULT_MIN_FRAGMENT_BYTES,
    REJECT_BAD_FRAGMENT_SIZE,
    AddKind,
    Reassembler,
    split_message,
)

MIB = 1024 * 1024


def _peak_allocated(action) -> tuple[object, int]:
    """(result, peak bytes allocated while running action)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = action()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# -- issue 11 item 2: fragment headers cost work before data --------------------------


def test_first_fragment_of_a_16_mib_claim_in_1_byte_fragments_reserves_nothing() -> None:
    """Before: the first 1-byte fragment of a message claiming 16 MiB made the reassembler
    allocate and zero 16 MiB + 16 Mi flag bytes (16 ms of CPU per 67-byte entry)."""
    r = Reassembler()
    total = 16 * MIB
    result, peak = _peak_allocated(lambda: r.add("insider", b"m" * 16, 0, total, total, b"x", 0.0))
    assert result.reason == REJECT_BAD_FRAGMENT_SIZE
    assert len(r) == 0 and r.held_bytes == 0
    assert peak < 64 * 1024, peak


def test_memory_follows_bytes_received_not_the_claim() -> None:
    """Fragments of the smallest accepted size, claiming 16 MiB: what is held grows with
    the fragments that arrive, whatever the order (here: the last index first)."""
    r = Reassembler()
    frag = DEFAULT_MIN_FRAGMENT_BYTES
    count = 16 * MIB // frag
    rng = random.Random(11)
    indexes = [count - 1, *rng.sample(range(count - 1), 20)]

    def feed() -> list[AddKind]:
        return [
            r.add("insider", b"m" * 16, i, count, count * frag, bytes(frag), 0.0).kind
            for i in indexes
        ]

    kinds, peak = _peak_allocated(feed)
    assert kinds == [AddKind.NEW_FRAGMENT] * len(indexes)
    received = len(indexes) * frag
    assert r.held_bytes == received
    # The bytes plus per-fragment bookkeeping: far below the 16 MiB the header claims.
    assert peak < 4 * received + 64 * 1024, (peak, received)
    # NAK work is bounded by what arrived too: the lowest missing indexes, in order.
    missing = r.pending_naks(1.0)[0][2]
    assert missing[:3] == [i for i in range(count) if i not in indexes][:3]


def test_honest_fragments_still_reassemble_in_any_order() -> None:
    r = Reassembler()
    data = random.Random(3).randbytes(MIB + 123)
    frags = split_message(data, 474)  # the smallest fragment a 576-byte datagram carries
    order = list(range(len(frags)))
    random.Random(4).shuffle(order)
    results = [r.add("p", b"h" * 16, i, len(frags), len(data), frags[i], 0.0) for i in order]
    assert [res.kind for res in results[:-1]] == [AddKind.NEW_FRAGMENT] * (len(frags) - 1)
    assert results[-1].kind is AddKind.COMPLETE and results[-1].data == data
    assert len(r) == 0 and r.total_bytes == 0


def test_two_max_size_messages_from_one_peer_still_fit_its_budget() -> None:
    """Storing fragments as they arrive did not change what is charged: the node's
    per-peer budget (2 x max_message_bytes + 64 KiB) still holds two 16 MiB messages."""
    r = Reassembler(max_bytes_per_peer=2 * 16 * MIB + 65_536, max_total_bytes=256 * MIB)
    frag = 1298  # fragment_bytes at the default 1400-byte datagrams
    count = -(-16 * MIB // frag)
    for msg_id in (b"a" * 16, b"b" * 16):
        assert r.add("p", msg_id, 0, count, 16 * MIB, bytes(frag), 0.0).is_new
    assert b"a" * 16 in r and b"b" * 16 in r and r.stats["evicted:peer_budget"] == 0


def test_fragment_nak_answers_come_from_what_arrived() -> None:
    r = Reassembler()
    data = bytes(range(256)) * 20
    frags = split_message(data, 1000)
    r.add("p", b"n" * 16, 3, len(frags), len(data), frags[3], 0.0)
    assert r.fragments_for_nak(b"n" * 16, [0, 3, 3, 99]) == [(3, bytes(frags[3]))]


# -- issue 11 item 5: a message in 1-byte fragments held as ~1M memoryviews -----------


def test_a_message_in_1_byte_fragments_never_completes_so_is_never_relayed() -> None:
    """Before: a 1 MiB message in 1-byte fragments completed, and the relay re-split it
    into ~1M memoryviews (+240 MB RSS for 10 s) for its OutgoingWindow. Now no such
    message gets past its first fragment, so the relay path never sees it."""
    r = Reassembler()
    size = MIB
    results = [r.add("insider", b"t" * 16, i, size, size, b"y", 0.0) for i in range(1000)]
    assert {res.reason for res in results} == {REJECT_BAD_FRAGMENT_SIZE}
    assert len(r) == 0 and not r.is_completed(b"t" * 16)


# -- wire: member records the node could never send to (issue 11 item 4) -------------
# Found by `python -m bench fuzz --target member` (and --target datagram, in a PEERS frame):
# decode_member accepted a host that socket.sendto() refuses with UnicodeError from IDNA,
# and port 0 (EINVAL); gossiped, either broke the node's send path at every retry.

MEMBER_CRASH_IDNA = bytes.fromhex(
    "6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e00000007011b580465752d3008302e2e30302e3039"
)


def test_fuzz_crash_member_host_refused_by_idna() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_member(MEMBER_CRASH_IDNA)
    fuzz_targets.member(MEMBER_CRASH_IDNA)  # every invariant of the target holds again


@pytest.mark.parametrize(
    ("host", "port"),
    [("a..b", 7000), (".a", 7000), ("a" * 64, 7000), ("10.0.0.1", 0)],
)
def test_unsendable_member_addresses_are_malformed(host: str, port: int) -> None:
    record = wire.MemberRecord(b"n" * 16, 1, wire.MemberState.UP, host, port, None)
    with pytest.raises(wire.WireError):
        wire.decode_member(record.encode())
    with pytest.raises(wire.WireError):
        wire.decode_members(wire.encode_members([record]))


def test_sendable_member_addresses_still_decode() -> None:
    for host in ("10.0.0.1", "node-3.example.org", "node.example.org.", "::1", ""):
        record = wire.MemberRecord(b"n" * 16, 1, wire.MemberState.UP, host, 1, "z")
        assert wire.decode_member(record.encode()) == (record, len(record.encode()))
