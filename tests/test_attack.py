"""Attack-and-fault scenarios: real ``gwyh-node`` processes on 127.0.0.1, and the
simulated cluster where an insider's forged traffic has to be made up inside a core.

Marked ``attack`` so they run alone (``pytest -m attack``) as well as with the suite.
Each scenario is bounded in time and count and asserts an outcome, never a speed; what
it measured (flood rate, drop counters) is printed for the record (``pytest -s``).
Scenarios that need the fixes of issue 11 join this file with them.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from gwyh_mp.protocol import wire
from tests.helpers_core import make_cluster
from tests.procs import (
    STDIO_FAST,
    NodeProcess,
    free_udp_port,
    node_args,
    node_processes,
    wait_all,
    write_key,
)
from tests.test_large_messages import delivered, inject_fragment, sim_cluster
from tests.test_multiprocess import receivers

pytestmark = pytest.mark.attack

KEY = b"attack-suite-key-0123456789abcdef"
FLOOD_SECONDS = 3.0
FLOOD_MAX_DATAGRAMS = 3_000_000
HONEST_MESSAGES = 20  # per sending node, spread over the flood


def _junk(rng: random.Random) -> list[bytes]:
    """Datagrams an outsider can send, one of each way to reach further into a node:
    garbage, each handshake type, a fresh-timestamped Hello (costs MAC checks),
    CONTROL and BROADCAST naming random session ids."""
    now_ns = time.time_ns()
    hello = (
        wire.HELLO_FIXED.pack(
            wire.VERSION,
            wire.PacketType.HELLO,
            rng.randbytes(16),
            rng.randbytes(16),
            rng.randbytes(32),
            rng.getrandbits(32),
            0,
            now_ns,
        )
        + b"\xff\x01"
        + rng.randbytes(32)
    )
    out = [rng.randbytes(rng.randrange(1, 200)) for _ in range(8)]
    out.append(hello.ljust(wire.HELLO_PADDED_BYTES, b"\0"))
    for ptype in (wire.PacketType.OHAI, wire.PacketType.OKBOSS, wire.PacketType.GOTEAM):
        out.append(bytes((wire.VERSION, ptype)) + rng.randbytes(120))
    for _ in range(8):
        control = struct.pack("!BBHIQ", 1, wire.PacketType.CONTROL, 0, rng.getrandbits(32), 1)
        out.append(control + rng.randbytes(64))
        header = struct.pack(
            "!BBBBIIQ", 1, wire.PacketType.BROADCAST, 1, 0, rng.getrandbits(32), 1, 1
        )
        out.append(header + rng.randbytes(16 + 80))
    return out


def _start_cluster(tmp_path: Path, workers: int) -> tuple[list[int], list[str]]:
    key = write_key(tmp_path, "k", KEY)
    ports = [free_udp_port() for _ in range(3)]
    # 1 s heartbeats: the watchdog (5.5 s) outlasts the flood, so a node starved of CPU by
    # the flooder on a small machine is not declared DOWN by a peer starved alongside it.
    extra = ["--stdio", "--heartbeat-interval", "1.0", "--stats-interval", "0.25"]
    extra += ["--workers", str(workers)]
    args = []
    for i, port in enumerate(ports):
        boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
        args.append(node_args(port, key, *extra, *boot))
    return ports, args


def _flood(ports: list[int], deadline: float, honest: list[tuple[NodeProcess, bytes]]) -> int:
    """Junk at the highest rate this one socket manages, round-robin over the nodes,
    with the honest lines sent at even intervals in between. Returns datagrams sent."""
    rng = random.Random(11)
    junk = _junk(rng)
    targets = [("127.0.0.1", p) for p in ports]
    started = time.monotonic()
    spacing = (deadline - started) / (len(honest) + 1)
    next_honest = started + spacing
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while sent < FLOOD_MAX_DATAGRAMS:
            for datagram in junk:
                for target in targets:
                    try:
                        sock.sendto(datagram, target)
                        sent += 1
                    except BlockingIOError:
                        pass
            now = time.monotonic()
            if honest and now >= next_honest:
                proc, line = honest.pop(0)
                proc.send_line(line)
                next_honest += spacing
            if now >= deadline:
                break
    for proc, line in honest:  # the flood ended early (count bound): send the rest now
        proc.send_line(line)
    return sent


def _received(proc: NodeProcess) -> Counter[str]:
    return Counter(str(m["data"]) for m in list(proc.messages))


@pytest.mark.parametrize("workers", [1, 2])
def test_junk_flood_at_full_rate_leaves_honest_delivery_at_100_percent(
    tmp_path: Path, workers: int
) -> None:
    ports, args = _start_cluster(tmp_path, workers)
    with node_processes() as procs:
        procs.extend(NodeProcess(a) for a in args)
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == 2, 60), [
            p.stderr_lines[-3:] for p in procs
        ]
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == 2, 30)
        tag = os.urandom(4).hex()
        honest = [
            (procs[sender], f"honest {tag} {sender}:{k}".encode())
            for k in range(HONEST_MESSAGES)
            for sender in (0, 2)
        ]
        expected = {
            i: Counter(line.decode() for p, line in honest if p is not procs[i]) for i in range(3)
        }
        started = time.monotonic()
        sent = _flood(ports, started + FLOOD_SECONDS, list(honest))
        flood_s = time.monotonic() - started
        for i, proc in enumerate(procs):
            want = expected[i]
            assert proc.wait_for(lambda p, w=want: all(_received(p)[k] >= 1 for k in w), 30), (
                i,
                sum(want.values()),
                sum(_received(proc).values()),
                proc.stderr_lines[-5:],
            )
        time.sleep(0.5)  # duplicates would arrive by now
        delivered = 0
        for i, proc in enumerate(procs):
            got = _received(proc)
            assert {k: got[k] for k in expected[i]} == expected[i], i  # each exactly once
            assert proc.proc.poll() is None, proc.stderr_lines[-10:]
            delivered += sum(got[k] for k in expected[i])
        stats = [p.last_stats() for p in procs]
        drops = {
            k: sum(int(s.get(k, 0) or 0) for s in stats)
            for k in stats[0]
            if k.startswith(("drop", "handshake_hello"))
        }
        print(
            f"\njunk flood, --workers {workers}: {sent} datagrams in {flood_s:.1f} s "
            f"({sent / flood_s:,.0f}/s) against 3 nodes; honest delivery {delivered}/"
            f"{sum(sum(e.values()) for e in expected.values())}; node counters {drops}"
        )
        for proc in procs:
            assert proc.terminate() == 0


def test_receiver_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """Fault: SIGKILL one receiver process of a --workers 2 node while two peers stream
    to it; every line still arrives everywhere exactly once (retransmission and NAKs
    cover what the dead receiver held, the coordinator restarts it)."""
    key = write_key(tmp_path, "k", KEY)
    ports = [free_udp_port() for _ in range(3)]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            workers = ["--workers", "2" if i == 0 else "1"]
            procs.append(NodeProcess(node_args(port, key, *STDIO_FAST, *workers, *boot)))
        hub = procs[0]
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == 2, 60)
        assert hub.wait_for(lambda p: len(receivers(p)) == 2, 30)
        tag = os.urandom(4).hex()
        lines = [(procs[s], f"stream {tag} {s}:{k}") for k in range(100) for s in (1, 2)]
        victim = ""
        for n, (proc, line) in enumerate(lines):
            proc.send_line(line.encode())
            if n == len(lines) // 2:  # the receiver the kernel gives the most traffic dies
                busiest = max(receivers(hub).items(), key=lambda r: int(r[1].get("packets_in", 0)))
                victim = busiest[0]
                os.kill(int(busiest[1]["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
            time.sleep(0.01)  # ~100 lines/s: a stream, not one burst
        for i, proc in enumerate(procs):
            want = Counter(line for p, line in lines if p is not proc)
            assert proc.wait_for(lambda p, w=want: all(_received(p)[k] for k in w), 30), (
                i,
                sum(want.values()),
                sum(_received(proc)[k] for k in want),
                proc.stderr_lines[-5:],
            )
        time.sleep(0.5)
        for proc in procs:
            got = _received(proc)
            assert all(got[line] == 1 for p, line in lines if p is not proc)
        assert hub.wait_for(lambda p: receivers(p)[victim].get("restarts") == 1, 30)
        for proc in procs:
            assert proc.terminate() == 0


def test_insider_1_byte_fragment_flood_holds_nothing_and_is_not_relayed() -> None:
    """Issue 11 item 2: a key holder sends first fragments claiming 16 MiB in 1-byte
    fragments, 200 per second for 5 s. Before, each made every hop allocate and zero
    32 MiB and was forwarded; now each is rejected on arrival, nothing is held, no hop
    passes it on, and honest messages meanwhile arrive intact."""
    net, (victim, attacker, honest) = sim_cluster(3)
    rng = random.Random(5)
    total = 16 * 1024 * 1024
    injected = 0
    honest_msgs: dict[bytes, bytes] = {}
    cpu_before = time.process_time()
    for tick in range(50):  # 5 simulated seconds, 20 forged fragments per 0.1 s
        for _ in range(20):
            inject_fragment(attacker, rng.randbytes(16), 0, total, total, b"x")
            injected += 1
        net.pump(attacker)
        if tick % 10 == 0:
            data = rng.randbytes(64 * 1024)
            honest_msgs[net.broadcast(honest.addr, data)] = data
        net.run_for(0.1)
    # The figure the issue asks for (printed, not asserted: CPU time is not a test
    # oracle): an upper bound on the victim's share, since all three nodes and the
    # honest 64 KiB messages run in this one process.
    cpu_s = time.process_time() - cpu_before
    print(
        f"1-byte-fragment flood: {injected} forged first fragments over 5 s (200/s): "
        f"whole 3-node cluster used {cpu_s:.3f} CPU s = {cpu_s / 5 * 100:.1f} % of a core"
    )
    assert net.run_until_true(
        lambda: all(delivered(victim, m) for m in honest_msgs), timeout_s=10, step_s=0.05
    )
    for msg_id, data in honest_msgs.items():
        assert delivered(victim, msg_id) == [data]
    for node in (victim, honest):
        r = node.core.large.reassembler
        assert len(r) == 0 and r.held_bytes == 0 and r.total_bytes == 0
        # Every forged fragment was seen once, straight from the attacker: no hop relayed it.
        assert r.stats["rejected:bad_fragment_size"] == injected, dict(r.stats)


def test_insider_offering_200k_fake_members_fills_the_table_to_its_maximum_only() -> None:
    """Issue 11 item 3: 6.7 MB of PEERS frames made 200k members (+61 MB); a 35-byte
    PEERS_REQUEST then cost seconds of CPU and a 6.8 MB answer."""
    max_members, page = 2_000, 256
    net, addrs = make_cluster(
        3, seed=11, max_members=max_members, peer_list_max_records=page, peer_sync_interval_s=1e3
    )
    insider, victim = net.nodes[addrs[1]], net.nodes[addrs[0]]
    victim_id = victim.core.node_id
    assert victim_id in insider.core.links and insider.core.links[victim_id].session is not None
    fake = random.Random("fake-members")
    offered = offered_bytes = 0
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    while offered < 200_000:  # 1,000 records a frame, 10 frames a pump
        for _ in range(10):
            records = [
                wire.MemberRecord(fake.randbytes(16), 0, wire.MemberState.UP, "10.7.7.7", 7, None)
                for _ in range(1_000)
            ]
            body = wire.encode_members(records)
            offered_bytes += len(body)
            insider.core._queue_control(victim_id, wire.FrameType.PEERS, body)
            offered += len(records)
        net.pump(insider)
        net.run_for(0.01)
    del records, body
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    table = victim.core.members
    refused = victim.core.stats.get("members_refused", 0)
    assert len(table) == table.up_count == max_members
    assert refused == offered - (max_members - 2)  # the two real peers were there first
    assert grown < max_members * 2_000  # ~500 B a member; the rest is the sim's slack
    # A newcomer-style PEERS_REQUEST (empty body, the cheapest) gets one page.
    answers: list[int] = []

    def tap(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if src == victim.addr and dst == insider.addr:
            answers.append(len(data))

    net.on_receive = tap
    insider.core._queue_control(victim_id, wire.FrameType.PEERS_REQUEST, b"")
    net.pump(insider)
    net.run_for(0.05)
    sent_records = victim.core.stats.get("peer_records_sent", 0)
    assert 0 < sum(answers) <= page * 64  # a page of records (~45 B each) and framing
    # And again at once: rate-limited per session.
    insider.core._queue_control(victim_id, wire.FrameType.PEERS_REQUEST, b"")
    net.pump(insider)
    net.run_for(0.05)
    assert victim.core.stats.get("peer_list_rate_limited", 0) >= 1
    print(
        f"\nfake members offered {offered} ({offered_bytes} B of PEERS bodies): table "
        f"{len(table)} (max {max_members}), refused {refused}, traced growth {grown} B; "
        f"PEERS_REQUEST answer {sum(answers)} B in {len(answers)} datagrams "
        f"(<= {page} records; {victim.core.stats.get('peer_records_sent', 0)} records sent "
        f"in all)"
    )
    assert victim.core.stats.get("peer_records_sent", 0) == sent_records
