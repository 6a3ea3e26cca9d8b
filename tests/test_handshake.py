"""The Hello / Ohai / OkBoss / GoTeam handshake (gwyh_mp.protocol.handshake), driven by hand.

Two ``Handshaker`` objects exchange bytes directly; every refusal is checked for "no
reply at all" and for its stats counter, and every attack is followed by the genuine
exchange to prove the pending handshake was neither cancelled nor altered.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import (
    LABEL_HELLO,
    LABEL_OHAI,
    PskKeyring,
    mac,
    nonce,
    open_sealed,
    psk_to_key,
    seal,
    x25519_keypair,
)
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import PacketType
from tests.helpers_core import (
    PSK,
    PSK_NEW,
    PSK_OLD,
    PSK_WRONG,
    SECOND_NS,
    WALL_NS,
    Addr,
    Party,
    addr,
    lone_core,
    make_party,
    node_id,
    run_handshake,
    seeded_random,
)

HELLO, OHAI, OKBOSS, GOTEAM = (
    PacketType.HELLO,
    PacketType.OHAI,
    PacketType.OKBOSS,
    PacketType.GOTEAM,
)

# Byte ranges of the MAC-covered fields (wire.HELLO_FIXED / wire.OHAI_FIXED layouts).
HELLO_FIELDS = {
    "node_id": (18, 34),
    "public_key": (34, 66),
    "session_id": (66, 70),
    "incarnation": (70, 74),
    "timestamp": (80, 82),  # low bytes: a change well inside the time window
    "zone": (83, 85),  # the zone text "za"
}
OHAI_FIELDS = {
    "node_id": (18, 34),
    "public_key": (34, 66),
    "session_id": (66, 70),
    "incarnation": (70, 74),
    "challenge": (74, 90),
    "zone": (91, 93),  # the zone text "zb"
}


def _flip(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(b ^ 0x5A for b in data[start:end]) + data[end:]


def _pair(**kwargs: float | int) -> tuple[Party, Party]:
    return make_party(1, zone="za", **kwargs), make_party(2, zone="zb", **kwargs)


def _assert_no_state(p: Party) -> None:
    assert p.hs.half_open == 0
    assert p.hs.next_timer() is None
    assert p.sids.live == set()


# ----------------------------------------------------------------------------- success


def test_full_handshake_derives_matching_keys_and_session_ids() -> None:
    a, b = _pair()
    t = run_handshake(a, b, incarnation_a=3, incarnation_b=7)
    assert t.ohai and t.okboss and t.goteam
    ia, rb = t.initiator, t.responder
    assert ia is not None and rb is not None
    # keys: one per direction, crossed
    assert ia.send_key == rb.recv_key and ia.recv_key == rb.send_key
    assert ia.send_key != ia.recv_key
    # session ids: each side's local id is the other's remote id
    assert ia.local_session_id == rb.remote_session_id
    assert ia.remote_session_id == rb.local_session_id
    assert ia.local_session_id in a.sids.live and rb.local_session_id in b.sids.live
    # identities, zones, incarnations, addresses, roles
    assert (ia.peer_id, ia.peer_zone, ia.peer_incarnation, ia.addr) == (b.node_id, "zb", 7, b.addr)
    assert (rb.peer_id, rb.peer_zone, rb.peer_incarnation, rb.addr) == (a.node_id, "za", 3, a.addr)
    assert ia.initiator and not rb.initiator
    # the keys really work, both ways
    n = nonce(1)
    assert open_sealed(rb.recv_key, n, seal(ia.send_key, n, b"a->b")) == b"a->b"
    assert open_sealed(ia.recv_key, n, seal(rb.send_key, n, b"b->a")) == b"b->a"
    # nothing half-open is left on the initiator; the responder keeps only a done state
    assert not a.hs.is_initiating(b.addr)
    assert a.hs.half_open == 0 and b.hs.half_open == 0
    assert a.hs.stats["established_initiator"] == 1
    assert b.hs.stats["established_responder"] == 1


def test_every_handshake_derives_fresh_keys() -> None:
    a, b = _pair()
    first = run_handshake(a, b)
    second = run_handshake(a, b, now=1.0, wall_ns=WALL_NS + SECOND_NS)
    assert first.initiator and second.initiator
    assert first.initiator.send_key != second.initiator.send_key
    assert first.initiator.local_session_id != second.initiator.local_session_id


def test_packet_types_and_no_reply_is_larger_than_its_trigger() -> None:
    a, b = _pair()
    t = run_handshake(a, b)
    assert t.ohai and t.okboss and t.goteam
    assert [p[1] for p in (t.hello, t.ohai, t.okboss, t.goteam)] == [HELLO, OHAI, OKBOSS, GOTEAM]
    assert len(t.hello) == wire.HELLO_PADDED_BYTES
    assert len(t.ohai) <= len(t.hello)
    assert len(t.goteam) <= len(t.okboss)


zone_st = st.one_of(
    st.none(),
    st.text(max_size=64).filter(lambda z: len(z.encode()) <= wire.MAX_ZONE_BYTES),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    zone_a=zone_st,
    zone_b=zone_st,
    extra_a=st.integers(0, 7),
    extra_b=st.integers(0, 7),
)
def test_replies_never_exceed_their_trigger(
    zone_a: str | None, zone_b: str | None, extra_a: int, extra_b: int
) -> None:
    """Whatever the zones and the number of PSKs, Ohai <= Hello and GoTeam <= OkBoss;
    a retransmitted Hello gets the very same Ohai."""
    psks_a = [PSK] + [bytes([i]) * 32 for i in range(extra_a)]
    psks_b = [bytes([100 + i]) * 32 for i in range(extra_b)] + [PSK]
    a = make_party(1, psks_a, zone=zone_a)
    b = make_party(2, psks_b, zone=zone_b)
    t = run_handshake(a, b)
    assert t.ohai and t.okboss and t.goteam and t.initiator and t.responder
    assert len(t.ohai) <= len(t.hello)
    assert len(t.goteam) <= len(t.okboss)
    assert t.initiator.peer_zone == zone_b and t.responder.peer_zone == zone_a


# ----------------------------------------------------------------------------- refusals


def test_wrong_psk_gets_no_reply_and_is_counted() -> None:
    a = make_party(1, [PSK_WRONG])
    b = make_party(2, [PSK])
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    assert b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS) == (None, None)
    assert b.hs.stats == {"hello_bad_mac": 1}
    _assert_no_state(b)
    assert b.sids.next_sid == 1  # not even a session id was allocated


def test_wrong_psk_node_core_sends_nothing() -> None:
    core = lone_core("core", settle=False)
    assert core.datagrams_to_send(0.0) == []  # no seeds: nothing to say
    stranger = make_party(5, [PSK_WRONG])
    for i in range(3):
        hello = stranger.hs.initiate(addr(10 + i), 0.0, WALL_NS)
        core.receive_datagram(hello, addr(10 + i), 0.0)
    assert core.datagrams_to_send(0.0) == []
    assert core.handshaker.stats["hello_bad_mac"] == 3
    assert core.sessions == {} and core.member_list() == []


@pytest.mark.parametrize(
    ("skew_s", "accepted"),
    [(0.0, True), (59.0, True), (-59.0, True), (61.0, False), (-61.0, False)],
)
def test_hello_time_window_default_60s(skew_s: float, accepted: bool) -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    reply, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS + int(skew_s * SECOND_NS))
    assert (reply is not None) == accepted
    if not accepted:
        assert b.hs.stats == {"hello_stale": 1}
        _assert_no_state(b)


@pytest.mark.parametrize(("skew_s", "accepted"), [(4.9, True), (-4.9, True), (5.1, False)])
def test_hello_time_window_is_configurable(skew_s: float, accepted: bool) -> None:
    a = make_party(1)
    b = make_party(2, window_s=5.0)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    reply, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS + int(skew_s * SECOND_NS))
    assert (reply is not None) == accepted


@pytest.mark.parametrize(("skew_s", "accepted"), [(59.0, True), (61.0, False), (29.0, True)])
def test_node_core_applies_the_configured_window(skew_s: float, accepted: bool) -> None:
    """The node's wall clock (monotonic now + wall_offset_s) drives the time lock."""
    window = 30.0 if skew_s == 29.0 else 60.0
    core = lone_core("core", settle=False, skew_s=skew_s, handshake_window_s=window)
    a = make_party(1)
    core.receive_datagram(a.hs.initiate(addr(0), 0.0, WALL_NS), a.addr, 0.0)
    out = core.datagrams_to_send(0.0)
    assert bool(out) == accepted
    if accepted:
        assert [d[1] for d, _ in out] == [OHAI]
    else:
        assert core.handshaker.stats["hello_stale"] == 1


