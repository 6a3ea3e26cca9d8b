"""What the host or container lets this node use, checked at start.

Containers hide their limits from the usual calls: ``os.cpu_count()`` reports the
host's CPUs whatever the CPU quota, Docker gives /dev/shm 64 MiB (two receivers'
rings fill it), and the kernel silently clamps socket buffers to
``net.core.rmem_max``/``wmem_max``. A node that trusts those calls starts too many
receivers, dies on its first shared-memory ring, or drops bursts nobody can explain.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from pathlib import Path

from gwyh_mp.config import ConfigError

log = logging.getLogger("gwyh_mp")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
SHM_DIR = Path("/dev/shm")
MIN_RING_BYTES = 1 << 20
RING_OVERHEAD_BYTES = 4096  # segment header and slack, rounded up to a page


def affinity_cpus() -> int:
    """CPUs the scheduler lets this process run on (taskset, cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") -> CPUs, None if unlimited."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    quota = int(fields[0])
    period = int(fields[1]) if len(fields) > 1 else 100_000
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroup_v2(proc_self_cgroup: Path) -> str | None:
    """This process's cgroup v2 path ("0::/path" line), or None on a v1-only host."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors (a limit on
    a parent applies to every child), in CPUs; None when there is none."""
    limits: list[float] = []
    own = _own_cgroup_v2(proc_self_cgroup)
    if own is not None:
        # Inside a container's cgroup namespace the path is "/" and the mount is the
        # container's own cgroup; on a host it is the full path below the mount.
        directory = cgroup_root / own.lstrip("/")
        while True:
            with contextlib.suppress(OSError, ValueError):
                limit = parse_cpu_max((directory / "cpu.max").read_text())
                if limit is not None:
                    limits.append(limit)
            if directory == cgroup_root or cgroup_root not in directory.parents:
                break
            directory = directory.parent
    else:  # cgroup v1: the cpu controller's quota at its mount
        for mount in ("cpu,cpuacct", "cpu"):
            with contextlib.suppress(OSError, ValueError):
                base = cgroup_root / mount
                quota = int((base / "cpu.cfs_quota_us").read_text())
                period = int((base / "cpu.cfs_period_us").read_text())
                if quota > 0 and period > 0:
                    limits.append(quota / period)
                break
    return min(limits) if limits else None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota rounded
    to the nearest whole CPU (1.5 -> 2: a half CPU still runs a receiver), at least 1."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit + 0.5))
    return max(1, cpus)


def min_ring_bytes(max_datagram_bytes: int, sends_per_record: int) -> int:
    """The smallest ring that still takes the largest record (a batch of sends of
    full-size datagrams); a ring holds records up to half its capacity."""
    need = 2 * sends_per_record * (max_datagram_bytes + 256)  # + addresses, marshal
    return max(MIN_RING_BYTES, 1 << (need - 1).bit_length())


def shm_free_bytes(shm_dir: Path = SHM_DIR) -> int | None:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fit_rings(workers: int, ring_bytes: int, smallest: int, free: int | None) -> int:
    """The ring size to use: ``ring_bytes`` if the 2 rings of every receiver fit in the
    ``free`` bytes of /dev/shm (None: unknown), else the largest fraction of it
    (halving) that fits and is still at least ``smallest``, with a warning;
    ConfigError when even that does not fit."""
    if ring_bytes < smallest:
        raise ConfigError(
            f"ring_bytes {ring_bytes} is too small for datagrams of this size: at least "
            f"{smallest} (or lower max_datagram_bytes)"
        )
    if free is None:
        return ring_bytes
    rings = 2 * workers

    def total(size: int) -> int:
        return rings * (size + RING_OVERHEAD_BYTES)

    if total(ring_bytes) <= free:
        return ring_bytes
    size = ring_bytes
    while size >= smallest and total(size) > free:
        size //= 2
    mib = 1 << 20
    if size < smallest:
        raise ConfigError(
            f"{SHM_DIR} has {free / mib:.1f} MiB free but {workers} receivers need "
            f"{total(smallest) / mib:.1f} MiB at least (2 rings of {smallest // mib} MiB "
            "each): enlarge it (docker run --shm-size=256m, a Memory emptyDir in "
            "Kubernetes) or run fewer --workers"
        )
    log.warning(
        "%s has %.1f MiB free, too little for %d receivers x 2 rings of %d MiB: "
        "using %d MiB rings (less buffering between the processes under bursts); "
        "enlarge %s or set --ring-bytes to silence this",
        SHM_DIR,
        free / mib,
        workers,
        ring_bytes // mib,
        size // mib,
        SHM_DIR,
    )
    return size


def socket_buffer_warnings(requested: int) -> list[str]:
    """Open a throwaway UDP socket, ask for the node's buffers the node's way, and
    say which sysctl to raise if the kernel gave less (it clamps every socket alike)."""
    from gwyh_mp.runtime import udp

    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        udp.set_buffers(sock, requested)
        for option, sysctl, what in (
            (socket.SO_RCVBUF, "net.core.rmem_max", "receive"),
            (socket.SO_SNDBUF, "net.core.wmem_max", "send"),
        ):
            got = sock.getsockopt(socket.SOL_SOCKET, option) // 2  # Linux reports double
            if got < requested:
                out.append(
                    f"socket {what} buffer clamped to {got // 1024} KiB of the "
                    f"{requested // 1024} KiB requested: raise {sysctl} "
                    f"(sysctl -w {sysctl}={requested}) or bursts will be dropped"
                )
    return out
