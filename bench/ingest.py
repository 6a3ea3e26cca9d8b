"""`python -m bench ingest`: drive one gwyh-node (optionally multiprocess) at full speed.

A load generator in this process opens --peers UDP sockets (distinct source ports, so
the kernel's SO_REUSEPORT hash spreads them over the node's receivers), completes a real
handshake on each, hands the node its channel key, then sends 1 KB encrypted
broadcasts. Five sink peers subscribe to the node and count the forwards they get
(from the clear message ids; no decryption needed to count). The node delivers every
message to its application (--stdio, JSON lines to a file) and forwards it to the 5
subscribers.

For each offered rate it reports delivered msgs/s at the node, loss %, forwards seen
by the sinks, and CPU microseconds per delivered message summed over every node
process (coordinator and receivers); and, measured in the same run, the naive floor:
one recv + one decrypt + 5 encrypts + 5 sends per message in a tight Python loop
(bench.ceiling.measure_naive_floor). The highest rate without loss is the saturation
rate. All traffic is on 127.0.0.1; every loop is bounded by count and time.

Each step also splits that CPU by role (psutil per-process times over the step): the
coordinator (the node's main process: the protocol core) and the receivers (its
children: receive, decrypt, seal, send), and the run ends with the throughput this
predicts for 1, 2, 4, 8, 16 receivers, one core each (SCALING_MODEL).
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import (
    ProcessCpu,
    free_udp_port,
    machine_description,
    node_command,
    set_big_buffers,
    write_json,
)
from bench.floor import measure_naive_floor
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import PskKeyring, ids_digest, nonce, seal
from gwyh_mp.protocol.handshake import Established, Handshaker

KEY = b"bench-ingest-key-0123456789abcdef"
SINKS = 5
MODEL_RECEIVERS = (1, 2, 4, 8, 16)
SCALING_MODEL = (
    "predicted msg/s = min(R * 1e6 / receivers_us, 1e6 / coordinator_us): every message "
    "costs the receivers receivers_us of CPU in total, spread over R receivers with a core "
    "each, and the coordinator coordinator_us on its own single core; adding receivers adds "
    "capacity until the coordinator saturates"
)


def scaling_model(
    coordinator_us: float, receivers_us: float, receivers: tuple[int, ...] = MODEL_RECEIVERS
) -> list[dict[str, object]]:
    """Predicted msg/s for each receiver count (see SCALING_MODEL), and which role limits it."""
    coordinator_cap = 1e6 / coordinator_us if coordinator_us > 0 else float("inf")
    rows: list[dict[str, object]] = []
    for r in receivers:
        receiver_cap = r * 1e6 / receivers_us if receivers_us > 0 else float("inf")
        predicted = min(coordinator_cap, receiver_cap)
        rows.append(
            {
                "receivers": r,
                "predicted_msgs_per_s": round(predicted, 1) if predicted != float("inf") else None,
                "limit": "coordinator" if coordinator_cap <= receiver_cap else "receivers",
            }
        )
    return rows


def receiver_pids(node_proc: psutil.Process) -> list[int]:
    """The node's receivers: its child processes, multiprocessing's resource tracker aside."""
    pids = []
    for child in node_proc.children():
        try:
            if not any("resource_tracker" in part for part in child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="receiver processes of the node under test",
    )
    parser.add_argument("--peers", type=int, default=2000, help="sending peers (source ports)")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes")
    parser.add_argument(
        "--rates", default="2000,5000,10000,20000,0", help="offered msgs/s per step (0 = flat out)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="load time per step")
    parser.add_argument(
        "--floor-seconds", type=float, default=1.0, help="seconds measuring the naive floor"
    )


class Peer:
    """A minimal protocol client: a real handshake, then raw CONTROL/BROADCAST packets."""

    def __init__(self, target: tuple[str, int], ring: PskKeyring, index: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.target = target
        self.node_id = os.urandom(16)
        sids = iter(range(index * 16 + 1, index * 16 + 16))
        self.hs = Handshaker(
            self.node_id,
            None,
            ring,
            allocate_session_id=lambda: next(sids),
            release_session_id=lambda sid: None,
        )
        self.session: Established | None = None
        self.seq = 0
        self.link_seq = 0
        self.chan_seq = 0
        self.channel_key = os.urandom(32)
        self.seen_ids: set[bytes] = set()

    def start(self, now: float) -> None:
        self.sock.sendto(self.hs.initiate(self.target, now, time.time_ns()), self.target)

    def on_datagram(self, data: bytes, now: float) -> None:
        if len(data) < 2:
            return
        if data[1] in (wire.PacketType.OHAI, wire.PacketType.GOTEAM):
            try:
                reply, est = self.hs.handle(data[1], data, self.target, now, time.time_ns())
            except (wire.WireError, ValueError):
                return
            if reply is not None:
                self.sock.sendto(reply, self.target)
            if est is not None:
                self.session = est
        elif data[1] == wire.PacketType.BROADCAST and len(data) > wire.BROADCAST_HEADER.size:
            count = data[2]
            start = wire.BROADCAST_HEADER.size
            for i in range(count):
                self.seen_ids.add(data[start + 16 * i : start + 16 * i + 16])

    def control(self, *frames: bytes) -> bytes:
        assert self.session is not None
        self.seq += 1
        header = wire.CONTROL_HEADER.pack(
            wire.VERSION, wire.PacketType.CONTROL, 0, self.session.remote_session_id, self.seq
        )
        return header + seal(self.session.send_key, nonce(self.seq), b"".join(frames))

    def broadcast(self, payload: bytes) -> bytes:
        assert self.session is not None
        msg_id = os.urandom(16)
        self.link_seq = (self.link_seq + 1) & 0xFFFFFFFF
        self.chan_seq += 1
        entry = wire.ENTRY_HEADER.pack(wire.EntryKind.APP, 1, self.node_id, len(payload)) + payload
        header = wire.BROADCAST_HEADER.pack(
            wire.VERSION,
            wire.PacketType.BROADCAST,
            1,
            0,
            self.session.remote_session_id,
            self.link_seq,
            self.chan_seq,
        )
        return (
            header
            + msg_id
            + seal(self.channel_key, nonce(self.chan_seq, ids_digest(msg_id)), entry)
        )


def pump(peers: list[Peer], seconds: float) -> None:
    """Read whatever the node sent us, for up to ``seconds``."""
    by_fd = {p.sock.fileno(): p for p in peers}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(20):
            peer = by_fd[fd]
            for _ in range(256):
                try:
                    data = peer.sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                peer.on_datagram(data, time.monotonic())


def report_scaling(steps: list[dict[str, object]]) -> dict[str, object] | None:
    """The per-role costs of the busiest step (the most messages to spread the fixed
    costs over), the scaling they predict, printed as a table; None without a
    multiprocess node (one process is all coordinator)."""
    measured = [s for s in steps if s["delivered"] and s["receivers"]]
    if not measured:
        print("ingest scaling: needs --workers >= 2 (one process has no receivers)")
        return None
    busiest = max(measured, key=lambda s: float(s["delivered_per_s"]))  # type: ignore[arg-type]
    coordinator_us = float(busiest["coordinator_us_per_msg"])  # type: ignore[arg-type]
    receivers_us = float(busiest["receivers_us_per_msg"])  # type: ignore[arg-type]
    rows = scaling_model(coordinator_us, receivers_us)
    print(
        f"ingest per-role CPU at {busiest['delivered_per_s']} msg/s delivered: "
        f"coordinator {coordinator_us} us/msg, receivers {receivers_us} us/msg in total "
        f"({busiest['receivers']} receivers)"
    )
    print(f"model: {SCALING_MODEL}")
    print(" receivers  predicted msg/s  limit")
    for row in rows:
        print(f" {row['receivers']:>9}  {row['predicted_msgs_per_s']:>15}  {row['limit']}")
    return {
        "model": SCALING_MODEL,
        "from_offered_rate": busiest["offered_rate"],
        "coordinator_us_per_msg": coordinator_us,
        "receivers_us_per_msg": receivers_us,
        "predicted": rows,
    }


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run(args: argparse.Namespace) -> int:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.peers + SINKS + 256
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < need:
            print(
                f"bench ingest: need {need} file descriptors, the system allows {soft}",
                file=sys.stderr,
            )
            return 2
    floor = measure_naive_floor(args.size, 5, args.floor_seconds)
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-ingest-"))
    key_path = workdir / "key"
    key_path.write_bytes(KEY + b"\n")
    port = free_udp_port()
    target = ("127.0.0.1", port)
    out_path = workdir / "node.out"
    with open(out_path, "wb") as out, open(workdir / "node.err", "wb") as err:
        node = subprocess.Popen(
            node_command(
                port,
                key_path,
                "--workers",
                str(args.workers),
                "--heartbeat-interval",
                "30",
                "--max-datagram",
                "65000",
            ),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
        )
    result: dict[str, object] = {
        "bench": "ingest",
        "machine": machine_description(),
        "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "floor": floor,
    }
    try:
        time.sleep(1.0 if args.workers == 1 else 2.0)
        ring = PskKeyring([KEY])
        peers = [Peer(target, ring, i) for i in range(args.peers + SINKS)]
        for p in peers[args.peers :]:
            set_big_buffers(p.sock, 8 << 20)  # sinks receive every forward
        join_started = time.monotonic()
        for i, p in enumerate(peers):
            p.start(time.monotonic())
            if i % 200 == 199:
                pump(peers, 0.05)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(p.session for p in peers):
            pump(peers, 0.1)
            for p in peers:  # handshake retransmission, like a real peer
                if p.session is None:
                    for data, addr in p.hs.handle_timer(time.monotonic())[0]:
                        p.sock.sendto(data, addr)
        joined = sum(1 for p in peers if p.session)
        result["join"] = {
            "peers": len(peers),
            "joined": joined,
            "seconds": round(time.monotonic() - join_started, 3),
        }
        if joined < len(peers):
            result["error"] = "not every peer completed its handshake"
            write_json(args.json, result)
            return 1
        senders, sinks = peers[: args.peers], peers[args.peers :]
        for p in senders:
            p.sock.sendto(
                p.control(wire.encode_frame(wire.FrameType.CHANNEL_KEY, p.channel_key)), target
            )
        for p in sinks:
            p.sock.sendto(p.control(wire.encode_frame(wire.FrameType.SUBSCRIBE, b"\x01")), target)
        pump(peers, 1.0)
        payload = os.urandom(args.size // 2).hex().encode()[: args.size]
        node_proc = psutil.Process(node.pid)
        steps = []
        for rate in rates:
            receivers = receiver_pids(node_proc)
            cpu = ProcessCpu([node.pid, *receivers])
            lines0 = count_lines(out_path)
            sink0 = [len(s.seen_ids) for s in sinks]
            sent = 0
            started = time.monotonic()
            end = started + args.seconds
            i = 0
            while (now := time.monotonic()) < end:
                due = int((now - started) * rate) if rate > 0 else sent + 256
                while sent < due:
                    p = senders[i % len(senders)]
                    i += 1
                    try:
                        p.sock.sendto(p.broadcast(payload), target)
                    except BlockingIOError:
                        break
                    sent += 1
                if rate > 0:
                    time.sleep(0.0005)
                if sent % 4096 < 256:
                    pump(sinks, 0)
            send_seconds = time.monotonic() - started
            # Let the node drain, and refresh the sinks' subscriptions meanwhile.
            settle = time.monotonic() + 3.0
            last = -1
            while time.monotonic() < settle:
                pump(sinks, 0.2)
                now_lines = count_lines(out_path) - lines0
                if now_lines == last and now_lines >= sent:
                    break
                last = now_lines
            for p in sinks:
                p.sock.sendto(
                    p.control(wire.encode_frame(wire.FrameType.SUBSCRIBE, b"\x00")), target
                )
            used = cpu.delta()
            coord_s = used.per_pid.get(node.pid, 0.0)
            recv_s = used.total_s - coord_s
            delivered = count_lines(out_path) - lines0
            forwards = [len(s.seen_ids) - a for s, a in zip(sinks, sink0, strict=True)]
            step = {
                "offered_rate": rate or None,
                "sent": sent,
                "sent_per_s": round(sent / send_seconds, 1),
                "delivered": delivered,
                "delivered_per_s": round(delivered / send_seconds, 1),
                "loss_pct": round(100.0 * (sent - delivered) / sent, 3) if sent else None,
                "forwards_min_per_sink": min(forwards),
                "cpu_us_per_delivered": round((coord_s + recv_s) * 1e6 / delivered, 2)
                if delivered
                else None,
                "coordinator_us_per_msg": round(coord_s * 1e6 / delivered, 2)
                if delivered
                else None,
                "receivers_us_per_msg": round(recv_s * 1e6 / delivered, 2) if delivered else None,
                "receivers": len(receivers),
                "node_processes": 1 + len(receivers),
            }
            step["ratio_to_floor"] = (
                round(step["cpu_us_per_delivered"] / floor["cpu_us_per_msg"], 3)  # type: ignore[operator]
                if step["cpu_us_per_delivered"]
                else None
            )
            steps.append(step)
            print(
                f"ingest rate {f'{rate:g}/s' if rate else 'max'}: "
                f"sent {step['sent_per_s']}/s delivered "
                f"{step['delivered_per_s']}/s loss {step['loss_pct']}% cpu "
                f"{step['cpu_us_per_delivered']} us/msg (floor {floor['cpu_us_per_msg']:.1f}; "
                f"coordinator {step['coordinator_us_per_msg']} + {len(receivers)} receivers "
                f"{step['receivers_us_per_msg']})",
            )
        lossless = [s for s in steps if s["loss_pct"] == 0]
        result["steps"] = steps
        result["saturation_msgs_per_s"] = max(
            (float(s["delivered_per_s"]) for s in lossless),
            default=None,  # type: ignore[arg-type]
        )
        result["max_delivered_per_s"] = max(float(s["delivered_per_s"]) for s in steps)  # type: ignore[arg-type]
        result["scaling"] = report_scaling(steps)
        write_json(args.json, result)
        return 0
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
