"""Smoke tests for `python -m bench ceiling` and bench.common.

They run on tiny durations and only check structure and internal consistency,
never performance figures (this VM is far too noisy for that).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bench import common
from bench import floor as floor_bench

REPO = Path(__file__).resolve().parents[1]


def _check_floor(floor: dict, payload_size: int, fanout: int) -> None:
    assert floor["payload_size"] == payload_size
    assert floor["fanout"] == fanout
    assert floor["datagram_bytes"] == payload_size + floor_bench.WIRE_OVERHEAD
    assert floor["messages"] > 0
    assert floor["rounds"] >= 1
    assert floor["packets_out"] == floor["messages"] * fanout
    assert 0 <= floor["sink_received"] <= floor["packets_out"]
    assert floor["sink_dropped"] == floor["packets_out"] - floor["sink_received"]
    assert floor["elapsed_s"] > 0
    assert floor["msgs_per_s"] == pytest.approx(floor["messages"] / floor["elapsed_s"])
    assert floor["out_pps"] == pytest.approx(floor["msgs_per_s"] * fanout)
    assert floor["cpu_us_per_msg"] > 0
    assert floor["cpu_user_us_per_msg"] >= 0 and floor["cpu_sys_us_per_msg"] >= 0
    assert floor["cpu_us_per_msg"] == pytest.approx(
        floor["cpu_user_us_per_msg"] + floor["cpu_sys_us_per_msg"]
    )
    assert floor["definition"] == floor_bench.FLOOR_MESSAGE


def test_cli_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "ceiling.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "ceiling",
            "--seconds",
            "0.05",
            "--sizes",
            "64",
            "--fanout",
            "3",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    written = orjson.loads(out.read_bytes())
    # The human table goes to stdout, the JSON only to the --json file.
    assert b"CPU us/msg" in proc.stdout and not proc.stdout.lstrip().startswith(b"{")

    assert written["bench"] == "ceiling"
    machine = written["machine"]
    for key in ("platform", "python", "cpu_count", "memory_total_bytes", "kernel", "packages"):
        assert key in machine
    assert set(machine["packages"]) == {"uvloop", "PyNaCl", "orjson", "psutil"}
    assert written["params"]["sizes"] == [64]
    assert written["params"]["fanout"] == 3
    assert written["x25519"]["scalarmult_ops_s"] > 0

    (result,) = written["results"]
    assert result["payload_size"] == 64
    udp = result["udp"]
    assert udp["sendto_unread_sink"]["sent_pps"] > 0
    assert udp["send_connected_unread_sink"]["sent_pps"] > 0
    pair = udp["pair"]
    assert pair["sent"] > 0 and pair["sent_pps"] > 0
    assert 0 <= pair["received"] <= pair["sent"]
    assert pair["drop_pct"] == pytest.approx(100 * (pair["sent"] - pair["received"]) / pair["sent"])
    for name, value in result["crypto"].items():
        if name.endswith("_ops_s"):
            assert value > 0, name
    _check_floor(result["naive_floor"], 64, 3)


def test_cli_rejects_bad_sizes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "ceiling", "--sizes", "0", "--seconds", "0.01"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""


def test_naive_floor_function_is_self_consistent() -> None:
    floor = floor_bench.measure_naive_floor(payload_size=200, fanout=2, seconds=0.03)
    _check_floor(floor, 200, 2)


def test_naive_floor_receiving_each_message_per_provider() -> None:
    floor = floor_bench.measure_naive_floor(payload_size=200, fanout=2, seconds=0.03, receives=3)
    assert floor["receives"] == 3
    assert floor["messages"] > 0 and floor["packets_out"] == floor["messages"] * 2
    assert "3 sock.recv(65536)" in floor["definition"]
    with pytest.raises(ValueError):
        floor_bench.measure_naive_floor(payload_size=200, fanout=2, seconds=0.03, receives=0)


def test_write_json_and_median(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a" / "b" / "r.json"
    common.write_json(str(target), {"x": 1, "y": [1.5]})
    assert orjson.loads(target.read_bytes()) == {"x": 1, "y": [1.5]}
    assert capsys.readouterr().out == ""  # a file given: nothing on stdout
    common.write_json("-", {"x": 2})
    assert orjson.loads(capsys.readouterr().out) == {"x": 2}
    common.write_json(None, {"x": 3})
    assert capsys.readouterr().out == ""
    assert common.median([3, 1, 2]) == 2
    assert math.isnan(common.median([]))


def test_set_big_buffers_never_raises() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        rcv, snd = common.set_big_buffers(sock, 1 << 20)
        assert rcv > 0 and snd > 0
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    assert common.set_big_buffers(closed) == (0, 0)


def test_process_cpu_counts_own_work() -> None:
    cpu = common.ProcessCpu([os.getpid()], include_children=True)
    deadline = time.process_time() + 0.1
    spins = 0
    while time.process_time() < deadline and spins < 10_000_000:
        spins += 1
    delta = cpu.delta()
    assert delta.total_s > 0
    assert delta.total_s == pytest.approx(delta.user_s + delta.system_s)
    assert os.getpid() in delta.per_pid
    assert delta.missing_pids == []
    assert delta.us_per(10) == pytest.approx(delta.total_s * 1e5)
    assert math.isnan(delta.us_per(0))


def test_naive_floor_with_default_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root (no SO_RCVBUFFORCE) rounds must shrink to fit small queues."""

    def default_buffers(sock: socket.socket, nbytes: int = 0) -> tuple[int, int]:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        )

    monkeypatch.setattr(floor_bench, "set_big_buffers", default_buffers)
    floor = floor_bench.measure_naive_floor(payload_size=1200, fanout=2, seconds=0.03)
    _check_floor(floor, 1200, 2)
    assert floor["input_rcvbuf_effective_bytes"] < 1 << 20
