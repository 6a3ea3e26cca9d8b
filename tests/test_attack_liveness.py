"""Liveness faults of issue 11 with real nodes: a seed ``gwyh-node`` stopped (SIGSTOP)
past the session grace rejoins once continued (item 1), and an in-process node whose
application never reads refuses its subscribers instead of black-holing them (item 7).

The SIGSTOP scenario is marked ``attack`` (``pytest -m attack``); it asserts outcomes
within generous deadlines and prints the time to rejoin and deliver (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import pytest

from gwyh_mp import Config, Node
from gwyh_mp.protocol.peers import SESSION_GRACE_S
from tests.procs import STDIO_FAST, NodeProcess, free_udp_port, node_args, node_processes, wait_all
from tests.test_streams import until

KEY = b"liveness-suite-key-0123456789abcd"
NODES = 4
HEARTBEAT_S = 0.5  # STDIO_FAST
# Past SESSION_GRACE_S (a fixed 30 s) the peers have freed the seed's sessions, which is
# what kept it out for good; the 70 s pause with 5 s heartbeats is the same case.
PAUSE_S = SESSION_GRACE_S + 5.0


def _lines(proc: NodeProcess) -> set[str]:
    return {str(m["data"]) for m in list(proc.messages)}


@pytest.mark.attack
def test_seed_node_stopped_past_the_session_grace_rejoins_and_delivers(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o600)
    ports = [free_udp_port() for _ in range(NODES)]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            procs.append(NodeProcess(node_args(port, str(key), *STDIO_FAST, *boot)))
        seed, others = procs[0], procs[1:]
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == NODES - 1, 60)
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == NODES - 1, 30)
        os.kill(seed.proc.pid, signal.SIGSTOP)
        try:
            # Everyone else declares it DOWN, then frees its sessions.
            assert wait_all(others, lambda p: p.last_stats().get("members_up") == NODES - 2, 30)
            time.sleep(PAUSE_S)
        finally:
            os.kill(seed.proc.pid, signal.SIGCONT)
        woke = time.monotonic()
        tag = os.urandom(4).hex()
        sent: list[str] = []
        rejoined_s: float | None = None
        delivered_s: float | None = None
        while time.monotonic() < woke + 60 and delivered_s is None:  # bounded: ~600 lines
            line = f"after {tag} {len(sent)}"
            seed.send_line(line.encode())
            sent.append(line)
            time.sleep(0.1)
            if rejoined_s is None and all(
                p.last_stats().get("members_up") == NODES - 1 for p in others
            ):
                rejoined_s = time.monotonic() - woke
            if all(_lines(p) & set(sent) for p in others):
                delivered_s = time.monotonic() - woke
        assert delivered_s is not None, [p.stderr_lines[-3:] for p in procs]
        assert wait_all(others, lambda p: p.last_stats().get("members_up") == NODES - 1, 30)
        if rejoined_s is None:
            rejoined_s = time.monotonic() - woke
        # And it receives again: a line sent before its subscriptions are renewed may
        # miss it (nothing repairs a message for a node nobody forwards to), so send one
        # every 0.2 s until one arrives.
        back: list[str] = []
        received_s: float | None = None
        while time.monotonic() < woke + 90 and received_s is None:  # bounded: ~450 lines
            back.append(f"to the seed {tag} {len(back)}")
            others[0].send_line(back[-1].encode())
            if seed.wait_for(lambda p: bool(_lines(p) & set(back)), 0.2):
                received_s = time.monotonic() - woke
        assert received_s is not None, seed.stderr_lines[-5:]
        stats = seed.last_stats()
        print(
            f"\nseed SIGSTOPped {PAUSE_S:.0f} s (heartbeat {HEARTBEAT_S} s, session grace "
            f"{SESSION_GRACE_S:.0f} s): UP at all {NODES - 1} peers {rejoined_s:.2f} s and "
            f"its broadcasts delivered {delivered_s:.2f} s after SIGCONT "
            f"({delivered_s / HEARTBEAT_S:.1f} heartbeats), receiving again {received_s:.2f} s "
            f"after; seed counters: pauses_detected "
            f"{stats.get('pauses_detected')}, rejoin_handshakes "
            f"{stats.get('rejoin_handshakes')}, refutations {stats.get('refutations')}"
        )
        for proc in procs:
            assert proc.terminate() == 0


def _local(**kw: object) -> Config:
    return Config.local(bind=("127.0.0.1", 0), psks=[KEY], **kw)


async def test_a_node_whose_consumer_never_reads_refuses_subscribers() -> None:
    """Issue 11 item 7 in process: b's only reader never reads, so b stops reading its
    socket (backpressure). Within a few heartbeats a and c no longer count on b as a
    provider, b counts and reports it, and a's broadcasts still reach c."""
    a = await Node(_local()).start()
    b = await Node(_local(bootstrap=[a.address])).start()
    c = await Node(_local(bootstrap=[a.address])).start()
    nodes = (a, b, c)
    try:
        await asyncio.gather(*(n.wait_for_members(2) for n in nodes))
        await until(lambda: b.node_id in a.providers and b.node_id in c.providers)
        await until(lambda: len(b.providers) == 2)
        stuck = b.messages(queue_size=4)  # never read
        heard = c.messages()
        for i in range(50):  # bounded: the stuck stream fills after about 4
            await a.broadcast(b"fill %d" % i)
            await asyncio.wait_for(anext(heard), 30)
            if b.stats()["reading_paused"]:
                break
        assert b.stats()["reading_paused"] == 1
        await until(lambda: b.stats().get("saturated") == 1)
        await until(lambda: b.node_id not in a.providers and b.node_id not in c.providers)
        assert b.stats()["subscribers_shed"] >= 2
        assert c.stats()["providers_refused"] >= 1
        msg_id = await a.broadcast(b"still flowing")
        async with asyncio.timeout(30):
            while (await anext(heard)).id != msg_id:
                pass
        del stuck  # its reader goes away: b reads again and stops refusing
        gc.collect()
        await until(lambda: b.stats()["reading_paused"] == 0)
        assert not b._core().subscriptions.saturated
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
