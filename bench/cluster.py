"""`python -m bench cluster`: a cluster of real `gwyh-node` processes on this machine.

Starts --nodes processes (--stdio, stdout to files), waits until every node sees the
whole cluster and has its providers, then feeds --count broadcasts of --size bytes
into --senders nodes' stdin, paced at --rate msg/s in 1 ms ticks. It reports:

- msgs/s: count / (time the last node had every message - first send);
- loss and duplicates per node, from the delivered JSON lines;
- CPU per node-delivery summed over all node processes (psutil, user+sys);
- the naive floor measured in the same run (bench.ceiling.measure_naive_floor: one
  recv + one decrypt + one encryption and one send per subscriber), and the ratio;
- kernel socket-buffer overflows (/proc/net/snmp RcvbufErrors) during the run.

Every loop is bounded by count and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

from bench.common import (
    ClusterNode,
    counter_delta,
    free_udp_port,
    machine_description,
    node_command,
    percentile_summary,
    rcvbuf_errors,
    write_json,
)
from bench.floor import measure_naive_floor
from gwyh_mp.config import DEFAULT_DISSEMINATION

KEY = b"bench-cluster-key-0123456789abcdef"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=10, help="gwyh-node processes")
    parser.add_argument("--rate", type=float, default=4500.0, help="offered msgs/s (0 = unpaced)")
    parser.add_argument("--count", type=int, default=25_000, help="broadcasts in total")
    parser.add_argument("--size", type=int, default=512, help="payload bytes")
    parser.add_argument(
        "--senders",
        type=senders_arg,
        default=1,
        help="how many nodes originate; 'all': a full mesh (every node broadcasts, and the "
        "floor receives each message once per provider)",
    )
    parser.add_argument("--subscriptions", type=int, default=5, help="providers per node")
    parser.add_argument("--workers", type=int, default=1, help="receiver processes per node")
    parser.add_argument(
        "--max-datagram", type=int, default=1400, help="the nodes' --max-datagram (bytes)"
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=0.0,
        help="the nodes' --flush-interval (coalescing window under load, seconds)",
    )
    parser.add_argument(
        "--dissemination",
        choices=["eager", "trees", "both"],
        default=DEFAULT_DISSEMINATION,
        help="the nodes' --dissemination (default: the node's); both: one cluster each, "
        "back to back, one naive floor",
    )
    parser.add_argument(
        "--floor-seconds", type=float, default=1.0, help="seconds measuring the naive floor"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="hard cap on the run (s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def senders_arg(text: str) -> int:
    """--senders: a count, or 'all' (0 here, resolved to --nodes in run())."""
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or 'all': {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("need at least one sender")
    return value


def floor_receives(args: argparse.Namespace) -> int:
    """Copies of each message the naive floor receives: one per provider in a full mesh
    (every node a sender: each message reaches a node once from each provider), else
    one (the floor of a relay)."""
    if args.senders == args.nodes:
        return max(1, min(args.subscriptions, args.nodes - 1))
    return 1


def start_cluster(args: argparse.Namespace, workdir: Path, mode: str) -> list[ClusterNode]:
    key_path = workdir / "cluster.key"
    key_path.write_bytes(KEY + b"\n")
    ports = [free_udp_port() for _ in range(args.nodes)]
    nodes = []
    for i, port in enumerate(ports):
        cmd = node_command(
            port,
            key_path,
            "--stats-interval",
            "0.25",
            "--subscriptions",
            str(args.subscriptions),
            "--max-datagram",
            str(args.max_datagram),
            "--flush-interval",
            str(args.flush_interval),
            "--heartbeat-interval",
            "1",
            "--workers",
            str(args.workers),
            "--dissemination",
            mode,
        )
        if i:
            cmd += ["--bootstrap", f"127.0.0.1:{ports[0]}"]
        out_path, err_path = workdir / f"node{i}.out", workdir / f"node{i}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # The child keeps its own copies of the descriptors.
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err)
        nodes.append(ClusterNode(i, port, proc, out_path, err_path))
    return nodes


def wait_converged(nodes: list[ClusterNode], args: argparse.Namespace, timeout: float) -> bool:
    want_providers = min(args.subscriptions, args.nodes - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n.proc.poll() is not None for n in nodes):
            return False
        stats = [n.last_stats() for n in nodes]
        if all(
            s.get("members_up") == args.nodes - 1 and s.get("providers") == want_providers
            for s in stats
        ):
            return True
        time.sleep(0.1)
    return False


def payload(seq: int, size: int, sent_at: float) -> bytes:
    """Sequence number and send time (Unix s) up front, padded to ``size`` bytes."""
    head = b"%010d %.6f " % (seq, sent_at)
    return head + b"x" * max(0, size - len(head))


def feed(nodes: list[ClusterNode], args: argparse.Namespace) -> tuple[float, float]:
    """Write --count lines, paced, round-robin over the sender nodes' stdin."""
    senders = nodes[: args.senders]
    for n in senders:
        os.set_blocking(n.proc.stdin.fileno(), True)  # type: ignore[union-attr]
    started = time.monotonic()
    deadline = started + args.timeout
    sent = 0
    while sent < args.count and time.monotonic() < deadline:
        due = (
            args.count
            if args.rate <= 0
            else min(args.count, int((time.monotonic() - started) * args.rate) + 1)
        )
        batches: dict[int, list[bytes]] = {}
        now = time.time()
        for seq in range(sent, due):
            line = payload(seq, args.size, now) + b"\n"
            batches.setdefault(seq % len(senders), []).append(line)
        for idx, lines in batches.items():
            os.write(senders[idx].proc.stdin.fileno(), b"".join(lines))  # type: ignore[union-attr]
        sent = due
        time.sleep(0.001)
    return started, time.monotonic()