def test_replayed_hello_gets_no_second_ohai() -> None:
    a, b = _pair(timeout_s=10.0)
    t = run_handshake(a, b)
    assert t.responder is not None
    sids_used = b.sids.next_sid
    # while the responder still holds the completed state
    assert b.hs.handle(HELLO, t.hello, a.addr, 1.0, WALL_NS + SECOND_NS) == (None, None)
    assert b.hs.stats["hello_duplicate"] == 1
    # after that state expired, the id is still remembered for the time-lock window
    b.hs.handle_timer(11.0)
    assert b.hs.half_open == 0
    assert b.hs.handle(HELLO, t.hello, a.addr, 20.0, WALL_NS + 20 * SECOND_NS) == (None, None)
    assert b.hs.stats["hello_replay"] == 1
    # from another address too
    assert b.hs.handle(HELLO, t.hello, addr(9), 21.0, WALL_NS + 21 * SECOND_NS) == (None, None)
    assert b.sids.next_sid == sids_used
    assert b.hs.stats["ohai_sent"] == 1


def test_retransmitted_hello_while_pending_repeats_the_same_ohai_only_to_its_sender() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    again, _ = b.hs.handle(HELLO, hello, a.addr, 0.5, WALL_NS)
    assert ohai is not None and again == ohai
    assert b.hs.stats["hello_retransmit"] == 1
    # the same Hello "from" a spoofed victim address gets nothing
    assert b.hs.handle(HELLO, hello, addr(9), 0.5, WALL_NS) == (None, None)
    assert b.hs.half_open == 1 and len(b.sids.live) == 1


