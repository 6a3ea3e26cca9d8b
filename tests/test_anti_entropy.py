"""Digest-based anti-entropy (PEERS_REQUEST with bucket digests), the silent table
seeding API (``learn_members`` / ``reselect_providers``) and the shortcut that skips
provider selection when it could not change anything (``_selection_settled``).

Cluster scenarios run on the deterministic simulator; PEERS answers are read by opening
the CONTROL datagrams with the receiving session's key (side-effect free), so the tests
see exactly which member records went over the wire.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.anti_entropy import PEER_LIST_MIN_INTERVAL_S
from gwyh_mp.protocol.crypto import nonce, open_sealed
from gwyh_mp.protocol.events import MemberDown, MemberUp, ProviderChanged
from gwyh_mp.protocol.membership import DIGEST_BUCKETS, bucket_of, id_hash
from gwyh_mp.protocol.membership import record_of as member_record
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.selection import Candidate, Strategy, select_providers
from gwyh_mp.protocol.subscriptions import ProviderState
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, PacketType
from gwyh_mp.simulation import SimNode
from tests.helpers_core import (
    PSK,
    Addr,
    CheckedSimNetwork,
    addr,
    live_nodes,
    lone_core,
    make_cluster,
    node_id,
    seeded_random,
    view_of,
)

UP, DOWN = MemberState.UP, MemberState.DOWN
NEVER_S = 1000.0  # a peer-sync interval no test reaches: no periodic sync interferes
ZONES4: tuple[str | None, ...] = (None, "a", "b", "c")

Key = tuple[bytes, int, MemberState]


def key(record: MemberRecord) -> Key:
    return record.node_id, record.incarnation, record.state


# ----------------------------------------------------------------------------- helpers


class PeersTap:
    """Collects the member records of every PEERS frame delivered to one node."""

    def __init__(self, net: CheckedSimNetwork, node: SimNode) -> None:
        self.node = node
        self.frames: list[list[MemberRecord]] = []
        net.on_receive = self._on_receive

    def _on_receive(self, src: Addr, dst: Addr, data: bytes) -> None:
        if dst != self.node.addr or data[1] != PacketType.CONTROL:
            return
        _, _, _, sid, seq = wire.CONTROL_HEADER.unpack_from(data)
        session = self.node.core.sessions.get(sid)
        assert session is not None
        plaintext = open_sealed(session.recv_key, nonce(seq), data[wire.CONTROL_HEADER.size :])
        for ftype, body in wire.iter_frames(plaintext):
            if ftype == FrameType.PEERS:
                self.frames.append(wire.decode_members(body))

    @property
    def records(self) -> list[MemberRecord]:
        return [r for frame in self.frames for r in frame]


def stat(node: SimNode, name: str) -> int:
    return node.core.stats.get(name, 0)


def own_record(node: SimNode) -> MemberRecord:
    m = node.core.local_member()
    return MemberRecord(m.node_id, m.incarnation, UP, m.host, m.port, m.zone)


def record_of(node: SimNode, subject: bytes) -> MemberRecord:
    member = node.core.members.get(subject)
    assert member is not None
    return member_record(member)


def phantom(i: int, inc: int = 0, state: MemberState = UP) -> MemberRecord:
    """A member that is no node of the simulation."""
    return MemberRecord(
        random.Random(f"phantom/{i}").randbytes(16), inc, state, "10.9.9.9", 1, None
    )


def converged(n: int, seed: int, **overrides: object) -> tuple[CheckedSimNetwork, list[Addr]]:
    net, addrs = make_cluster(n, seed=seed, **overrides)
    digests = {tuple(node.core.anti_entropy.member_digests()) for node in net.nodes.values()}
    for node in net.nodes.values():
        assert node.core.members.up_count == n - 1
    assert len(digests) == 1  # equal views, equal digests
    return net, addrs


def ask(net: CheckedSimNetwork, requester: SimNode, responder: SimNode, body: bytes | None) -> None:
    """Make ``requester`` send one PEERS_REQUEST to ``responder`` (``None``: the real
    digest request) and deliver everything that follows for a few link delays; first
    wait out the responder's per-peer answer interval."""
    net.run_for(PEER_LIST_MIN_INTERVAL_S)
    rid = responder.core.node_id
    if body is None:
        requester.core.anti_entropy.request_peers(rid)
    else:
        requester.core._queue_control(rid, FrameType.PEERS_REQUEST, body)
    net.pump(requester)
    net.run_for(0.01)  # 1 ms links: request and answer are long delivered


