"""Helpers shared by every benchmark: machine description, JSON output, socket
buffers, medians and per-process CPU accounting.

Keep this module small and stable: several benches import it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

# Linux socket options that ignore net.core.{r,w}mem_max; need CAP_NET_ADMIN.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_PACKAGES = ("uvloop", "PyNaCl", "orjson", "psutil")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_description() -> dict:
    """What the numbers were measured on; every bench puts this under "machine"."""
    now = time.time()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_bytes": psutil.virtual_memory().total,
        # A noisy VM: the load at start tells whether a run had company.
        "loadavg": load,
        "packages": {name: _package_version(name) for name in _PACKAGES},
        "timestamp": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(),
        "unix_time": now,
    }


def write_json(path: str | None, result: dict) -> None:
    """Print `result` as indented JSON on stdout; also write it to `path` if given."""
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data + b"\n")


def set_big_buffers(sock: socket.socket, nbytes: int = 8 << 20) -> tuple[int, int]:
    """Ask for `nbytes` send and receive buffers; return the effective (rcvbuf, sndbuf).

    The *FORCE options bypass net.core.rmem_max (root only); otherwise fall back
    to the capped plain options. The kernel doubles the request, so 8 MiB reads
    back as 16 MiB. Never raises: a bench should still run with small buffers.
    """
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        )
    except OSError:
        return (0, 0)


def median(xs: Iterable[float]) -> float:
    """Median of `xs`; NaN (JSON null through orjson) when empty."""
    values = list(xs)
    return float(statistics.median(values)) if values else math.nan


@dataclass
class CpuDelta:
    """CPU seconds consumed between two ProcessCpu snapshots."""

    user_s: float
    system_s: float
    per_pid: dict[int, float] = field(default_factory=dict)
    # Processes seen at start but gone at the end: their last interval is lost.
    missing_pids: list[int] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s

    def us_per(self, count: int) -> float:
        """Microseconds of user+sys CPU per unit of work (e.g. per delivered message)."""
        return self.total_s * 1e6 / count if count > 0 else math.nan


class ProcessCpu:
    """User+sys CPU of a set of processes, as a delta between two snapshots.

    Typical use: ``cpu = ProcessCpu(node_pids, include_children=True)``, run the
    load, then ``cpu.delta().us_per(deliveries)`` *before* stopping the nodes:
    psutil cannot read a process that has exited, so such a process only
    contributes up to its last snapshot (it is listed in ``missing_pids``).
    With ``include_children`` every live descendant is counted too; one that
    appears after the start snapshot is counted from zero (its whole life).
    """

    def __init__(self, pids: Iterable[int], include_children: bool = False) -> None:
        self.pids = list(pids)
        self.include_children = include_children
        self._start = self.snapshot()

    def _processes(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                procs[pid] = proc
                if self.include_children:
                    for child in proc.children(recursive=True):
                        procs.setdefault(child.pid, child)
            except psutil.Error:
                continue
        return list(procs.values())

    def snapshot(self) -> dict[int, tuple[float, float]]:
        """(user_s, system_s) per live pid, children of the process excluded."""
        snap: dict[int, tuple[float, float]] = {}
        for proc in self._processes():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            snap[proc.pid] = (t.user, t.system)
        return snap

    def reset(self) -> None:
        """Start a new measurement interval from now."""
        self._start = self.snapshot()

    def delta(self) -> CpuDelta:
        """CPU used since construction (or the last reset)."""
        end = self.snapshot()
        user = system = 0.0
        per_pid: dict[int, float] = {}
        for pid, (u1, s1) in end.items():
            u0, s0 = self._start.get(pid, (0.0, 0.0))
            du, ds = max(0.0, u1 - u0), max(0.0, s1 - s0)
            user += du
            system += ds
            per_pid[pid] = du + ds
        missing = sorted(pid for pid in self._start if pid not in end)
        return CpuDelta(user, system, per_pid, missing)


def last_stats_line(err_path: Path | str, tail_bytes: int = 16384) -> dict[str, object] | None:
    """The newest ``--stats-interval`` record in a node's stderr file (its last
    ``tail_bytes``), or None if there is none yet (or the file cannot be read)."""
    try:
        with open(err_path, "rb") as f:
            f.seek(max(0, os.path.getsize(err_path) - tail_bytes))
            tail = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        if line.startswith(b'{"event":"stats"'):
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.loads(line)
    return None


def node_command(port: int, key_path: Path | str, *extra: str) -> list[str]:
    """The ``gwyh-node`` command line every bench starts its nodes with: loopback bind,
    one key, --stdio, warnings only; ``extra`` adds the bench's own flags."""
    return [
        sys.executable,
        "-m",
        "gwyh_mp.cli",
        "--bind",
        f"127.0.0.1:{port}",
        "--psk-file",
        str(key_path),
        "--stdio",
        "--log-level",
        "warning",
        *extra,
    ]
