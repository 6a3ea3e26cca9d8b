"""`python -m bench cluster` on a tiny cluster: the figures it reports are consistent."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.cluster import floor_receives, senders_arg
from gwyh_mp.cli import message_json, messages_json
from gwyh_mp.protocol.events import Message

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_cluster_run_reports_consistent_figures(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "cluster",
            "--nodes",
            "3",
            "--subscriptions",
            "2",
            "--count",
            "300",
            "--rate",
            "600",
            "--max-datagram",
            "65000",
            "--flush-interval",
            "0.005",
            "--floor-seconds",
            "0.2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["lost_messages"] == 0
    assert result["duplicate_deliveries"] == 0
    assert result["node_deliveries"] == 2 * 300  # two receivers, the sender excluded
    latency = result["latency_ms"]
    assert latency["count"] == result["node_deliveries"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 30_000
    assert result["params"]["flush_interval"] == 0.005
    assert result["cpu_us_per_delivery"] > 0 and result["floor_cpu_us_per_msg"] > 0


def test_both_modes_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    args = ["--nodes", "4", "--subscriptions", "3", "--count", "300", "--rate", "600"]
    args += ["--floor-seconds", "0.2", "--dissemination", "both", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cluster", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    for mode in ("eager", "trees"):
        figures = result["modes"][mode]
        assert figures["complete"] and figures["lost_messages"] == 0
        assert figures["duplicate_deliveries"] == 0
        assert figures["node_deliveries"] == 3 * 300
        assert figures["datagrams_in"] > 0
    assert b"cluster (eager)" in proc.stdout and b"cluster (trees)" in proc.stdout


def test_full_mesh_every_node_sends_and_the_floor_receives_per_provider(
    tmp_path: Path,
) -> None:
    out = tmp_path / "mesh.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "cluster",
            "--nodes",
            "3",
            "--senders",
            "all",
            "--subscriptions",
            "2",
            "--size",
            "1024",
            "--count",
            "240",
            "--rate",
            "480",
            "--floor-seconds",
            "0.2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["params"]["senders"] == 3
    assert result["complete"] and result["lost_messages"] == 0
    assert result["duplicate_deliveries"] == 0 and result["own_deliveries"] == 0
    # Every node originates a third and receives the other two thirds.
    assert result["node_deliveries"] == 2 * 240
    assert result["floor"]["receives"] == 2  # one copy per provider
    assert b"(2 receives/msg)" in proc.stdout


def test_senders_and_floor_receives() -> None:
    assert senders_arg("all") == 0 and senders_arg("ALL") == 0 and senders_arg("3") == 3
    for bad in ("0", "-1", "some"):
        with pytest.raises(argparse.ArgumentTypeError):
            senders_arg(bad)
    mesh = argparse.Namespace(nodes=6, senders=6, subscriptions=5)
    assert floor_receives(mesh) == 5
    assert floor_receives(argparse.Namespace(nodes=3, senders=3, subscriptions=5)) == 2
    assert floor_receives(argparse.Namespace(nodes=10, senders=1, subscriptions=5)) == 1


def test_bad_arguments_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cluster", "--flush-interval", "3"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2 and b"--flush-interval" in proc.stderr


def test_stdio_lines_carry_the_delivery_time() -> None:
    msg = Message(b"hi", b"\x01" * 16, b"\x02" * 16, 3)
    record = orjson.loads(message_json(msg, 1795772664.7498441))
    assert record["received_at"] == 1795772664.749844 and record["data"] == "hi"
    assert "received_at" not in orjson.loads(message_json(msg))


def test_batch_lines_are_the_same_bytes_as_one_by_one() -> None:
    batch = [
        Message(b'text "quoted" \\ \n \xc3\xa9', b"\x01" * 16, b"\x02" * 16, 3),
        Message(b"\xff\xfe not utf-8", b"\x03" * 16, b"\x04" * 16, 255),
        Message(b"", b"\x05" * 16, b"\x06" * 16, 0),
    ]
    stamp = 1795772664.7498441
    assert messages_json(batch, stamp) == b"".join(message_json(m, stamp) for m in batch)
    assert messages_json([], stamp) == b""