def a_provider_pair(net: CheckedSimNetwork, addrs: list[Addr]) -> tuple[SimNode, SimNode]:
    requester = net.nodes[addrs[3]]
    provider_id = sorted(requester.core.providers)[0]
    responder = next(n for n in net.nodes.values() if n.core.node_id == provider_id)
    return requester, responder


# ----------------------------------------------------------------------------- syncs


def test_sync_between_agreeing_views_carries_only_the_responders_record() -> None:
    net, addrs = converged(10, seed=41, peer_sync_interval_s=NEVER_S)
    a, p = a_provider_pair(net, addrs)
    tap = PeersTap(net, a)
    answered, sent = stat(p, "peer_syncs_answered"), stat(p, "peer_records_sent")
    ask(net, a, p, None)
    assert stat(p, "peer_syncs_answered") == answered + 1
    assert stat(p, "peer_records_sent") == sent + 1
    assert [key(r) for r in tap.records] == [key(own_record(p))]


def test_periodic_syncs_of_a_converged_cluster_carry_one_record_each() -> None:
    net, _ = converged(10, seed=42, peer_sync_interval_s=1.0)
    before = {
        a: (stat(n, "peer_syncs_answered"), stat(n, "peer_records_sent"))
        for a, n in net.nodes.items()
    }
    net.run_for(5.0)
    answered = sent = 0
    for a, n in net.nodes.items():
        answered += stat(n, "peer_syncs_answered") - before[a][0]
        sent += stat(n, "peer_records_sent") - before[a][1]
    assert answered >= 10 * 3  # every node synced about once a second
    assert sent == answered


def phantoms_sharing_a_bucket() -> tuple[int, int, int]:
    """Two phantoms in one digest bucket and a third in another."""
    seen: dict[int, int] = {}
    for i in range(1000):
        b = bucket_of(id_hash(phantom(i).node_id))
        if b in seen:
            other = next(k for k in range(1000) if bucket_of(id_hash(phantom(k).node_id)) != b)
            return seen[b], i, other
        seen[b] = i
    raise AssertionError("no two phantoms share a bucket")


def test_digest_request_gets_every_member_of_each_differing_bucket() -> None:
    net, addrs = converged(10, seed=43, peer_sync_interval_s=NEVER_S)
    a, p = a_provider_pair(net, addrs)
    # P alone knows of a member that is UP (its bucket differs) and of one that has left
    # (UP, then DOWN) from the same bucket; and of another departed member elsewhere,
    # which alone makes no difference (digests cover UP members only).
    i, j, k = phantoms_sharing_a_bucket()
    alive, left, elsewhere = phantom(i), phantom(j), phantom(k)
    p.core.learn_members([alive, left, phantom(j, 0, DOWN), elsewhere, phantom(k, 1, DOWN)])
    mine, theirs = a.core.anti_entropy.member_digests(), p.core.anti_entropy.member_digests()
    differing = [b for b in range(DIGEST_BUCKETS) if mine[b] != theirs[b]]
    bucket = bucket_of(id_hash(alive.node_id))
    assert differing == [bucket]
    tap = PeersTap(net, a)
    sent = stat(p, "peer_records_sent")
    ask(net, a, p, None)
    in_bucket = [member_record(m) for m in p.core.members.bucket_members({bucket})]
    want = {key(own_record(p))} | {key(r) for r in in_bucket if r.node_id != a.core.node_id}
    got = [key(r) for r in tap.records]
    assert len(got) == len(set(got))
    assert set(got) == want
    assert key(alive) in want
    assert (left.node_id, 0, DOWN) in want  # DOWN members of the bucket travel too
    assert all(r.node_id != elsewhere.node_id for r in tap.records)
    assert stat(p, "peer_records_sent") == sent + len(want)
    assert view_of(a.core, alive.node_id) is not None  # the missing UP member is learned
    assert a.core.members.get(left.node_id) is None  # an unknown DOWN is not
    # now the views agree on who is UP: the next sync carries P's record only
    assert a.core.anti_entropy.member_digests() == p.core.anti_entropy.member_digests()
    tap.frames.clear()
    ask(net, a, p, None)
    assert [key(r) for r in tap.records] == [key(own_record(p))]


