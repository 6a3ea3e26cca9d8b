"""`python -m bench pause`: a gwyh-node stopped (SIGSTOP) during a paced stream.

Starts --nodes gwyh-node processes of a preset (the preset's values that have a flag,
as `bench membership` does), waits until the cluster is formed, then one node
broadcasts --rate msg/s (lines on its stdin) while the last node and its receiver
processes are stopped for --pause seconds (SIGSTOP, then SIGCONT). It reports, for the
stopped node: broadcasts delivered of those sent, duplicates, missing; whether and when
(after SIGSTOP) the others declared it DOWN, seen from their stats lines; how long after
SIGCONT all of them held it UP again; when it had every broadcast; and its catch-up
counters. This is issue 15's scenario: 30 s at 10 msg/s.

Every loop is bounded by count and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    ClusterNode,
    free_udp_port,
    machine_description,
    node_command,
    signal_tree,
    write_json,
)
from bench.membership import cli_preset_flags

KEY = b"bench-pause-key-0123456789abcdef0"
STATS_INTERVAL_S = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=4, help="gwyh-node processes")
    parser.add_argument(
        "--preset", choices=("local", "lan", "wan"), default="lan", help="Config preset"
    )
    parser.add_argument("--pause", type=float, default=30.0, help="seconds stopped")
    parser.add_argument("--rate", type=float, default=10.0, help="broadcasts per second")
    parser.add_argument("--before", type=float, default=3.0, help="stream seconds before")
    parser.add_argument("--after", type=float, default=5.0, help="stream seconds after SIGCONT")
    parser.add_argument("--workers", type=int, default=1, help="receiver processes per node")
    parser.add_argument(
        "--catch-up-window", type=float, default=None, help="the nodes' --catch-up-window"
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="wait for delivery (s)")


def _start(args: argparse.Namespace, workdir: Path, flags: list[str]) -> list[ClusterNode]:
    key_path = workdir / "cluster.key"
    key_path.write_bytes(KEY + b"\n")
    key_path.chmod(0o600)
    ports = [free_udp_port() for _ in range(args.nodes)]
    extra = [*flags, "--workers", str(args.workers), "--stats-interval", str(STATS_INTERVAL_S)]
    if args.catch_up_window is not None:
        extra += ["--catch-up-window", str(args.catch_up_window)]
    nodes = []
    for i, port in enumerate(ports):
        boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
        out, err = workdir / f"node{i}.out", workdir / f"node{i}.err"
        proc = subprocess.Popen(
            node_command(port, key_path, "--no-control", *extra, *boot),
            stdin=subprocess.PIPE,
            stdout=open(out, "wb"),  # noqa: SIM115  (closed with the process)
            stderr=open(err, "wb"),  # noqa: SIM115
        )
        nodes.append(ClusterNode(i, port, proc, out, err))
    return nodes


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(STATS_INTERVAL_S)
    return predicate()


def _delivered(node: ClusterNode) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in node.out_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            counts[str(orjson.loads(line).get("data"))] += 1
    return counts


def run_once(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    flags, exactness = cli_preset_flags(args.preset)
    with tempfile.TemporaryDirectory(prefix="gwyh-pause-") as tmp:
        nodes = _start(args, Path(tmp), flags)
        try:
            return _scenario(args, nodes, flags, exactness, log)
        finally:
            for node in nodes:
                with contextlib.suppress(ProcessLookupError):
                    signal_tree(node.proc.pid, signal.SIGCONT)
                node.proc.terminate()
            for node in nodes:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()


def _scenario(
    args: argparse.Namespace, nodes: list[ClusterNode], flags: list[str], exactness: str, log: Any
) -> dict[str, Any]:
    n = args.nodes
    sender, stopped, observers = nodes[1], nodes[-1], nodes[:-1]

    def up(node: ClusterNode) -> Any:
        return node.last_stats().get("members_up")

    if not _wait(lambda: all(up(x) == n - 1 for x in nodes), 60):
        raise SystemExit("the cluster did not form within 60 s")
    _wait(lambda: all(x.last_stats().get("providers") == min(5, n - 1) for x in nodes), 30)
    log(f"cluster of {n} formed; streaming {args.rate:g} msg/s")
    tag = os.urandom(4).hex()
    sent: list[str] = []
    marks: dict[str, float] = {}
    interval = 1.0 / args.rate
    assert sender.proc.stdin is not None
    total = args.before + args.pause + args.after
    start = time.monotonic()
    next_send = next_check = start
    missed_meanwhile: set[str] = set()
    while (now := time.monotonic()) < start + total:  # bounded: total * rate lines
        if "stop" not in marks and now >= start + args.before:
            signal_tree(stopped.proc.pid, signal.SIGSTOP)
            marks["stop"] = now
            log(f"SIGSTOP node {stopped.index} for {args.pause:g} s")
        if "cont" not in marks and now >= start + args.before + args.pause:
            signal_tree(stopped.proc.pid, signal.SIGCONT)
            marks["cont"] = now
            missed_meanwhile = set(sent)
            log("SIGCONT")
        if now >= next_send:
            sent.append(f"{tag} {len(sent)}")
            sender.proc.stdin.write(sent[-1].encode() + b"\n")
            sender.proc.stdin.flush()
            next_send += interval
        views = [up(x) for x in observers]
        if "stop" in marks and "down" not in marks and any(v == n - 2 for v in views):
            marks["down"] = now
        if "cont" in marks and "caught_up" not in marks and now >= next_check:
            next_check = now + STATS_INTERVAL_S
            if missed_meanwhile <= set(_delivered(stopped)):
                marks["caught_up"] = time.monotonic()
        back = "cont" in marks and "down" in marks and "up" not in marks
        if back and all(v == n - 1 for v in views):
            marks["up"] = now
        time.sleep(min(interval, STATS_INTERVAL_S) / 2)
    expected = set(sent)
    complete = _wait(lambda: expected <= set(_delivered(stopped)), args.timeout)
    done = time.monotonic()
    if "down" in marks and "up" not in marks:
        _wait(lambda: all(up(x) == n - 1 for x in observers), 10)
        marks["up"] = time.monotonic()
    time.sleep(1.0)  # anything arriving twice late is counted too
    counts = _delivered(stopped)
    stats = stopped.last_stats()
    return {
        "preset": args.preset,
        "flags": flags,
        "preset_exactness": exactness,
        "sent": len(sent),
        "delivered": sum(1 for line in expected if counts[line] > 0),
        "duplicates": sum(counts[line] - 1 for line in expected if counts[line] > 1),
        "missing": sum(1 for line in expected if counts[line] == 0),
        "complete": complete,
        "declared_down_after_stop_s": _since(marks, "down", "stop"),
        "up_after_cont_s": _since(marks, "up", "cont"),
        "complete_after_cont_s": round(done - marks["cont"], 2) if complete else None,
        # Every broadcast sent before SIGCONT delivered (None: not within the stream).
        "caught_up_after_cont_s": _since(marks, "caught_up", "cont"),
        "catch_up": {k: v for k, v in stats.items() if str(k).startswith("catch_up")},
        "refutations": stats.get("refutations"),
    }


def _since(marks: dict[str, float], event: str, origin: str) -> float | None:
    return round(marks[event] - marks[origin], 2) if event in marks else None


def format_table(result: dict[str, Any]) -> str:
    r = result["run"]
    p = result["params"]
    cu = r["catch_up"]
    head = (
        f"pause: {p['nodes']} gwyh-node processes, preset {r['preset']} "
        f"({' '.join(r['flags'])}; {r['preset_exactness']}), SIGSTOP {p['pause']:g} s "
        f"during a {p['rate']:g} msg/s stream"
    )
    cols = [
        ("sent", str(r["sent"])),
        ("delivered", str(r["delivered"])),
        ("dupes", str(r["duplicates"])),
        ("missing", str(r["missing"])),
        ("DOWN after stop s", _cell(r["declared_down_after_stop_s"])),
        ("UP after cont s", _cell(r["up_after_cont_s"])),
        ("had all sent before cont, after s", _cell(r["caught_up_after_cont_s"])),
        ("recovered", str(cu.get("catch_up_recovered", 0))),
        ("missed", str(cu.get("catch_up_missed", 0))),
    ]
    widths = [max(len(a), len(b)) for a, b in cols]
    return "\n".join(
        [
            head,
            "  ".join(a.rjust(w) for (a, _), w in zip(cols, widths, strict=True)),
            "  ".join(b.rjust(w) for (_, b), w in zip(cols, widths, strict=True)),
        ]
    )


def _cell(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def run(args: argparse.Namespace) -> int:
    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    result = {
        "params": {
            k: getattr(args, k)
            for k in ("nodes", "preset", "pause", "rate", "before", "after", "workers")
        },
        "machine": machine_description(),
        "run": run_once(args, log),
    }
    result["params"]["catch_up_window"] = args.catch_up_window
    print(format_table(result))
    write_json(args.json, result)
    return 0 if result["run"]["complete"] and not result["run"]["duplicates"] else 1