def test_hello_from_itself_is_ignored() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    # reflected straight back to the initiator
    assert a.hs.handle(HELLO, hello, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["hello_self"] == 1
    assert a.hs.half_open == 1  # only its own pending Hello


def test_half_open_responder_states_are_bounded() -> None:
    b = make_party(2, max_half_open=2)
    replies = []
    for i in range(3):
        a = make_party(10 + i)
        replies.append(
            b.hs.handle(HELLO, a.hs.initiate(b.addr, 0.0, WALL_NS), a.addr, 0.0, WALL_NS)
        )
    assert [r is not None for r, _ in replies] == [True, True, False]
    assert b.hs.stats["hello_overload"] == 1


def _hello_with_key(a: Party, public_key: bytes, psks: list[bytes]) -> bytes:
    signed = wire.encode_hello_signed(b"h" * 16, a.node_id, public_key, 1, 0, WALL_NS, None)
    return wire.finish_hello(signed, PskKeyring(psks).macs(LABEL_HELLO, signed))


def test_low_order_public_key_is_refused() -> None:
    a, b = _pair()
    hello = _hello_with_key(a, bytes(32), [PSK])  # validly MACed, degenerate key
    assert b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS) == (None, None)
    assert b.hs.stats["hello_bad_key"] == 1
    _assert_no_state(b)
    # and in an Ohai
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    hs_id = wire.decode_hello(hello).hs_id
    signed = wire.encode_ohai_signed(hs_id, b.node_id, bytes(32), 9, 0, b"c" * 16, None)
    ohai = signed + mac(psk_to_key(PSK), LABEL_OHAI, wire.decode_hello(hello).signed + signed)
    assert a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["ohai_bad_key"] == 1
    assert a.hs.is_initiating(b.addr)


def test_non_handshake_type_is_a_wire_error() -> None:
    a, _ = _pair()
    with pytest.raises(wire.WireError):
        a.hs.handle(PacketType.CONTROL, b"\x01\x10" + bytes(20), addr(2), 0.0, WALL_NS)


# ----------------------------------------------------------------------------- attacks