def test_remembered_down_members_alone_make_no_difference() -> None:
    """P remembers departed members that A never heard of (A joined later, or trimmed
    them): the views agree on who is UP, so a sync carries P's own record only."""
    net, addrs = converged(10, seed=48, peer_sync_interval_s=NEVER_S)
    a, p = a_provider_pair(net, addrs)
    for i in range(5):
        p.core.learn_members([phantom(i, i), phantom(i, i + i % 2, DOWN)])
    assert len(p.core.members) == len(a.core.members) + 5
    assert a.core.anti_entropy.member_digests() == p.core.anti_entropy.member_digests()
    tap = PeersTap(net, a)
    sent = stat(p, "peer_records_sent")
    ask(net, a, p, None)
    assert [key(r) for r in tap.records] == [key(own_record(p))]
    assert stat(p, "peer_records_sent") == sent + 1


def test_empty_request_still_gets_the_full_up_list() -> None:
    """Older peers and newcomers send no digests: they get every UP member."""
    net, addrs = converged(10, seed=44, peer_sync_interval_s=NEVER_S)
    a, p = a_provider_pair(net, addrs)
    p.core.learn_members([phantom(2), phantom(2, 0, DOWN)])  # a DOWN member: not sent
    tap = PeersTap(net, a)
    sent = stat(p, "peer_records_sent")
    ask(net, a, p, b"")
    ups = [member_record(m) for m in p.core.members.up_members()]
    want = {key(own_record(p))} | {key(r) for r in ups if r.node_id != a.core.node_id}
    assert len(want) == 9  # P itself and the 8 others besides A
    got = [key(r) for r in tap.records]
    assert len(got) == len(set(got)) and set(got) == want
    assert stat(p, "peer_records_sent") == sent + len(want)


def test_request_with_a_bad_digest_length_is_dropped_as_malformed() -> None:
    net, addrs = converged(6, seed=45, peer_sync_interval_s=NEVER_S)
    a, p = a_provider_pair(net, addrs)
    tap = PeersTap(net, a)
    malformed, sent = stat(p, "drop_malformed"), stat(p, "peer_records_sent")
    ask(net, a, p, bytes(8 * DIGEST_BUCKETS - 8))
    assert stat(p, "drop_malformed") == malformed + 1
    assert stat(p, "peer_records_sent") == sent
    assert tap.frames == []
    # and a well-formed request over the same session is still answered
    ask(net, a, p, None)
    assert [key(r) for r in tap.records] == [key(own_record(p))]


# ----------------------------------------------------------------------------- repair


def adjacent(x: SimNode, y: SimNode) -> bool:
    return y.core.node_id in x.core.providers or x.core.node_id in y.core.providers


