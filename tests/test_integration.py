"""Real nodes on 127.0.0.1: in-process clusters through the library API and clusters
of ``gwyh-node`` processes. Conditions are awaited with generous deadlines."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from gwyh_mp import Config, MemberState, Node
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import LABEL_HELLO, PskKeyring
from tests.helpers_nodes import start_hub_and_spokes
from tests.procs import NodeProcess, free_udp_port, node_processes, wait_all, write_key

KEY = b"integration-test-key-0123456789abcdef"


def local(**kw: object) -> Config:
    return Config.local(bind=("127.0.0.1", 0), psks=[KEY], **kw)


async def start_cluster(n: int, **kw: object) -> list[Node]:
    first = await Node(local(**kw)).start()
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(await Node(local(bootstrap=[first.address], **kw)).start())
    await asyncio.gather(*(node.wait_for_members(n - 1, timeout=30) for node in nodes))
    return nodes


async def collect(node: Node, want: set[bytes], got: Counter[bytes], timeout: float) -> None:
    async def reader() -> None:
        async for msg in node.messages():
            got[msg.id] += 1
            if want <= set(got):
                return

    await asyncio.wait_for(reader(), timeout)


async def test_ten_node_cluster_delivers_every_broadcast_exactly_once() -> None:
    nodes = await start_cluster(10)
    try:
        # Wait until every node has its full set of providers and their channel keys.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            len(n.providers) == 5 and all(st.confirmed for st in n._core().providers.values())
            for n in nodes
        ):
            await asyncio.sleep(0.05)
        sent: dict[bytes, Node] = {}
        for i, node in enumerate(nodes):
            for k in range(5):
                sent[await node.broadcast(f"msg {k} from {i}".encode())] = node
        counters = {n.node_id: Counter[bytes]() for n in nodes}
        await asyncio.gather(
            *(
                collect(n, {m for m, s in sent.items() if s is not n}, counters[n.node_id], 30)
                for n in nodes
            )
        )
        await asyncio.sleep(0.3)  # late duplicates would show up now
        for n in nodes:
            expected = {m for m, s in sent.items() if s is not n}
            assert set(counters[n.node_id]) == expected  # never its own messages
            assert all(c == 1 for c in counters[n.node_id].values())
            assert n.stats().get("drop_decrypt", 0) == 0
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_trees_cluster_delivers_exactly_once_and_prunes() -> None:
    # A hub with two receiver processes (duplicates judged outside the core) and six
    # single-process nodes, all in trees mode: every broadcast arrives exactly once and
    # providers are pruned to announcements.
    base = local(dissemination="trees")
    nodes = await start_hub_and_spokes(base, hub_workers=2, spokes=6)
    try:
        sent: dict[bytes, Node] = {}
        counters = {n.node_id: Counter[bytes]() for n in nodes}
        for round_ in range(3):
            batch = {}
            for i, node in enumerate(nodes):
                for k in range(10):
                    batch[await node.broadcast(f"{round_}/{k} from {i}".encode())] = node
                    await asyncio.sleep(0.002)
            sent.update(batch)
            await asyncio.gather(
                *(
                    collect(n, {m for m, s in sent.items() if s is not n}, counters[n.node_id], 30)
                    for n in nodes
                )
            )
        await asyncio.sleep(0.3)  # late duplicates would show up now
        for n in nodes:
            assert set(counters[n.node_id]) == {m for m, s in sent.items() if s is not n}
            assert all(c == 1 for c in counters[n.node_id].values())
        assert sum(n.stats().get("trees_prunes_in", 0) for n in nodes) > 0
        assert sum(n.stats().get("trees_ihave_ids", 0) for n in nodes) > 0
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_wrong_psk_node_learns_nothing_and_gets_no_reply() -> None:
    nodes = await start_cluster(3)
    outsider = await Node(
        Config.local(
            bind=("127.0.0.1", 0),
            psks=[b"another-key-entirely-0123456789"],
            bootstrap=[nodes[0].address],
        )
    ).start()
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.settimeout(1.0)
    try:
        # A well-formed Hello under the wrong key gets no answer at all.
        ring = PskKeyring([b"another-key-entirely-0123456789"])
        signed = wire.encode_hello_signed(
            os.urandom(16), os.urandom(16), os.urandom(32), 7, 0, time.time_ns(), None
        )
        raw.sendto(wire.finish_hello(signed, ring.macs(LABEL_HELLO, signed)), nodes[0].address)
        with pytest.raises(TimeoutError):
            raw.recvfrom(65535)
        await nodes[1].broadcast(b"secret")
        await asyncio.sleep(1.5)
        assert outsider.members() == []
        assert outsider.stats().get("delivered", 0) == 0
        assert nodes[0].stats().get("handshake_hello_bad_mac", 0) >= 2
        assert all(m.node_id != outsider.node_id for n in nodes for m in n.members())
    finally:
        raw.close()
        await outsider.stop()
        await asyncio.gather(*(n.stop() for n in nodes))


async def test_node_with_old_and_new_psk_talks_to_both() -> None:
    old, new = b"old-key-0123456789abcdef", b"new-key-0123456789abcdef"
    bridge = await Node(Config.local(bind=("127.0.0.1", 0), psks=[old, new])).start()
    only_old = await Node(
        Config.local(bind=("127.0.0.1", 0), psks=[old], bootstrap=[bridge.address])
    ).start()
    only_new = await Node(
        Config.local(bind=("127.0.0.1", 0), psks=[new], bootstrap=[bridge.address])
    ).start()
    try:
        await bridge.wait_for_members(2, timeout=30)
        await only_old.wait_for_members(1, timeout=30)
        await only_new.wait_for_members(1, timeout=30)
        for node in (only_old, only_new):
            deadline = time.monotonic() + 30
            while bridge.node_id not in node.providers and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        deadline = time.monotonic() + 30
        while len(bridge.providers) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        msg_id = await bridge.broadcast(b"from the bridge")
        assert (await only_old.receive(timeout=10)).id == msg_id
        assert (await only_new.receive(timeout=10)).id == msg_id
        msg_id = await only_old.broadcast(b"from old")
        assert (await bridge.receive(timeout=10)).id == msg_id
        # The old-key and new-key nodes never establish a session with each other.
        assert only_old._core().links.get(only_new.node_id) is None
        assert only_new._core().links.get(only_old.node_id) is None
    finally:
        await asyncio.gather(bridge.stop(), only_old.stop(), only_new.stop())


async def test_graceful_stop_is_seen_as_down() -> None:
    nodes = await start_cluster(4)
    try:
        leaving = nodes.pop()
        await leaving.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [
                next((m.state for m in n.members() if m.node_id == leaving.node_id), None)
                for n in nodes
            ]
            if all(s == MemberState.DOWN for s in states):
                break
            await asyncio.sleep(0.05)
        assert all(
            next(m.state for m in n.members() if m.node_id == leaving.node_id) == MemberState.DOWN
            for n in nodes
        )
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


# ---------------------------------------------------------------- processes


def test_stdio_cluster_of_processes_delivers_exactly_once(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    ports = [free_udp_port() for _ in range(4)]
    common = ["--psk-file", key, "--heartbeat-interval", "0.5", "--max-datagram", "65000"]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            procs.append(
                NodeProcess(
                    [
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--stdio",
                        "--stats-interval",
                        "0.2",
                        *common,
                        *boot,
                    ]
                )
            )
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == 3, 60), [
            p.stderr_lines[-3:] for p in procs
        ]
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == 3, 30)
        time.sleep(0.5)
        lines = {i: [f"line {k} from node {i} ✓".encode() for k in range(3)] for i in range(4)}
        lines[1].append(b"\xff\xfebinary")  # not UTF-8: delivered as base64
        for i, p in enumerate(procs):
            for text in lines[i]:
                p.send_line(text)
        for i, p in enumerate(procs):
            expected = sum(len(v) for j, v in lines.items() if j != i)
            assert p.wait_for(lambda q, e=expected: len(q.messages) >= e, 30), p.stderr_lines[-5:]
        time.sleep(0.5)
        for i, p in enumerate(procs):
            texts = Counter()
            for m in p.messages:
                assert {"id", "origin", "data"} <= m.keys()
                if m.get("encoding") == "base64":
                    import base64

                    texts[base64.b64decode(m["data"])] += 1
                else:
                    texts[m["data"].encode()] += 1
            expected = Counter(t for j, v in lines.items() if j != i for t in v)
            assert texts == expected
        for p in procs:
            assert p.terminate() == 0


def test_killed_node_is_marked_down_everywhere(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    ports = [free_udp_port() for _ in range(4)]
    interval, missed = 0.4, 3
    common = [
        "--psk-file",
        key,
        "--heartbeat-interval",
        str(interval),
        "--missed-heartbeats",
        str(missed),
        "--stats-interval",
        "0.1",
        "--subscriptions",
        "3",
    ]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            procs.append(NodeProcess(["--bind", f"127.0.0.1:{port}", *common, *boot], stdin=False))
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == 3, 60)
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == 3, 30)
        victim = procs.pop(2)
        victim.kill()
        killed_at = time.monotonic()
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == 2, 30)
        elapsed = time.monotonic() - killed_at
        # Detection is bounded by the configured heartbeats; the slack absorbs a loaded CI box.
        assert elapsed < interval * missed + 5.0, elapsed
        for p in procs:
            assert p.terminate() == 0


def test_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with node_processes() as procs:
            p = NodeProcess(["--bind", f"127.0.0.1:{port}", "--psk-file", key], stdin=False)
            procs.append(p)
            assert p.proc.wait(30) == 1
            assert p.wait_for(lambda q: bool(q.stderr_lines), 5)
            errors = [line for line in p.stderr_lines if "error" in line]
            assert len(errors) == 1 and "cannot bind" in errors[0]
            assert not any("Traceback" in line for line in p.stderr_lines)
