"""`python -m bench large`: large (fragmented) messages on this machine.

Four measurements, each on real node processes over 127.0.0.1, in one run:

1. **Goodput** (loopback, no faults): a cluster of --nodes ``gwyh-node --stdio`` processes;
   node 0 is fed enough messages of each --sizes to carry --volume bytes (at least 2); goodput
   is payload bytes / (time until *every* other node printed every message), in MiB/s. It
   is repeated for each --compare-datagrams value (--max-datagram is always included), and
   set against this machine's raw loopback UDP rate measured in the same run with
   ``bench.ceiling.measure_udp_pair`` (one sender process, one receiver process, datagrams
   of the same size) and ``measure_udp_send``.
2. **Delivery under loss**: the same cluster behind the fault-injecting relay mesh
   (``python -m gwyh_mp.relay``, one route per node, each node advertising its relay
   address, so every datagram between nodes crosses the relay) with --loss and --delay-ms;
   delivery ratio = (receiver, message) pairs delivered intact / pairs expected, after all
   arrived or nothing moved for --stall-s or --loss-timeout passed.
3. **Chain latency**: --chain-hops + 1 nodes in a line (each node's only provider is the
   previous one; forced in the chain-node driver below, see ``_force_chain``), with
   cut-through forwarding as implemented. Measured: the time from the head's broadcast
   to the delivery at each hop. Derived (not measured): store-and-forward latency
   estimated as hops x the measured single-hop time.
4. **Datagram size**: part 1's goodput per --compare-datagrams value.

All loops are bounded by counts and deadlines; every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    ClusterNode,
    ProcessCpu,
    counter_delta,
    free_udp_port,
    last_json_line,
    machine_description,
    rcvbuf_errors,
    set_big_buffers,
    write_json,
)
from bench.floor import (
    LOOPBACK,
    _mp_context,
    _udp_socket,
    measure_udp_pair,
    measure_udp_send,
    timed_calls,
)
from gwyh_mp.protocol import crypto, wire
from gwyh_mp.runtime import udp as runtime_udp
from gwyh_mp.runtime.mmsg import BatchReceiver, BatchSender

KEY = b"bench-large-key-0123456789abcdef0123"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=_int_list, default=[65536, 4 * MIB], help="bytes, comma list"
    )
    parser.add_argument("--nodes", type=int, default=4, help="gwyh-node processes")
    parser.add_argument(
        "--max-datagram", type=int, default=1400, help="the nodes' --max-datagram (bytes)"
    )
    parser.add_argument("--loss", type=_float_list, default=[0.0, 0.05, 0.2], help="comma list")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="relay delay, each way")
    parser.add_argument(
        "--compare-datagrams",
        type=_int_list,
        default=[1400, 8192, 65000],
        help="--max-datagram values for the goodput comparison ('' to skip)",
    )
    parser.add_argument("--volume", type=int, default=8 * MIB, help="bytes per size in part 1")
    parser.add_argument("--loss-volume", type=int, default=4 * MIB, help="bytes per size in part 2")
    parser.add_argument(
        "--loss-timeout", type=float, default=90.0, help="bound of each lossy transfer (s)"
    )
    parser.add_argument("--stall-s", type=float, default=10.0, help="give up after no progress")
    parser.add_argument("--chain-hops", type=int, default=4, help="relay hops in the chain part")
    parser.add_argument("--chain-repeats", type=int, default=3, help="messages sent down the chain")
    parser.add_argument(
        "--udp-seconds", type=float, default=1.0, help="seconds measuring raw UDP for comparison"
    )
    parser.add_argument("--seed", type=int, default=1, help="relay seed")
    parser.add_argument(
        "--parts", default="goodput,loss,chain", help="comma list of goodput, loss, chain"
    )


# ---------------------------------------------------------------------------- payloads


def payload(size: int, seed: int) -> bytes:
    """Random binary (so it travels base64 in the JSON output) without b"\\n"/b"\\r":
    it must survive being one stdin line."""
    data = random.Random(seed).randbytes(size)
    return data.translate(bytes.maketrans(b"\n\r", b"\x0b\x0e"))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decoded(record: dict[str, Any]) -> bytes:
    if record.get("encoding") == "base64":
        return base64.b64decode(record["data"])
    return str(record["data"]).encode()


# ---------------------------------------------------------------------------- clusters


@dataclass
class Cluster:
    nodes: list[ClusterNode]
    workdir: Path
    relay: subprocess.Popen[bytes] | None = None
    relay_err: Path | None = None

    def stop(self) -> dict[str, Any] | None:
        for n in self.nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            try:
                n.proc.wait(10)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(5)
        relay_stats = None
        if self.relay is not None:
            if self.relay.poll() is None:
                self.relay.send_signal(signal.SIGTERM)
            try:
                self.relay.wait(10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait(5)
            relay_stats = last_json_line(self.relay_err, tail_bytes=None)
        for path in self.workdir.iterdir():
            path.unlink()
        self.workdir.rmdir()
        return relay_stats


def start_relay(
    ports: list[int], loss: float, delay_ms: float, seed: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], list[str], Path]:
    cmd = [sys.executable, "-m", "gwyh_mp.relay", "--seed", str(seed)]
    for port in ports:
        cmd += ["--route", f"127.0.0.1:0=127.0.0.1:{port}"]
    cmd += ["--loss", str(loss), "--delay-ms", str(delay_ms), "--stats-interval", "1"]
    err = workdir / "relay.err"
    with open(err, "wb") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, cwd=REPO)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith(b"{"):
            break
    if not line.startswith(b"{"):
        proc.kill()
        raise RuntimeError(f"relay did not start: {err.read_text()[-500:]}")
    routes = orjson.loads(line)["routes"]
    return proc, [listen for listen, _ in routes], err


def start_cluster(
    n: int,
    max_datagram: int,
    *,
    loss: float | None = None,
    delay_ms: float = 0.0,
    seed: int = 1,
) -> Cluster:
    """``n`` gwyh-node --stdio processes (stdout and stderr to files), all bootstrapping
    from node 0. With ``loss`` set, behind a relay mesh: each node advertises its relay
    address and bootstraps to node 0's, so all node-to-node traffic crosses the relay."""
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-large-"))
    key_path = workdir / "cluster.key"
    key_path.write_bytes(KEY + b"\n")
    ports = [free_udp_port() for _ in range(n)]
    relay = relay_err = None
    advertise = [f"127.0.0.1:{p}" for p in ports]
    if loss is not None:
        relay, advertise, relay_err = start_relay(ports, loss, delay_ms, seed, workdir)
    nodes = []
    for i, port in enumerate(ports):
        cmd = [
            sys.executable, "-m", "gwyh_mp.cli",
            "--bind", f"127.0.0.1:{port}",
            "--psk-file", str(key_path),
            "--stdio",
            "--stats-interval", "0.25",
            "--max-datagram", str(max_datagram),
            "--heartbeat-interval", "0.5",
            "--log-level", "warning",
        ]  # fmt: skip
        if loss is not None:
            cmd += ["--advertise", advertise[i]]
        if i:
            cmd += ["--bootstrap", advertise[0]]
        out_path, err_path = workdir / f"node{i}.out", workdir / f"node{i}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=REPO)
        nodes.append(ClusterNode(i, port, proc, out_path, err_path))
    return Cluster(nodes, workdir, relay, relay_err)