def lagging_scenario(
    sync_s: float,
) -> tuple[CheckedSimNetwork, SimNode, SimNode, SimNode]:
    """12 nodes, 3 providers each. Node K crashes and node R refutes a suspicion
    (incarnation 1); every live node learns both except L, which misses the news: it
    still holds K UP and R DOWN at incarnation 0. Neither K nor R is a neighbour of L,
    so only anti-entropy can tell it."""
    net, addrs = converged(12, seed=46, subscriptions=3, peer_sync_interval_s=sync_s)
    nodes = [net.nodes[a] for a in addrs]
    lag = k = r = None
    for cand in nodes[1:]:
        far = [n for n in nodes[1:] if n is not cand and not adjacent(cand, n)]
        if len(far) >= 2:
            lag, k, r = cand, far[0], far[1]
            break
    assert lag is not None and k is not None and r is not None
    kid, rid = k.core.node_id, r.core.node_id
    k_rec, r_rec = record_of(lag, kid), record_of(lag, rid)
    net.kill(k.addr)
    r.core.incarnation = 1
    k_down = MemberRecord(kid, 0, DOWN, k_rec.host, k_rec.port, k_rec.zone)
    r_up1 = MemberRecord(rid, 1, UP, r_rec.host, r_rec.port, r_rec.zone)
    for n in nodes:
        if n is k:
            continue
        if n is lag:
            n.core.members.apply(MemberRecord(rid, 0, DOWN, r_rec.host, r_rec.port, r_rec.zone))
        else:
            n.core.learn_members([k_down, r_up1])
    live = [n for n in nodes if n is not k]
    others = {tuple(n.core.anti_entropy.member_digests()) for n in live if n is not lag}
    assert len(others) == 1  # everyone but L agrees
    mine = lag.core.anti_entropy.member_digests()
    (theirs,) = others
    differing = {b for b in range(DIGEST_BUCKETS) if mine[b] != theirs[b]}
    assert differing == {bucket_of(id_hash(kid)), bucket_of(id_hash(rid))}
    return net, lag, k, r


View = tuple[MemberState, int]


def lag_view(lag: SimNode, k: SimNode, r: SimNode) -> tuple[View, View]:
    vk, vr = view_of(lag.core, k.core.node_id), view_of(lag.core, r.core.node_id)
    assert vk is not None and vr is not None
    return (vk.state, vk.incarnation), (vr.state, vr.incarnation)


def test_missed_down_and_missed_refutation_are_repaired_by_the_periodic_sync() -> None:
    net, lag, k, r = lagging_scenario(sync_s=1.0)
    start = net.now
    assert lag_view(lag, k, r) == ((UP, 0), (DOWN, 0))
    repaired = ((DOWN, 0), (UP, 1))
    assert net.run_until_true(lambda: lag_view(lag, k, r) == repaired, 2.0, 0.01)
    assert net.now - start <= 1.0 + 0.5 + 0.05  # one interval, plus the heartbeat tick
    kid, rid = k.core.node_id, r.core.node_id
    late = [e for t, e in lag.events if t >= start]
    assert any(isinstance(e, MemberDown) and e.member.node_id == kid for e in late)
    assert any(
        isinstance(e, MemberUp) and e.member.node_id == rid and e.member.incarnation == 1
        for e in late
    )
    net.run_for(1.0)
    live = [n for n in net.nodes.values() if n.alive]
    assert len({tuple(n.core.anti_entropy.member_digests()) for n in live}) == 1  # all agree again


def test_without_the_sync_the_lagging_view_stays_wrong() -> None:
    """The control for the test above: nothing else repairs L's view."""
    net, lag, k, r = lagging_scenario(sync_s=NEVER_S)
    net.run_for(3.0)
    assert lag_view(lag, k, r) == ((UP, 0), (DOWN, 0))


def sync_counts(net: CheckedSimNetwork) -> tuple[int, int]:
    """Peer syncs answered and records sent, summed over every node."""
    answered = sum(stat(n, "peer_syncs_answered") for n in net.nodes.values())
    return answered, sum(stat(n, "peer_records_sent") for n in net.nodes.values())


