"""Wire format v1 (gwyh_mp.protocol.wire): round trips, strictness and robustness.

Decoders must turn anything malformed into an exception the node counts as a silent
drop -- never a crash -- and the node itself must survive arbitrary bytes, truncations
and single-byte mutations of real datagrams.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.wire import (
    HELLO_PADDED_BYTES,
    MAX_ZONE_BYTES,
    VERSION,
    FrameType,
    MemberRecord,
    MemberState,
    PacketType,
    WireError,
)
from tests.helpers_core import WALL_NS, Addr, CheckedSimNetwork, addr, make_cluster, make_party

# What NodeCore.receive_datagram turns into a counted "drop_malformed".
NODE_CATCHES = (WireError, struct.error, ValueError, IndexError)

FAST = settings(max_examples=150, deadline=None, derandomize=True)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

b16 = st.binary(min_size=16, max_size=16)
b32 = st.binary(min_size=32, max_size=32)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
zones = st.one_of(
    st.none(),
    st.text(max_size=MAX_ZONE_BYTES).filter(lambda z: len(z.encode()) <= MAX_ZONE_BYTES),
)


def _sendable(host: str) -> bool:
    """decode_member drops hosts that sendto() would refuse with a UnicodeError (a..b)."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


ascii_hosts = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=wire.MAX_HOST_BYTES
).filter(_sendable)
mac_lists = st.lists(b32, min_size=1, max_size=wire.MAX_PSKS_PER_HELLO)
records = st.builds(
    MemberRecord,
    node_id=b16,
    incarnation=u32,
    state=st.sampled_from(list(MemberState)),
    host=ascii_hosts,
    port=st.integers(1, 0xFFFF),  # port 0 is dropped too
    zone=zones,
)


def _hello(
    hs_id: bytes = b"H" * 16,
    node: bytes = b"N" * 16,
    pk: bytes = b"P" * 32,
    sid: int = 7,
    inc: int = 3,
    ts: int = 1_800_000_000 * 10**9,
    zone: str | None = "zone-a",
    macs: list[bytes] | None = None,
) -> bytes:
    signed = wire.encode_hello_signed(hs_id, node, pk, sid, inc, ts, zone)
    return wire.finish_hello(signed, macs if macs is not None else [b"M" * 32])


def _ohai(zone: str | None = "zone-b", mac: bytes = b"m" * 32) -> bytes:
    signed = wire.encode_ohai_signed(b"H" * 16, b"R" * 16, b"Q" * 32, 9, 4, b"C" * 16, zone)
    return signed + mac


def _valid_samples() -> list[tuple[str, bytes]]:
    rec = MemberRecord(b"n" * 16, 5, MemberState.UP, "10.0.0.1", 7000, "a")
    return [
        ("hello", _hello()),
        ("hello-8-macs", _hello(macs=[bytes([i]) * 32 for i in range(8)])),
        ("ohai", _ohai()),
        ("ohai-no-zone", _ohai(zone=None)),
        ("okboss", wire.encode_confirm(PacketType.OKBOSS, b"H" * 16, b"c" * 32)),
        ("member", rec.encode()),
        ("members", wire.encode_members([rec, rec])),
        ("frames", wire.encode_frame(FrameType.PING, b"abc") + wire.encode_frame(FrameType.NAK)),
    ]


def _decode(kind: str, data: bytes) -> object:
    if kind.startswith("hello"):
        return wire.decode_hello(data)
    if kind.startswith("ohai"):
        return wire.decode_ohai(data)
    if kind == "okboss":
        return wire.decode_confirm(data)
    if kind == "member":
        return wire.decode_member(data)
    if kind == "members":
        return wire.decode_members(data)
    return wire.iter_frames(data)


DECODERS = [
    wire.decode_hello,
    wire.decode_ohai,
    wire.decode_confirm,
    wire.decode_member,
    wire.decode_members,
    wire.iter_frames,
]

# ----------------------------------------------------------------------------- round trips


@FAST
@given(b16, b16, b32, u32, u32, u64, zones, mac_lists)
def test_hello_round_trip(
    hs_id: bytes,
    node: bytes,
    pk: bytes,
    sid: int,
    inc: int,
    ts: int,
    zone: str | None,
    macs: list[bytes],
) -> None:
    signed = wire.encode_hello_signed(hs_id, node, pk, sid, inc, ts, zone)
    data = wire.finish_hello(signed, macs)
    assert data[0] == VERSION and data[1] == PacketType.HELLO
    assert len(data) >= HELLO_PADDED_BYTES
    hello = wire.decode_hello(data)
    assert (hello.hs_id, hello.node_id, hello.public_key) == (hs_id, node, pk)
    assert (hello.session_id, hello.incarnation, hello.timestamp_ns) == (sid, inc, ts)
    assert hello.zone == zone
    assert hello.signed == signed
    assert list(hello.macs) == macs