def test_reflected_hello_macs_in_an_ohai_are_refused() -> None:
    """gwyh §8.4: echoing the initiator's own Hello MACs inside an Ohai that carries the
    attacker's key must not authenticate."""
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    parsed = wire.decode_hello(hello)
    _, attacker_pk = x25519_keypair(seeded_random("attacker"))
    for hello_mac in parsed.macs:
        signed = wire.encode_ohai_signed(
            parsed.hs_id, node_id(66), attacker_pk, 99, 0, b"c" * 16, None
        )
        assert a.hs.handle(OHAI, signed + hello_mac, b.addr, 0.0, WALL_NS) == (None, None)
    # the Hello MAC recomputed over Hello+Ohai is not an Ohai MAC either (role label)
    signed = wire.encode_ohai_signed(parsed.hs_id, node_id(66), attacker_pk, 99, 0, b"c" * 16, None)
    relabelled = mac(psk_to_key(PSK), LABEL_HELLO, parsed.signed + signed)
    assert a.hs.handle(OHAI, signed + relabelled, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["ohai_bad_mac"] == len(parsed.macs) + 1
    assert a.hs.is_initiating(b.addr)
    # the genuine responder still completes the very same handshake
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)
    assert okboss is not None
    goteam, rb = b.hs.handle(OKBOSS, okboss, a.addr, 0.0, WALL_NS)
    assert goteam is not None
    _, ia = a.hs.handle(GOTEAM, goteam, b.addr, 0.0, WALL_NS)
    assert ia is not None and rb is not None and ia.peer_id == b.node_id
    assert ia.send_key == rb.recv_key


@pytest.mark.parametrize("field", sorted(HELLO_FIELDS))
def test_tampered_hello_field_is_refused(field: str) -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    start, end = HELLO_FIELDS[field]
    if field == "public_key":
        _, other = x25519_keypair(seeded_random("mitm"))
        forged = hello[:start] + other + hello[end:]
    else:
        forged = _flip(hello, start, end)
    assert forged != hello
    assert b.hs.handle(HELLO, forged, a.addr, 0.0, WALL_NS) == (None, None)
    assert b.hs.stats in ({"hello_bad_mac": 1}, {"hello_stale": 1})
    _assert_no_state(b)
    # the untouched Hello still works afterwards
    assert b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)[0] is not None


@pytest.mark.parametrize("field", sorted(OHAI_FIELDS))
def test_tampered_ohai_field_is_refused_and_does_not_cancel(field: str) -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    start, end = OHAI_FIELDS[field]
    if field == "public_key":
        _, other = x25519_keypair(seeded_random("mitm"))
        forged = ohai[:start] + other + ohai[end:]
    else:
        forged = _flip(ohai, start, end)
    assert a.hs.handle(OHAI, forged, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["ohai_bad_mac"] == 1
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)
    assert okboss is not None
    goteam, rb = b.hs.handle(OKBOSS, okboss, a.addr, 0.0, WALL_NS)
    assert goteam is not None and rb is not None
    _, ia = a.hs.handle(GOTEAM, goteam, b.addr, 0.0, WALL_NS)
    assert ia is not None and ia.send_key == rb.recv_key


def test_forged_goteam_is_ignored_and_the_real_one_completes() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    hs_id = wire.decode_hello(hello).hs_id
    forged = wire.encode_confirm(GOTEAM, hs_id, b"\x00" * 32)
    # before the Ohai: nothing to confirm yet
    assert a.hs.handle(GOTEAM, forged, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["goteam_unknown"] == 1
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)
    assert okboss is not None
    # after the Ohai: a random MAC, and A's own OkBoss MAC reflected as a GoTeam
    reflected = wire.encode_confirm(GOTEAM, hs_id, wire.decode_confirm(okboss).mac)
    for bad in (forged, reflected):
        assert a.hs.handle(GOTEAM, bad, b.addr, 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["goteam_bad_mac"] == 2
    assert a.hs.is_initiating(b.addr)
    goteam, rb = b.hs.handle(OKBOSS, okboss, a.addr, 0.0, WALL_NS)
    assert goteam is not None
    # the genuine GoTeam from a spoofed address is not accepted either
    assert a.hs.handle(GOTEAM, goteam, addr(9), 0.0, WALL_NS) == (None, None)
    _, ia = a.hs.handle(GOTEAM, goteam, b.addr, 0.0, WALL_NS)
    assert ia is not None and rb is not None and ia.recv_key == rb.send_key


def test_forged_okboss_is_ignored_and_the_real_one_completes() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    hs_id = wire.decode_hello(hello).hs_id
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)
    assert okboss is not None
    forged = wire.encode_confirm(OKBOSS, hs_id, b"\x11" * 32)
    assert b.hs.handle(OKBOSS, forged, a.addr, 0.0, WALL_NS) == (None, None)
    assert b.hs.stats["okboss_bad_mac"] == 1
    # the genuine OkBoss from another address does not count
    assert b.hs.handle(OKBOSS, okboss, addr(9), 0.0, WALL_NS) == (None, None)
    assert b.hs.stats["okboss_unknown"] == 1
    assert b.hs.half_open == 1
    goteam, rb = b.hs.handle(OKBOSS, okboss, a.addr, 0.0, WALL_NS)
    assert goteam is not None and rb is not None
    _, ia = a.hs.handle(GOTEAM, goteam, b.addr, 0.0, WALL_NS)
    assert ia is not None and ia.send_key == rb.recv_key