def test_a_node_that_joined_after_a_departure_agrees_with_the_older_nodes() -> None:
    """The older nodes remember the departed member as DOWN, the newcomer never heard of
    it: their digests must still be equal, or every sync would resend that bucket for
    ever."""
    net, addrs = converged(8, seed=47, peer_sync_interval_s=1.0)
    dead = net.nodes[addrs[5]]
    did = dead.core.node_id
    net.kill(dead.addr)
    older = live_nodes(net)

    def all_see_it_down() -> bool:
        views = [view_of(n.core, did) for n in older]
        return all(v is not None and v.state is DOWN for v in views)

    assert net.run_until_true(all_see_it_down, 10.0)
    net.run_for(1.0)  # let the STATUS flood die out
    newcomer = net.add_node(
        Config.local(bind=addr(8), psks=[PSK], bootstrap=[addrs[0]], peer_sync_interval_s=1.0)
    )
    net.run_for(5.0)
    assert newcomer.core.members.up_count == 7
    # the premise: the views really differ in the DOWN member only
    assert newcomer.core.members.get(did) is None
    assert all(n.core.members.get(did) is not None for n in older)
    live = live_nodes(net)
    assert len(live) == 8
    assert len({tuple(n.core.anti_entropy.member_digests()) for n in live}) == 1
    answered, sent = sync_counts(net)
    net.run_for(4.0)
    answered2, sent2 = sync_counts(net)
    assert answered2 - answered >= 8 * 3  # every node synced about once a second
    assert sent2 - sent == answered2 - answered  # one record each: nothing differs
    assert newcomer.core.members.get(did) is None  # nor was the DOWN pushed on it
    assert len({tuple(n.core.anti_entropy.member_digests()) for n in live}) == 1


# ----------------------------------------------------------------------------- selection


def make_core(
    strategy: Strategy, n: int, zone: str | None, seed: int = 0, **overrides: object
) -> NodeCore:
    config = Config(
        bind=addr(0),
        psks=[PSK],
        zone=zone,
        strategy=strategy,
        subscriptions=n,
        seen_set_size=1000,
        **overrides,  # type: ignore[arg-type]
    )
    return NodeCore(config, 0.0, random_bytes=seeded_random(f"core/{seed}"))


def pool_ids(size: int) -> list[bytes]:
    rng = random.Random("pool")
    return [rng.randbytes(16) for _ in range(size)]


def check_selection(
    strategy: Strategy,
    n: int,
    own_zone: str | None,
    zones: list[str | None],
    downs: Iterable[int],
    current_idx: Iterable[int],
    unknown_current: bool,
) -> bool:
    """``_selection_settled()`` is True exactly when ``select_providers`` (any RNG)
    returns the current providers; returns what it said."""
    core = make_core(strategy, n, own_zone)
    ids = pool_ids(len(zones))
    changed = core.learn_members(
        [MemberRecord(i, 0, UP, "10.5.0.1", 7000, z) for i, z in zip(ids, zones, strict=True)]
    )
    assert changed == len(ids)
    down_set = set(downs)
    core.learn_members([MemberRecord(ids[i], 0, DOWN, "10.5.0.1", 7000, None) for i in down_set])
    current = {ids[i] for i in current_idx}
    if unknown_current:
        current.add(b"\xee" * 16)
    core.providers.clear()
    core.providers.update({pid: ProviderState(since=0.0, last_heard=0.0) for pid in current})
    candidates = sorted(
        (Candidate(ids[i], z) for i, z in enumerate(zones) if i not in down_set),
        key=lambda c: c.node_id,
    )
    settled = core.subscriptions.selection_settled()
    for x in range(5):
        chosen = select_providers(
            own_zone=own_zone,
            candidates=candidates,
            current=current,
            n=n,
            strategy=strategy,
            rng=random.Random(x),
        )
        assert (set(chosen) == current) is settled, (x, sorted(chosen), sorted(current))

    # Fixed point: after a real selection there is nothing left to select.
    core.reselect_providers(1.0)
    assert core.subscriptions.selection_settled()
    again = select_providers(
        own_zone=own_zone,
        candidates=candidates,
        current=set(core.providers),
        n=n,
        strategy=strategy,
        rng=random.Random(99),
    )
    assert set(again) == set(core.providers)
    assert set(core.providers) <= {c.node_id for c in candidates}
    return settled