def wait_converged(cluster: Cluster, timeout: float) -> bool:
    n = len(cluster.nodes)
    want = min(5, n - 1)  # the CLI's default --subscriptions is 5
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(x.proc.poll() is not None for x in cluster.nodes):
            return False
        stats = [x.last_stats() for x in cluster.nodes]
        # Every node also has all its subscribers: a broadcast sent before that reaches
        # fewer nodes (or none) and would be measured as loss.
        if all(
            s.get("members_up") == n - 1
            and s.get("providers") == want
            and s.get("subscribers", n - 1) == n - 1
            for s in stats
        ):
            return True
        time.sleep(0.1)
    return False


def send_lines(node: ClusterNode, lines: list[bytes]) -> None:
    stdin = node.proc.stdin
    assert stdin is not None
    for line in lines:
        stdin.write(line + b"\n")
    stdin.flush()


def collect(node: ClusterNode, offset: int) -> tuple[list[str], int]:
    """Digests of the messages a node printed after ``offset``, and the new offset."""
    with open(node.out_path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    out = [digest(decoded(orjson.loads(line))) for line in chunk[:end].splitlines() if line]
    return out, offset + end


def run_batch(
    cluster: Cluster,
    sender: int,
    messages: list[bytes],
    *,
    timeout: float,
    stall_s: float,
) -> dict[str, Any]:
    """Feed ``messages`` to one node's stdin and wait until every other node printed them
    all (or nothing moved for ``stall_s``, or ``timeout``). Checks content and duplicates."""
    receivers = [x for x in cluster.nodes if x.index != sender]
    offsets = {x.index: os.path.getsize(x.out_path) for x in receivers}
    lines_before = {x.index: x.count_new_lines() for x in receivers}
    want = len(messages)
    wanted = {digest(m) for m in messages}
    done_at: dict[int, float] = {}
    cpu = ProcessCpu([x.proc.pid for x in cluster.nodes], include_children=True)
    started = time.monotonic()
    send_lines(cluster.nodes[sender], messages)
    deadline = started + timeout
    marker: tuple[Any, ...] | None = None
    moved_at = started
    stalled = False
    while len(done_at) < len(receivers):
        now = time.monotonic()
        for x in receivers:
            if x.index not in done_at and x.count_new_lines() - lines_before[x.index] >= want:
                done_at[x.index] = now
        if len(done_at) == len(receivers) or now > deadline:
            break
        current = (
            tuple(x.lines_seen for x in receivers),
            tuple(x.last_stats().get("fragments_received", 0) for x in receivers),
        )
        if current != marker:
            marker, moved_at = current, now
        elif now - moved_at > stall_s:
            stalled = True
            break
        time.sleep(0.005)
    cpu_s = cpu.delta().total_s  # before collect(): the nodes are idle from here on
    complete = len(done_at) == len(receivers)
    elapsed = (max(done_at.values()) - started) if complete else None
    delivered = corrupt = duplicates = 0
    for x in receivers:
        got, _ = collect(x, offsets[x.index])
        seen: set[str] = set()
        for d in got:
            if d not in wanted:
                corrupt += 1
            elif d in seen:
                duplicates += 1
            else:
                seen.add(d)
        delivered += len(seen)
    expected = want * len(receivers)
    total_bytes = sum(len(m) for m in messages)
    return {
        "count": want,
        "bytes": total_bytes,
        "complete": complete,
        "stalled": stalled,
        "elapsed_s": round(elapsed, 4) if elapsed else None,
        "goodput_mib_s": round(total_bytes / elapsed / MIB, 3) if elapsed else None,
        "aggregate_mib_s": round(total_bytes * len(receivers) / elapsed / MIB, 3)
        if elapsed
        else None,
        "per_node_done_s": {str(i): round(t - started, 4) for i, t in sorted(done_at.items())},
        # Every node process (receiver processes included), per MiB delivered to one node:
        # unlike MiB/s, this barely moves when other work shares the machine.
        "node_cpu_s": round(cpu_s, 3),
        "node_cpu_ms_per_mib": round(cpu_s * 1000 / (total_bytes * len(receivers) / MIB), 2)
        if total_bytes
        else None,
        "expected_deliveries": expected,
        "delivered": delivered,
        "delivery_ratio": round(delivered / expected, 4) if expected else None,
        "duplicates": duplicates,
        "corrupt_or_unknown": corrupt,
    }


def node_counters(cluster: Cluster) -> list[dict[str, Any]]:
    keys = (
        "fragments_received", "fragments_sent", "fragment_naks_sent", "fragments_resent",
        "naks_sent", "retransmits", "shed_datagrams", "duplicates", "drop_no_channel_key",
    )  # fmt: skip
    return [{k: x.last_stats().get(k) for k in keys} for x in cluster.nodes]


# ---------------------------------------------------------------------------- floor loop

# What a node's BROADCAST datagram carries besides the fragment's payload: the clear
# header and message id, the Poly1305 tag, the entry and fragment headers.
FLOOR_PREFIX = wire.BROADCAST_HEADER.size + wire.MESSAGE_ID_BYTES
FLOOR_BATCH = 64  # datagrams per sendmmsg / recvmmsg, as the runtime's RECV_BATCH

FLOOR_NOTE = (
    "floor: the same datagrams with none of the protocol, one hop: a sender process "
    "seals each one with the project's crypto (crypto.seal, XSalsa20-Poly1305, a "
    "counter nonce with the 16-byte id as its tail, as a BROADCAST datagram) and sends "
    f"them {FLOOR_BATCH} per sendmmsg (runtime.mmsg.BatchSender); a receiver process "
    "takes them with recvmmsg (BatchReceiver) and opens each one (crypto.open_sealed). "
    "floor_mib_s counts the fragment payload of every datagram that was received and "
    "authenticated (datagram - header, id, tag, entry and fragment headers, as the node "
    "counts message bytes) over the sender's send time; datagrams the receiver could "
    "not keep up with are dropped by the kernel and not counted."
)


def fragment_payload(datagram: int) -> int:
    """Message bytes one fragment datagram of ``datagram`` bytes carries (node.fragment_bytes)."""
    return (
        datagram
        - wire.BROADCAST_OVERHEAD
        - wire.MESSAGE_ID_BYTES
        - wire.ENTRY_HEADER.size
        - wire.FRAGMENT_HEADER.size
    )


def _floor_receiver(conn: Any, key: bytes, max_seconds: float) -> None:
    """Child process: recvmmsg + open every datagram until a short end marker, 0.3 s of
    silence after data, or ``max_seconds``."""
    import select

    with _udp_socket() as sock:
        set_big_buffers(sock)
        sock.setblocking(False)
        conn.send(sock.getsockname()[1])
        receiver = BatchReceiver(sock, FLOOR_BATCH, runtime_udp.MAX_DATAGRAM)
        ok = bad = 0
        deadline = time.monotonic() + max_seconds
        cpu0 = time.process_time()
        done = False
        while not done and ok + bad < 50_000_000:
            if not select.select([sock], [], [], 0.3)[0]:
                if ok or time.monotonic() > deadline:
                    break
                continue
            for _ in range(64):  # drain what is queued, bounded
                count = receiver.recv_batch()
                for i in range(count):
                    packet = receiver.packet(i)
                    if len(packet) < FLOOR_PREFIX:
                        done = True
                        continue
                    head = bytes(packet[:FLOOR_PREFIX])
                    counter = int.from_bytes(head[12:20], "big")
                    try:
                        crypto.open_sealed(
                            key, crypto.nonce(counter, head[20:]), bytes(packet[FLOOR_PREFIX:])
                        )
                        ok += 1
                    except crypto.DecryptError:
                        bad += 1
                if count < FLOOR_BATCH:
                    break
            if time.monotonic() > deadline:
                break
        conn.send((ok, bad, time.process_time() - cpu0))
        conn.close()


def measure_floor(datagram: int, seconds: float) -> dict[str, Any]:
    """The floor loop (FLOOR_NOTE): one sender and one receiver process over 127.0.0.1."""
    key = os.urandom(32)
    ctx = _mp_context()
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_floor_receiver, args=(child_conn, key, seconds + 10.0), daemon=True)
    proc.start()
    child_conn.close()
    plain_len = datagram - FLOOR_PREFIX - crypto.TAG_BYTES
    message = os.urandom(plain_len * FLOOR_BATCH)
    plaintexts = [message[i * plain_len : (i + 1) * plain_len] for i in range(FLOOR_BATCH)]
    msg_id = os.urandom(wire.MESSAGE_ID_BYTES)
    head = wire.BROADCAST_HEADER.pack(0, 0, 0, 0, 0, 0, 0)[:12]
    counter = 0
    try:
        if not parent_conn.poll(15.0):
            raise RuntimeError("floor receiver did not start")
        addr = (LOOPBACK, parent_conn.recv())
        with _udp_socket(bind=False) as tx:
            set_big_buffers(tx)
            sender = BatchSender(tx)
            seal, nonce = crypto.seal, crypto.nonce

            def body(n: int) -> int:
                nonlocal counter
                items = []
                for plaintext in plaintexts[:n]:
                    counter += 1
                    c = counter.to_bytes(8, "big")
                    items.append(
                        (
                            b"".join(
                                (head, c, msg_id, seal(key, nonce(counter, msg_id), plaintext))
                            ),
                            addr,
                        )
                    )
                try:
                    return sender.send_batch(items)
                except OSError:
                    return 0

            cpu0 = time.process_time()
            sent, elapsed = timed_calls(body, seconds, batch=FLOOR_BATCH)
            sender_cpu = time.process_time() - cpu0
            for _ in range(20):  # end markers; one may be dropped on a full queue
                with contextlib.suppress(OSError):
                    tx.sendto(b"end", addr)
                if parent_conn.poll(0.005):
                    break
        ok, bad, receiver_cpu = (
            parent_conn.recv() if parent_conn.poll(seconds + 15.0) else (0, 0, 0.0)
        )
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        parent_conn.close()
    payload_bytes = ok * fragment_payload(datagram)
    cpu_s = sender_cpu + receiver_cpu
    return {
        "datagram_bytes": datagram,
        "fragment_payload_bytes": fragment_payload(datagram),
        "sent": sent,
        "received_authenticated": ok,
        "failed_authentication": bad,
        "elapsed_s": round(elapsed, 4),
        "drop_pct": round(100.0 * (sent - ok) / sent, 2) if sent else None,
        "floor_mib_s": round(payload_bytes / elapsed / MIB, 2) if elapsed > 0 else None,
        "sender_cpu_us_per_datagram": round(1e6 * sender_cpu / sent, 2) if sent else None,
        "receiver_cpu_us_per_datagram": round(1e6 * receiver_cpu / ok, 2) if ok else None,
        # Both processes, per MiB of payload that got through (what was dropped still cost).
        "floor_cpu_ms_per_mib": round(cpu_s * 1000 / (payload_bytes / MIB), 2)
        if payload_bytes
        else None,
    }


