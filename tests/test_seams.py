"""Rules at the seams between mechanisms: STATUS coalescing vs refutations, catch-up's
reconnects vs restarted members, the failure detector vs refreshed suspicions."""

from __future__ import annotations

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.membership_changes import STATUS_COALESCE_S
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import MemberRecord, MemberState
from tests.helpers_core import addr, lone_core, node_id


def _record(i: int, incarnation: int = 1, state: MemberState = MemberState.UP) -> MemberRecord:
    host, port = addr(i + 1)
    return MemberRecord(node_id(i), incarnation, state, host, port, None)


def _originated(core: NodeCore) -> list[MemberRecord]:
    out: list[MemberRecord] = []
    originate = core.flood.originate

    def spy(msg_id: bytes, kind: int, body: bytes) -> None:
        if kind == wire.EntryKind.STATUS:
            out.append(wire.decode_member(body)[0])
        originate(msg_id, kind, body)

    core.flood.originate = spy  # type: ignore[method-assign]
    return out


def test_relayed_refutation_is_not_held_behind_join_news() -> None:
    """A suspect told us its refutation directly (it may have no subscriber to flood it);
    we flood it on at once. It is an UP record, but STATUS coalescing must not hold it:
    0.5 s is longer than the local preset's suspicion_min_s (0.25 s), and accusers with
    confirmations would declare a live member DOWN before it leaves."""
    core = lone_core("refute-held")
    assert core.config.suspicion_min_s is not None
    assert core.config.suspicion_min_s < STATUS_COALESCE_S
    changes = core.membership
    core.learn_members([_record(1), _record(2)])
    changes.apply(_record(1, 1, MemberState.SUSPECT), 1.0, announce=False)  # flood
    sent = _originated(core)
    changes.announce(_record(3), 1.0)  # a join just announced (rare news: at once)
    # The suspect's own refutation, sent to us directly:
    changes.apply(_record(1, 2), 1.05, announce=False, source=node_id(1))
    assert core.members.get(node_id(1)).state == MemberState.UP  # type: ignore[union-attr]
    assert _record(1, 2) in sent, "refutation held by STATUS coalescing"


def test_catch_up_reconnect_stops_once_the_address_hosts_a_new_member() -> None:
    """A node restarts at the same address with a new node id (the default: ids are
    random per start). Catch-up's reconnects to the old id (every RECONNECT_HEARTBEATS,
    for EVICTED_MEMORY windows) stop once another member holds a session there: each
    would complete with the new member and cost a full handshake and a new session."""
    from gwyh_mp.config import Config
    from tests.helpers_core import PSK, make_cluster

    net, addrs = make_cluster(4, settle_s=5.0)
    old = net.nodes[addrs[3]].core.node_id
    net.kill(addrs[3])
    a = net.nodes[addrs[0]].core
    assert net.run_until_true(
        lambda: (m := a.members.get(old)) is not None and m.state == MemberState.DOWN, 30.0
    )
    del net.nodes[addrs[3]]
    restarted = Config.local(bind=addrs[3], psks=[PSK], bootstrap=[addrs[0]], node_id=b"\x99" * 16)
    net.add_node(restarted)
    net.run_for(5.0)
    before = a.stats.get("sessions_established", 0)
    net.run_for(30.0)
    # 30 s of a quiet cluster: no new member, nothing lost; a new session or two at most.
    assert a.stats.get("sessions_established", 0) - before <= 2, (
        a.stats.get("catch_up_reconnects", 0),
        a.stats.get("sessions_established", 0) - before,
    )


def test_a_newer_suspicion_replaces_the_detectors_older_one() -> None:
    """We hold X SUSPECT at incarnation 1 and miss its refutation (UP 2); X is then
    suspected again at 2 and that SUSPECT(2) flood reaches us (Change.REFRESHED). The
    failure detector must time the suspicion at 2: at 1, confirmations for 2 would be
    ignored and its deadline's declare_down(X, 1) would do nothing."""
    core = lone_core("suspect-refresh")
    changes = core.membership
    core.learn_members([_record(1), _record(2)])
    changes.apply(_record(1, 1, MemberState.SUSPECT), 1.0, announce=False)
    assert core.detector.suspicions[node_id(1)].incarnation == 1
    changes.apply(_record(1, 2, MemberState.SUSPECT), 2.0, announce=False)
    assert core.members.get(node_id(1)).incarnation == 2  # type: ignore[union-attr]
    assert core.detector.suspicions[node_id(1)].incarnation == 2