def test_small_hello_is_padded_to_exactly_the_padded_size() -> None:
    data = _hello(zone=None)
    assert len(data) == HELLO_PADDED_BYTES
    # A big Hello (8 MACs, long zone) is never truncated to the padded size.
    big = _hello(zone="z" * MAX_ZONE_BYTES, macs=[b"x" * 32] * 8)
    assert len(big) > HELLO_PADDED_BYTES
    assert len(wire.decode_hello(big).macs) == 8


@FAST
@given(b16, b16, b32, u32, u32, b16, zones, b32)
def test_ohai_round_trip(
    hs_id: bytes,
    node: bytes,
    pk: bytes,
    sid: int,
    inc: int,
    challenge: bytes,
    zone: str | None,
    mac: bytes,
) -> None:
    signed = wire.encode_ohai_signed(hs_id, node, pk, sid, inc, challenge, zone)
    data = signed + mac
    assert data[:2] == bytes((VERSION, PacketType.OHAI))
    ohai = wire.decode_ohai(data)
    assert (ohai.hs_id, ohai.node_id, ohai.public_key) == (hs_id, node, pk)
    assert (ohai.session_id, ohai.incarnation, ohai.challenge) == (sid, inc, challenge)
    assert ohai.zone == zone
    assert (ohai.signed, ohai.mac) == (signed, mac)


@FAST
@given(st.sampled_from([PacketType.OKBOSS, PacketType.GOTEAM]), b16, b32)
def test_confirm_round_trip(ptype: PacketType, hs_id: bytes, mac: bytes) -> None:
    data = wire.encode_confirm(ptype, hs_id, mac)
    assert len(data) == wire.CONFIRM.size == 50
    assert data[:2] == bytes((VERSION, ptype))
    assert wire.decode_confirm(data) == wire.Confirm(ptype, hs_id, mac)


@FAST
@given(records, st.binary(max_size=8))
def test_member_record_round_trip_at_any_offset(rec: MemberRecord, prefix: bytes) -> None:
    encoded = rec.encode()
    decoded, end = wire.decode_member(prefix + encoded + b"tail", len(prefix))
    assert decoded == rec
    assert end == len(prefix) + len(encoded)
    # memoryview input (the node's hot path) decodes identically
    assert wire.decode_member(memoryview(encoded)) == (rec, len(encoded))


@FAST
@given(st.lists(records, max_size=12))
def test_member_list_round_trip(recs: list[MemberRecord]) -> None:
    data = wire.encode_members(recs)
    assert wire.decode_members(data) == recs
    with pytest.raises(WireError):
        wire.decode_members(data + b"\x00")  # trailing bytes
    if recs:
        with pytest.raises(WireError):
            wire.decode_members(data[:-1])


def test_member_list_count_larger_than_content_is_refused() -> None:
    rec = MemberRecord(b"n" * 16, 1, MemberState.DOWN, "h", 1, None)
    data = struct.pack("!H", 2) + rec.encode()
    with pytest.raises(WireError):
        wire.decode_members(data)
    with pytest.raises(WireError):
        wire.decode_members(b"\x00")


@FAST
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8))
def test_frames_round_trip_and_unknown_types_are_kept(frames: list[tuple[int, bytes]]) -> None:
    data = b"".join(wire.FRAME_HEADER.pack(t, len(b)) + b for t, b in frames)
    assert wire.iter_frames(data) == frames
    assert wire.iter_frames(memoryview(data)) == frames


def test_frame_encoding_and_limits() -> None:
    assert wire.encode_frame(FrameType.PING, b"xy") == bytes((FrameType.PING, 0, 2)) + b"xy"
    assert wire.encode_frame(FrameType.HEARTBEAT) == bytes((FrameType.HEARTBEAT, 0, 0))
    assert len(wire.encode_frame(FrameType.PEERS, bytes(wire.MAX_FRAME_BODY))) == 3 + 0xFFFF
    with pytest.raises(ValueError):
        wire.encode_frame(FrameType.PEERS, bytes(wire.MAX_FRAME_BODY + 1))
    good = wire.encode_frame(FrameType.PING, b"abc")
    for cut in range(1, len(good)):
        with pytest.raises(WireError):
            wire.iter_frames(good[:cut])
    assert wire.iter_frames(b"") == []


