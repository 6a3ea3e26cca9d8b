"""The multiprocess node: SO_REUSEPORT receivers, a coordinator, shared-memory rings,
supervision. Real processes on 127.0.0.1; generous deadlines, no timing asserts."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import psutil

from gwyh_mp import Config, Node
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import LABEL_HELLO, PskKeyring
from gwyh_mp.runtime.driver import freeze_startup_heap
from tests.helpers_nodes import start_hub_and_spokes
from tests.procs import (
    STDIO_FAST,
    NodeProcess,
    free_udp_port,
    node_args,
    node_processes,
    wait_all,
    write_key,
)

KEY = b"multiprocess-test-key-0123456789abcdef"


def gwyh_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("gwyh_")}


def receivers(proc: NodeProcess) -> dict[str, dict[str, object]]:
    """Latest per-process stats line of each receiver of a gwyh-node process."""
    latest: dict[str, dict[str, object]] = {}
    for record in list(proc.process_stats):
        role = str(record.get("role"))
        if role.startswith("receiver"):
            latest[role] = record
    return latest


def hello_from(sock: socket.socket, target: tuple[str, int]) -> None:
    ring = PskKeyring([KEY])
    signed = wire.encode_hello_signed(
        os.urandom(16), os.urandom(16), os.urandom(32), 1, 0, time.time_ns(), None
    )
    sock.sendto(wire.finish_hello(signed, ring.macs(LABEL_HELLO, signed)), target)


async def test_library_node_with_two_workers_delivers_exactly_once() -> None:
    base = Config.local(bind=("127.0.0.1", 0), psks=[KEY])
    nodes = await start_hub_and_spokes(base, hub_workers=2)
    hub, others = nodes[0], nodes[1:]
    try:
        sent = {}
        for node in nodes:
            for k in range(5):
                sent[await node.broadcast(b"%d" % k + os.urandom(100))] = node
        big = os.urandom(200_000)  # fragmented: reassembled by the coordinator
        sent[await others[0].broadcast(big)] = others[0]
        got = {n.node_id: Counter[bytes]() for n in nodes}

        async def read(node: Node) -> None:
            want = {m for m, s in sent.items() if s is not node}
            async for msg in node.messages():
                got[node.node_id][msg.id] += 1
                if msg.data is not None and len(msg.data) == len(big):
                    assert msg.data == big
                if want <= set(got[node.node_id]):
                    return

        await asyncio.wait_for(asyncio.gather(*(read(n) for n in nodes)), 30)
        await asyncio.sleep(0.3)
        for node in nodes:
            assert all(c == 1 for c in got[node.node_id].values())
            assert not any(sent[m] is node for m in got[node.node_id])
        roles = {p["role"] for p in hub.process_stats()}
        assert roles == {"coordinator", "receiver-0", "receiver-1"}
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
    assert not any(name.startswith(f"gwyh_{os.getpid()}_") for name in gwyh_segments())


def test_both_receivers_get_traffic_and_sigterm_cleans_up(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    port = free_udp_port()
    with node_processes() as procs:
        node = NodeProcess(
            node_args(port, key, "--workers", "2", "--stats-interval", "0.2"), stdin=False
        )
        procs.append(node)
        assert node.wait_for(lambda p: len(receivers(p)) == 2, 30), node.stderr_lines[-5:]
        # Only this node's rings: other nodes on a shared machine come and go.
        mine = f"gwyh_{node.proc.pid}_"
        assert any(name.startswith(mine) for name in gwyh_segments())
        pids = {int(r["pid"]) for r in receivers(node).values()}  # type: ignore[arg-type]
        # 64 distinct source ports: the kernel hashes flows over both receivers.
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
                hello_from(s, ("127.0.0.1", port))
            assert node.wait_for(
                lambda p: all(int(r.get("packets_in", 0)) > 0 for r in receivers(p).values()), 30
            ), receivers(node)
        finally:
            for s in socks:
                s.close()
        started = time.monotonic()
        assert node.terminate(timeout=30) == 0
        assert time.monotonic() - started < 30
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.05)
        assert not [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
        ]
        assert not any(name.startswith(mine) for name in gwyh_segments())


def test_killed_receiver_is_replaced_and_the_node_keeps_delivering(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    ports = [free_udp_port() for _ in range(3)]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            workers = ["--workers", "2"] if i == 0 else ["--workers", "1"]
            procs.append(NodeProcess(node_args(port, key, *STDIO_FAST, *workers, *boot)))
        hub = procs[0]
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == 2, 60)
        assert hub.wait_for(lambda p: len(receivers(p)) == 2, 30)
        victim = receivers(hub)["receiver-0"]
        os.kill(int(victim["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
        killed_at = time.monotonic()
        assert hub.wait_for(
            lambda p: (
                receivers(p)["receiver-0"].get("pid") != victim["pid"]
                and receivers(p)["receiver-0"].get("restarts") == 1
            ),
            30,
        ), hub.stderr_lines[-5:]
        replaced_after = time.monotonic() - killed_at
        assert replaced_after < 30  # the closing note reports the measured figure
        # After the restart, everything sent is delivered everywhere exactly once.
        time.sleep(0.5)
        for i, p in enumerate(procs):
            p.send_line(b"after restart from %d" % i)
        for i, p in enumerate(procs):
            assert p.wait_for(lambda q: len(q.messages) >= 2, 30), (i, q_lines(p))
        time.sleep(0.3)
        for p in procs:
            texts = Counter(m["data"] for m in p.messages)
            assert all(c == 1 for c in texts.values())
        assert hub.terminate() == 0


def q_lines(p: NodeProcess) -> list[str]:
    return p.stderr_lines[-5:]


def test_receivers_exit_when_the_coordinator_dies(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    port = free_udp_port()
    with node_processes() as procs:
        node = NodeProcess(
            node_args(port, key, "--workers", "2", "--stats-interval", "0.2"), stdin=False
        )
        procs.append(node)
        assert node.wait_for(lambda p: len(receivers(p)) == 2, 30)
        pids = [int(r["pid"]) for r in receivers(node).values()]  # type: ignore[arg-type]
        coordinator_pid = node.proc.pid
        node.kill()  # SIGKILL: no chance to clean up
        deadline = time.monotonic() + 15
        alive = pids
        while time.monotonic() < deadline:
            alive = [
                p
                for p in pids
                if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            ]
            if not alive:
                break
            time.sleep(0.05)
        assert not alive
        # The coordinator's resource tracker unlinks its rings once it is gone.
        deadline = time.monotonic() + 15
        mine = f"gwyh_{coordinator_pid}_"
        while time.monotonic() < deadline and any(n.startswith(mine) for n in gwyh_segments()):
            time.sleep(0.1)
        assert not any(n.startswith(mine) for n in gwyh_segments())


def test_freeze_startup_heap_takes_the_existing_heap_out_of_collections() -> None:
    """gwyh-node and every receiver call it once started: full collections then skip
    the import-time heap (they cost 0.1-0.3 s each under load before)."""
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > max(before, 1000)
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made after the freeze is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
