"""Congestion control wired into the node: NAKs from sequence gaps, retransmission,
AIMD reacting to loss, priority of membership traffic, bounded queues and backpressure."""

from __future__ import annotations

import random

import pytest

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.wire import PacketType
from gwyh_mp.simulation import SimNetwork

PSK = [b"congestion-test-key-0123456789"]
A, B = ("10.0.0.1", 7000), ("10.0.0.2", 7000)


def two_nodes(loss: float, seed: int = 1, **kw: object) -> SimNetwork:
    """Two nodes, each the other's only provider: no redundant path, so every lost
    broadcast datagram must be recovered by NAK and retransmission."""
    state = {"armed": False}

    def link(src: tuple[str, int], dst: tuple[str, int], rng: random.Random) -> float | None:
        return 0.002 + rng.random() * 0.001

    net = SimNetwork(seed=seed, link=link)
    original = net.link

    def lossy(src: tuple[str, int], dst: tuple[str, int], rng: random.Random) -> float | None:
        return original(src, dst, rng)

    net.link = lossy
    net.add_node(Config.local(bind=A, psks=PSK, max_datagram_bytes=1400, **kw))
    net.add_node(Config.local(bind=B, psks=PSK, bootstrap=[A], max_datagram_bytes=1400, **kw))
    net.run_for(3.0)

    drop_rng = random.Random(seed)

    def hook(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        state["last_kind"] = data[1]

    def lossy_after_join(
        src: tuple[str, int], dst: tuple[str, int], rng: random.Random
    ) -> float | None:
        if (
            state["armed"]
            and state.get("last_kind") == PacketType.BROADCAST
            and drop_rng.random() < loss
        ):
            return None
        return original(src, dst, rng)

    net.on_datagram = hook
    net.link = lossy_after_join
    state["armed"] = True
    return net


def delivered(net: SimNetwork, addr: tuple[str, int]) -> list[bytes]:
    return [e.id for _, e in net.nodes[addr].events if isinstance(e, Message)]


def test_lost_broadcast_datagrams_are_recovered_by_nak_and_retransmission() -> None:
    net = two_nodes(loss=0.3)
    assert net.nodes[A].core.providers and net.nodes[B].core.providers
    sent = []
    for k in range(300):
        sent.append(net.broadcast(A, b"m%d" % k))
        net.run_for(0.003)
    assert net.run_until_true(lambda: set(sent) <= set(delivered(net, B)), 10.0)
    got = delivered(net, B)
    assert len(got) == len(set(got))  # exactly once, despite retransmissions
    a, b = net.nodes[A].core.stats, net.nodes[B].core.stats
    assert b.get("naks_sent", 0) > 0
    assert a.get("retransmits", 0) > 0
    # NAKs are aggregated: far fewer NAKs than lost datagrams.
    assert b["naks_sent"] < a["retransmits"]


def test_no_naks_without_loss() -> None:
    net = two_nodes(loss=0.0)
    for k in range(200):
        net.broadcast(A, b"m%d" % k)
        net.run_for(0.002)
    net.run_for(1.0)
    assert net.nodes[B].core.stats.get("naks_sent", 0) == 0
    assert net.nodes[A].core.stats.get("retransmits", 0) == 0


def test_loss_lowers_the_pace_and_quiet_raises_it_again() -> None:
    net = two_nodes(loss=0.3, send_rate_initial_bytes_per_s=4 << 20)
    core_a = net.nodes[A].core
    link = core_a.links[net.nodes[B].core.node_id]
    for k in range(400):
        net.broadcast(A, bytes(1000) + b"%d" % k)
        net.run_for(0.002)
    net.run_for(0.5)
    assert link.pacer is not None
    lowered = link.pacer.rate_bytes_per_s
    assert lowered < 4 << 20
    assert core_a.stats.get("rate_decreases", 0) >= 1
    # Loss-free traffic lets the rate climb back (additive increase).
    net.link = lambda src, dst, rng: 0.002
    for k in range(400):
        net.broadcast(A, b"q%d" % k)
        net.run_for(0.005)
    assert link.pacer.rate_bytes_per_s > lowered


def test_membership_survives_a_saturated_link() -> None:
    """Data far above the pace queues up (and is shed past the link queue bound, counted),
    while heartbeats keep flowing: nobody is declared DOWN."""
    net = two_nodes(
        loss=0.0,
        send_rate_initial_bytes_per_s=64 << 10,
        send_rate_min_bytes_per_s=64 << 10,
        send_rate_max_bytes_per_s=64 << 10,
        link_queue_bytes=256 << 10,
    )
    for _ in range(60):
        for _ in range(20):
            net.broadcast(A, bytes(1200))
        net.run_for(0.1)
    core_a, core_b = net.nodes[A].core, net.nodes[B].core
    assert core_a.stats.get("shed_datagrams", 0) > 0  # the overload is visible
    assert core_a.backlog_bytes > 0
    assert all(m.is_up for m in core_a.member_list())
    assert all(m.is_up for m in core_b.member_list())
    assert core_b.stats.get("declared_down", 0) == 0


def test_broadcast_backpressure_flag() -> None:
    net = two_nodes(
        loss=0.0,
        send_rate_initial_bytes_per_s=64 << 10,
        send_rate_min_bytes_per_s=64 << 10,
        send_rate_max_bytes_per_s=64 << 10,
        send_queue_bytes=128 << 10,
    )
    core = net.nodes[A].core
    assert core.accepting
    for _ in range(600):  # 720 KB: past the initial burst and the 128 KiB bound
        net.broadcast(A, bytes(1200))
    assert not core.accepting  # the runtime makes broadcast() wait now
    net.run_until_true(lambda: core.accepting, 30.0)
    assert core.accepting


def test_one_mib_message_reaches_every_node_intact_at_ten_percent_loss() -> None:
    """Sans-IO, 7 nodes, 10 % of *all* datagrams lost (handshakes and control too):
    the fragmented 1 MiB broadcast arrives whole and byte-identical everywhere, once."""
    import hashlib

    from gwyh_mp.simulation import constant_link

    addrs = [(f"10.0.1.{i}", 7000) for i in range(1, 8)]
    net = SimNetwork(seed=5, link=constant_link(0.002, 0.0))
    for i, a in enumerate(addrs):
        net.add_node(
            Config.local(
                bind=a, psks=PSK, max_datagram_bytes=1400, bootstrap=[addrs[0]] if i else []
            )
        )
    net.run_for(5.0)
    net.link = constant_link(0.002, 0.10)
    data = random.Random(7).randbytes(1 << 20)
    msg_id = net.broadcast(addrs[3], data)
    digest = hashlib.sha256(data).digest()

    def done() -> bool:
        return all(
            any(isinstance(e, Message) and e.id == msg_id for _, e in net.nodes[a].events)
            for a in addrs
            if a != addrs[3]
        )

    assert net.run_until_true(done, 60.0, 0.1)
    for a in addrs:
        got = [e for _, e in net.nodes[a].events if isinstance(e, Message) and e.id == msg_id]
        if a == addrs[3]:
            assert got == []
        else:
            assert len(got) == 1 and hashlib.sha256(got[0].data).digest() == digest


def test_a_node_nobody_subscribes_to_still_gets_its_broadcasts_out() -> None:
    net = two_nodes(loss=0.0)
    core_a, core_b = net.nodes[A].core, net.nodes[B].core
    # B stops receiving from A (as if it had picked other providers): A has no subscriber.
    core_b.providers.pop(core_a.node_id)
    core_a.subscribers.pop(core_b.node_id)
    assert not core_a.subscribers
    msg_id = net.broadcast(A, b"late joiner speaking")
    big_id = net.broadcast(A, bytes(5000))  # fragmented: released to providers too
    net.run_for(1.0)
    assert {msg_id, big_id} <= set(delivered(net, B))


@pytest.mark.parametrize("interval", [0.001, 0.1, 0.25])
def test_the_lost_last_datagram_of_a_stream_is_repaired_after_a_tail_probe(
    interval: float,
) -> None:
    """A burst, a 10 msg/s and a 4 msg/s stream whose very last BROADCAST datagram is
    lost: no later datagram reveals the gap, so only the tail probe (however long the
    link's pace makes it wait) gets it NAKed and resent."""
    net = two_nodes(loss=0.0)
    drop = {"armed": False, "dropped": 0}
    kinds: dict[str, int] = {}
    inner_link = net.link

    def hook(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        kinds["last"] = data[1]

    def drop_once(src: tuple[str, int], dst: tuple[str, int], rng: random.Random) -> float | None:
        if drop["armed"] and src == A and kinds.get("last") == PacketType.BROADCAST:
            drop["armed"] = False
            drop["dropped"] += 1
            return None
        return inner_link(src, dst, rng)

    net.on_datagram = hook
    net.link = drop_once
    sent = []
    for k in range(20):
        drop["armed"] = k == 19
        sent.append(net.broadcast(A, b"s%d" % k))
        net.run_for(interval)
    assert drop["dropped"] == 1
    assert net.run_until_true(lambda: set(sent) <= set(delivered(net, B)), 2.0)
    assert net.nodes[B].core.stats.get("naks_sent", 0) >= 1
    assert net.nodes[A].core.stats.get("retransmits", 0) >= 1