# ----------------------------------------------------------------------------- strictness


def test_unpadded_hello_is_refused() -> None:
    signed = wire.encode_hello_signed(b"H" * 16, b"N" * 16, b"P" * 32, 1, 0, 5, None)
    unpadded = signed + b"\x01" + b"M" * 32
    assert len(unpadded) < HELLO_PADDED_BYTES
    with pytest.raises(WireError, match="short hello"):
        wire.decode_hello(unpadded)
    # one byte short of the padded size is still refused; the padded one parses
    padded = wire.finish_hello(signed, [b"M" * 32])
    with pytest.raises(WireError):
        wire.decode_hello(padded[: HELLO_PADDED_BYTES - 1])
    assert wire.decode_hello(padded).macs == (b"M" * 32,)


def test_unpadded_hello_gets_no_reply_from_a_node() -> None:
    """Even with valid MACs and a fresh timestamp, an unpadded Hello is dropped: no
    amplification possible. The same Hello padded gets its Ohai."""
    net, addrs = make_cluster(1, settle_s=0.1)
    core = net.nodes[addrs[0]].core
    initiator = make_party(1)
    hello = initiator.hs.initiate(addrs[0], 0.0, WALL_NS + int(net.now * 1e9))
    body_len = len(wire.decode_hello(hello).signed) + 1 + 32
    assert body_len < len(hello) == HELLO_PADDED_BYTES
    core.receive_datagram(hello[:body_len], initiator.addr, net.now)
    assert core.datagrams_to_send(net.now) == []
    assert core.stats["drop_malformed"] == 1
    assert core.handshaker.stats.get("ohai_sent", 0) == 0
    core.receive_datagram(hello, initiator.addr, net.now)
    out = core.datagrams_to_send(net.now)
    assert [(d[1], a) for d, a in out] == [(PacketType.OHAI, initiator.addr)]
    assert len(out[0][0]) <= len(hello)


@pytest.mark.parametrize("count", [0, wire.MAX_PSKS_PER_HELLO + 1])
def test_hello_mac_count_out_of_range_is_refused(count: int) -> None:
    signed = wire.encode_hello_signed(b"H" * 16, b"N" * 16, b"P" * 32, 1, 0, 5, None)
    data = signed + bytes((count,)) + b"M" * 32 * count
    data += bytes(max(0, HELLO_PADDED_BYTES - len(data)))
    with pytest.raises(WireError, match="mac count"):
        wire.decode_hello(data)


def test_hello_mac_count_beyond_the_datagram_is_refused() -> None:
    signed = wire.encode_hello_signed(b"H" * 16, b"N" * 16, b"P" * 32, 1, 0, 5, None)
    data = signed + bytes((8,)) + b"M" * 32  # claims 8 MACs, carries 1 (+ padding)
    data += bytes(HELLO_PADDED_BYTES - len(data))
    assert len(data) < len(signed) + 1 + 8 * 32
    with pytest.raises(WireError):
        wire.decode_hello(data)


def test_ohai_length_must_be_exact() -> None:
    data = _ohai()
    assert wire.decode_ohai(data).mac == b"m" * 32
    with pytest.raises(WireError):
        wire.decode_ohai(data + b"\x00")
    with pytest.raises(WireError):
        wire.decode_ohai(data[:-1])
    with pytest.raises(WireError):
        wire.decode_ohai(data[: wire.OHAI_FIXED.size])


def test_confirm_length_must_be_exact() -> None:
    data = wire.encode_confirm(PacketType.GOTEAM, b"H" * 16, b"c" * 32)
    for bad in (data[:-1], data + b"\x00", b""):
        with pytest.raises(WireError):
            wire.decode_confirm(bad)


def test_zone_none_and_empty_string_are_distinct() -> None:
    assert wire._encode_zone(None) == b"\xff"
    assert wire._encode_zone("") == b"\x00"
    h_none, h_empty = _hello(zone=None), _hello(zone="")
    assert h_none != h_empty
    assert wire.decode_hello(h_none).zone is None
    assert wire.decode_hello(h_empty).zone == ""
    assert wire.decode_ohai(_ohai(zone=None)).zone is None
    assert wire.decode_ohai(_ohai(zone="")).zone == ""
    r_none = MemberRecord(b"n" * 16, 0, MemberState.UP, "h", 1, None)
    r_empty = MemberRecord(b"n" * 16, 0, MemberState.UP, "h", 1, "")
    assert r_none.encode() != r_empty.encode()
    assert wire.decode_member(r_none.encode())[0].zone is None
    assert wire.decode_member(r_empty.encode())[0].zone == ""