@pytest.mark.parametrize("strategy", list(Strategy))
def test_selection_settled_agrees_with_select_providers(strategy: Strategy) -> None:
    rng = random.Random(f"settled/{strategy}")
    verdicts = []
    for _ in range(300):
        size = rng.randrange(0, 12)
        zones = [rng.choice(ZONES4) for _ in range(size)]
        downs = [i for i in range(size) if rng.random() < 0.15]
        n = rng.randrange(1, 8)
        own_zone = rng.choice(ZONES4)
        if rng.random() < 0.5:
            # Often the selection's own answer (possibly perturbed), so both verdicts
            # are common; a purely random subset is rarely settled.
            ids = pool_ids(size)
            up = [Candidate(ids[i], z) for i, z in enumerate(zones) if i not in downs]
            chosen = select_providers(
                own_zone=own_zone,
                candidates=up,
                current=(),
                n=n,
                strategy=strategy,
                rng=rng,
            )
            index = {nid: i for i, nid in enumerate(ids)}
            current = {index[c] for c in chosen}
            if current and rng.random() < 0.3:
                current.discard(rng.choice(sorted(current)))
            if size and rng.random() < 0.3:
                current.add(rng.randrange(size))
        else:
            current = {i for i in range(size) if rng.random() < 0.4}
        unknown = rng.random() < 0.05
        verdicts.append(check_selection(strategy, n, own_zone, zones, downs, current, unknown))
    assert verdicts.count(True) >= 50 and verdicts.count(False) >= 50


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    strategy=st.sampled_from(list(Strategy)),
    n=st.integers(1, 7),
    own_zone=st.sampled_from(ZONES4),
    members=st.lists(
        st.tuples(st.sampled_from(ZONES4), st.booleans(), st.booleans()),  # zone, down, cur
        max_size=10,
    ),
    unknown=st.booleans(),
)
def test_selection_settled_agrees_with_select_providers_hypothesis(
    strategy: Strategy,
    n: int,
    own_zone: str | None,
    members: list[tuple[str | None, bool, bool]],
    unknown: bool,
) -> None:
    zones = [z for z, _, _ in members]
    downs = [i for i, (_, down, _) in enumerate(members) if down]
    current = [i for i, (_, _, cur) in enumerate(members) if cur]
    check_selection(strategy, n, own_zone, zones, downs, current, unknown)


def test_a_pending_swap_is_never_settled() -> None:
    core = make_core(Strategy.UNIFORM, 2, None)
    ids = pool_ids(4)
    core.learn_members([MemberRecord(i, 0, UP, "10.5.0.1", 7000, None) for i in ids])
    core.reselect_providers(0.0)
    assert core.subscriptions.selection_settled()
    newcomer = next(i for i in ids if i not in core.providers)
    core.subscriptions.pending_swaps.append((sorted(core.providers)[0], newcomer))
    assert not core.subscriptions.selection_settled()
    core.reselect_providers(0.1)
    assert newcomer in core.providers and core.subscriptions.selection_settled()


# ----------------------------------------------------------------------------- learn_members


def test_learn_members_is_silent_skips_itself_and_counts_changes() -> None:
    core = make_core(Strategy.UNIFORM, 2, "a")
    core.start(0.0)
    core.datagrams_to_send(0.0)
    ids = pool_ids(4)
    own = MemberRecord(core.node_id, 0, UP, "10.0.0.1", 7000, "a")
    records = [
        own,
        MemberRecord(core.node_id, 3, DOWN, "10.0.0.1", 7000, "a"),  # would be refuted
        *(MemberRecord(i, 0, UP, "10.5.0.1", 7000, "a") for i in ids[:3]),
        MemberRecord(ids[0], 0, UP, "10.5.0.1", 7000, "a"),  # already known: no change
        MemberRecord(ids[3], 4, DOWN, "10.5.0.1", 7000, "a"),  # unknown DOWN: ignored
        MemberRecord(ids[1], 0, DOWN, "10.5.0.1", 7000, "a"),  # a change
        MemberRecord(ids[2], 2, UP, "10.5.0.1", 7000, "b"),  # a change (newer)
    ]
    assert core.learn_members(records) == 5
    assert core.members.get(core.node_id) is None
    assert core.incarnation == 0  # no refutation of the DOWN about itself
    assert set(core.members.members) == set(ids[:3])
    assert core.members.up_count == 2
    assert core.next_event() is None
    assert core.providers == {}  # no reselection either
    assert core.datagrams_to_send(0.0) == []  # nothing announced
    assert core.stats.get("status_announced", 0) == 0
    assert core.learn_members(records) == 0  # nothing new the second time

    core.reselect_providers(0.5)
    assert set(core.providers) == {ids[0], ids[2]}  # the two UP members
    assert core.next_event() == ProviderChanged(tuple(sorted(core.providers)))
    assert core.next_event() is None


