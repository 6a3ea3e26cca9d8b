"""Container-aware defaults: CPUs from affinity and cgroup quotas (fake cgroup trees),
rings fitted to /dev/shm, and the warning that names the sysctl when the kernel clamps
socket buffers."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gwyh_mp.config import ConfigError
from gwyh_mp.runtime import host, udp

MIB = 1 << 20


def fake_cgroup(tmp_path: Path, own: str, limits: dict[str, str], v1: bool = False) -> Path:
    root = tmp_path / "cgroup"
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for directory, text in limits.items():
        path = root / directory.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        (path / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("4:memory:/x\n1:cpu:/\n" if v1 else f"0::{own}\n")
    return root


def test_cpu_max_parsing() -> None:
    assert host.parse_cpu_max("max 100000") is None
    assert host.parse_cpu_max("200000 100000") == 2.0
    assert host.parse_cpu_max("150000 100000\n") == 1.5
    assert host.parse_cpu_max("50000") == 0.5  # period defaults to 100 ms


def test_quota_on_own_cgroup_caps_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "affinity_cpus", lambda: 16)
    root = fake_cgroup(tmp_path, "/kubepods/pod1/ctr", {"/kubepods/pod1/ctr": "200000 100000"})
    proc = tmp_path / "proc_self_cgroup"
    assert host.cgroup_cpu_limit(root, proc) == 2.0
    assert host.usable_cpus(root, proc) == 2


def test_the_tightest_ancestor_quota_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "affinity_cpus", lambda: 16)
    root = fake_cgroup(
        tmp_path,
        "/a/b/c",
        {"/a": "300000 100000", "/a/b": "max 100000", "/a/b/c": "800000 100000"},
    )
    assert host.usable_cpus(root, tmp_path / "proc_self_cgroup") == 3


def test_rounding_and_the_floor_of_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "affinity_cpus", lambda: 8)
    proc = tmp_path / "proc_self_cgroup"
    for quota, want in (("150000", 2), ("140000", 1), ("20000", 1), ("max", 8)):
        root = fake_cgroup(tmp_path, "/", {"/": f"{quota} 100000"})
        assert host.usable_cpus(root, proc) == want, quota


def test_affinity_caps_a_larger_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "affinity_cpus", lambda: 2)
    root = fake_cgroup(tmp_path, "/", {"/": "800000 100000"})
    assert host.usable_cpus(root, tmp_path / "proc_self_cgroup") == 2


def test_no_cgroup_files_means_affinity(tmp_path: Path) -> None:
    assert host.usable_cpus(tmp_path / "none", tmp_path / "none") == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "affinity_cpus", lambda: 8)
    root = fake_cgroup(tmp_path, "/", {}, v1=True)
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert host.usable_cpus(root, tmp_path / "proc_self_cgroup") == 3
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert host.usable_cpus(root, tmp_path / "proc_self_cgroup") == 8


def test_rings_fit_shrink_or_fail(caplog: pytest.LogCaptureFixture) -> None:
    smallest = host.min_ring_bytes(1400, 64)
    assert smallest == MIB
    assert host.fit_rings(2, 16 * MIB, smallest, None) == 16 * MIB
    assert host.fit_rings(2, 16 * MIB, smallest, 256 * MIB) == 16 * MIB
    with caplog.at_level(logging.WARNING, logger="gwyh_mp"):
        # Docker's default: 8 rings of 8 MiB plus headers do not fit; 4 MiB do.
        assert host.fit_rings(4, 16 * MIB, smallest, 64 * MIB) == 4 * MIB
    assert "/dev/shm has 64.0 MiB free" in caplog.text
    with pytest.raises(ConfigError, match=r"/dev/shm has 2\.0 MiB free.*--shm-size"):
        host.fit_rings(4, 16 * MIB, smallest, 2 * MIB)
    jumbo = host.min_ring_bytes(65_000, 64)
    assert jumbo == 8 * MIB
    with pytest.raises(ConfigError, match="ring_bytes"):
        host.fit_rings(1, 4 * MIB, jumbo, None)


def test_a_clamped_socket_buffer_names_the_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())

    def unprivileged(sock: socket.socket, nbytes: int) -> None:  # no CAP_NET_ADMIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)

    monkeypatch.setattr(udp, "set_buffers", unprivileged)
    warnings = host.socket_buffer_warnings(2 * max(rmem_max, wmem_max))
    assert any("net.core.rmem_max" in w for w in warnings), warnings
    assert any("net.core.wmem_max" in w for w in warnings), warnings
    assert host.socket_buffer_warnings(4096) == []


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) not installed")
def test_node_in_a_tiny_dev_shm_fails_with_one_clear_line(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"host-limits-test-key-0123456789\n")
    key.chmod(0o600)
    # A private mount namespace with a 2 MiB /dev/shm, like a starved container.
    script = (
        "mount -t tmpfs -o size=2m tmpfs /dev/shm && exec "
        f"{sys.executable} -m gwyh_mp.cli --bind 127.0.0.1:0 --psk-file {key} --workers 2"
    )
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs x /mnt"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces refused here: {probe.stderr.decode().strip()}")
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "/dev/shm has" in lines[0] and "--shm-size" in lines[0]
    assert "Traceback" not in result.stderr