def test_zone_limits() -> None:
    longest = "é" * (MAX_ZONE_BYTES // 2)  # 64 bytes of UTF-8
    assert wire.decode_hello(_hello(zone=longest)).zone == longest
    with pytest.raises(ValueError):
        _hello(zone="z" * (MAX_ZONE_BYTES + 1))
    with pytest.raises(ValueError):
        MemberRecord(b"n" * 16, 0, MemberState.UP, "h", 1, "é" * 33).encode()
    prefix = wire.MEMBER_FIXED.pack(b"n" * 16, 0, MemberState.UP, 1)
    for length in (MAX_ZONE_BYTES + 1, 0xFE):
        with pytest.raises(WireError, match="zone"):
            wire.decode_member(prefix + bytes((length,)) + b"z" * length + b"\x01h")
    with pytest.raises(WireError, match="UTF-8"):
        wire.decode_member(prefix + b"\x02\xff\xfe" + b"\x01h")


def test_member_record_field_checks() -> None:
    prefix = wire.MEMBER_FIXED.pack(b"n" * 16, 0, 5, 1)  # state 5 does not exist
    with pytest.raises(WireError, match="state"):
        wire.decode_member(prefix + b"\xff\x01h")
    ok = wire.MEMBER_FIXED.pack(b"n" * 16, 0, MemberState.DOWN, 1) + b"\xff"
    with pytest.raises(WireError, match="ASCII"):
        wire.decode_member(ok + b"\x02\xc3\xa9")
    with pytest.raises(WireError):
        wire.decode_member(ok + bytes((wire.MAX_HOST_BYTES + 1,)) + b"h" * 65)
    with pytest.raises(WireError):
        wire.decode_member(ok)  # no host length
    with pytest.raises(ValueError):
        MemberRecord(b"n" * 16, 0, MemberState.UP, "h" * 65, 1, None).encode()
    with pytest.raises(struct.error):
        MemberRecord(b"n" * 16, 1 << 32, MemberState.UP, "h", 1, None).encode()


def test_member_record_encode_accepts_only_what_decode_accepts() -> None:
    rec = MemberRecord(b"n" * 16, 0, MemberState.UP, "höst", 1, None)
    try:
        encoded = rec.encode()
    except ValueError:
        return  # refusing at encode time is the fix
    assert wire.decode_member(encoded)[0] == rec


def test_decode_confirm_raises_wire_error_for_unknown_type() -> None:
    data = bytearray(wire.encode_confirm(PacketType.OKBOSS, b"H" * 16, b"c" * 32))
    data[1] = 0x7F
    with pytest.raises(WireError):
        wire.decode_confirm(bytes(data))


# ----------------------------------------------------------------------------- robustness


@FUZZ
@given(st.binary(max_size=400))
def test_decoders_on_arbitrary_bytes_raise_only_what_the_node_catches(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except NODE_CATCHES:
            pass


SAMPLES = _valid_samples()
SAMPLE_IDS = [kind for kind, _ in SAMPLES]


@pytest.mark.parametrize(("kind", "data"), SAMPLES, ids=SAMPLE_IDS)
def test_truncations_are_refused_cleanly(kind: str, data: bytes) -> None:
    _decode(kind, data)  # the sample itself is valid
    refused = 0
    for cut in range(len(data)):
        try:
            _decode(kind, data[:cut])
        except NODE_CATCHES:
            refused += 1
    # Every proper prefix of a fixed-layout packet is refused; frame streams may split
    # at a frame boundary and stay valid.
    if kind.startswith(("hello", "ohai")) or kind in ("okboss", "member", "members"):
        assert refused == len(data)
    else:
        assert refused >= len(data) - 2


@pytest.mark.parametrize(("kind", "data"), SAMPLES, ids=SAMPLE_IDS)
def test_single_byte_mutations_never_escape(kind: str, data: bytes) -> None:
    rng = random.Random(kind)
    for pos in range(len(data)):
        for value in {0x00, 0xFF, data[pos] ^ 0x80, rng.randrange(256)}:
            mutated = data[:pos] + bytes((value,)) + data[pos + 1 :]
            try:
                _decode(kind, mutated)
            except NODE_CATCHES:
                pass


def test_version_byte_is_one_and_written_by_every_encoder() -> None:
    assert VERSION == 1
    for _, data in _valid_samples()[:5]:
        assert data[0] == VERSION
    assert wire.CONTROL_HEADER.pack(VERSION, PacketType.CONTROL, 0, 1, 1)[0] == VERSION


def test_node_drops_other_versions_and_warns_sparingly() -> None:
    net, addrs = make_cluster(1, settle_s=0.1)
    core = net.nodes[addrs[0]].core
    good = _hello()
    for i in range(9):
        core.receive_datagram(bytes((2,)) + good[1:], addr(i + 1), net.now)
    assert core.stats["drop_bad_version"] == 9
    # one warning per power of two: 1, 2, 4, 8
    assert len(core.warnings) == 4
    assert "version 2" in core.warnings[0]
    assert core.handshaker.stats == {}
    core.receive_datagram(b"\x01", addr(1), net.now)
    core.receive_datagram(bytes((VERSION, 0x66)) + bytes(40), addr(1), net.now)
    assert core.stats["drop_short"] == 1
    assert core.stats["drop_bad_type"] == 1
    assert core.datagrams_to_send(net.now) == []


Captured = list[tuple[Addr, Addr, bytes]]


def _captured_cluster_datagrams() -> tuple[CheckedSimNetwork, Captured]:
    captured: Captured = []
    net, addrs = make_cluster(3, seed=4, settle_s=0)
    net.on_datagram = lambda src, dst, data: captured.append((src, dst, data))
    net.run_for(2.0)
    net.broadcast(addrs[1], b"payload" * 10)
    net.run_for(0.2)
    return net, captured


def test_node_survives_mutated_and_truncated_real_datagrams() -> None:
    """Every kind of real datagram, cut short or with one byte changed, is refused and
    counted (they were all delivered already, so nothing may be accepted twice);
    receive_datagram never raises."""
    net, captured = _captured_cluster_datagrams()
    kinds = {data[1] for _, _, data in captured}
    assert set(PacketType) <= kinds
    before = {
        a: (Counter(n.core.stats), Counter(n.core.handshaker.stats)) for a, n in net.nodes.items()
    }
    rng = random.Random(11)
    by_kind: dict[int, Captured] = {}
    for item in captured:
        by_kind.setdefault(item[2][1], []).append(item)
    fed = 0
    for items in by_kind.values():
        for src, dst, data in items[:4]:
            core = net.nodes[dst].core
            step = max(1, len(data) // 25)
            variants = [data[:cut] for cut in range(0, len(data), step)]
            for _ in range(25):
                pos = rng.randrange(len(data))
                flipped = data[pos] ^ (1 + rng.randrange(255))
                variants.append(data[:pos] + bytes((flipped,)) + data[pos + 1 :])
            for variant in variants:
                core.receive_datagram(variant, src, net.now)
                fed += 1
    assert fed > 500
    node_delta: Counter[str] = Counter()
    hs_delta: Counter[str] = Counter()
    for a, n in net.nodes.items():
        node_delta += Counter(n.core.stats) - before[a][0]
        hs_delta += Counter(n.core.handshaker.stats) - before[a][1]
    assert node_delta["packets_in"] == fed
    refused = sum(v for k, v in node_delta.items() if k.startswith("drop_") or k == "duplicates")
    assert refused + sum(hs_delta.values()) == fed, (node_delta, hs_delta)
    assert not any(k.startswith(("established", "ohai_sent")) for k in hs_delta)
    assert node_delta["delivered"] == 0 and node_delta["sessions_established"] == 0


@pytest.fixture(scope="module")
def fuzz_target() -> CheckedSimNetwork:
    net, _ = make_cluster(2, seed=9, settle_s=1.0)
    return net


@FUZZ
@given(payload=st.binary(max_size=300), ptype=st.sampled_from(list(PacketType)))
def test_node_survives_arbitrary_bytes_of_every_type(
    fuzz_target: CheckedSimNetwork, payload: bytes, ptype: PacketType
) -> None:
    core = fuzz_target.nodes[addr(0)].core
    before = core.stats.get("packets_in", 0)
    core.receive_datagram(bytes((VERSION, ptype)) + payload, addr(99), 10.0)
    assert core.stats["packets_in"] == before + 1