# ----------------------------------------------------------------------------- providers


def test_a_silent_provider_already_down_in_the_table_is_replaced() -> None:
    """A provider the table already holds DOWN at its incarnation (seeded silently with
    ``learn_members``, so nothing dropped it then) dies: the failed probe cannot declare
    it DOWN again, yet it must stop being a provider and a replacement be chosen."""
    net, addrs = converged(10, seed=49, subscriptions=3, peer_sync_interval_s=NEVER_S)
    a = net.nodes[addrs[3]]
    assert len(a.core.providers) == 3
    pid = sorted(a.core.providers)[0]
    p = next(n for n in net.nodes.values() if n.core.node_id == pid)
    rest = tuple(sorted(set(a.core.providers) - {pid}))
    rec = record_of(a, pid)
    down = MemberRecord(pid, rec.incarnation, DOWN, rec.host, rec.port, rec.zone)
    assert a.core.learn_members([down]) == 1
    assert pid in a.core.providers  # learn_members is silent: still a provider
    net.kill(p.addr)
    start = net.now
    failed = stat(a, "fd_probes_failed")
    hb = a.core.config.heartbeat_interval_s
    limit = a.core.liveness.watchdog_s + hb + hb + 0.2  # generous: probes take ~0.3 s
    assert net.run_until_true(lambda: pid not in a.core.providers, limit, 0.01)
    assert stat(a, "fd_probes_failed") == failed + 1
    changes = [e for t, e in a.events if t >= start and isinstance(e, ProviderChanged)]
    assert changes and changes[0].providers == rest  # dropped, announced as an event
    # a replacement is chosen a reassign delay later
    assert net.run_until_true(lambda: len(a.core.providers) == 3, 0.5, 0.01)
    assert pid not in a.core.providers
    assert set(rest) < set(a.core.providers)
    for q in a.core.providers:
        view = view_of(a.core, q)
        assert view is not None and view.state is UP
    last = [e for _, e in a.events if isinstance(e, ProviderChanged)][-1]
    assert last.providers == tuple(sorted(a.core.providers))
    net.run_for(2.0)
    assert pid not in a.core.providers and len(a.core.providers) == 3


def test_paging_goes_on_with_the_peer_it_started_with_and_skips_pending_providers() -> None:
    """A follow-up page is asked of the peer we were paging from while we hold a session
    with it, even if re-selection dropped it as a provider; a random pull picks only a
    confirmed provider (a request to one still handshaking would go unanswered)."""
    core = lone_core("paging-follow-up")
    ae = core.anti_entropy
    asked: list[bytes] = []
    ae.request_peers = asked.append  # type: ignore[method-assign]
    paged, other = node_id(1), node_id(2)
    ae._follow_up = paged
    ae.sync(10.0, [other], lambda p: p == paged)
    assert asked == [paged]
    ae._follow_up = paged
    ae.sync(20.0, [other], lambda p: False)  # session gone: a confirmed provider instead
    assert asked == [paged, other]
    ae.sync(30.0, [], lambda p: True)  # nobody confirmed yet: nothing is sent
    assert asked == [paged, other]