def test_ohai_from_another_address_is_ignored() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    assert a.hs.handle(OHAI, ohai, addr(9), 0.0, WALL_NS) == (None, None)
    assert a.hs.stats["ohai_unknown"] == 1
    assert a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)[0] is not None


def test_duplicate_ohai_repeats_the_same_okboss() -> None:
    a, b = _pair()
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.0, WALL_NS)
    assert ohai is not None
    first, _ = a.hs.handle(OHAI, ohai, b.addr, 0.0, WALL_NS)
    second, _ = a.hs.handle(OHAI, ohai, b.addr, 0.1, WALL_NS)
    assert first is not None and first == second
    assert len(a.sids.live) == 1


def test_one_initiation_per_address() -> None:
    a, b = _pair()
    h1 = a.hs.initiate(b.addr, 0.0, WALL_NS)
    h2 = a.hs.initiate(b.addr, 0.5, WALL_NS)
    h3 = a.hs.initiate(addr(7), 0.5, WALL_NS)
    assert h1 == h2 != h3
    assert a.hs.stats["initiated"] == 2 and len(a.sids.live) == 2


# ----------------------------------------------------------------------------- timers


def test_initiator_retransmits_every_retry_s_then_gives_up() -> None:
    a, b = _pair(retry_s=1.0, timeout_s=10.0)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    sid = next(iter(a.sids.live))
    sent: list[tuple[float, bytes, Addr]] = []
    failures: list[tuple[float, Addr]] = []
    while (due := a.hs.next_timer()) is not None:
        assert due <= 10.0
        out, failed = a.hs.handle_timer(due)
        sent += [(due, d, dst) for d, dst in out]
        failures += [(due, f) for f in failed]
    assert [t for t, _, _ in sent] == [float(i) for i in range(1, 10)]
    assert all(d == hello and dst == b.addr for _, d, dst in sent)
    assert failures == [(10.0, b.addr)]
    assert not a.hs.is_initiating(b.addr)
    assert a.sids.released == [sid]
    _assert_no_state(a)
    assert a.hs.stats["retransmit"] == 9 and a.hs.stats["initiator_timeout"] == 1


def test_initiator_retransmits_okboss_once_the_ohai_arrived() -> None:
    a, b = _pair(retry_s=1.0, timeout_s=10.0)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.1, WALL_NS)
    assert ohai is not None
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 0.2, WALL_NS)
    assert okboss is not None
    goteam, rb = b.hs.handle(OKBOSS, okboss, a.addr, 0.3, WALL_NS)
    assert goteam is not None and rb is not None
    # the GoTeam is lost: A repeats its OkBoss, B repeats the same GoTeam, once established
    out, failed = a.hs.handle_timer(1.0)
    assert out == [(okboss, b.addr)] and failed == []
    again, rb2 = b.hs.handle(OKBOSS, okboss, a.addr, 1.1, WALL_NS)
    assert again == goteam and rb2 is None
    assert b.hs.stats["okboss_retransmit"] == 1
    _, ia = a.hs.handle(GOTEAM, again, b.addr, 1.2, WALL_NS)
    assert ia is not None and ia.send_key == rb.recv_key
    assert a.hs.next_timer() is None


def test_responder_half_open_state_expires_and_frees_its_session_id() -> None:
    a, b = _pair(timeout_s=10.0)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 2.0, WALL_NS)
    assert ohai is not None
    okboss, _ = a.hs.handle(OHAI, ohai, b.addr, 2.0, WALL_NS)
    assert okboss is not None
    (sid,) = b.sids.live
    assert b.hs.half_open == 1
    assert b.hs.next_timer() == 12.0
    b.hs.handle_timer(11.9)
    assert b.hs.half_open == 1 and b.sids.released == []
    b.hs.handle_timer(12.0)
    assert b.hs.half_open == 0
    assert b.sids.released == [sid] and b.sids.live == set()
    assert b.hs.stats["responder_timeout"] == 1
    # the late OkBoss finds nothing
    assert b.hs.handle(OKBOSS, okboss, a.addr, 12.5, WALL_NS) == (None, None)
    assert b.hs.stats["okboss_unknown"] == 1


