"""Names and tags in member records, the LEFT state, and rejected-handshake sources.

Codec: records with metadata round-trip, records without it are byte-for-byte the
pre-metadata format. Core: a graceful leave is LEFT (never DOWN) at every peer, and the
same node id coming back is UP again. All on SimNetwork's fake clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gwyh_mp.config import Config, ConfigError
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import EXPIRED, WRONG_KEY, MemberDown, MemberLeft, MemberUpdated
from gwyh_mp.protocol.handshake import MAX_REJECT_SOURCES, RejectLog
from gwyh_mp.protocol.membership import Change, MemberTable
from gwyh_mp.protocol.wire import MemberRecord, MemberState, WireError
from tests.helpers_core import PSK, PSK_WRONG, addr, live_nodes, make_cluster, view_of

KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"

names = st.text(max_size=16)
tag_lists = st.dictionaries(
    st.text(KEY_CHARS, min_size=1, max_size=8), st.text(max_size=12), max_size=6
).map(lambda d: tuple(sorted(d.items())))
records = st.builds(
    MemberRecord,
    node_id=st.binary(min_size=16, max_size=16),
    incarnation=st.integers(0, 2**32 - 1),
    state=st.sampled_from(MemberState),
    host=st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", "localhost"]),
    port=st.integers(1, 65535),
    zone=st.none() | st.text(max_size=10),
    name=names,
    tags=tag_lists,
)


# ----------------------------------------------------------------------------- codec


@given(st.lists(records, max_size=5))
def test_member_lists_with_metadata_round_trip(recs: list[MemberRecord]) -> None:
    assert wire.decode_members(wire.encode_members(recs)) == recs


def test_a_record_without_metadata_is_the_old_format_byte_for_byte() -> None:
    rec = MemberRecord(b"n" * 16, 7, MemberState.DOWN, "10.0.0.1", 7946, "eu")
    old = wire.MEMBER_FIXED.pack(b"n" * 16, 7, 2, 7946) + b"\x02eu" + b"\x08" + b"10.0.0.1"
    assert rec.encode() == old
    decoded, end = wire.decode_member(old)
    assert decoded == rec and end == len(old)
    assert decoded.name == "" and decoded.tags == ()


def test_metadata_is_flagged_in_the_state_byte_and_trails_the_host() -> None:
    bare = MemberRecord(b"n" * 16, 1, MemberState.UP, "10.0.0.1", 7946, None)
    named = MemberRecord(
        b"n" * 16, 1, MemberState.UP, "10.0.0.1", 7946, None, "web-1", (("dc", "x"),)
    )
    raw = named.encode()
    assert raw[20] == MemberState.UP | wire.STATE_METADATA_FLAG
    block = b"\x05web-1\x01\x02dc\x01x"
    assert (
        raw
        == bytes([*bare.encode()[:20], raw[20], *bare.encode()[21:]])
        + bytes((0, len(block)))
        + block
    )


@given(st.binary(max_size=40))
def test_every_record_that_decodes_re_encodes_to_the_same_bytes(block: bytes) -> None:
    """Only the canonical form decodes (the fuzz harness's round-trip invariant)."""
    bare = MemberRecord(b"n" * 16, 1, MemberState.UP, "10.0.0.1", 7946, None).encode()
    raw = bare[:20] + b"\x81" + bare[21:] + bytes((0, len(block))) + block
    try:
        rec, used = wire.decode_member(raw)
    except WireError:
        return
    assert rec.encode() == raw[:used]


@pytest.mark.parametrize(
    "block",
    [
        b"",  # no name length
        b"\x05ab",  # name runs past the block
        b"\x00\x11",  # 17 tags
        b"\x00\x01\x03a b\x00",  # bad key character
        b"\x00\x01\x00\x00",  # empty key
        b"\x00\x02\x01a\x00\x01a\x00",  # duplicate key
        b"\x02\xff\xfe\x00",  # name not UTF-8
        b"\x00\x00",  # flagged, yet neither name nor tags
        b"\x02db\x00future",  # bytes after the tags
        b"\x00\x02\x01b\x00\x01a\x00",  # keys out of order
    ],
)
def test_bad_metadata_is_a_wire_error(block: bytes) -> None:
    bare = MemberRecord(b"n" * 16, 1, MemberState.UP, "10.0.0.1", 7946, None).encode()
    raw = bare[:20] + b"\x81" + bare[21:] + bytes((0, len(block))) + block
    with pytest.raises(WireError):
        wire.decode_member(raw)


def test_metadata_longer_than_the_limit_or_the_buffer_is_a_wire_error() -> None:
    bare = MemberRecord(b"n" * 16, 1, MemberState.UP, "10.0.0.1", 7946, None).encode()
    flagged = bare[:20] + b"\x81" + bare[21:]
    with pytest.raises(WireError):
        wire.decode_member(flagged)  # flag set, no length
    with pytest.raises(WireError):
        wire.decode_member(flagged + b"\x01\x41" + bytes(0x141))  # over MAX_METADATA_BYTES
    with pytest.raises(WireError):
        wire.decode_member(flagged + b"\x00\x10\x00")  # runs past the buffer


def test_the_largest_record_fits_the_smallest_datagram() -> None:
    tags = tuple((f"k{i:02d}", "v" * 11) for i in range(16))
    name = "n" * (wire.MAX_METADATA_BYTES - 2 - sum(2 + len(k) + len(v) for k, v in tags))
    assert wire.metadata_problem(name, tags) is None
    rec = MemberRecord(b"n" * 16, 1, MemberState.UP, "h" * 64, 1, "z" * 64, name, tags)
    size = len(rec.encode())
    # one STATUS entry in one BROADCAST, and one PEERS frame in one CONTROL packet
    assert size + wire.BROADCAST_OVERHEAD + wire.ENTRY_OVERHEAD <= 576
    assert size + 2 + wire.FRAME_HEADER.size + wire.CONTROL_OVERHEAD <= 576


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "x" * 65}, "name is 65 bytes"),
        ({"tags": {f"k{i}": "v" for i in range(17)}}, "tags: 17 given"),
        ({"tags": {"a b": "1"}}, "tags: key 'a b'"),
        ({"tags": {"": "1"}}, "tags: key ''"),
        ({"tags": (("a", "1"), ("a", "2"))}, "given twice"),
        ({"tags": {"k": "v" * 129}}, "over 128 bytes"),
        ({"tags": {f"k{i:02d}": "v" * 30 for i in range(10)}}, "bytes encoded"),
    ],
)
def test_config_refuses_names_and_tags_that_cannot_travel(
    changes: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        Config(psks=[PSK], **changes).validate()  # type: ignore[arg-type]


def test_config_sorts_tags_and_accepts_a_dict() -> None:
    config = Config(psks=[PSK], name="db-1", tags={"role": "db", "dc": "x"}).validate()
    assert config.tags == (("dc", "x"), ("role", "db"))


# ----------------------------------------------------------------------------- table


def rec(state: MemberState, inc: int, name: str = "") -> MemberRecord:
    return MemberRecord(b"m" * 16, inc, state, "10.0.0.1", 7000, None, name)


def test_left_beats_up_and_down_at_equal_incarnation_and_leaves_the_digest() -> None:
    t = MemberTable()
    empty = list(t.digests)
    assert t.apply(rec(MemberState.UP, 3)) is Change.JOINED
    assert t.apply(rec(MemberState.DOWN, 3)) is Change.DOWN
    assert t.apply(rec(MemberState.LEFT, 3)) is Change.LEFT
    assert t.apply(rec(MemberState.DOWN, 3)) is Change.NONE
    assert t.apply(rec(MemberState.UP, 3)) is Change.NONE
    assert t.digests == empty and t.up_count == 0
    assert t.apply(rec(MemberState.UP, 4)) is Change.UP  # a restart overrides LEFT
    assert t.apply(rec(MemberState.LEFT, 9, "x")) is Change.LEFT
    assert t.apply(rec(MemberState.LEFT, 0)) is Change.NONE  # unknown and gone: not kept
    fresh = MemberTable()
    assert fresh.apply(rec(MemberState.LEFT, 0)) is Change.NONE and len(fresh) == 0


def test_a_record_that_names_a_member_fills_in_a_handshake_learned_entry() -> None:
    t = MemberTable()
    assert t.apply(rec(MemberState.UP, 1)) is Change.JOINED
    before = list(t.digests)
    assert t.apply(rec(MemberState.UP, 1, "web")) is Change.UPDATED
    assert t.digests != before  # anti-entropy sees the difference
    assert t.apply(rec(MemberState.UP, 1)) is Change.NONE  # no metadata keeps the name
    assert t.apply(rec(MemberState.UP, 2)) is Change.REFRESHED
    member = t.get(b"m" * 16)
    assert member is not None and member.name == "web"


# ----------------------------------------------------------------------------- core


def test_graceful_leave_is_left_not_down_and_a_restart_is_up() -> None:
    net, addrs = make_cluster(6, seed=3)
    leaver = net.nodes[addrs[2]]
    lid = leaver.core.node_id
    net.leave(addrs[2])
    assert leaver.core.local_member().state is MemberState.LEFT
    net.run_for(3.0)  # well past failure detection: nobody turns it into DOWN
    for n in live_nodes(net, (addrs[2],)):
        member = view_of(n.core, lid)
        assert member is not None and member.state is MemberState.LEFT, n.addr
        gone = [e for _, e in n.events if isinstance(e, MemberDown)]
        assert [type(e) for e in gone] == [MemberLeft]  # left, never failed
        assert lid not in n.core.providers and lid not in n.core.subscribers
    assert leaver.core.incarnation == 0
    net.kill(addrs[2])
    again = net.add_node(Config.local(bind=addrs[2], psks=[PSK], bootstrap=[addrs[0]], node_id=lid))
    net.run_for(6.0)
    for n in live_nodes(net, (addrs[2],)):
        member = view_of(n.core, lid)
        assert member is not None and member.state is MemberState.UP, n.addr
    assert again.core.incarnation >= 1  # it refuted its own LEFT


def test_names_and_tags_reach_every_member() -> None:
    net, addrs = make_cluster(2, seed=5, settle_s=0.0)
    for i in range(2, 6):
        net.add_node(
            Config.local(
                bind=addr(i),
                psks=[PSK],
                bootstrap=[addrs[0]],
                name=f"node-{i}",
                tags={"role": "web" if i % 2 else "db", "i": str(i)},
            )
        )
    net.run_for(8.0)
    named = {n.core.node_id: n for n in net.nodes.values() if n.core.config.name}
    seed = net.nodes[addrs[0]]  # it met every named node by handshake first
    updated = {e.member.node_id for _, e in seed.events if isinstance(e, MemberUpdated)}
    assert updated == set(named)
    for n in net.nodes.values():
        for nid, other in named.items():
            if nid == n.core.node_id:
                continue
            member = view_of(n.core, nid)
            assert member is not None and member.name == other.core.config.name, n.addr
            assert member.tag_dict["i"] == other.core.config.name[-1]


# ----------------------------------------------------------------------------- rejects


def test_reject_log_is_bounded_and_drains() -> None:
    log = RejectLog()
    for i in range(1000):
        log.add(WRONG_KEY, ("10.0.0.1", 1000 + i))
    log.add(EXPIRED, ("10.0.0.2", 1))
    drained = log.drain()
    assert len(drained) <= MAX_REJECT_SOURCES + 2
    assert sum(r.count for r in drained) == 1001
    assert any(r.addr is None and r.reason == WRONG_KEY for r in drained)
    assert log.drain() == []


def test_wrong_key_hellos_are_reported_with_their_source() -> None:
    net, addrs = make_cluster(2, seed=4)
    intruder = addr(50)
    net.add_node(Config.local(bind=intruder, psks=[PSK_WRONG], bootstrap=[addrs[0]]))
    net.run_for(3.0)
    rejected = net.nodes[addrs[0]].core.take_rejected_handshakes()
    assert {(r.reason, r.addr) for r in rejected} == {(WRONG_KEY, intruder)}
