"""Issue 11 hardening (items 3, 4, 8): the member table's bound, peer-list pagination
and where its replies may go, send paths that survive addresses no socket accepts, and
an advertised port that a port mapping chose."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest

from gwyh_mp.api import Node
from gwyh_mp.config import Config
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.runtime.mmsg import BatchSender, send_skipping_refused
from tests.helpers_core import PSK, addr, seeded_random


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
