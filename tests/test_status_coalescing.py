"""Membership news under load (membership_changes.py STATUS_COALESCE_S) and the
retransmit buffers' share of the node-wide budget (links.py retain_bytes_per_link).

A join storm announces every newcomer to every subscriber: one STATUS datagram per
join per subscriber is O(N^2) datagrams. Held news leaves together in full datagrams.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.links import (
    RETAIN_BYTES_PER_LINK,
    RETAIN_MIN_BYTES_PER_LINK,
    LinkState,
    retain_bytes_per_link,
)
from gwyh_mp.protocol.membership_changes import STATUS_COALESCE_S
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import MemberRecord, MemberState
from tests.helpers_core import addr, lone_core, make_cluster, node_id, up_ids


def _record(i: int, incarnation: int = 1, state: MemberState = MemberState.UP) -> MemberRecord:
    host, port = addr(i + 1)
    return MemberRecord(node_id(i), incarnation, state, host, port, None)


def _originated(core: NodeCore) -> list[MemberRecord]:
    """Every STATUS record the core originates from now on, in order."""
    out: list[MemberRecord] = []
    originate = core.flood.originate

    def spy(msg_id: bytes, kind: int, body: bytes) -> None:
        if kind == wire.EntryKind.STATUS:
            out.append(wire.decode_member(body)[0])
        originate(msg_id, kind, body)

    core.flood.originate = spy  # type: ignore[method-assign]
    return out


def test_news_alone_leaves_at_once_and_a_burst_waits_for_the_timer() -> None:
    core = lone_core("coalesce")
    sent = _originated(core)
    changes = core.membership
    changes.announce(_record(1), 10.0)
    assert [r.node_id for r in sent] == [node_id(1)]  # rare news: no delay
    changes.announce(_record(2), 10.1)
    changes.announce(_record(3), 10.2)
    assert len(sent) == 1 and core.stats["status_coalesced"] == 2
    due = core.get_timer()
    assert due is not None and due <= 10.0 + STATUS_COALESCE_S
    core.handle_timer(10.0 + STATUS_COALESCE_S - 0.01)
    assert len(sent) == 1
    core.handle_timer(10.0 + STATUS_COALESCE_S)
    assert [r.node_id for r in sent] == [node_id(1), node_id(2), node_id(3)]
    assert changes.next_timer() is None


def test_a_newer_record_replaces_the_held_one_and_our_own_never_waits() -> None:
    core = lone_core("coalesce-own")
    sent = _originated(core)
    changes = core.membership
    changes.announce(_record(1), 5.0)
    changes.announce(_record(2, 1), 5.1)  # held
    changes.announce(_record(3, 1), 5.15)  # held
    changes.announce(_record(3, 2), 5.18)  # replaces the held UP of member 3
    own = MemberRecord(core.node_id, 3, MemberState.UP, *addr(0), None)
    changes.announce(own, 5.3)  # a refutation or our leaving: at once
    assert [r.node_id for r in sent] == [node_id(1), core.node_id]
    core.handle_timer(5.0 + STATUS_COALESCE_S)
    assert sent[2:] == [_record(2, 1), _record(3, 2)]


def test_failure_news_never_waits_and_supersedes_a_held_up() -> None:
    """SUSPECT, DOWN and LEFT are judged by detection time: they leave at once, and a
    held UP of the same member (older) is dropped."""
    core = lone_core("coalesce-down")
    sent = _originated(core)
    changes = core.membership
    changes.announce(_record(1), 5.0)
    changes.announce(_record(2, 1), 5.1)  # held
    changes.announce(_record(2, 2, MemberState.DOWN), 5.2)  # at once
    changes.announce(_record(4, 1, MemberState.SUSPECT), 5.25)  # at once
    assert sent == [_record(1), _record(2, 2, MemberState.DOWN), _record(4, 1, MemberState.SUSPECT)]
    core.handle_timer(5.0 + STATUS_COALESCE_S)
    assert sent[3:] == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 1.5), st.integers(1, 6), st.integers(1, 3)),
        min_size=1,
        max_size=30,
    )
)
def test_every_member_latest_news_is_sent_and_bursts_are_paced(
    steps: list[tuple[float, int, int]],
) -> None:
    core = lone_core("coalesce-prop")
    changes = core.membership
    sent: list[tuple[float, MemberRecord]] = []
    originate = changes._originate
    clock = [0.0]

    def spy(record: MemberRecord) -> None:
        sent.append((clock[0], record))
        originate(record)

    changes._originate = spy  # type: ignore[method-assign]
    now = 1.0
    latest: dict[bytes, MemberRecord] = {}
    for dt, member, incarnation in steps:
        now += dt
        due = changes.next_timer()
        if due is not None and due <= now:
            clock[0] = due
            changes.handle_timer(due)
        clock[0] = now
        record = _record(member, incarnation)
        latest[record.node_id] = record
        changes.announce(record, now)
    due = changes.next_timer()
    if due is not None:
        clock[0] = due
        changes.handle_timer(due)
    assert changes.next_timer() is None
    # Nothing is lost: the last record announced about each member went out last.
    last_sent = {r.node_id: r for _, r in sent}
    assert last_sent == latest
    # Paced: originations at distinct times are STATUS_COALESCE_S apart at least.
    times = sorted({t for t, _ in sent})
    assert all(b - a >= STATUS_COALESCE_S - 1e-9 for a, b in itertools.pairwise(times))


def test_a_join_storm_converges_with_fewer_status_datagrams() -> None:
    net, addrs = make_cluster(24, seed=7, settle_s=0)
    net.run_for(30.0)
    nodes = [net.nodes[a] for a in addrs]
    everyone = {n.core.node_id for n in nodes}
    for node in nodes:
        assert up_ids(node.core) == everyone - {node.core.node_id}
    coalesced = sum(n.core.stats.get("status_coalesced", 0) for n in nodes)
    assert coalesced > 0  # the storm was paced, and still every view is complete


def test_retransmit_share_is_bounded_both_ways() -> None:
    budget = 64 << 20
    assert retain_bytes_per_link(budget, 0) == RETAIN_BYTES_PER_LINK
    assert retain_bytes_per_link(budget, 10) == RETAIN_BYTES_PER_LINK
    assert retain_bytes_per_link(budget, 1000) == budget // 1000
    assert retain_bytes_per_link(256 << 20, 5000) == (256 << 20) // 5000
    assert retain_bytes_per_link(budget, 100_000) == RETAIN_MIN_BYTES_PER_LINK


def test_a_link_keeps_only_its_share() -> None:
    link = LinkState(node_id(1))
    share = retain_bytes_per_link(64 << 20, 5000)
    for seq in range(1, 200):
        datagram = bytes(8) + seq.to_bytes(4, "big") + bytes(1100)
        link.remember(datagram, max_bytes=share)
    assert 0 < link.sent_bytes <= share
    assert link.sent_bytes == sum(len(d) for d in link.sent.values())
    assert max(link.sent) == 199  # the newest are kept
