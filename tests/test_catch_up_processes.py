"""Catch-up with real ``gwyh-node`` processes: one is stopped (SIGSTOP, with its
receiver processes) during a paced stream for longer than it takes its peers to declare
it DOWN, yet shorter than the catch-up window; after SIGCONT it delivers every
broadcast exactly once.

Marked ``attack`` like its neighbours (tests/test_attack_liveness.py): it takes
~30 s. ``python -m bench pause`` measures the issue's 30 s scenario.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.common import signal_tree
from tests.procs import STDIO_FAST, NodeProcess, free_udp_port, node_args, node_processes, wait_all

KEY = b"catch-up-suite-key-0123456789abcd"
NODES = 4
PAUSE_S = 8.0  # heartbeat 0.5 s: DOWN after ~2.5 s; the window is 30 s
RATE_S = 0.1  # 10 msg/s


def _lines(proc: NodeProcess) -> Counter[str]:
    return Counter(str(m["data"]) for m in list(proc.messages))


@pytest.mark.attack
def test_a_node_stopped_during_a_stream_delivers_every_broadcast_exactly_once(
    tmp_path: Path,
) -> None:
    key = tmp_path / "k"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o600)
    ports = [free_udp_port() for _ in range(NODES)]
    with node_processes() as procs:
        for i, port in enumerate(ports):
            boot = ["--bootstrap", f"127.0.0.1:{ports[0]}"] if i else []
            procs.append(NodeProcess(node_args(port, str(key), *STDIO_FAST, *boot)))
        sender, paused, others = procs[1], procs[-1], procs[:-1]
        assert wait_all(procs, lambda p: p.last_stats().get("members_up") == NODES - 1, 60)
        assert wait_all(procs, lambda p: p.last_stats().get("providers") == NODES - 1, 30)
        tag = os.urandom(4).hex()
        sent: list[str] = []
        declared_down = threading.Event()

        def stream(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # bounded: seconds / RATE_S lines
                sent.append(f"{tag} {len(sent)}")
                sender.send_line(sent[-1].encode())
                if any(p.last_stats().get("members_up") == NODES - 2 for p in others[:1]):
                    declared_down.set()
                time.sleep(RATE_S)

        stream(1.0)
        signal_tree(paused.proc.pid, signal.SIGSTOP)
        try:
            stream(PAUSE_S)
        finally:
            signal_tree(paused.proc.pid, signal.SIGCONT)
        stream(2.0)
        expected = set(sent)

        def complete(p: NodeProcess) -> bool:
            return expected <= set(_lines(p))

        receivers = [p for p in procs if p is not sender]  # an origin does not deliver
        assert wait_all(receivers, complete, 60), [
            (len(expected - set(_lines(p))), p.stderr_lines[-3:]) for p in receivers
        ]
        time.sleep(1.0)  # nothing may arrive twice afterwards either
        for p in receivers:
            counts = _lines(p)
            doubled = [line for line in expected if counts[line] > 1]
            assert not doubled, (p is paused, len(doubled))
        stats = paused.last_stats()
        print(
            f"\nSIGSTOP {PAUSE_S:.0f} s during {len(sent)} broadcasts at "
            f"{1 / RATE_S:.0f}/s: all delivered once at the stopped node; declared DOWN "
            f"meanwhile: {declared_down.is_set()}; catch-up: recovered "
            f"{stats.get('catch_up_recovered')}, pulls {stats.get('catch_up_pulls')}, "
            f"missed {stats.get('catch_up_missed', 0)}"
        )
        assert int(stats.get("catch_up_missed", 0)) == 0  # type: ignore[call-overload]
        for proc in procs:
            assert proc.terminate() == 0
