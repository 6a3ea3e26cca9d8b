"""Helpers shared by every benchmark: machine description, JSON output, free ports,
socket buffers, kernel drop counters, percentiles, node processes and per-process CPU
accounting.

One home for each of these: a bench module imports from here, never from another bench
module, so each command can change without breaking the others.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

from gwyh_mp.runtime.udp import set_buffers

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


def write_json(path: str | os.PathLike[str] | None, result: dict) -> None:
    """Write `result` as indented JSON to `path` ("-": stdout); nothing without a path.
    The human table goes to stdout, so JSON joins it only when asked for."""
    if path is None:
        return
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    if str(path) == "-":
        sys.stdout.write(data.decode() + "\n")
        sys.stdout.flush()
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data + b"\n")


def set_big_buffers(sock: socket.socket, nbytes: int = 8 << 20) -> tuple[int, int]:
    """Ask for `nbytes` send and receive buffers the way the runtime does (its
    ``set_buffers``: the *FORCE options as root, else the capped plain ones); return
    the effective (rcvbuf, sndbuf). The kernel doubles the request, so 8 MiB reads back
    as 16 MiB. Never raises: a bench should still run with small buffers."""
    set_buffers(sock, nbytes)
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        )
    except OSError:
        return (0, 0)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rcvbuf_errors() -> int | None:
    """Kernel-wide UDP RcvbufErrors (datagrams dropped on a full socket buffer, every
    process counted) from /proc/net/snmp; None where unavailable."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
        return None
    return int(udp[1][udp[0].index("RcvbufErrors")])


def counter_delta(before: int | None, after: int | None) -> int | None:
    """``after - before`` of a counter that may be unavailable (None)."""
    return None if before is None or after is None else after - before


def udp_drops(ports: set[int]) -> dict[int, int] | None:
    """Datagrams the kernel dropped (full receive buffer) per local port, for the IPv4
    UDP sockets bound to ``ports``: the ``drops`` column of /proc/net/udp. Sockets
    sharing a port (SO_REUSEPORT workers) are summed. None where unavailable."""
    try:
        with open("/proc/net/udp", encoding="ascii") as f:
            next(f)
            out: dict[int, int] = {}
            for line in f:
                fields = line.split()
                port = int(fields[1].rpartition(":")[2], 16)
                if port in ports:
                    out[port] = out.get(port, 0) + int(fields[-1])
            return out
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def drops_between(a: dict[int, int] | None, b: dict[int, int] | None) -> int | None:
    """New drops from a to b; sockets opened in between count from zero, sockets
    closed in between are lost (they left /proc/net/udp)."""
    if a is None or b is None:
        return None
    return sum(max(0, n - a.get(port, 0)) for port, n in b.items())


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank ``p``-th percentile (0 < p <= 100) of a sorted, non-empty sequence:
    the smallest value with at least p % of the values at or below it. The rank is
    computed in integers (thousandths of a percent), so 99.9 % of 1000 is exactly 999."""
    n = len(sorted_values)
    rank = max(1, -(-round(p * 1000) * n // 100_000))
    return sorted_values[min(rank, n) - 1]


def percentile_summary(
    values: Iterable[float],
    points: Sequence[float] = (50, 90, 99),
    scale: float = 1.0,
    digits: int = 3,
) -> dict[str, float | int | None]:
    """count, the nearest-rank ``points`` (keys p50, p99_9, ...), max and mean of
    ``values`` times ``scale``, rounded to ``digits``; None for each when empty."""
    xs = sorted(values)
    out: dict[str, float | int | None] = {"count": len(xs)}
    for p in points:
        out["p" + f"{p:g}".replace(".", "_")] = (
            round(percentile(xs, p) * scale, digits) if xs else None
        )
    out["max"] = round(xs[-1] * scale, digits) if xs else None
    out["mean"] = round(sum(xs) / len(xs) * scale, digits) if xs else None
    return out


def median(xs: Iterable[float]) -> float:
    """Median of `xs`; NaN (JSON null through orjson) when empty."""
    values = list(xs)
    return float(statistics.median(values)) if values else math.nan


class ProcSampler:
    """CPU % (of one core) and RSS of one process between successive calls."""

    def __init__(self, pid: int | None) -> None:
        self.proc: psutil.Process | None = None
        self._last: tuple[float, float] | None = None
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                self.proc = psutil.Process(pid)
                self._last = (time.monotonic(), self._cpu())

    def _cpu(self) -> float:
        assert self.proc is not None
        t = self.proc.cpu_times()
        return t.user + t.system

    def cpu_seconds(self) -> float | None:
        if self.proc is None:
            return None
        try:
            return self._cpu()
        except psutil.Error:
            return None

    def sample(self) -> tuple[float | None, int | None]:
        if self.proc is None or self._last is None:
            return None, None
        try:
            now, cpu = time.monotonic(), self._cpu()
            rss = self.proc.memory_info().rss
        except psutil.Error:
            return None, None
        t0, c0 = self._last
        self._last = (now, cpu)
        pct = 100.0 * (cpu - c0) / (now - t0) if now > t0 else 0.0
        return round(pct, 1), rss


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


def last_json_line(
    path: Path | str | None, prefix: bytes = b"{", tail_bytes: int | None = 16384
) -> dict[str, object] | None:
    """The newest JSON line starting with ``prefix`` in a file (only its last
    ``tail_bytes`` read, or all of it with None); None if there is none yet or the
    file cannot be read. A node's ``--stats-interval`` records: ``prefix=STATS_PREFIX``."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            if tail_bytes is not None:
                f.seek(max(0, os.path.getsize(path) - tail_bytes))
            tail = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        if line.startswith(prefix):
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.loads(line)
    return None


STATS_PREFIX = b'{"event":"stats"'


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


@dataclass
class ClusterNode:
    """One spawned ``gwyh-node --stdio`` whose stdout and stderr go to files."""

    index: int
    port: int
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    lines_seen: int = 0
    out_offset: int = 0
    done_at: float | None = None
    stats: dict[str, object] = field(default_factory=dict)

    def last_stats(self) -> dict[str, object]:
        latest = last_json_line(self.err_path, STATS_PREFIX, 8192)
        if latest is not None:
            self.stats = latest
        return self.stats

    def count_new_lines(self) -> int:
        with open(self.out_path, "rb") as f:
            f.seek(self.out_offset)
            chunk = f.read()
        self.out_offset += len(chunk)
        self.lines_seen += chunk.count(b"\n")
        return self.lines_seen


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """Signal a node and its receiver processes (SIGSTOP: a whole machine pauses, not
    one process of it)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
    os.kill(pid, sig)