def test_completed_responder_state_keeps_its_session_id_on_expiry() -> None:
    a, b = _pair(timeout_s=10.0)
    t = run_handshake(a, b)
    assert t.responder is not None
    b.hs.handle_timer(10.0)
    assert b.sids.released == []  # the session owns it now
    assert t.responder.local_session_id in b.sids.live


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize(
    ("init_psks", "resp_psks", "ok"),
    [
        ([PSK_OLD, PSK_NEW], [PSK_OLD], True),
        ([PSK_OLD], [PSK_OLD, PSK_NEW], True),
        ([PSK_OLD, PSK_NEW], [PSK_NEW], True),
        ([PSK_NEW], [PSK_OLD, PSK_NEW], True),
        ([PSK_NEW, PSK_OLD], [PSK_OLD, PSK_NEW], True),
        ([PSK_OLD], [PSK_NEW], False),
        ([PSK_NEW], [PSK_OLD], False),
    ],
    ids=["A->B", "B->A", "A->C", "C->A", "A->A2", "B->C", "C->B"],
)
def test_key_rotation(init_psks: list[bytes], resp_psks: list[bytes], ok: bool) -> None:
    """A holds [old, new], B [old], C [new]: A talks to both, B and C cannot talk."""
    i = make_party(1, init_psks)
    r = make_party(2, resp_psks)
    t = run_handshake(i, r)
    if ok:
        assert t.initiator is not None and t.responder is not None
        assert t.initiator.send_key == t.responder.recv_key
        assert t.initiator.recv_key == t.responder.send_key
    else:
        assert t.ohai is None
        assert r.hs.stats == {"hello_bad_mac": 1}
        _assert_no_state(r)


def test_next_timer_is_never_later_than_the_earliest_deadline() -> None:
    """next_timer is cached (a node asks after every datagram): after any sequence of
    starts, answers and expiries it is never later than the true earliest deadline,
    and it is None once nothing is pending."""
    a, b = _pair(retry_s=1.0, timeout_s=10.0)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    assert a.hs.next_timer() == 1.0
    ohai, _ = b.hs.handle(HELLO, hello, a.addr, 0.5, WALL_NS)
    assert ohai is not None and b.hs.next_timer() == 10.5  # the responder state expires
    a.hs.handle_timer(1.0)  # retransmit: next retry at 2.0
    assert a.hs.next_timer() == 2.0
    b.hs.handle_timer(10.5)
    assert b.hs.next_timer() is None


def _core_at(i: int, **overrides: object) -> NodeCore:
    return NodeCore(
        Config.local(bind=addr(i), psks=[PSK], **overrides),  # type: ignore[arg-type]
        0.0,
        wall_offset_s=WALL_NS / 1e9,
        random_bytes=seeded_random(f"core{i}"),
    )


@pytest.mark.parametrize("first_tick_s", [0.01, 0.5, 5.0])
def test_a_first_tick_after_the_bootstrap_handshake_does_not_start_another(
    first_tick_s: float,
) -> None:
    """A joining node's first heartbeat tick comes late (a loaded event loop), after its
    bootstrap handshake completed but before any provider is confirmed: it must not
    handshake the seed again (two sessions per joiner); once the handshake is older than
    a retry, an alone node re-handshakes its seeds as before."""
    seed, joiner = _core_at(0), _core_at(1, bootstrap=[addr(0)])
    seed.start(0.0)
    joiner.start(0.0)
    cores = {addr(0): seed, addr(1): joiner}
    now = 0.0
    for _ in range(10):  # HELLO, OHAI, OKBOSS, GOTEAM, then whatever follows at once
        moved = False
        for src, core in cores.items():
            for data, dst in core.datagrams_to_send(now):
                cores[dst].receive_datagram(data, src, now)
                moved = True
        if not moved:
            break
    assert joiner.handshaker.stats["established_initiator"] == 1
    now = first_tick_s
    joiner.handle_timer(now)
    hellos = [d for d, _ in joiner.datagrams_to_send(now) if d[1] == PacketType.HELLO]
    retry = joiner.config.handshake_retry_s
    assert retry is not None
    assert len(hellos) == (0 if first_tick_s < retry else 1)
    assert joiner.handshaker.stats["initiated"] == (1 if first_tick_s < retry else 2)