# ---------------------------------------------------------------------------- parts 1 and 4


def udp_ceiling(datagram: int, seconds: float) -> dict[str, Any]:
    pair = measure_udp_pair(datagram, seconds)
    send = measure_udp_send(datagram, seconds / 2, connected=False)
    return {
        "datagram_bytes": datagram,
        "pair_recv_pps": round(pair["recv_pps"]),
        "pair_mib_s": round(pair["recv_pps"] * datagram / MIB, 2),
        "pair_drop_pct": round(pair["drop_pct"], 2),
        "send_only_pps": round(send["sent_pps"]),
        "send_only_mib_s": round(send["sent_pps"] * datagram / MIB, 2),
    }


def part_goodput(args: argparse.Namespace, log: list[str]) -> dict[str, Any]:
    datagrams = list(dict.fromkeys([args.max_datagram, *args.compare_datagrams]))
    ceilings = {}
    floors = {}
    runs = []
    for dg in datagrams:
        ceilings[str(dg)] = udp_ceiling(dg, args.udp_seconds)
        floors[str(dg)] = measure_floor(dg, args.udp_seconds)
        cluster = start_cluster(args.nodes, dg)
        try:
            if not wait_converged(cluster, 60):
                runs.append({"max_datagram": dg, "error": "cluster did not converge"})
                continue
            time.sleep(0.5)  # channel keys of the last subscriptions
            for size in args.sizes:
                count = max(2, args.volume // size)
                msgs = [payload(size, 1000 * size + k) for k in range(count)]
                before = rcvbuf_errors()
                result = run_batch(cluster, 0, msgs, timeout=120, stall_s=args.stall_s)
                after = rcvbuf_errors()
                raw = ceilings[str(dg)]["pair_mib_s"]
                floor = floors[str(dg)]["floor_mib_s"]
                floor_cpu = floors[str(dg)]["floor_cpu_ms_per_mib"]
                result.update(
                    {
                        "max_datagram": dg,
                        "size": size,
                        "raw_udp_pair_mib_s": raw,
                        "goodput_vs_raw_udp": round(result["goodput_mib_s"] / raw, 4)
                        if result["goodput_mib_s"] and raw
                        else None,
                        "floor_mib_s": floor,
                        "goodput_vs_floor": round(result["goodput_mib_s"] / floor, 4)
                        if result["goodput_mib_s"] and floor
                        else None,
                        "floor_cpu_ms_per_mib": floor_cpu,
                        "rcvbuf_errors": counter_delta(before, after),
                        "node_counters": node_counters(cluster),
                    }
                )
                runs.append(result)
                log.append(
                    f"goodput dg={dg} size={size}: {result['goodput_mib_s']} MiB/s to all "
                    f"(floor {floor} MiB/s, raw UDP pair {raw} MiB/s), "
                    f"complete={result['complete']}"
                )
        finally:
            cluster.stop()
    best: dict[str, Any] = {}
    for size in args.sizes:
        rows = [r for r in runs if r.get("size") == size and r.get("goodput_mib_s")]
        if rows:
            top = max(rows, key=lambda r: r["goodput_mib_s"])
            best[str(size)] = {
                "max_datagram": top["max_datagram"],
                "goodput_mib_s": top["goodput_mib_s"],
                "by_datagram": {str(r["max_datagram"]): r["goodput_mib_s"] for r in rows},
            }
    return {
        "udp_ceiling": ceilings,
        "floor": floors,
        "runs": runs,
        "best_datagram_on_loopback": best,
    }


def goodput_table(goodput: dict[str, Any]) -> list[str]:
    """Node goodput next to the same-run floor loop and raw UDP, one row per run."""
    head = (
        f"{'datagram':>8} {'size':>9} {'node MiB/s':>10} {'floor MiB/s':>11} "
        f"{'node/floor':>10} {'raw UDP MiB/s':>13} {'complete':>8} "
        f"{'node CPU ms/MiB':>15} {'floor CPU ms/MiB':>16}"
    )
    lines = [head, "-" * len(head)]
    for r in goodput["runs"]:
        if "error" in r:
            lines.append(f"{r['max_datagram']:>8} {r['error']}")
            continue
        ratio = r.get("goodput_vs_floor")
        lines.append(
            f"{r['max_datagram']:>8} {r['size']:>9} {r['goodput_mib_s'] or '-':>10} "
            f"{r['floor_mib_s'] or '-':>11} "
            f"{f'{100 * ratio:.0f} %' if ratio else '-':>10} "
            f"{r['raw_udp_pair_mib_s']:>13} {r['complete']!s:>8} "
            f"{r.get('node_cpu_ms_per_mib') or '-':>15} {r.get('floor_cpu_ms_per_mib') or '-':>16}"
        )
    return lines


# ---------------------------------------------------------------------------- part 2


def part_loss(args: argparse.Namespace, log: list[str]) -> list[dict[str, Any]]:
    out = []
    for loss in args.loss:
        cluster = start_cluster(
            args.nodes, args.max_datagram, loss=loss, delay_ms=args.delay_ms, seed=args.seed
        )
        relay_stats = None
        rows: list[dict[str, Any]] = []
        converged = False
        try:
            converged = wait_converged(cluster, 90)
            if converged:
                time.sleep(1.5)  # lost SUBSCRIBED / CHANNEL_KEY frames retry on heartbeats
                for size in args.sizes:
                    count = max(1, args.loss_volume // size)
                    msgs = [payload(size, 2000 * size + k) for k in range(count)]
                    before = rcvbuf_errors()
                    result = run_batch(
                        cluster, 1, msgs, timeout=args.loss_timeout, stall_s=args.stall_s
                    )
                    after = rcvbuf_errors()
                    result.update(
                        {
                            "size": size,
                            "rcvbuf_errors": counter_delta(before, after),
                            "node_counters": node_counters(cluster),
                        }
                    )
                    rows.append(result)
                    log.append(
                        f"loss={loss} size={size}: delivery ratio {result['delivery_ratio']}, "
                        f"complete={result['complete']} in {result['elapsed_s']} s"
                    )
        finally:
            relay_stats = cluster.stop()
        out.append(
            {
                "loss": loss,
                "delay_ms": args.delay_ms,
                "converged": converged,
                "runs": rows,
                "relay": relay_stats,
            }
        )
    return out


# ---------------------------------------------------------------------------- part 3: chain


def chain_node_id(i: int) -> bytes:
    return hashlib.blake2b(b"bench-large-chain-%d" % i, digest_size=16).digest()


def _force_chain(index: int) -> str:
    """In this (chain node) process only: replace provider selection so that node i's one
    provider is node i-1 whenever it is a member (node 0 has none). The CLI cannot force a
    topology: providers are sampled from the whole membership, which every node learns."""
    import gwyh_mp.protocol.node as node_module

    if not hasattr(node_module, "select_providers"):
        return "select_providers not found in gwyh_mp.protocol.node: chain not forced"
    wanted = chain_node_id(index - 1) if index > 0 else None

    def select_previous(*, candidates: Any, **_: Any) -> list[bytes]:
        ids = {c.node_id for c in candidates}
        return [wanted] if wanted is not None and wanted in ids else []

    node_module.select_providers = select_previous  # type: ignore[assignment]
    return "forced"


async def _chain_node(index: int, port: int, prev_port: int | None, datagram: int) -> int:
    from gwyh_mp import Config, Node

    forced = _force_chain(index)
    config = Config.local(
        bind=("127.0.0.1", port),
        psks=[KEY],
        bootstrap=[("127.0.0.1", prev_port)] if prev_port else [],
        node_id=chain_node_id(index),
        subscriptions=1,
        max_datagram_bytes=datagram,
    )
    loop = asyncio.get_running_loop()
    out = sys.stdout.buffer

    def emit(obj: dict[str, Any]) -> None:
        out.write(orjson.dumps(obj) + b"\n")
        out.flush()

    async with Node(config) as node:
        emit({"event": "started", "forced": forced})

        async def report() -> None:
            while True:
                core = node._core()  # confirmation is not public; the bench needs it
                providers = [
                    {"id": pid.hex(), "confirmed": st.confirmed}
                    for pid, st in core.providers.items()
                ]
                emit(
                    {"event": "state", "providers": providers, "subscribers": len(core.subscribers)}
                )
                await asyncio.sleep(0.2)

        async def deliveries() -> None:
            async for msg in node.messages():
                emit(
                    {
                        "event": "delivered",
                        "t": time.monotonic(),
                        "id": msg.id.hex(),
                        "sha": digest(msg.data),
                        "hops": msg.hops,
                    }
                )

        async def commands() -> None:
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                cmd = orjson.loads(line)
                if cmd["op"] == "send":
                    data = payload(cmd["size"], cmd["seed"])
                    t = time.monotonic()
                    msg_id = await node.broadcast(data)
                    emit({"event": "sent", "t": t, "id": msg_id.hex(), "sha": digest(data)})
                elif cmd["op"] == "stop":
                    return

        tasks = [asyncio.create_task(report()), asyncio.create_task(deliveries())]
        try:
            await commands()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def chain_node_main(argv: list[str]) -> int:
    index, port, prev_port, datagram = (int(x) for x in argv)
    try:
        import uvloop

        return uvloop.run(_chain_node(index, port, prev_port or None, datagram))
    except ImportError:  # pragma: no cover
        return asyncio.run(_chain_node(index, port, prev_port or None, datagram))


class ChainProc:
    def __init__(self, index: int, port: int, prev_port: int, datagram: int, workdir: Path):
        self.index = index
        self.out_path = workdir / f"chain{index}.out"
        self.err_path = workdir / f"chain{index}.err"
        code = (
            "import sys; from bench.large import chain_node_main; "
            "sys.exit(chain_node_main(sys.argv[1:]))"
        )
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(index), str(port), str(prev_port), str(datagram)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=REPO,
            )
        self.offset = 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        with open(self.out_path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        new = [orjson.loads(x) for x in chunk[:end].splitlines() if x]
        self.events.extend(new)
        return new

    def last_state(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == "state"), None)

    def command(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(obj) + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.command({"op": "stop"})
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def part_chain(args: argparse.Namespace, log: list[str]) -> dict[str, Any]:
    hops = args.chain_hops
    n = hops + 1
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-chain-"))
    ports = [free_udp_port() for _ in range(n)]
    procs = [
        ChainProc(i, ports[i], ports[i - 1] if i else 0, args.max_datagram, workdir)
        for i in range(n)
    ]
    result: dict[str, Any] = {
        "hops": hops,
        "max_datagram": args.max_datagram,
        "topology": "node i subscribes only to node i-1 (selection replaced in the chain "
        "driver processes, one process per node, library API)",
    }
    try:
        ids = [chain_node_id(i).hex() for i in range(n)]

        def chained() -> bool:
            for p in procs:
                p.poll()
            for i, p in enumerate(procs):
                st = p.last_state()
                if st is None:
                    return False
                want = [{"id": ids[i - 1], "confirmed": True}] if i else []
                if st["providers"] != want:
                    return False
            return True

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not chained():
            if any(p.proc.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        forced = [e.get("forced") for p in procs for e in p.events if e["event"] == "started"]
        result["forced"] = forced
        if not chained():
            result["error"] = "the chain did not form"
            result["states"] = [p.last_state() for p in procs]
            return result
        time.sleep(0.5)
        rows = []
        for size in args.sizes:
            samples = []
            for rep in range(args.chain_repeats):
                for p in procs:
                    p.poll()
                procs[0].command({"op": "send", "size": size, "seed": 3000 * size + rep})
                sent = None
                arrivals: dict[int, float] = {}
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len(arrivals) < hops:
                    if sent is None:
                        sent = next((e for e in procs[0].poll() if e["event"] == "sent"), None)
                        if sent is None:
                            time.sleep(0.002)
                            continue
                    for i in range(1, n):
                        if i in arrivals:
                            continue
                        for e in procs[i].poll():
                            if e["event"] == "delivered" and e["id"] == sent["id"]:
                                if e["sha"] != sent["sha"]:
                                    raise RuntimeError(f"chain node {i}: corrupt delivery")
                                arrivals[i] = e["t"]
                    time.sleep(0.002)
                if sent is None or len(arrivals) < hops:
                    samples.append(None)
                    continue
                samples.append([(arrivals[i] - sent["t"]) * 1000 for i in range(1, n)])
                time.sleep(0.2)
            good = [s for s in samples if s is not None]
            if not good:
                rows.append({"size": size, "error": "no complete sample"})
                continue
            per_hop = [round(statistics.median(s[i] for s in good), 3) for i in range(hops)]
            single = per_hop[0]
            through = per_hop[-1]
            derived = round(hops * single, 3)
            rows.append(
                {
                    "size": size,
                    "samples": len(good),
                    "measured_arrival_ms_by_hop": per_hop,
                    "measured_single_hop_ms": single,
                    "measured_cut_through_ms": through,
                    "derived_store_and_forward_ms": derived,
                    "derived_speedup": round(derived / through, 2) if through else None,
                    "raw_samples_ms": [[round(x, 3) for x in s] for s in good],
                }
            )
            log.append(
                f"chain {hops} hops size={size}: cut-through {through} ms (measured), "
                f"1 hop {single} ms (measured), store-and-forward ~{derived} ms (derived)"
            )
        result["runs"] = rows
        return result
    finally:
        for p in procs:
            p.stop()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


# ---------------------------------------------------------------------------- main


NOTES = [
    "goodput_mib_s: payload MiB per second delivered to *every* other node (time from the "
    "first stdin write to the last node printing the last message); aggregate_mib_s "
    "multiplies by the receivers.",
    "node_cpu_ms_per_mib: user+sys CPU of every node process (receiver processes "
    "included) during the transfer, per MiB delivered to one receiver; "
    "floor_cpu_ms_per_mib: both floor processes per MiB that got through. On a shared "
    "machine these move far less between runs than the MiB/s figures.",
    "raw_udp_pair_mib_s: one process sending datagrams of --max-datagram bytes to another "
    "process on 127.0.0.1 (bench.ceiling.measure_udp_pair), no crypto, no fanout; a node "
    "also encrypts, and the origin sends each fragment to every subscriber, so the ratio is "
    "a cost indicator, not an efficiency bound.",
    FLOOR_NOTE,
    "chain: measured_* values are timestamps (CLOCK_MONOTONIC, shared by all processes); "
    "derived_store_and_forward_ms = hops x measured_single_hop_ms is an estimate of what "
    "forwarding only whole messages would cost, not a measurement.",
    "max-datagram: 1400 is the safe default for real networks: 1400 B + 8 B UDP + 40 B "
    "IPv6 header fits a 1500-byte Ethernet MTU, so datagrams are never IP-fragmented. "
    "Bigger datagrams only help on loopback (MTU 65536) or jumbo-frame LANs; on a real "
    "path an 8 KB datagram becomes ~6 IP fragments and losing any one loses all of it "
    "(loss multiplies), and many middleboxes drop IP fragments outright.",
]


def run(args: argparse.Namespace) -> int:
    if args.nodes < 2 or args.chain_hops < 1 or not args.sizes:
        print("bench large: need --nodes >= 2, --chain-hops >= 1, --sizes", file=sys.stderr)
        return 2
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"goodput", "loss", "chain"}
    if unknown:
        print(f"bench large: unknown --parts {sorted(unknown)}", file=sys.stderr)
        return 2
    log: list[str] = []
    result: dict[str, Any] = {
        "bench": "large",
        "machine": machine_description(),
        "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "notes": NOTES,
    }
    started = time.monotonic()
    if "goodput" in parts:
        result["goodput"] = part_goodput(args, log)
    if "loss" in parts:
        result["loss"] = part_loss(args, log)
    if "chain" in parts:
        result["chain"] = part_chain(args, log)
    result["wall_s"] = round(time.monotonic() - started, 1)
    write_json(args.json, result)
    for line in log:
        print(line)
    if "goodput" in result:
        print()
        print("\n".join(goodput_table(result["goodput"])))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m bench.large")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