def expected_for(node: ClusterNode, args: argparse.Namespace) -> int:
    own = (
        sum(1 for seq in range(args.count) if seq % args.senders == node.index)
        if (node.index < args.senders)
        else 0
    )
    return args.count - own


def verify(
    node: ClusterNode, args: argparse.Namespace, latencies: list[float] | None = None
) -> dict[str, int]:
    """Delivery counts for one node; appends each delivery's latency (s) to ``latencies``:
    from the line written to the sender's stdin to the node printing it (one clock)."""
    got: dict[int, int] = {}
    with open(node.out_path, "rb") as f:
        for line in f:
            record = orjson.loads(line)
            data = record["data"]
            seq = int(data[:10])
            got[seq] = got.get(seq, 0) + 1
            if latencies is not None and "received_at" in record:
                latencies.append(record["received_at"] - float(data.split(" ", 2)[1]))
    own = {
        s for s in range(args.count) if node.index < args.senders and s % args.senders == node.index
    }
    expected = set(range(args.count)) - own
    return {
        "expected": len(expected),
        "delivered": len(set(got) & expected),
        "missing": len(expected - set(got)),
        "duplicates": sum(c - 1 for c in got.values() if c > 1),
        "own_delivered": len(set(got) & own),
    }


def run(args: argparse.Namespace) -> int:
    if args.senders == 0:
        args.senders = args.nodes
    if args.nodes < 2 or args.senders < 1 or args.senders > args.nodes:
        print("bench cluster: need --nodes >= 2 and 1 <= --senders <= --nodes", file=sys.stderr)
        return 2
    if args.size < 32 or not 0 <= args.flush_interval <= 1:
        print("bench cluster: need --size >= 32 and 0 <= --flush-interval <= 1", file=sys.stderr)
        return 2
    floor = measure_naive_floor(
        args.size, args.subscriptions, args.floor_seconds, receives=floor_receives(args)
    )
    result: dict[str, object] = {
        "bench": "cluster",
        "machine": machine_description(),
        "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    if args.dissemination != "both":
        status = run_mode(args, args.dissemination, floor, result)
        write_json(args.json, result)
        return status
    status = 0
    modes: dict[str, dict[str, object]] = {}
    for mode in ("eager", "trees"):
        modes[mode] = {}
        status |= run_mode(args, mode, floor, modes[mode])
    result["modes"] = modes
    write_json(args.json, result)
    return status


def run_mode(args: argparse.Namespace, mode: str, floor: dict, result: dict[str, object]) -> int:
    """One cluster in one dissemination mode; its figures go into ``result``."""
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-cluster-"))
    nodes = start_cluster(args, workdir, mode)
    try:
        if not wait_converged(nodes, args, 60):
            result["error"] = "cluster did not converge"
            print(f"cluster ({mode}): did not converge", file=sys.stderr)
            return 1
        time.sleep(1.0)  # let subscriptions settle and channel keys arrive
        procs = [psutil.Process(n.proc.pid) for n in nodes]
        cpu_before = [p.cpu_times() for p in procs]
        snmp_before = rcvbuf_errors()
        first_send, last_send = feed(nodes, args)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            for n in nodes:
                if n.done_at is None and n.count_new_lines() >= expected_for(n, args):
                    n.done_at = now
            if all(n.done_at is not None for n in nodes):
                break
            # Stop early if nothing moved for a while: messages are lost, not late.
            time.sleep(0.02)
            if now - last_send > 10 and all(n.lines_seen == n.count_new_lines() for n in nodes):
                break
        cpu_after = [p.cpu_times() for p in procs]
        snmp_after = rcvbuf_errors()
        stats = [n.last_stats() for n in nodes]
        latencies: list[float] = []
        checks = [verify(n, args, latencies) for n in nodes]
        deliveries = sum(c["delivered"] for c in checks)
        cpu_s = sum(
            (a.user - b.user) + (a.system - b.system)
            for a, b in zip(cpu_after, cpu_before, strict=True)
        )
        user_s = sum(a.user - b.user for a, b in zip(cpu_after, cpu_before, strict=True))
        complete = all(n.done_at is not None for n in nodes)
        end = max(n.done_at for n in nodes if n.done_at is not None) if complete else None
        lost = sum(c["missing"] for c in checks)
        cpu_us = cpu_s * 1e6 / deliveries if deliveries else None
        # Tree churn: every graft or swap leaves the old provider's queued copies in
        # flight as duplicates, so these show whether the trees hold still.
        churn = {
            key: sum(s.get(key) or 0 for s in stats)
            for key in ("trees_grafts_out", "trees_swaps", "trees_prunes_out")
        }
        result.update(
            {
                "msgs_per_s": round(args.count / (end - first_send), 1) if end else None,
                "offered_msgs_per_s": round(args.count / (last_send - first_send), 1)
                if last_send > first_send
                else None,
                "complete": complete,
                "lost_messages": lost,
                "duplicate_deliveries": sum(c["duplicates"] for c in checks),
                "own_deliveries": sum(c["own_delivered"] for c in checks),
                "node_deliveries": deliveries,
                "cpu_s": round(cpu_s, 3),
                "cpu_user_s": round(user_s, 3),
                "cpu_us_per_delivery": round(cpu_us, 2) if cpu_us else None,
                "floor_cpu_us_per_msg": round(floor["cpu_us_per_msg"], 2),
                "ratio_to_floor": round(cpu_us / floor["cpu_us_per_msg"], 3) if cpu_us else None,
                "rcvbuf_errors": counter_delta(snmp_before, snmp_after),
                "latency_ms": percentile_summary(latencies, scale=1000),
                "floor": floor,
                "datagrams_in": sum(s.get("packets_in") or 0 for s in stats),
                "duplicates_dropped": sum(s.get("duplicates") or 0 for s in stats),
                "trees": churn,
                "per_node": [
                    {
                        **c,
                        "datagrams_in": s.get("packets_in"),
                        "datagrams_out": s.get("packets_out"),
                        "duplicates_dropped": s.get("duplicates"),
                        "drop_decrypt": s.get("drop_decrypt", 0),
                    }
                    for c, s in zip(checks, stats, strict=True)
                ],
            }
        )
        floor_note = f" ({floor['receives']} receives/msg)" if floor["receives"] > 1 else ""
        print(
            f"cluster ({mode}): {result['msgs_per_s']} msg/s "
            f"(offered {result['offered_msgs_per_s']}), "
            f"lost {lost}, dup {result['duplicate_deliveries']}, "
            f"{result['cpu_us_per_delivery']} us CPU/delivery vs floor "
            f"{result['floor_cpu_us_per_msg']} us{floor_note} (x{result['ratio_to_floor']}), "
            f"rcvbuf errors {result['rcvbuf_errors']}, latency ms p50 "
            f"{result['latency_ms']['p50']} p99 {result['latency_ms']['p99']} "
            f"max {result['latency_ms']['max']}, datagrams in {result['datagrams_in']} "
            f"(dropped as duplicates {result['duplicates_dropped']}), trees "
            + " ".join(f"{k.removeprefix('trees_')} {v}" for k, v in churn.items()),
        )
        return 0 if complete and lost == 0 else 1
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            try:
                n.proc.wait(10)
            except subprocess.TimeoutExpired:
                n.proc.kill()
        if not args.keep:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
        else:
            print(f"work directory kept: {workdir}", file=sys.stderr)
