"""Tests for gwyh_mp.protocol.framing (sans-IO, deterministic)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol.framing import (
    MAX_NAK_INDEXES,
    MESSAGE_OVERHEAD_BYTES,
    REJECT_BAD_FRAGMENT_SIZE,
    REJECT_BAD_HEADER,
    REJECT_INCONSISTENT,
    REJECT_INDEX_OUT_OF_RANGE,
    REJECT_OVER_BUDGET,
    REJECT_TOO_LARGE,
    AddKind,
    FragmentHeader,
    OutgoingWindow,
    Reassembler,
    split_message,
)

KIB = 1024
MIB = 1024 * 1024


def make_reassembler(**overrides: float) -> Reassembler:
    params: dict[str, float] = {
        "max_message_bytes": 16 * MIB,
        "max_bytes_per_peer": 4 * MIB,
        "max_total_bytes": 8 * MIB,
        "incomplete_timeout_s": 10.0,
        "nak_delay_s": 0.1,
        "min_fragment_bytes": 1,  # the tests use tiny fragments to keep counts readable
    }
    params.update(overrides)
    return Reassembler(**params)  # type: ignore[arg-type]


def feed_all(r: Reassembler, peer: object, msg_id: bytes, data: bytes, frag: int, now: float = 0.0):
    frags = split_message(data, frag)
    results = [r.add(peer, msg_id, i, len(frags), len(data), f, now) for i, f in enumerate(frags)]
    return results


# -- split_message -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "frag", "expected_lens"),
    [
        (0, 4, [0]),
        (1, 4, [1]),
        (4, 4, [4]),
        (8, 4, [4, 4]),
        (7, 4, [4, 3]),
        (9, 4, [4, 4, 1]),
        (5, 1, [1] * 5),
    ],
)
def test_split_sizes(size: int, frag: int, expected_lens: list[int]) -> None:
    data = bytes(range(size))
    frags = split_message(data, frag)
    assert [len(f) for f in frags] == expected_lens
    assert b"".join(frags) == data


def test_split_is_zero_copy_and_validates() -> None:
    data = bytearray(b"abcdefgh")
    frags = split_message(data, 3)
    data[0] = ord("X")
    assert bytes(frags[0]) == b"Xbc"
    with pytest.raises(ValueError):
        split_message(b"abc", 0)
    with pytest.raises(ValueError):
        split_message(b"abc", -1)


def test_header_constants_and_validation() -> None:
    assert FragmentHeader.COUNT_MAX == FragmentHeader.TOTAL_LEN_MAX == 2**32 - 1
    assert FragmentHeader(b"id", 0, 1, 10).error() is None
    assert FragmentHeader(b"id", 1, 1, 10).error() == REJECT_INDEX_OUT_OF_RANGE
    assert FragmentHeader(b"id", 0, 0, 10).error() == REJECT_BAD_HEADER
    assert FragmentHeader(b"id", 0, 2**32, 2**33).error() == REJECT_BAD_HEADER
    assert FragmentHeader(b"id", 0, 1, 17 * MIB).error() == REJECT_TOO_LARGE
    assert FragmentHeader(b"id", 0, 1, 17 * MIB).error(32 * MIB) is None
    assert FragmentHeader(b"id", 0, 11, 10).error() == REJECT_BAD_HEADER  # empty fragments
    assert FragmentHeader(b"", 0, 1, 10).error() == REJECT_BAD_HEADER


# -- round trip --------------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    data=st.binary(min_size=0, max_size=3000),
    frag=st.integers(min_value=1, max_value=300),
    rnd=st.randoms(use_true_random=False),
    dup_count=st.integers(min_value=0, max_value=20),
)
def test_roundtrip_random_order_with_duplicates(
    data: bytes, frag: int, rnd: random.Random, dup_count: int
) -> None:
    r = make_reassembler()
    frags = split_message(data, frag)
    order = list(range(len(frags)))
    order += [rnd.randrange(len(frags)) for _ in range(dup_count)]
    rnd.shuffle(order)
    completes = []
    seen: set[int] = set()
    for i in order:
        res = r.add("peer", b"msg", i, len(frags), len(data), frags[i], 0.0)
        if res.kind is AddKind.COMPLETE:
            completes.append(res.data)
        # NEW exactly on first sighting (cut-through forwards each fragment once)
        assert res.is_new == (i not in seen)
        seen.add(i)
    assert len(completes) == 1
    assert bytes(completes[0]) == data
    assert len(r) == 0 and r.total_bytes == 0
    assert r.stats["completed"] == 1


@pytest.mark.parametrize("size", [0, 1, 1199, 1200, 1201, 2400, 2401, 12000])
def test_roundtrip_boundaries(size: int) -> None:
    data = random.Random(size).randbytes(size)
    results = feed_all(make_reassembler(), "p", b"m", data, 1200)
    assert [res.kind for res in results[:-1]] == [AddKind.NEW_FRAGMENT] * (len(results) - 1)
    assert results[-1].kind is AddKind.COMPLETE
    assert results[-1].data == data


def test_last_fragment_first_determines_fragment_size() -> None:
    data = bytes(range(250)) * 4  # 1000 bytes, F=300 -> 300,300,300,100
    frags = split_message(data, 300)
    r = make_reassembler()
    assert r.add("p", b"m", 3, 4, 1000, frags[3], 0).kind is AddKind.NEW_FRAGMENT
    # a non-last fragment that disagrees with the F implied by the last one
    assert r.add("p", b"m", 0, 4, 1000, bytes(299), 0).reason == REJECT_BAD_FRAGMENT_SIZE
    for i in (2, 0):
        assert r.add("p", b"m", i, 4, 1000, frags[i], 0).kind is AddKind.NEW_FRAGMENT
    res = r.add("p", b"m", 1, 4, 1000, frags[1], 0)
    assert res.kind is AddKind.COMPLETE and res.data == data


def test_same_message_from_two_peers_merges() -> None:
    data = random.Random(1).randbytes(5000)
    frags = split_message(data, 1000)
    r = make_reassembler()
    kinds = []
    for i, f in enumerate(frags):
        kinds.append(r.add("a", b"m", i, 5, 5000, f, 0).kind)
        kinds.append(r.add("b", b"m", i, 5, 5000, f, 0).kind)
    assert kinds.count(AddKind.COMPLETE) == 1
    assert kinds.count(AddKind.NEW_FRAGMENT) == 4
    assert kinds.count(AddKind.DUPLICATE) == 5


# -- rejection ---------------------------------------------------------------------


def test_inconsistent_fragments_rejected() -> None:
    r = make_reassembler(max_message_bytes=10_000)
    frags = split_message(bytes(3000), 1000)
    assert r.add("p", b"m", 0, 3, 3000, frags[0], 0).kind is AddKind.NEW_FRAGMENT
    cases = [
        ((1, 4, 3000, frags[1]), REJECT_INCONSISTENT),  # count differs
        ((1, 3, 2999, frags[1]), REJECT_INCONSISTENT),  # total_len differs
        ((3, 3, 3000, frags[1]), REJECT_INDEX_OUT_OF_RANGE),
        ((-1, 3, 3000, frags[1]), REJECT_INDEX_OUT_OF_RANGE),
        ((1, 3, 3000, bytes(999)), REJECT_BAD_FRAGMENT_SIZE),
        ((2, 3, 3000, bytes(1001)), REJECT_BAD_FRAGMENT_SIZE),
    ]
    for (index, count, total_len, data), reason in cases:
        res = r.add("p", b"m", index, count, total_len, data, 0)
        assert res.kind is AddKind.REJECTED and res.reason == reason
    # new messages whose first fragment cannot be consistent with the header
    for args in [(0, 3, 3000, bytes(900)), (2, 3, 3000, bytes(1500)), (0, 1, 10, bytes(9))]:
        assert r.add("p", b"x", *args, 0).reason == REJECT_BAD_FRAGMENT_SIZE
    assert r.add("p", b"x", 0, 2, 10_001, bytes(5001), 0).reason == REJECT_TOO_LARGE
    assert r.stats["rejected:" + REJECT_INCONSISTENT] == 2
    assert r.stats["rejected:" + REJECT_BAD_FRAGMENT_SIZE] == 5
    # the good message is unaffected
    for i in (1, 2):
        res = r.add("p", b"m", i, 3, 3000, frags[i], 0)
    assert res.kind is AddKind.COMPLETE


def test_message_larger_than_peer_budget_rejected() -> None:
    r = make_reassembler(max_bytes_per_peer=1 * MIB, max_total_bytes=2 * MIB)
    res = r.add("p", b"m", 0, 2, 1 * MIB, bytes(MIB // 2), 0)
    assert res.reason == REJECT_OVER_BUDGET
    assert r.total_bytes == 0


# -- memory bounds -----------------------------------------------------------------


def _flood(r: Reassembler, peer: str, rnd: random.Random, n: int, now: float, check) -> None:
    """n bogus partial messages: first fragment only, random sizes up to 256 KiB."""
    for _ in range(n):
        total_len = rnd.randrange(2, 256 * KIB)
        count = rnd.randrange(2, min(total_len, 64) + 1)
        frag = -(-total_len // count)
        if (count - 1) * frag >= total_len:
            count = 2
            frag = -(-total_len // 2)
        res = r.add(peer, rnd.randbytes(16), 0, count, total_len, bytes(frag), now)
        assert res.kind in (AddKind.NEW_FRAGMENT, AddKind.REJECTED)
        check()


@pytest.mark.parametrize("flooders", [("flood1",), ("flood1", "flood2")])
def test_flooding_peer_cannot_exceed_bounds_or_evict_honest(flooders: tuple[str, ...]) -> None:
    per_peer, total = 1536 * KIB, 3 * MIB
    r = make_reassembler(max_bytes_per_peer=per_peer, max_total_bytes=total)
    rnd = random.Random(7)

    def check() -> None:
        assert r.total_bytes <= total
        assert all(r.peer_bytes(p) <= per_peer for p in ("honest", *flooders))

    honest = rnd.randbytes(768 * KIB)
    frags = split_message(honest, 1200)
    results = []
    # interleave: the honest message trickles in while the flooders send thousands
    for i, f in enumerate(frags):
        results.append(r.add("honest", b"H", i, len(frags), len(honest), f, float(i)))
        check()
        if i % 4 == 0:
            for peer in flooders:
                _flood(r, peer, rnd, 20, float(i), check)
            assert b"H" in r or i == len(frags) - 1
    assert results[-1].kind is AddKind.COMPLETE and results[-1].data == honest
    assert all(res.kind is AddKind.NEW_FRAGMENT for res in results[:-1])
    evictions = r.stats["evicted:peer_budget"] + r.stats["evicted:total_budget"]
    assert evictions > 2000 * len(flooders)
    if len(flooders) > 1:
        assert r.stats["evicted:total_budget"] > 0  # the total bound was actually exercised
    assert r.peer_bytes("honest") == 0


def test_total_budget_evicts_heaviest_peer_oldest_message() -> None:
    r = make_reassembler(max_bytes_per_peer=700 * KIB, max_total_bytes=1 * MIB)

    def start(peer: str, msg_id: bytes, size: int, now: float) -> None:
        res = r.add(peer, msg_id, 0, 2, size, bytes(size // 2), now)
        assert res.kind is AddKind.NEW_FRAGMENT

    start("heavy", b"h1", 200 * KIB, 0)
    start("heavy", b"h2", 200 * KIB, 1)
    start("heavy", b"h3", 200 * KIB, 2)
    start("light", b"l1", 100 * KIB, 3)
    start("new", b"n1", 350 * KIB, 4)  # over 1 MiB total: heavy (not new) loses its oldest
    assert b"h1" not in r and all(m in r for m in (b"h2", b"h3", b"l1", b"n1"))
    assert r.stats["evicted:total_budget"] == 1
    assert r.total_bytes <= 1 * MIB


def test_requester_heaviest_with_nothing_to_give_is_rejected() -> None:
    r = make_reassembler(max_bytes_per_peer=600 * KIB, max_total_bytes=1 * MIB)
    for peer in ("a", "b"):
        assert r.add(peer, peer.encode(), 0, 2, 400 * KIB, bytes(200 * KIB), 0).is_new
    res = r.add("c", b"c", 0, 2, 500 * KIB, bytes(250 * KIB), 0)
    assert res.reason == REJECT_OVER_BUDGET
    assert b"a" in r and b"b" in r


def test_peer_budget_evicts_own_oldest_only() -> None:
    r = make_reassembler(max_bytes_per_peer=302 * KIB, max_total_bytes=4 * MIB)
    assert r.add("other", b"o", 0, 2, 200 * KIB, bytes(100 * KIB), 0).is_new
    for k in range(5):
        assert r.add("p", bytes([k]), 0, 2, 100 * KIB, bytes(50 * KIB), k).is_new
    assert [bytes([k]) in r for k in range(5)] == [False, False, True, True, True]
    assert b"o" in r
    assert r.peer_bytes("p") <= 302 * KIB
    assert r.stats["evicted:peer_budget"] == 2


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 15),  # msg id
            st.integers(0, 1),  # fragment index
            st.integers(2, 40 * KIB),  # total_len (reused ids with other sizes get rejected)
            st.integers(0, 5),  # time step
        ),
        max_size=200,
    )
)
def test_accounting_invariants(ops: list[tuple[str, int, int, int, int]]) -> None:
    r = make_reassembler(
        max_bytes_per_peer=64 * KIB, max_total_bytes=128 * KIB, incomplete_timeout_s=7.0
    )
    now = 0.0
    for peer, mid, index, total_len, step in ops:
        now += step
        first = -(-total_len // 2)
        size = first if index == 0 else total_len - first
        r.add(peer, bytes([mid]), index, 2, total_len, bytes(size), now)
        r.expire(now)
        r.pending_naks(now)
        assert r.total_bytes <= 128 * KIB
        assert sum(r.peer_bytes(p) for p in "abc") == r.total_bytes
        assert all(r.peer_bytes(p) <= 64 * KIB for p in "abc")
    r.expire(now + 100)
    assert r.total_bytes == 0 and len(r) == 0


# -- expiry, completion memory, NAKs -----------------------------------------------


def test_expiry_frees_memory_and_measures_from_last_progress() -> None:
    r = make_reassembler(incomplete_timeout_s=5.0)
    frags = split_message(bytes(10_000), 1000)
    r.add("p", b"a", 0, 10, 10_000, frags[0], 0.0)
    r.add("p", b"b", 0, 10, 10_000, frags[0], 0.0)
    r.add("p", b"a", 1, 10, 10_000, frags[1], 3.0)  # progress on "a"
    r.add("p", b"a", 1, 10, 10_000, frags[1], 4.0)  # duplicate: not progress
    assert r.total_bytes == 2 * (10_000 + 10 + MESSAGE_OVERHEAD_BYTES)
    assert r.next_timer(4.0) == pytest.approx(0.1)  # "b" NAK is due (overdue)
    assert r.expire(4.9) == 0
    assert r.expire(5.0) == 1 and b"b" not in r and b"a" in r
    assert r.expire(7.9) == 0
    assert r.expire(8.0) == 1
    assert r.total_bytes == 0 and r.peer_bytes("p") == 0 and len(r) == 0
    assert r.next_timer(8.0) is None
    assert r.stats["expired"] == 2


def test_late_duplicates_after_completion_do_not_recreate_state() -> None:
    r = make_reassembler()
    data = bytes(range(256)) * 20
    frags = split_message(data, 1000)
    results = feed_all(r, "p", b"m", data, 1000)
    assert results[-1].kind is AddKind.COMPLETE and r.is_completed(b"m")
    for peer in ("p", "q"):
        for i, f in enumerate(frags):
            assert r.add(peer, b"m", i, len(frags), len(data), f, 1.0).kind is AddKind.DUPLICATE
    assert len(r) == 0 and r.total_bytes == 0
    assert r.stats["completed"] == 1 and r.stats["late_duplicates"] == 2 * len(frags)
    assert r.pending_naks(100.0) == []


def test_completed_ids_bounded() -> None:
    r = make_reassembler()
    r.max_completed_ids = 3
    for k in range(5):
        assert r.add("p", bytes([k]), 0, 1, 1, b"x", 0).kind is AddKind.COMPLETE
    assert [r.is_completed(bytes([k])) for k in range(5)] == [False, False, True, True, True]


def test_nak_timing_rate_limit_and_bound() -> None:
    r = make_reassembler(nak_delay_s=0.5, incomplete_timeout_s=100.0)
    count = 1000
    frags = split_message(bytes(count), 1)
    for i in (0, 5, 999):
        r.add("p", b"m", i, count, count, frags[i], 0.0)
    assert r.pending_naks(0.4) == []
    assert r.next_timer(0.4) == pytest.approx(0.5)
    naks = r.pending_naks(0.5)
    assert len(naks) == 1
    peer, msg_id, missing = naks[0]
    assert (peer, msg_id) == ("p", b"m")
    assert len(missing) == MAX_NAK_INDEXES
    assert missing[:5] == [1, 2, 3, 4, 6] and 0 not in missing and 5 not in missing
    # rate limit: not again before nak_delay_s has passed since the last NAK
    assert r.pending_naks(0.6) == [] and r.pending_naks(0.99) == []
    assert r.next_timer(0.6) == pytest.approx(1.0)
    assert len(r.pending_naks(1.0)) == 1
    # progress from another peer postpones the next NAK and redirects it
    r.add("q", b"m", 1, count, count, frags[1], 1.2)
    assert r.pending_naks(1.6) == []
    naks = r.pending_naks(1.7)
    assert naks[0][0] == "q" and naks[0][2][0] == 2
    assert r.stats["naks"] == 3


def test_relay_serves_naks_from_partial_buffer() -> None:
    r = make_reassembler()
    data = random.Random(3).randbytes(2500)
    frags = split_message(data, 1000)
    r.add("p", b"m", 0, 3, 2500, frags[0], 0)
    r.add("p", b"m", 2, 3, 2500, frags[2], 0)
    got = r.fragments_for_nak(b"m", [2, 1, 0, 0, 7, -1])
    assert got == [(2, data[2000:]), (0, data[:1000])]
    assert r.fragments_for_nak(b"unknown", [0]) == []


# -- send side ---------------------------------------------------------------------


def test_outgoing_window_retention() -> None:
    w = OutgoingWindow(max_window_bytes=10_000 + 2 * MESSAGE_OVERHEAD_BYTES, retain_s=2.0)
    a = split_message(b"a" * 5000, 1000)
    assert w.add_message(b"A", a, 0.0)
    assert w.add_message(b"B", split_message(b"b" * 5000, 1000), 1.0)
    assert w.fragments_for_nak(b"A", [4, 4, 9, -1, 0]) == [(4, a[4]), (0, a[0])]
    assert w.fragments_for_nak(b"nope", [0]) == []
    assert w.message_shape(b"A") == (5, 5000)
    assert w.add_message(b"C", split_message(b"c" * 100, 1000), 1.5)  # over bytes: A goes
    assert b"A" not in w and b"B" in w and b"C" in w
    assert w.total_bytes <= w.max_window_bytes
    assert not w.add_message(b"D", [bytes(20_000)], 1.5)
    assert b"D" not in w
    assert w.next_timer(2.0) == pytest.approx(3.0)
    assert w.expire(2.99) == 0 and w.expire(3.0) == 1 and b"B" not in w
    assert w.expire(3.5) == 1 and len(w) == 0 and w.total_bytes == 0
    assert w.next_timer(3.5) is None
    # a NAK can only trigger a bounded number of retransmissions
    w.add_message(b"E", split_message(bytes(1000), 1), 4.0)
    assert len(w.fragments_for_nak(b"E", range(1000))) == MAX_NAK_INDEXES


def test_one_mib_over_lossy_link_completes_via_naks() -> None:
    rnd = random.Random(1234)
    loss = 0.10
    tick_s = 0.01
    data = rnd.randbytes(1 * MIB)
    frag_size = 1200
    frags = split_message(data, frag_size)
    count = len(frags)

    window = OutgoingWindow(max_window_bytes=4 * MIB, retain_s=30.0)
    window.add_message(b"big", frags, 0.0)
    per_tick = 64 * KIB // frag_size  # a burst limit per tick, like the node's window
    unsent = list(enumerate(frags))
    r = make_reassembler(nak_delay_s=0.05, incomplete_timeout_s=5.0)

    completed = []
    lost = 0
    retransmitted = 0

    def deliver(index: int, frag, now: float) -> None:
        nonlocal lost
        if rnd.random() < loss:
            lost += 1
            return
        res = r.add("sender", b"big", index, count, len(data), frag, now)
        if res.kind is AddKind.COMPLETE:
            completed.append(res.data)

    now = 0.0
    for _tick in range(2000):  # bounded: fails rather than spins
        now += tick_s
        burst, unsent = unsent[:per_tick], unsent[per_tick:]
        for index, frag in burst:
            deliver(index, frag, now)
        for peer, msg_id, missing in r.pending_naks(now):
            assert peer == "sender" and msg_id == b"big"
            if rnd.random() < loss:  # NAKs get lost too
                continue
            for index, frag in window.fragments_for_nak(msg_id, missing):
                retransmitted += 1
                deliver(index, frag, now)
        if completed and not unsent:
            break
    assert len(completed) == 1
    assert completed[0] == data
    assert lost > 0.05 * count and retransmitted > 0.05 * count
    assert len(r) == 0 and r.total_bytes == 0
    # late stragglers do not resurrect it
    assert r.add("sender", b"big", 0, count, len(data), frags[0], now).kind is AddKind.DUPLICATE
