"""Catch-up (protocol/catch_up.py): a node back from a pause or a partition gets every
broadcast it missed exactly once, within the window; beyond it the loss is counted.

Fake clock (SimNetwork) for the protocol rules; the frames' codec with hypothesis.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gwyh_mp.config import Config, ConfigError
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.catch_up import ids_per_frame
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import CATCHUP_NO_MORE, FrameType, MemberState
from gwyh_mp.simulation import SimNetwork, SimNode
from tests.helpers_core import PSK, addr, lone_core, make_cluster, messages, node_id, view_of

Addr = tuple[str, int]
N = 8
RATE_S = 0.1  # one broadcast every 0.1 s: the 10 msg/s stream

ids16 = st.binary(min_size=16, max_size=16)


# ----------------------------------------------------------------------------- codec


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1), st.lists(ids16, max_size=50))
def test_ask_round_trips(since_ms: int, cursor: int, wanted: list[bytes]) -> None:
    body = wire.encode_catchup_ask(since_ms, cursor, wanted)
    assert wire.decode_catchup_ask(body) == (since_ms, cursor, wanted)


@given(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 0xFFFFFFFF),
    st.lists(ids16, max_size=50),
)
def test_offer_round_trips(cursor: int, next_cursor: int, missed: int, ids: list[bytes]) -> None:
    body = wire.encode_catchup_offer(cursor, next_cursor, missed, ids)
    assert wire.decode_catchup_offer(body) == (cursor, next_cursor, missed, ids)


@given(st.binary(max_size=200))
def test_malformed_frames_raise_wire_errors_only(body: bytes) -> None:
    for decode in (wire.decode_catchup_ask, wire.decode_catchup_offer):
        try:
            decode(body)
        except wire.WireError:
            pass


@pytest.mark.parametrize(
    "body",
    [
        b"",
        wire.CATCHUP_ASK_HEADER.pack(1, 0, 2) + bytes(16),  # one id short
        wire.CATCHUP_ASK_HEADER.pack(1, 0, 1) + bytes(17),  # trailing byte
        wire.CATCHUP_ASK_HEADER.pack(1, 0, 0xFFFF) + bytes(16 * 10),  # count beyond the cap
    ],
)
def test_bad_asks_are_rejected(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_catchup_ask(body)


def test_bad_offers_are_rejected() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_catchup_offer(wire.CATCHUP_OFFER_HEADER.pack(0, 0, 0, 3) + bytes(32))
    with pytest.raises(wire.WireError):
        wire.decode_catchup_offer(bytes(5))


def test_a_full_frame_fits_a_datagram() -> None:
    for size in (576, 1400, 65_000):
        ids = [bytes(16)] * ids_per_frame(size)
        frame = wire.encode_frame(FrameType.CATCHUP_OFFER, wire.encode_catchup_offer(1, 2, 3, ids))
        assert len(frame) + wire.CONTROL_OVERHEAD <= size


def test_config_validates_the_window_and_bytes() -> None:
    base = Config.local(psks=[PSK])
    base.replace(catch_up_window_s=0).validate()  # off
    with pytest.raises(ConfigError, match="catch_up_window_s"):
        base.replace(catch_up_window_s=-1.0).validate()
    with pytest.raises(ConfigError, match="catch_up_bytes"):
        base.replace(catch_up_bytes=100).validate()


def test_the_history_holds_at_most_half_the_seen_set() -> None:
    """An asker must remember every id it is offered, or it would deliver it twice."""
    core = lone_core("small", seen_set_size=1000)
    for i in range(1500):
        core.catch_up.record(i.to_bytes(16, "big"), b"\x00" + bytes(30))
    assert len(core.catch_up.history) == 500


# ----------------------------------------------------------------------------- helpers


def stream(
    net: SimNetwork, origins: list[Addr], seconds: float, tag: bytes, sent: dict[bytes, Addr]
) -> None:
    """One broadcast every RATE_S for ``seconds``, round-robin over ``origins``."""
    steps = round(seconds / RATE_S)
    for i in range(steps):
        origin = origins[i % len(origins)]
        sent[net.broadcast(origin, tag + b"%d" % i)] = origin
        net.run_for(RATE_S)


def counts_at(node: SimNode) -> Counter[bytes]:
    return Counter(m.id for m in messages(node))


def missing_or_doubled(net: SimNetwork, sent: dict[bytes, Addr], nodes: list[Addr]) -> dict:
    """Per node: (missing, delivered more than once) among ``sent`` (origins excluded)."""
    out = {}
    for a in nodes:
        counts = counts_at(net.nodes[a])
        missing = [i for i, o in sent.items() if o != a and counts[i] == 0]
        doubled = [i for i, o in sent.items() if counts[i] > 1]
        if missing or doubled:
            out[a] = (len(missing), len(doubled))
    return out


def all_delivered_once(net: SimNetwork, sent: dict[bytes, Addr], nodes: list[Addr]) -> bool:
    return not missing_or_doubled(net, sent, nodes)


# ----------------------------------------------------------------------------- pauses


def test_a_subscriber_silent_for_20_s_gets_every_missed_message_exactly_once() -> None:
    net, addrs = make_cluster(N, seed=31)
    paused = addrs[3]
    origins = [a for a in addrs if a != paused]
    sent: dict[bytes, Addr] = {}
    stream(net, origins, 2.0, b"before ", sent)
    net.pause(paused)
    stream(net, origins, 20.0, b"during ", sent)
    net.resume(paused)
    stream(net, origins, 3.0, b"after ", sent)
    assert net.run_until_true(lambda: all_delivered_once(net, sent, addrs), 15.0, 0.1), (
        missing_or_doubled(net, sent, addrs)
    )
    net.run_for(5.0)  # and nothing arrives twice later
    assert all_delivered_once(net, sent, addrs), missing_or_doubled(net, sent, addrs)
    core = net.nodes[paused].core
    assert core.stats["catch_up_pauses"] == 1
    assert core.stats["catch_up_recovered"] >= 150  # most of the 200 broadcast meanwhile
    # Nobody reports a loss: not the paused node, nor the peers that pulled from it.
    assert all(net.nodes[a].core.stats.get("catch_up_missed", 0) == 0 for a in addrs)


def test_without_catch_up_the_paused_node_loses_messages() -> None:
    """The same pause with catch-up off: the test above can fail."""
    net, addrs = make_cluster(N, seed=31, catch_up_window_s=0)
    paused = addrs[3]
    origins = [a for a in addrs if a != paused]
    sent: dict[bytes, Addr] = {}
    net.pause(paused)
    stream(net, origins, 20.0, b"during ", sent)
    net.resume(paused)
    net.run_for(10.0)
    missing, doubled = missing_or_doubled(net, sent, [paused])[paused]
    assert missing > 100 and doubled == 0


def test_beyond_the_window_the_missed_count_is_reported() -> None:
    window = 8.0
    net, addrs = make_cluster(N, seed=32, catch_up_window_s=window)
    paused = addrs[2]
    origins = [a for a in addrs if a != paused]
    sent: dict[bytes, Addr] = {}
    net.pause(paused)
    stream(net, origins, 20.0, b"during ", sent)
    net.resume(paused)
    core = net.nodes[paused].core
    assert net.run_until_true(lambda: core.stats.get("catch_up_missed", 0) > 0, 10.0, 0.1)
    net.run_for(10.0)
    counts = counts_at(net.nodes[paused])
    lost = sum(1 for i in sent if counts[i] == 0)
    assert all(counts[i] <= 1 for i in sent)
    # About window / RATE_S of the 200 come back; the rest are counted (to the 1 s
    # bucket of the eviction count, and the heartbeat of margin in the range asked).
    assert 80 <= lost <= 140, lost
    assert abs(core.stats["catch_up_missed"] - lost) <= 25, (core.stats["catch_up_missed"], lost)
    assert any("missed" in w and "for good" in w for w in core.warnings)
    # The others lost nothing and say so.
    assert all(net.nodes[a].core.stats.get("catch_up_missed", 0) == 0 for a in origins)
    # Everything in the window arrived: the newest broadcasts of the pause are there.
    newest = list(sent)[-int(window / RATE_S) + 20 :]
    assert all(counts[i] == 1 for i in newest)


# ----------------------------------------------------------------------------- partitions


class Halves:
    """Two halves that cannot reach each other between ``cut`` and ``heal``."""

    def __init__(self, left: set[Addr], cut: float, heal: float) -> None:
        self.left, self.cut, self.heal = left, cut, heal
        self.net: SimNetwork | None = None

    def __call__(self, src: Addr, dst: Addr, rng: object) -> float | None:
        if (
            self.net is not None
            and self.cut <= self.net.now < self.heal
            and ((src in self.left) != (dst in self.left))
        ):
            return None
        return 0.001


def test_a_partition_of_two_halves_heals_and_both_sides_catch_up() -> None:
    addrs = [addr(i) for i in range(N)]
    halves = Halves(set(addrs[: N // 2]), cut=5.0, heal=17.0)
    net, addrs = make_cluster(N, seed=33, link=halves, settle_s=0)  # type: ignore[arg-type]
    halves.net = net
    net.run_until(5.0)
    sent: dict[bytes, Addr] = {}
    stream(net, addrs, 12.0, b"split ", sent)  # both sides broadcast while cut
    left = addrs[: N // 2]
    right = addrs[N // 2 :]
    # While cut, each side has only its own side's messages.
    assert any(counts_at(net.nodes[left[0]])[i] == 0 for i, o in sent.items() if o in right)
    stream(net, addrs, 3.0, b"healed ", sent)
    assert net.run_until_true(lambda: all_delivered_once(net, sent, addrs), 30.0, 0.1), (
        missing_or_doubled(net, sent, addrs)
    )
    net.run_for(5.0)
    assert all_delivered_once(net, sent, addrs)
    assert sum(net.nodes[a].core.stats.get("catch_up_recovered", 0) for a in addrs) > 0


# ----------------------------------------------------------------------------- bounds


def _filled_core(entries: int, size: int, **overrides: object) -> NodeCore:
    core = lone_core("provider", **overrides)
    for i in range(entries):
        entry = wire.ENTRY_HEADER.pack(wire.EntryKind.APP, 1, node_id(9), size) + bytes(size)
        core.catch_up.history.add(i.to_bytes(16, "big"), entry, 0.0)
    return core


def _ask(core: NodeCore, peer: bytes, since_ms: int, cursor: int, wanted: list[bytes]) -> None:
    core.catch_up.on_ask(peer, wire.encode_catchup_ask(since_ms, cursor, wanted), 1.0)


def _offers(core: NodeCore, peer: bytes) -> list[tuple[int, int, int, list[bytes]]]:
    frames = core._control.pop(peer, [])
    return [
        wire.decode_catchup_offer(body)
        for ftype, body in wire.iter_frames(b"".join(frames))
        if ftype == FrameType.CATCHUP_OFFER
    ]


def test_an_offer_is_one_page_and_pages_cover_the_history_once() -> None:
    core = _filled_core(1000, 10, max_datagram_bytes=1400)
    peer = node_id(5)
    page = core.catch_up.page_ids
    got: list[bytes] = []
    cursor = 0
    for _ in range(100):
        _ask(core, peer, 60_000, cursor, [])
        ((asked, next_cursor, _, ids),) = _offers(core, peer)
        assert asked == cursor and len(ids) <= page
        cursor = next_cursor
        got += ids
        if cursor == CATCHUP_NO_MORE:
            break
    assert got == [i.to_bytes(16, "big") for i in range(1000)]


def test_forged_asks_cannot_make_a_node_send_more_than_its_budget() -> None:
    """Any number of asks, wanting everything again and again, from one peer: the
    entries and offers sent stay within catch_up_bytes per window."""
    budget = 1 << 16
    core = _filled_core(400, 1000, catch_up_bytes=budget, max_datagram_bytes=65_000)
    peer = node_id(5)
    everything = [i.to_bytes(16, "big") for i in range(400)]
    sent_bytes = 0
    for _ in range(200):
        _ask(core, peer, 0xFFFFFFFF, 0, everything)
        for _, entries in core.catch_up.take_resends():
            sent_bytes += sum(len(e) + 16 for _, e in entries)
        sent_bytes += sum(len(b) for b in core._control.pop(peer, []))
    assert sent_bytes <= budget + 1000 + 70_000  # one entry and one offer of overshoot
    assert core.stats["catch_up_refused"] > 150


def test_an_ask_for_unknown_ids_or_a_bogus_cursor_sends_nothing_but_an_empty_offer() -> None:
    core = _filled_core(10, 10)
    peer = node_id(5)
    _ask(core, peer, 1000, 1 << 40, [b"\xff" * 16] * 50)
    assert core.catch_up.take_resends() == []
    assert _offers(core, peer) == [(1 << 40, CATCHUP_NO_MORE, 0, [])]
    # An id asked many times in one ask is sent once.
    _ask(core, peer, 1000, CATCHUP_NO_MORE, [bytes(16)] * 50)
    ((_, entries),) = core.catch_up.take_resends()
    assert [i for i, _ in entries] == [bytes(16)]
    assert _offers(core, peer) == []


@pytest.mark.parametrize("ftype", [FrameType.CATCHUP_ASK, FrameType.CATCHUP_OFFER])
def test_a_malformed_catch_up_frame_from_a_peer_is_a_counted_drop(ftype: FrameType) -> None:
    net, addrs = make_cluster(2, seed=35, settle_s=2.0)
    core = net.nodes[addrs[0]].core
    session = next(iter(core.sessions.values()))
    before = core.stats.get("drop_malformed", 0)
    for body in (b"\x00" * 3, wire.CATCHUP_OFFER_HEADER.pack(0, 0, 0, 9) + bytes(16)):
        plaintext = wire.encode_frame(ftype, body)
        seq = session.replay.highest + 1
        core.receive_control_plaintext(
            session.local_session_id, seq, session.addr, plaintext, net.now
        )
    assert core.stats.get("drop_malformed", 0) == before + 2
    assert core.stats.get("catch_up_served", 0) == 0


def test_an_unsolicited_offer_is_ignored() -> None:
    core = lone_core("victim")
    body = wire.encode_catchup_offer(0, CATCHUP_NO_MORE, 1000, [bytes(16)] * 10)
    core.catch_up.on_offer(node_id(5), body, 1.0)
    assert core.stats["catch_up_stale_offers"] == 1
    assert core.stats.get("catch_up_missed", 0) == 0


def test_the_paused_node_is_up_again_everywhere() -> None:
    """Not catch-up's job, but its precondition: after the pause, everyone holds the
    node UP (refuted), so it is forwarded to again."""
    net, addrs = make_cluster(N, seed=34)
    paused = addrs[1]
    pid = net.nodes[paused].core.node_id
    net.pause(paused)
    net.run_for(20.0)
    net.resume(paused)
    net.run_for(5.0)
    for a in addrs:
        if a != paused:
            m = view_of(net.nodes[a].core, pid)
            assert m is not None and m.state == MemberState.UP


def test_a_large_message_is_pulled_from_its_origin() -> None:
    """An origin keeps its own fragments in the history too: in a two-node cluster
    (no relay to pull from) the paused peer still gets a large message exactly once."""
    net, (origin, paused) = make_cluster(2, seed=5, max_datagram_bytes=1400)
    net.pause(paused)
    data = bytes(range(256)) * 800  # 200 KiB: ~150 fragments at 1400 B
    msg_id = net.broadcast(origin, data)
    net.run_for(8.0)
    net.resume(paused)
    assert net.run_until_true(
        lambda: [m.data for m in messages(net.nodes[paused]) if m.id == msg_id] == [data],
        20.0,
        0.1,
    )
    net.run_for(3.0)
    assert [m.id for m in messages(net.nodes[paused])].count(msg_id) == 1
    # ... from the origin's history (~158 fragments), not only from the fragment window,
    # which waits for a subscriber and would stall a window behind a NAK in larger clusters.
    assert net.nodes[origin].core.stats.get("catch_up_served", 0) >= 150
