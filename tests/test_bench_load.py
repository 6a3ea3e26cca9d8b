"""Smoke tests for `python -m bench load` and its virtual-peer driver.

Tiny sizes (a few peers, seconds): they check that the tool runs end to end and that
the figures it reports agree with each other, never performance.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bench import load_report
from bench.load import MAX_DEFAULT_PROCS, default_procs
from bench.load_report import node_counters
from bench.virtual_peers import ensure_fd_limit
from tests.procs import free_udp_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--duration", "2", "--rate", "10", "--settle", "0.5", "--drain", "4", "--quiet"]


def _bench(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "load", *argv],
        cwd=REPO,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _check_latency(lat: dict, count: int) -> None:
    assert lat["count"] == count
    if count:
        assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
        assert lat["p50"] <= lat["max"] and lat["mean"] <= lat["max"]
    else:
        assert lat["p50"] is None and lat["max"] is None


def _check_mesh(mesh: dict) -> None:
    assert 0 <= mesh["delivered"] <= mesh["expected"]
    assert mesh["missing"] == mesh["expected"] - mesh["delivered"]
    if mesh["expected"]:
        assert mesh["ratio"] == pytest.approx(mesh["delivered"] / mesh["expected"])
    assert mesh["duplicates"] >= 0
    # Latencies include deliveries at peers that left, so at least the counted ones.
    assert mesh["latency_ms"]["count"] >= mesh["delivered"]


def _check_node_block(block: dict) -> None:
    assert block["measured_at"] == "node"
    assert 0 <= block["delivered"] <= block["sent"]
    assert block["missing"] == block["sent"] - block["delivered"]
    assert block["ratio"] == pytest.approx(block["delivered"] / block["sent"])
    assert 0 <= block["held_delivered"] <= block["held_at_sender"] <= block["sent"]
    _check_latency(block["latency_ms"], block["delivered"])
    assert block["offered_per_s"] == pytest.approx(block["sent"] / block["seconds"], rel=0.01)
    assert block["delivered_per_s"] <= block["offered_per_s"]
    _check_mesh(block["mesh"])


def _check_samples(result: dict) -> None:
    samples = result["samples"]
    assert len(samples) >= 3
    times = [s["t_s"] for s in samples]
    assert times == sorted(times)
    for key in ("sent", "node_delivered", "mesh_delivered"):
        values = [s[key] for s in samples]
        assert values == sorted(values), key  # cumulative counters
    total_sent = result["steady"]["sent"] + result.get("churn", {}).get("sent", 0)
    assert samples[-1]["sent"] == total_sent
    names = [p["name"] for p in result["phases"]]
    assert names[:3] == ["join", "settle", "steady"] and names[-1] == "drain"


def test_spawned_node_reports_consistent_figures(tmp_path: Path) -> None:
    out, plots = tmp_path / "load.json", tmp_path / "plots"
    proc = _bench(
        "--peers", "6", *TINY, "--churn", "1", "--churn-duration", "2",
        "--json", str(out), "--plot", str(plots),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = orjson.loads(out.read_bytes())
    table = proc.stdout.decode()  # the human table goes to stdout, JSON only to the file
    assert "p99 ms" in table and table.count("\nsteady ") == 1 and "generator" in table
    assert "node counters: sessions established " in table

    assert result["bench"] == "load" and result["mode"] == "spawned"
    assert result["measured_at"] == "node"
    for key in ("platform", "python", "cpu_count", "memory_total_bytes", "loadavg"):
        assert key in result["machine"]
    join = result["join"]
    assert join["completed"] and join["joined"] == join["peers"] == 6
    assert join["failures"] == 0 and join["seconds"] > 0
    assert join["node_members_up"] >= 6

    steady = result["steady"]
    assert steady["sent"] > 0
    _check_node_block(steady)
    churn = result["churn"]
    _check_node_block(churn)
    assert churn["left"] >= 1 and churn["joined"] + churn["not_joined_at_end"] == churn["left"]

    assert result["node_foreign_lines"] == 0  # every stdout line was one of ours
    _check_samples(result)
    assert any(s["node_cpu_pct"] is not None for s in result["samples"])
    assert result["resources"]["node_rss_bytes"]["max"] > 0
    assert result["generator"]["datagrams_in"] > 0

    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["load_cpu.png", "load_latency_cdf.png", "load_throughput.png"]
    for name in pngs:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(Path(p).name for p in result["plots"]) == pngs


def test_peers_sharded_over_generator_processes(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = _bench(
        "--peers", "20", "--procs", "2", *TINY, "--churn", "1", "--churn-duration", "2",
        "--json", str(out), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = orjson.loads(out.read_bytes())
    assert result["params"]["procs"] == result["generator_procs"] == 2
    join = result["join"]
    assert join["completed"] and join["joined"] == 20 and join["join_time_s"]["count"] == 20
    for name in ("steady", "churn"):
        block = result[name]
        _check_node_block(block)
        # Each generator process reported its CPU and loop lag in every phase.
        assert sorted(g["process"] for g in block["generator"]) == [0, 1]
        assert block["generator_saturated"] in (True, False)
    _check_samples(result)
    assert {tuple(sorted(g[0] for g in s["gen_procs"])) for s in result["samples"][-3:]} == {(0, 1)}
    assert result["generator"]["peers_created"] >= 20
    roles = {p["role"] for p in result["resources"]["node_processes"]}
    assert "coordinator" in roles
    gens = result["resources"]["generator_processes"]
    assert [g["role"] for g in gens] == ["generator-0", "generator-1"]
    assert all(g["rss_bytes_max"] > 0 and "steady" in g["cpu_pct_mean"] for g in gens)
    steady = result["steady"]
    assert 0 < steady["mesh"]["receivers"] <= 20 and steady["mesh"]["duplicates"] == 0
    assert steady["node_cpu_us_per_delivery"] is None or steady["node_cpu_us_per_delivery"] > 0
    assert "CPU per delivery" in proc.stdout.decode()


def test_target_mode_measures_at_virtual_peers(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_bytes(b"a-test-key-for-bench-load-0123456789\n")
    port = free_udp_port()
    node = subprocess.Popen(
        [
            sys.executable, "-m", "gwyh_mp.cli", "--bind", f"127.0.0.1:{port}",
            "--psk-file", str(key), "--workers", "1", "--log-level", "warning",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        proc = _bench(
            "--target", f"127.0.0.1:{port}", "--psk-file", str(key),
            "--target-pid", str(node.pid), "--peers", "5", *TINY, "--churn", "0",
            "--peer-mode", "full",  # complete nodes: they relay to each other too
            "--json", "-",
        )  # fmt: skip
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(10)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = orjson.loads(proc.stdout[: proc.stdout.rindex(b"}") + 1])  # then the table
    assert result["mode"] == "target" and result["measured_at"] == "virtual-peers"
    assert result["join"]["joined"] == 5
    steady = result["steady"]
    assert steady["measured_at"] == "virtual-peers"
    assert steady["delivered"] == steady["mesh"]["delivered"]
    assert steady["ratio"] == steady["mesh"]["ratio"]
    _check_mesh(steady["mesh"])
    _check_latency(steady["latency_ms"], steady["mesh"]["latency_ms"]["count"])
    assert "churn" not in result
    # --target-pid: the node's CPU and RSS are sampled although we did not start it.
    assert any(s["node_rss_bytes"] for s in result["samples"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "10"], b"--size"),
        (["--target", "127.0.0.1:9"], b"--psk-file"),
        (["--reassign-delay", "3,1"], b"--reassign-delay"),
        (["--peers", "0"], b"--peers"),
    ],
)
def test_rejects_bad_arguments(argv: list[str], message: bytes) -> None:
    proc = _bench(*argv, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stdout == b""


def test_refused_fd_limit_is_one_clear_line() -> None:
    # Far above any kernel's fs.nr_open: setrlimit must refuse even for root.
    proc = _bench("--peers", str(1 << 31), timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "file descriptors" in lines[0]


def test_ensure_fd_limit_keeps_enough() -> None:
    limit = ensure_fd_limit(64)
    assert limit.ok and not limit.raised
    assert limit.soft >= 64 or limit.soft == -1


def test_node_counters_sum_the_receivers_dropped_sends() -> None:
    """The summary's node counters: the core's, plus sends the receivers dropped at a full
    socket buffer (only in their process records)."""
    result = {
        "node": {
            "final_stats": {"sessions_established": 7, "tail_probes_sent": 3, "packets_in": 9},
            "final_process_stats": {
                "coordinator": {"role": "coordinator"},
                "receiver-0": {"role": "receiver-0", "send_dropped": 4},
                "receiver-1": {"role": "receiver-1", "send_dropped": 5},
            },
        }
    }
    assert node_counters(result) == {
        "sessions established": 7,
        "tail probes": 3,
        "sends dropped (socket buffer full)": 9,
    }
    assert node_counters({}) == {}


def test_percentiles_are_nearest_rank() -> None:
    values = [i * 1_000_000 for i in range(1, 1001)]  # 1..1000 ms
    pct = load_report.percentiles_ms(values)
    assert pct["count"] == 1000
    assert (pct["p50"], pct["p90"], pct["p99"], pct["p99_9"], pct["max"]) == (
        500.0,
        900.0,
        990.0,
        999.0,
        1000.0,
    )
    assert load_report.percentiles_ms([])["p50"] is None


def test_default_procs_grow_with_peers_and_rate() -> None:
    assert default_procs(5, 1) == 1
    assert default_procs(1000, 10) <= default_procs(5000, 10) <= default_procs(5000, 100)
    assert default_procs(5000, 10) > 1
    assert default_procs(10**6, 1000) == MAX_DEFAULT_PROCS
    # A full peer relays and keeps the member table: it needs more processes.
    assert default_procs(2000, 10, "light") < default_procs(2000, 10, "full")


def test_light_peers_deliver_everything_and_keep_no_membership() -> None:
    """Light virtual peers (make_light) against a full node, on the fake clock: every
    broadcast reaches every light peer exactly once, the node sees them all UP and
    subscribed, yet a light peer's table never holds more than the node."""
    from bench.virtual_peers import make_light
    from gwyh_mp.config import Config
    from gwyh_mp.protocol.events import Message
    from gwyh_mp.simulation import SimNetwork
    from tests.helpers_core import PSK, addr

    net = SimNetwork(seed=3)
    hub = net.add_node(Config.local(bind=addr(0), psks=[PSK]))
    lights = []
    for i in range(1, 9):
        node = net.add_node(
            Config.local(bind=addr(i), psks=[PSK], bootstrap=[addr(0)], subscriptions=1),
            start=False,
        )
        make_light(node.core)
        node.core.start(net.now)
        net.pump(node)
        lights.append(node)
    net.run_for(10.0)
    assert len(hub.core.members.up_members()) == 8
    assert len(hub.core.subscribers) == 8
    sent = [net.broadcast(addr(0), b"hub %d" % k) for k in range(5)]
    sent.append(net.broadcast(addr(1), b"from a light peer"))
    net.run_for(5.0)
    for node in lights:
        got = [e.id for _, e in node.events if type(e) is Message]
        own = {sent[-1]} if node is lights[0] else set()
        assert sorted(got) == sorted(set(sent) - own)  # each once, none missing
        assert len(node.core.members.members) <= 1  # the node only: floods dropped
        assert not node.core.fanout.pending
    assert sent[-1] in {e.id for _, e in hub.events if type(e) is Message}
