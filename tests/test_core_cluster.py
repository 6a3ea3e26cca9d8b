"""Whole clusters of real NodeCores on SimNetwork's fake clock.

Every scenario is deterministic (seeded network and node randomness). ``CheckedSimNetwork``
turns a core that leaves a due timer behind -- which would make the simulation spin at one
instant forever -- into an immediate test failure.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter

import pytest

from gwyh_mp.config import Config
from gwyh_mp.protocol import inbound, wire
from gwyh_mp.protocol.crypto import nonce, seal
from gwyh_mp.protocol.events import MemberSuspect
from gwyh_mp.protocol.handshake import Established
from gwyh_mp.protocol.node import NodeCore, NotRunning
from gwyh_mp.protocol.peers import REJOIN_BATCH
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.protocol.subscriptions import ProviderState
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, PacketType
from gwyh_mp.simulation import SimNode, constant_link
from tests.helpers_core import (
    PSK,
    PSK_WRONG,
    WALL_NS,
    Addr,
    CheckedSimNetwork,
    Party,
    addr,
    delivery_counts,
    down_events,
    event_trace,
    live_nodes,
    lone_core,
    make_cluster,
    make_party,
    messages,
    node_id,
    up_ids,
    view_of,
)

N = 10
SUBSCRIPTIONS = 5  # Config default
HEARTBEAT_S = 0.5  # Config.local
MISSED = 3  # Config default
WATCHDOG_S = HEARTBEAT_S * (MISSED + 0.5)  # N missed, plus half an interval of grace
DETECT_S = WATCHDOG_S + HEARTBEAT_S  # then PINGed for one interval before it is accused


def ids_by_addr(net: CheckedSimNetwork) -> dict[Addr, bytes]:
    return {a: n.core.node_id for a, n in net.nodes.items()}


def assert_converged(net: CheckedSimNetwork, exclude: tuple[Addr, ...] = ()) -> None:
    """Every live node knows every other live node UP, has min(N, live - 1) providers
    chosen among them, and every provider link is known at both ends."""
    nodes = live_nodes(net, exclude)
    live_ids = {n.core.node_id for n in nodes}
    by_id = {n.core.node_id: n for n in nodes}
    want = min(SUBSCRIPTIONS, len(nodes) - 1)
    for n in nodes:
        others = live_ids - {n.core.node_id}
        assert others <= up_ids(n.core), f"{n.addr} misses {len(others - up_ids(n.core))}"
        assert len(n.core.providers) == want, (n.addr, len(n.core.providers))
        assert set(n.core.providers) <= others
        for provider_id in n.core.providers:
            assert n.core.node_id in by_id[provider_id].core.subscribers


def broadcast_all(net: CheckedSimNetwork, origins: list[Addr], tag: bytes) -> dict[bytes, Addr]:
    return {net.broadcast(a, tag + a[0].encode()): a for a in origins}


def assert_delivered_once(
    net: CheckedSimNetwork, sent: dict[bytes, Addr], exclude: tuple[Addr, ...] = ()
) -> None:
    for msg_id, origin in sent.items():
        counts = delivery_counts(net, msg_id)
        for a, count in counts.items():
            if a in exclude:
                continue
            assert count == (0 if a == origin else 1), (origin, a, count)


# ----------------------------------------------------------------------------- formation


@pytest.mark.parametrize(("n", "seed"), [(2, 1), (3, 2), (10, 3), (10, 4)])
def test_cluster_converges_from_one_seed(n: int, seed: int) -> None:
    net, _ = make_cluster(n, seed=seed)
    assert_converged(net)
    for node in net.nodes.values():
        assert down_events(node) == []
        assert node.core.stats.get("drop_decrypt", 0) == 0
        assert node.core.stats.get("drop_malformed", 0) == 0


def test_broadcast_from_every_node_is_delivered_exactly_once_never_to_sender() -> None:
    net, addrs = make_cluster(N, seed=5)
    sent = broadcast_all(net, addrs, b"from ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)
    ids = ids_by_addr(net)
    for node in net.nodes.values():
        for m in messages(node):
            origin = sent[m.id]
            assert m.origin == ids[origin]
            assert m.data == b"from " + origin[0].encode()
            assert 1 <= m.hops < N


def test_a_fanout_target_is_reused_until_its_session_or_address_changes() -> None:
    """The fanout's view of a subscriber is built once per session and address (not per
    flush), and never outlives either: a moved peer or a new session gets a new one."""
    net, addrs = make_cluster(2, seed=3)
    a, b = net.nodes[addrs[0]].core, net.nodes[addrs[1]].core
    peers = a.peers
    target = peers.fanout_target(b.node_id)
    assert target is not None and peers.fanout_target(b.node_id) is target
    session = peers.links[b.node_id].session
    assert session is not None
    assert (target.addr, target.remote_session_id) == (session.addr, session.remote_session_id)
    peers.moved(session, ("10.9.9.9", 7001))
    moved = peers.fanout_target(b.node_id)
    assert moved is not None and moved is not target and moved.addr == ("10.9.9.9", 7001)
    session.remote_session_id ^= 1
    renewed = peers.fanout_target(b.node_id)
    assert renewed is not None and renewed.remote_session_id == session.remote_session_id
    peers.links[b.node_id].session = None
    assert peers.fanout_target(b.node_id) is None


def test_a_burst_is_coalesced_and_encrypted_once() -> None:
    net, addrs = make_cluster(N, seed=6)
    origin = net.nodes[addrs[2]]
    out: list[tuple[Addr, Addr, bytes]] = []
    net.on_datagram = lambda s, d, data: out.append((s, d, data))
    encryptions = origin.core.fanout.channel.encryptions
    ids = [origin.core.broadcast(b"burst %d" % i, net.now) for i in range(20)]
    net.pump(origin)
    first_round = [d for s, _, d in out if s == origin.addr and d[1] == PacketType.BROADCAST]
    assert len(first_round) == len(origin.core.subscribers) > 0
    assert all(d[2] == 20 for d in first_round)  # 20 entries per datagram
    assert origin.core.fanout.channel.encryptions == encryptions + 1
    assert len({d[wire.BROADCAST_HEADER.size :] for d in first_round}) == 1  # same ciphertext
    net.run_for(1.0)
    assert_delivered_once(net, dict.fromkeys(ids, addrs[2]))
    # in delivery order at every node
    for node in live_nodes(net, (addrs[2],)):
        assert [m.id for m in messages(node)] == ids


def test_duplicates_are_dropped_before_decryption(monkeypatch: pytest.MonkeyPatch) -> None:
    net, addrs = make_cluster(N, seed=7)
    sent = broadcast_all(net, addrs[:5], b"dup ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)
    duplicates = sum(n.core.stats.get("duplicates", 0) for n in net.nodes.values())
    assert duplicates > 0  # with 5 providers each, most copies are redundant
    assert all(n.core.stats.get("drop_decrypt", 0) == 0 for n in net.nodes.values())

    # Replaying an already-delivered broadcast costs a set lookup, not a decryption.
    captured: list[tuple[Addr, Addr, bytes]] = []
    net.on_datagram = lambda s, d, data: captured.append((s, d, data))
    net.broadcast(addrs[1], b"one more")
    net.run_for(1.0)
    src, dst, datagram = next(c for c in captured if c[2][1] == PacketType.BROADCAST)
    decryptions = 0
    real_open = inbound.open_sealed

    def counting_open(key: bytes, n: bytes, sealed: bytes) -> bytes:
        nonlocal decryptions
        decryptions += 1
        return real_open(key, n, sealed)

    monkeypatch.setattr(inbound, "open_sealed", counting_open)
    core = net.nodes[dst].core
    before = core.stats.get("duplicates", 0)
    for _ in range(5):
        core.receive_datagram(datagram, src, net.now)
    assert core.stats["duplicates"] == before + 5
    assert decryptions == 0
    assert core.stats.get("drop_decrypt", 0) == 0


# ----------------------------------------------------------------------------- refutation


def _seen_up_everywhere(net: CheckedSimNetwork, subject: Addr) -> bool:
    """``subject`` is UP, at its own current (refuted, >= 1) incarnation, at every other
    live node."""
    me = net.nodes[subject].core
    for n in live_nodes(net, (subject,)):
        m = view_of(n.core, me.node_id)
        if m is None or not m.is_up or m.incarnation != me.incarnation or me.incarnation < 1:
            return False
    return True


def _lie_about(net: CheckedSimNetwork, subject: Addr, accuser: Addr) -> None:
    """A trusted but mistaken peer floods "subject is DOWN" at its current incarnation."""
    me = net.nodes[subject].core
    lie = MemberRecord(me.node_id, me.incarnation, MemberState.DOWN, *subject, me.zone)
    liar = net.nodes[accuser]
    liar.core.membership.announce(lie, net.now)
    net.pump(liar)


@pytest.mark.parametrize("seed", [3, 4])
def test_injected_down_is_refuted_with_a_higher_incarnation_everywhere(seed: int) -> None:
    net, addrs = make_cluster(N, seed=seed)
    subject = net.nodes[addrs[4]]
    sid = subject.core.node_id
    _lie_about(net, addrs[4], addrs[7])
    assert net.run_until_true(lambda: _seen_up_everywhere(net, addrs[4]), 1.0, 0.01)
    assert subject.core.incarnation == 1
    assert subject.core.stats["refutations"] == 1
    believed = [n.addr for n in live_nodes(net, (addrs[4],)) if down_events(n, sid)]
    assert len(believed) >= N // 2  # the lie did spread before it lost
    assert down_events(subject) == []


def test_a_forged_down_at_the_top_incarnation_is_refuted_everywhere() -> None:
    """Issue 11 item 6: a key holder floods DOWN at the furthest incarnation others accept,
    then DOWN(0xFFFFFFFF); each is refuted (the second by wrapping to 0), and the victim
    ends UP everywhere."""
    net, addrs = make_cluster(N, seed=3)
    subject = net.nodes[addrs[4]].core
    liar = net.nodes[addrs[7]]
    for forged, refuted in ((0x7FFFFFFF, 0x80000000), (0xFFFFFFFF, 0)):
        lie = MemberRecord(subject.node_id, forged, MemberState.DOWN, *addrs[4], subject.zone)
        liar.core.membership.announce(lie, net.now)
        net.pump(liar)
        net.run_for(0.5)
        assert subject.incarnation == refuted
        # The liar never applied its own lie: it holds UP(0), and 0x80000000 is exactly
        # half the space from 0, unordered, so it keeps UP(0) (still UP).
        skip = (addrs[4], addrs[7]) if refuted == 0x80000000 else (addrs[4],)
        for n in live_nodes(net, skip):
            m = view_of(n.core, subject.node_id)
            assert m is not None and m.is_up and m.incarnation == refuted, n.addr
    assert subject.stats["refutations"] == 2


def test_a_refuted_lie_causes_no_further_false_downs() -> None:
    net, addrs = make_cluster(N, seed=3)
    sid = net.nodes[addrs[4]].core.node_id
    _lie_about(net, addrs[4], addrs[7])
    net.run_for(10.0)
    for n in net.nodes.values():
        assert {m.node_id for _, m in down_events(n)} <= {sid}, n.addr
    assert_converged(net)


class PartitionNet:
    """A 10-node cluster whose node 4 is cut off from everyone during [5 s, 9 s)."""

    def __init__(self, seed: int = 3) -> None:
        self.victim = addr(4)
        self.net = CheckedSimNetwork(seed=seed, link=self._link)
        self.addrs = [addr(i) for i in range(N)]
        for i, a in enumerate(self.addrs):
            self.net.add_node(
                Config.local(bind=a, psks=[PSK], bootstrap=[self.addrs[0]] if i else [])
            )

    def _link(self, src: Addr, dst: Addr, rng: random.Random) -> float | None:
        if 5.0 <= self.net.now < 9.0 and self.victim in (src, dst):
            return None
        return 0.001


@pytest.mark.parametrize("seed", [3, 4])
def test_partitioned_node_is_declared_down_then_refutes_everywhere(seed: int) -> None:
    p = PartitionNet(seed)
    net = p.net
    net.run_for(5.0)
    assert_converged(net)
    vid = net.nodes[p.victim].core.node_id
    net.run_until(9.0)
    for n in live_nodes(net, (p.victim,)):
        m = view_of(n.core, vid)
        assert m is not None and not m.is_up, n.addr
    assert net.run_until_true(lambda: _seen_up_everywhere(net, p.victim), 5.0, 0.01)


def test_cluster_settles_after_a_partition_heals() -> None:
    p = PartitionNet()
    net = p.net
    net.run_until(20.0)
    assert net.nodes[p.victim].core.stats.get("declared_down", 0) == 0
    assert_converged(net)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("phase", [0.0, 0.13, 0.37])
def test_killed_node_is_declared_down_everywhere_within_watchdog_and_probe(phase: float) -> None:
    net, addrs = make_cluster(N, seed=8, settle_s=5.0 + phase)
    dead = addrs[5]
    dead_id = net.nodes[dead].core.node_id
    t_kill = net.now
    net.kill(dead)
    net.run_for(DETECT_S + 2.0)
    slack = 0.25
    for n in live_nodes(net):
        downs = down_events(n)
        assert [m.node_id for _, m in downs] == [dead_id], n.addr  # nobody else suspected
        assert downs[0][0] - t_kill <= DETECT_S + slack, (n.addr, downs[0][0] - t_kill)
        m = view_of(n.core, dead_id)
        assert m is not None and not m.is_up
    net.run_for(2.0)
    assert_converged(net, exclude=(dead,))
    for n in live_nodes(net):
        assert dead_id not in n.core.providers
        assert dead_id not in n.core.subscribers
    sent = broadcast_all(net, [a for a in addrs if a != dead], b"after kill ")
    net.run_for(1.0)
    assert_delivered_once(net, sent, exclude=(dead,))


def test_graceful_leave_is_down_everywhere_quickly() -> None:
    net, addrs = make_cluster(N, seed=9)
    leaver = net.nodes[addrs[3]]
    lid = leaver.core.node_id
    t_leave = net.now
    net.leave(addrs[3])
    assert not leaver.core.running
    assert not leaver.core.local_member().is_up
    with pytest.raises(NotRunning):
        leaver.core.broadcast(b"too late", net.now)
    net.run_for(0.2)
    for n in live_nodes(net, (addrs[3],)):
        downs = down_events(n, lid)
        assert len(downs) == 1 and downs[0][0] - t_leave < 0.05, n.addr
    assert leaver.core.incarnation == 0  # it did not refute its own departure
    net.run_for(2.0)
    assert_converged(net, exclude=(addrs[3],))
    for n in live_nodes(net, (addrs[3],)):
        assert lid not in n.core.providers and lid not in n.core.subscribers
        assert down_events(n) == down_events(n, lid)  # nobody else suspected
    received = len(messages(leaver))
    sent = broadcast_all(net, [a for a in addrs if a != addrs[3]], b"after leave ")
    net.run_for(1.0)
    assert_delivered_once(net, sent, exclude=(addrs[3],))
    assert len(messages(leaver)) == received


@pytest.mark.parametrize("wait_for_detection", [True, False])
def test_fresh_node_at_a_killed_address_rejoins(wait_for_detection: bool) -> None:
    net, addrs = make_cluster(N, seed=10)
    old_id = net.nodes[addrs[6]].core.node_id
    net.kill(addrs[6])
    if wait_for_detection:
        net.run_for(WATCHDOG_S + 1.0)
    fresh = net.add_node(Config.local(bind=addrs[6], psks=[PSK], bootstrap=[addrs[0]]))
    new_id = fresh.core.node_id
    assert new_id != old_id
    net.run_for(6.0)
    assert_converged(net)
    for n in live_nodes(net, (addrs[6],)):
        m = view_of(n.core, old_id)
        assert m is None or not m.is_up
    assert old_id not in up_ids(fresh.core)
    sent = broadcast_all(net, [a for a in addrs if a != addrs[6]], b"welcome back ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)
    assert len(messages(fresh)) == N - 1


def _restart_with_same_id(seed: int, downtime_s: float) -> tuple[CheckedSimNetwork, SimNode]:
    net, addrs = make_cluster(N, seed=seed)
    old = net.nodes[addrs[6]].core
    net.kill(addrs[6])
    net.run_for(downtime_s)
    again = net.add_node(
        Config.local(bind=addrs[6], psks=[PSK], bootstrap=[addrs[0]], node_id=old.node_id)
    )
    return net, again


def test_restart_with_a_persistent_node_id_after_detection_refutes_its_old_down() -> None:
    net, again = _restart_with_same_id(10, WATCHDOG_S + 1.0)
    assert net.run_until_true(lambda: _seen_up_everywhere(net, again.addr), 6.0, 0.05)
    net.run_for(3.0)
    assert_converged(net)
    sent = broadcast_all(net, [a for a in net.nodes if a != again.addr], b"same id ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)


def test_quick_restart_with_a_persistent_node_id_rejoins() -> None:
    net, again = _restart_with_same_id(10, 0.2)
    net.run_for(20.0)
    # Back before anyone's probe failed (it re-handshakes everyone within 0.2 s): it
    # may never have been suspected, so it need not have refuted anything.
    me = again.core
    for n in live_nodes(net, (again.addr,)):
        m = view_of(n.core, me.node_id)
        assert m is not None and m.is_up and m.incarnation == me.incarnation, n.addr


LATE_JOINER_BUG = (
    "BUG: providers are only (re)selected while a node has fewer than N, so nodes that "
    "join after the others are full get few or no subscribers; their broadcasts reach "
    "only later joiners, or nobody"
)


def test_late_joiner_broadcasts_reach_everyone() -> None:
    net, addrs = make_cluster(N, seed=11)
    late = net.add_node(Config.local(bind=addr(N), psks=[PSK], bootstrap=[addrs[0]]))
    net.run_for(5.0)
    assert len(late.core.providers) == SUBSCRIPTIONS  # it does receive...
    sent = broadcast_all(net, [late.addr], b"hello from the new one ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)  # ...but nobody hears it


def test_rolling_start_broadcasts_reach_everyone() -> None:
    """Nodes started one second apart (a rolling deploy)."""
    net = CheckedSimNetwork(seed=1)
    addrs = [addr(i) for i in range(N)]
    for i, a in enumerate(addrs):
        net.add_node(Config.local(bind=a, psks=[PSK], bootstrap=[addrs[0]] if i else []))
        net.run_for(1.0)
    net.run_for(3.0)
    assert all(len(up_ids(n.core)) == N - 1 for n in net.nodes.values())  # all known...
    sent = broadcast_all(net, addrs, b"rolling ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)  # ...but the last starters are barely heard


# ----------------------------------------------------------------------------- strategies


def test_hub_and_spoke_takes_exactly_one_provider_per_remote_zone() -> None:
    zones = ["a", "b", "c"] * 3
    net, addrs = make_cluster(9, seed=12, zones=zones, strategy=Strategy.HUB_AND_SPOKE)
    zone_of = {n.core.node_id: n.core.zone for n in net.nodes.values()}
    for n in net.nodes.values():
        per_zone = Counter(zone_of[p] for p in n.core.providers)
        remote = {"a", "b", "c"} - {n.core.zone}
        assert {z: per_zone[z] for z in remote} == dict.fromkeys(remote, 1), n.addr
        # the rest of N comes from the local zone (2 local candidates here)
        assert per_zone[n.core.zone] == min(SUBSCRIPTIONS - len(remote), 2)
        assert len(up_ids(n.core)) == 8
    sent = broadcast_all(net, addrs, b"zoned ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)


@pytest.mark.parametrize(
    "strategy", [Strategy.UNIFORM, Strategy.PREFER_LOCAL, Strategy.PREFER_REMOTE]
)
def test_every_strategy_forms_a_working_cluster(strategy: Strategy) -> None:
    zones = ["a", "a", "b", "b", "c", "c", None, None, "a", "b"]
    net, addrs = make_cluster(N, seed=13, zones=zones, strategy=strategy)
    assert_converged(net)
    sent = broadcast_all(net, addrs, b"strategy ")
    net.run_for(1.0)
    assert_delivered_once(net, sent)


# ----------------------------------------------------------------------------- determinism


def _scripted_run(seed: int) -> tuple[list[tuple[str, float, str, bytes]], list[object], str]:
    digest = hashlib.sha256()

    def record(src: Addr, dst: Addr, data: bytes) -> None:
        digest.update(f"{src}{dst}".encode() + data)

    net, addrs = make_cluster(N, seed=seed, settle_s=0)
    net.on_datagram = record
    net.run_for(4.0)
    for a in addrs[:4]:
        net.broadcast(a, b"scripted " + a[0].encode())
    net.run_for(0.5)
    net.kill(addrs[8])
    net.run_for(3.0)
    stats = [(a, sorted(n.core.stats.items())) for a, n in sorted(net.nodes.items())]
    return event_trace(net), [*stats, net.datagrams_sent, net.bytes_sent], digest.hexdigest()


def test_same_seed_same_run_byte_for_byte() -> None:
    first = _scripted_run(21)
    second = _scripted_run(21)
    assert first[0] == second[0]  # every event, in order, at the same simulated time
    assert first[1] == second[1]  # every stat
    assert first[2] == second[2]  # every datagram, byte for byte
    messages_seen = [e for e in first[0] if e[2] == "Message"]
    assert len(messages_seen) == 4 * (N - 1)
    other = _scripted_run(22)
    assert other[2] != first[2]


# ----------------------------------------------------------------------------- security


def test_node_with_a_wrong_psk_learns_nothing_and_gets_nothing() -> None:
    net, addrs = make_cluster(N, seed=14)
    intruder_addr = addr(200)
    to_intruder: list[bytes] = []
    net.on_datagram = lambda s, d, data: to_intruder.append(data) if d == intruder_addr else None
    intruder = net.add_node(
        Config.local(bind=intruder_addr, psks=[PSK_WRONG], bootstrap=[addrs[0], addrs[1]])
    )
    net.run_for(15.0)
    sent = broadcast_all(net, addrs, b"secret ")
    net.run_for(1.0)
    assert to_intruder == []
    assert intruder.core.member_list() == []
    assert intruder.events == []
    assert intruder.core.sessions == {} and intruder.core.providers == {}
    assert intruder.core.stats.get("handshakes_failed", 0) >= 2  # it did try, repeatedly
    refused = sum(net.nodes[a].core.handshaker.stats.get("hello_bad_mac", 0) for a in addrs[:2])
    assert refused >= 2
    iid = intruder.core.node_id
    for a in addrs:
        assert view_of(net.nodes[a].core, iid) is None
    assert_delivered_once(net, sent, exclude=(intruder_addr,))
    assert_converged(net, exclude=(intruder_addr,))


def test_no_handshake_reply_is_larger_than_its_trigger_in_a_real_cluster() -> None:
    sizes: dict[tuple[int, bytes], int] = {}
    pairs = 0

    def observe(src: Addr, dst: Addr, data: bytes) -> None:
        nonlocal pairs
        ptype = data[1]
        if ptype in (PacketType.HELLO, PacketType.OKBOSS):
            sizes[(ptype, data[2:18])] = len(data)
        elif ptype == PacketType.OHAI:
            assert len(data) <= sizes[(PacketType.HELLO, data[2:18])]
            pairs += 1
        elif ptype == PacketType.GOTEAM:
            assert len(data) <= sizes[(PacketType.OKBOSS, data[2:18])]
            pairs += 1

    net = CheckedSimNetwork(seed=15)
    net.on_datagram = observe
    zones = ["z" * 64, None, "", "é" * 32]
    for i in range(8):
        net.add_node(
            Config.local(
                bind=addr(i),
                psks=[PSK, *(bytes([i]) * 32 for i in range(i % 4))],
                bootstrap=[addr(0)] if i else [],
                zone=zones[i % 4],
            )
        )
    net.run_for(4.0)
    assert pairs >= 2 * 7


# ----------------------------------------------------------------------------- loss


class _SwitchableLoss:
    """1 ms links that lose ``loss`` of all datagrams (uniformly, from the network's rng)."""

    def __init__(self, loss: float = 0.0) -> None:
        self.loss = loss

    def __call__(self, src: Addr, dst: Addr, rng: random.Random) -> float | None:
        if self.loss and rng.random() < self.loss:
            return None
        return 0.001


@pytest.mark.parametrize("seed", [1, 3, 6])
def test_five_percent_loss_keeps_a_formed_cluster_working(seed: int) -> None:
    link = _SwitchableLoss()
    net, addrs = make_cluster(N, seed=seed, link=link)
    assert_converged(net)
    link.loss = 0.05
    sent: dict[bytes, Addr] = {}
    for round_ in range(5):
        sent |= broadcast_all(net, addrs, b"lossy %d " % round_)
        net.run_for(1.0)
    net.run_for(1.0)
    assert net.datagrams_dropped > 0
    total = N * (N - 1) * 5
    delivered = sum(sum(delivery_counts(net, m).values()) for m in sent)
    assert delivered >= 0.95 * total
    for msg_id, origin in sent.items():
        counts = delivery_counts(net, msg_id)
        assert counts[origin] == 0 and max(counts.values()) <= 1  # never twice
    known = sum(len(up_ids(n.core)) for n in net.nodes.values())
    assert known >= 0.95 * N * (N - 1)


@pytest.mark.parametrize("seed", [1, 4, 6])
def test_a_cluster_forms_over_five_percent_loss(seed: int) -> None:
    net, _ = make_cluster(N, seed=seed, link=constant_link(0.001, 0.05), settle_s=8.0)
    assert net.datagrams_dropped > 0
    known = sum(len(up_ids(n.core)) for n in net.nodes.values())
    assert known >= 0.95 * N * (N - 1)
    assert all(len(n.core.providers) == SUBSCRIPTIONS for n in net.nodes.values())


def test_a_cluster_formed_over_five_percent_loss_delivers_for_every_seed() -> None:
    for seed in range(2, 9):
        net, addrs = make_cluster(N, seed=seed, link=constant_link(0.001, 0.05), settle_s=8.0)
        sent = broadcast_all(net, addrs, b"lossy ")
        net.run_for(2.0)
        delivered = sum(sum(delivery_counts(net, m).values()) for m in sent)
        assert delivered >= 0.9 * N * (N - 1), seed


# ----------------------------------------------------------------------------- known bugs


def test_timer_deadline_moves_past_now_after_handle_timer_in_a_healthy_run() -> None:
    """The invariant CheckedSimNetwork enforces, exercised on a plain healthy cluster."""
    net, _ = make_cluster(N, seed=16, settle_s=10.0)
    for n in net.nodes.values():
        t = n.core.get_timer()
        assert t is not None and t > net.now - 1e-9


def test_provider_watchdog_deadline_always_advances() -> None:
    core = lone_core("watchdog")
    peer = b"p" * 16
    core.membership.apply(
        MemberRecord(peer, 0, MemberState.UP, *addr(1), None), 0.0, announce=False
    )
    core.providers.clear()
    core.providers[peer] = ProviderState(since=3.501, last_heard=3.501)
    core._next_heartbeat = 100.0  # only the watchdog is due
    core.subscriptions.reassign_at = None
    deadline = core.get_timer()
    assert deadline is not None and deadline < 3.501 + WATCHDOG_S + 0.01
    core.handle_timer(deadline)
    nxt = core.get_timer()
    assert nxt is None or nxt > deadline


def _core_with_two_sessions_to(peer: Party) -> tuple[NodeCore, list[Established]]:
    """A NodeCore that answered two handshakes from ``peer`` (the second supersedes the
    first), and the peer's side of both sessions."""
    core = lone_core("two-sessions")
    sessions: list[Established] = []
    for now in (0.1, 0.2):
        hello = peer.hs.initiate(addr(0), now, WALL_NS + int(now * 1e9))
        core.receive_datagram(hello, peer.addr, now)
        (ohai,) = [d for d, _ in core.datagrams_to_send(now) if d[1] == PacketType.OHAI]
        okboss, _ = peer.hs.handle(PacketType.OHAI, ohai, addr(0), now, 0)
        assert okboss is not None
        core.receive_datagram(okboss, peer.addr, now)
        (goteam,) = [d for d, _ in core.datagrams_to_send(now) if d[1] == PacketType.GOTEAM]
        _, est = peer.hs.handle(PacketType.GOTEAM, goteam, addr(0), now, 0)
        assert est is not None
        sessions.append(est)
    assert len(core.sessions) == 2
    return core, sessions


def _control_from(est: Established, seq: int, frames: bytes) -> bytes:
    header = wire.CONTROL_HEADER.pack(
        wire.VERSION, PacketType.CONTROL, 0, est.remote_session_id, seq
    )
    return header + seal(est.send_key, nonce(seq), frames)


def test_traffic_on_a_surviving_older_session_never_raises() -> None:
    peer = make_party(1)
    core, (old, current) = _core_with_two_sessions_to(peer)
    # the peer announces itself DOWN on the current session, then only uses the old one
    bye = MemberRecord(peer.node_id, 0, MemberState.DOWN, *peer.addr, None)
    core.receive_datagram(
        _control_from(current, 1, wire.encode_frame(FrameType.PEERS, wire.encode_members([bye]))),
        peer.addr,
        1.0,
    )
    assert not view_of(core, peer.node_id).is_up  # type: ignore[union-attr]
    ping = wire.encode_frame(FrameType.PING, b"still here")
    core.receive_datagram(_control_from(old, 1, ping), peer.addr, 20.0)
    core.handle_timer(35.0)  # the current session is idle past the grace period: freed
    core.datagrams_to_send(35.0)
    core.receive_datagram(_control_from(old, 2, ping), peer.addr, 36.0)  # must not raise
    assert core.stats["packets_in"] >= 5


class _LinkRules:
    """Constant 1 ms links, except datagrams matching a rule while the clock is in its
    window: those are dropped (delay None) or delayed."""

    def __init__(self) -> None:
        self.net: CheckedSimNetwork | None = None
        self.rules: list[tuple[float, float, Addr | None, Addr | None, float | None]] = []

    def __call__(self, src: Addr, dst: Addr, rng: random.Random) -> float | None:
        if self.net is None:
            return 0.001
        now = self.net.now
        for start, end, r_src, r_dst, delay in self.rules:
            if start <= now < end and r_src in (None, src) and r_dst in (None, dst):
                return delay
        return 0.001


def _provider_pair(seed: int) -> tuple[CheckedSimNetwork, _LinkRules, Addr, Addr]:
    """Two nodes, each the other's only provider; A ticks at 0, 0.5, 1.0, ..."""
    rules = _LinkRules()
    net = CheckedSimNetwork(seed=seed, link=rules)
    rules.net = net
    a, b = addr(0), addr(1)
    net.add_node(Config.local(bind=a, psks=[PSK]))
    net.add_node(Config.local(bind=b, psks=[PSK], bootstrap=[a]))
    net.run_for(5.0)
    assert_converged(net)
    return net, rules, a, b


def test_a_provider_gone_silent_is_suspected_then_declared_down() -> None:
    net, rules, a, b = _provider_pair(17)
    rules.rules.append((5.01, 100.0, a, b, None))  # A -> B goes dark for good
    local = Config.local(psks=[PSK]).validate()
    assert local.suspicion_max_s is not None
    net.run_for(local.suspicion_max_s + 2.0)
    core_b = net.nodes[b].core
    a_id = net.nodes[a].core.node_id
    suspects = [(t, e.member) for t, e in net.nodes[b].events if isinstance(e, MemberSuspect)]
    (when, member), *_ = down_events(net.nodes[b])
    assert member.node_id == a_id
    # Probed (every PING unanswered), suspected, and only then, a whole suspicion
    # timeout later (two nodes: nobody to confirm), accused.
    assert suspects and suspects[0][1].node_id == a_id
    assert core_b.stats["fd_probes_failed"] >= 1
    assert when - suspects[0][0] >= local.suspicion_max_s - 0.01


def test_a_provider_that_answers_the_probe_is_not_accused() -> None:
    net, rules, a, b = _provider_pair(17)
    # A -> B loses everything long enough for B to start probing and lose its first
    # PONGs, then heals: a later PONG gets through and there is no suspicion.
    rules.rules.append((5.01, 5.2, a, b, None))
    net.run_for(3.0)
    core_b = net.nodes[b].core
    assert core_b.stats["fd_probes"] >= 1
    assert core_b.stats.get("fd_probes_failed", 0) == 0
    assert not any(isinstance(e, MemberSuspect) for _, e in net.nodes[b].events if _ > 5.0)
    assert down_events(net.nodes[b]) == []
    assert net.nodes[a].core.node_id in core_b.providers


def test_two_lost_heartbeats_and_a_little_jitter_do_not_declare_a_provider_down() -> None:
    net, rules, a, b = _provider_pair(17)
    # A's heartbeats of 5.5 and 6.0 are lost; the one of 6.5 takes 20 ms instead of 1 ms.
    rules.rules.append((5.01, 6.01, a, b, None))
    rules.rules.append((6.01, 6.6, a, b, 0.020))
    net.run_for(3.0)
    assert down_events(net.nodes[b]) == []
    assert down_events(net.nodes[a]) == []


def test_a_missed_join_announcement_is_repaired_by_anti_entropy() -> None:
    """A node that loses every copy of the STATUS flood announcing a joiner still learns
    of it from the periodic member-list sync with a provider."""
    sync_s = Config.local().peer_sync_interval_s

    def scenario(deaf: Addr | None) -> tuple[CheckedSimNetwork, SimNode, float]:
        rules = _LinkRules()
        net, addrs = make_cluster(N, seed=18, link=rules)
        rules.net = net
        if deaf is not None:  # everything sent to `deaf` is lost for 0.3 s (< 1 heartbeat)
            rules.rules.append((net.now, net.now + 0.3, None, deaf, None))
        joined_at = net.now
        joiner = net.add_node(Config.local(bind=addr(N), psks=[PSK], bootstrap=[addrs[0]]))
        return net, joiner, joined_at

    dry, joiner, _ = scenario(None)
    dry.run_for(2 * sync_s)
    ids = ids_by_addr(dry)
    chosen = set(joiner.core.providers)
    # a node the joiner does not subscribe to can only learn of it through gossip
    deaf = next(a for a in sorted(dry.nodes)[1:] if ids[a] not in chosen and a != joiner.addr)
    net, joiner, joined_at = scenario(deaf)
    jid = joiner.core.node_id
    deaf_core = net.nodes[deaf].core
    net.run_for(0.5)
    assert jid not in up_ids(deaf_core)  # every copy of the flood was lost
    assert net.run_until_true(lambda: jid in up_ids(deaf_core), sync_s + 1.0, 0.01)
    assert net.now - joined_at <= sync_s + HEARTBEAT_S + 0.1


def test_mutual_bootstrap_pair_stays_up_past_the_session_grace_period() -> None:
    """Both nodes handshake each other at the same instant, so each ends up with two
    sessions; neither may free the one the other still sends on (regression)."""
    net = CheckedSimNetwork(seed=19)
    a, b = addr(0), addr(1)
    net.add_node(Config.local(bind=a, psks=[PSK], bootstrap=[b]))
    net.add_node(Config.local(bind=b, psks=[PSK], bootstrap=[a]))
    net.run_for(70.0)
    for n in net.nodes.values():
        assert down_events(n) == [], n.addr
        assert n.core.stats.get("drop_unknown_session", 0) == 0
        assert n.core.incarnation == 0


def test_fault_free_cluster_is_stable_for_a_minute() -> None:
    """No false DOWN, ever, without faults -- in particular not once SESSION_GRACE_S has
    passed since the (partly simultaneous) handshakes of the formation (regression)."""
    for seed in (1, 3, 4):
        net, _ = make_cluster(N, seed=seed, settle_s=70.0)
        for n in net.nodes.values():
            assert down_events(n) == [], (seed, n.addr)
        assert_converged(net)


# ----------------------------------------------------------------------------- pauses


def test_a_seed_node_paused_past_the_session_grace_rejoins_and_delivers() -> None:
    """Issue 11 item 1: the seed (no bootstrap) stops for 70 s, as under SIGSTOP. Its
    peers declare it DOWN and free its sessions; it must notice the pause, re-handshake
    the members it knows, refute the DOWN and deliver again within two heartbeats."""
    net, addrs = make_cluster(N, seed=21)
    seed = addrs[0]
    sid = net.nodes[seed].core.node_id
    net.pause(seed)
    net.run_for(70.0)
    for n in live_nodes(net, (seed,)):
        m = view_of(n.core, sid)
        assert m is not None and not m.is_up, n.addr
        assert not any(s.peer_id == sid for s in n.core.sessions.values()), n.addr
    woke = net.now
    net.resume(seed)
    deadline = 2 * HEARTBEAT_S
    assert net.run_until_true(lambda: _seen_up_everywhere(net, seed), deadline, 0.01)
    core = net.nodes[seed].core
    assert net.run_until_true(
        lambda: any(st.confirmed for st in core.providers.values()), woke + deadline - net.now, 0.01
    )
    assert core.stats["pauses_detected"] == 1
    sent = broadcast_all(net, addrs, b"after the pause ")
    net.run_for(0.5)
    assert_delivered_once(net, sent)


def test_an_isolated_node_rehandshakes_members_in_bounded_batches() -> None:
    """A node that stays isolated re-handshakes every member it knows, a bounded batch
    per heartbeat, backing off between passes (a large table must not burst)."""
    core = lone_core("isolated")
    members = 3 * REJOIN_BATCH
    core.learn_members(
        [
            MemberRecord(node_id(100 + i), 0, MemberState.UP, *addr(i + 1), None)
            for i in range(members)
        ]
    )
    started: Counter[int] = Counter()  # rejoin handshakes started, per heartbeat
    now = 0.0
    while now < 120.0:
        now = max(now, core.get_timer() or now)
        before = core.stats.get("rejoin_handshakes", 0)
        core.handle_timer(now)
        core.datagrams_to_send(now)
        started[int(now / HEARTBEAT_S)] += core.stats.get("rejoin_handshakes", 0) - before
        now += 0.001
    assert max(started.values()) == REJOIN_BATCH
    first_ticks = int(WATCHDOG_S / HEARTBEAT_S) + 4
    assert sum(started[t] for t in range(first_ticks)) == members  # the first pass: all
    # Then passes get rarer: 120 s is 240 heartbeats, a pass every tick would be 80.
    assert sum(started.values()) <= 10 * members
    busy = sorted(t for t, n in started.items() if n)
    assert max(b - a for a, b in itertools.pairwise(busy)) > 32


def test_a_node_whose_application_stops_reading_refuses_subscribers_visibly() -> None:
    """Issue 11 item 7: a node that stopped reading its socket (the application does not
    consume deliveries) must not stay a provider that relays nothing while it keeps
    heartbeating. After two heartbeats it sheds its subscribers with a refusal, they
    choose other providers, it is not accused, and it serves again once it reads."""
    rules = _LinkRules()
    net, addrs = make_cluster(N, seed=22, link=rules)
    rules.net = net
    slow = net.nodes[addrs[3]]
    sid = slow.core.node_id
    holders = [n for n in live_nodes(net, (addrs[3],)) if sid in n.core.providers]
    assert holders
    t0 = net.now
    slow.core.set_reading_paused(True)
    rules.rules.append((t0, t0 + 10.0, None, addrs[3], None))  # nothing is read
    net.run_for(2 * HEARTBEAT_S + HEARTBEAT_S + 0.1)
    assert slow.core.stats["saturated"] == 1
    assert slow.core.stats["subscribers_shed"] >= len(holders)
    assert any("refuses subscribers" in w for w in slow.core.warnings)
    assert not slow.core.subscribers
    net.run_for(1.0)
    for n in live_nodes(net, (addrs[3],)):
        assert sid not in n.core.providers, n.addr  # nobody counts on it any more
        assert down_events(n) == [], n.addr  # degraded, not accused
    for n in holders:
        assert n.core.stats["providers_refused"] == 1
    others = [a for a in addrs if a != addrs[3]]
    sent = broadcast_all(net, others, b"while it is slow ")
    net.run_for(1.0)
    assert_delivered_once(net, sent, exclude=(addrs[3],))
    assert down_events(slow) == []
    # It reads again: no longer saturated, and it receives.
    net.run_until(t0 + 10.0)
    slow.core.set_reading_paused(False)
    net.run_for(2.0)
    assert not slow.core.subscriptions.saturated
    sent = broadcast_all(net, others, b"after ")
    net.run_for(1.0)
    assert all(any(m.id == i for m in messages(slow)) for i in sent)
