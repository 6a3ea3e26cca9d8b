"""Issue 11 hardening (items 3, 4, 8): the member table's bound, peer-list pagination
and where its replies may go, send paths that survive addresses no socket accepts, and
an advertised port that a port mapping chose."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

import pytest

from gwyh_mp.api import Node
from gwyh_mp.config import Config
from gwyh_mp.protocol.anti_entropy import PEER_LIST_MIN_INTERVAL_S
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, encode_members
from gwyh_mp.runtime.mmsg import BatchSender, send_skipping_refused
from gwyh_mp.simulation import SimNode
from tests.helpers_core import PSK, CheckedSimNetwork, addr, make_cluster, seeded_random


def bound_core(label: str, **overrides: object) -> NodeCore:
    config = Config.local(bind=("127.0.0.1", 0), psks=[PSK], **overrides)  # type: ignore[arg-type]
    core = NodeCore(config, 0.0, random_bytes=seeded_random(label))
    core.set_bound_port(51234)
    return core


def test_advertised_port_survives_binding_port_0() -> None:
    # Regression (item 8): --advertise HOST:PORT kept the host but took the bound port.
    core = bound_core("adv", advertise=("203.0.113.7", 40000))
    member = core.local_member()
    assert (member.host, member.port) == ("203.0.113.7", 40000)
    # Port 0 in --advertise means "whatever port we bound".
    core = bound_core("adv0", advertise=("203.0.113.7", 0))
    assert core.local_member().port == 51234
    core = bound_core("bind")
    assert core.local_member().port == 51234
    assert Config(bind=addr(0), psks=[PSK], advertise=("10.9.9.9", 0)).advertised == (
        "10.9.9.9",
        7000,
    )


# ---------------------------------------------------------------- item 4: send paths

# Addresses a gossiped member record could carry before wire.decode_member refused them:
# IDNA rejects the empty label of "a..b" (UnicodeError), the kernel rejects port 0 (EINVAL).
SPOOFED = ("192.0.2.66", 4242)  # a third party a replayer points replies at
UNSENDABLE = [("a..b", 7000), ("127.0.0.1", 0)]


async def _until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("use_mmsg", [True, False])
def test_sender_skips_refused_destinations(use_mmsg: bool) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        tx.bind(("127.0.0.1", 0))
        tx.setblocking(False)
        good = rx.getsockname()
        items = [(b"1", good), (b"x", UNSENDABLE[0]), (b"2", good), (b"y", UNSENDABLE[1])]
        items.append((b"3", good))
        refused: list[tuple] = []
        sender = BatchSender(tx, use_mmsg=use_mmsg)
        done = send_skipping_refused(sender, items, lambda a, _e: refused.append(a))
        assert done == len(items)
        assert refused == UNSENDABLE
        assert sorted(rx.recv(10) for _ in range(3)) == [b"1", b"2", b"3"]
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_node_survives_unsendable_addresses(workers: int) -> None:
    # Regression (item 4): with 1 worker the timer callback raised at every handshake
    # retry (and the timer was not re-armed); with 2 the receiver process died.
    node = Node(Config.local(bind=("127.0.0.1", 0), psks=[PSK], workers=workers))
    await node.start()
    other = Node(
        Config.local(bind=("127.0.0.1", 0), psks=[PSK], workers=1, bootstrap=[node.address])
    )
    try:
        core = node._core()
        loop = asyncio.get_running_loop()
        for bad in UNSENDABLE:  # as if gossip had named them: handshakes, retried
            core.peers.initiate(bad, loop.time())
        node._runtime.schedule_flush()

        def send_errors() -> int:
            if workers == 1:
                return int(node.stats().get("send_errors", 0))
            return sum(int(p.get("send_errors", 0)) for p in node.process_stats())

        # Handshakes are retried every handshake_retry_s: errors keep being counted,
        # so the timer keeps running.
        await _until(lambda: send_errors() >= 3 * len(UNSENDABLE))
        # The node still works: a peer joins it.
        await other.start()
        up = await node.wait_for_members(1, timeout=60)
        assert [m.node_id for m in up] == [other.node_id]
        if workers == 2:
            assert all(p.get("restarts", 0) == 0 for p in node.process_stats()[1:])
    finally:
        await other.stop()
        await node.stop()


# ---------------------------------------------------------------- item 3: member table


def _fill_with_fakes(net: CheckedSimNetwork, insider: SimNode, victim: SimNode, n: int) -> None:
    fake = random.Random("fakes")
    records = [
        MemberRecord(fake.randbytes(16), 0, MemberState.UP, "10.7.7.7", 7, None) for _ in range(n)
    ]
    insider.core._queue_control(victim.core.node_id, FrameType.PEERS, encode_members(records))
    net.pump(insider)
    net.run_for(0.05)


def test_a_full_table_still_admits_a_member_that_handshakes() -> None:
    net, addrs = make_cluster(3, seed=5, max_members=16, peer_sync_interval_s=1e3)
    victim, insider = net.nodes[addrs[0]], net.nodes[addrs[1]]
    _fill_with_fakes(net, insider, victim, 100)
    table = victim.core.members
    assert len(table) == 16 and victim.core.stats["members_refused"] == 100 - 14
    newcomer = net.add_node(
        Config.local(bind=addr(9), psks=[PSK], bootstrap=[addrs[0]], max_members=16)
    )
    net.run_for(3.0)
    assert table.get(newcomer.core.node_id) is not None  # a gossiped ghost made room
    assert len(table) == 16 and victim.core.stats["members_evicted"] >= 1
    real = {n.core.node_id for n in net.nodes.values()} - {victim.core.node_id}
    assert real <= set(table.members)


def test_peer_list_goes_only_to_the_handshaken_address() -> None:
    # Regression: a captured PEERS_REQUEST replayed from a spoofed source roamed the
    # session there, and the answer (339 KB for 35 B) went to that third party (§8.6).
    net, addrs = make_cluster(3, seed=6, peer_sync_interval_s=1e3)
    victim, insider = net.nodes[addrs[0]], net.nodes[addrs[1]]
    session = victim.core.links[insider.core.node_id].session
    assert session is not None and session.verified_addr == insider.addr
    net.run_for(1.0)  # past the per-peer answer interval
    insider.core._queue_control(victim.core.node_id, FrameType.PEERS_REQUEST, b"")
    request = [d for d, to in insider.core.datagrams_to_send(net.now) if to == victim.addr]
    assert len(request) == 1
    sent = victim.core.stats.get("peer_records_sent", 0)
    victim.core.receive_datagram(bytes(request[0]), SPOOFED, net.now)
    assert session.addr == SPOOFED  # roamed: an authenticated packet came from there
    out = victim.core.datagrams_to_send(net.now)
    assert sum(len(d) for d, to in out if to == SPOOFED) <= len(request[0])
    assert victim.core.stats.get("peer_records_sent", 0) == sent
    assert victim.core.stats["peer_list_unverified_address"] == 1
    # From the verified address, the same request is answered.
    insider.core._queue_control(victim.core.node_id, FrameType.PEERS_REQUEST, b"")
    net.pump(insider)
    net.run_for(0.05)
    assert session.addr == insider.addr
    assert victim.core.stats.get("peer_records_sent", 0) > sent


def test_peer_list_pages_cover_the_whole_table_over_rounds() -> None:
    net, addrs = make_cluster(3, seed=7, peer_list_max_records=16, peer_sync_interval_s=1e3)
    victim, insider = net.nodes[addrs[0]], net.nodes[addrs[1]]
    _fill_with_fakes(net, insider, victim, 200)  # the victim learns 200 members
    asker = net.nodes[addrs[2]]
    assert len(victim.core.members) - len(asker.core.members) == 200
    digests = asker.core.anti_entropy.member_digests
    rounds = 0
    while digests() != victim.core.anti_entropy.member_digests():
        rounds += 1
        assert rounds <= 100, "digest sync did not converge"
        stats = victim.core.stats
        before = stats.get("peer_records_sent", 0), stats.get("peer_syncs_answered", 0)
        asker.core.anti_entropy.request_peers(victim.core.node_id)
        net.pump(asker)
        net.run_for(0.6)
        # Each answer is one page (the asker's own follow-up may add a second answer).
        answers = stats.get("peer_syncs_answered", 0) - before[1]
        assert stats.get("peer_records_sent", 0) - before[0] <= 16 * answers
    assert rounds >= 200 // 16  # it took pages, not one answer
    print(f"\n200 members, pages of 16 records: converged in {rounds} requests")


def test_a_full_page_is_followed_by_the_next_at_once() -> None:
    # With pages, a newcomer to a large cluster must not wait peer_sync_interval_s (30 s)
    # per page: a full page makes it ask again on the next heartbeat tick.
    net, addrs = make_cluster(3, seed=7, peer_list_max_records=16, peer_sync_interval_s=1e3)
    victim, insider = net.nodes[addrs[0]], net.nodes[addrs[1]]
    _fill_with_fakes(net, insider, victim, 200)
    asker = net.nodes[addrs[2]]
    assert victim.core.node_id in asker.core.providers
    net.run_for(PEER_LIST_MIN_INTERVAL_S)  # past the answer interval of the join's request
    start = net.now
    asker.core.anti_entropy.request_peers(victim.core.node_id)
    net.pump(asker)
    assert net.run_until_true(
        lambda: (
            asker.core.anti_entropy.member_digests() == victim.core.anti_entropy.member_digests()
        ),
        timeout_s=120,  # without follow-ups: one page per peer_sync_interval_s (1000 s)
        step_s=0.5,
    )
    took = net.now - start
    print(f"\n200 members, pages of 16, follow-ups on heartbeat ticks: {took:.1f} s simulated")
