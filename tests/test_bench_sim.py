"""`python -m bench sim` and the simulation features it relies on, on tiny clusters.

Structure and internal consistency only (never speed): every number a run reports must
agree with the others, and a seed must give the same results in another process (a
different PYTHONHASHSEED catches set-order dependence anywhere in the core or the bench).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import sim
from bench.__main__ import main
from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Event, Message
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.protocol.wire import MemberState
from gwyh_mp.simulation import SimNetwork, SimNode, constant_link

REPO = Path(__file__).resolve().parents[1]
KEY = b"test-bench-sim-key-0123456789abc"

# Fast protocol clocks keep failure detection and false-positive windows short.
FAST = ["--heartbeat-interval", "1", "--interval", "0.5", "--detect-timeout", "20"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "sim.json"
    assert main(["sim", *FAST, "--json", str(out), *extra]) == 0
    return orjson.loads(out.read_bytes())


def _check_strategy(s: dict, nodes: int, losses: list[float], killed: int) -> None:
    join = s["join"]
    assert join["converged"] and join["full_views"] == nodes
    assert join["providers"]["min"] == join["providers"]["max"] == 5
    assert [b["loss"] for b in s["broadcasts"]] == losses
    for phase in s["broadcasts"]:
        _check_broadcasts(phase, nodes)
    _check_membership(s, nodes, killed)


def _check_broadcasts(phase: dict, nodes: int) -> None:
    loss = phase["loss"]
    per = phase["per_broadcast"]
    assert per
    for b in per:
        assert b["targets"] == nodes - 1
        assert 0 <= b["delivered"] <= b["targets"]
        assert b["reliability"] == pytest.approx(b["delivered"] / b["targets"])
        assert b["copies"] <= b["packets"]
        assert b["cross_zone_packets"] <= b["packets"]
        if b["origin_subscribers"] == 0:
            # Nobody subscribes to it, so its broadcast has nowhere to go (core behaviour).
            assert b["delivered"] == 0 and b["packets"] == 0
            continue
        if loss == 0:
            assert b["reliability"] == 1.0
            assert b["copies"] == b["packets"]  # nothing lost, nobody dead yet
        if b["delivered"]:
            assert b["redundancy"] == pytest.approx(b["copies"] / b["delivered"] - 1, abs=1e-6)
            assert b["redundancy"] >= 0
            assert 1 <= b["mean_hop"] <= b["last_hop"]
        if b["t100_s"] is not None:
            assert b["delivered"] == b["targets"]
            assert 0 < b["t99_s"] <= b["t100_s"]
        if b["t99_s"] is not None:
            assert b["delivered"] >= math.ceil(0.99 * b["targets"])
    agg = phase["aggregate"]
    rel = agg["reliability"]
    assert rel["n"] == len(per)
    assert rel["min"] <= rel["p50"] <= rel["p99"] <= rel["max"]
    assert rel["mean"] == pytest.approx(sum(b["reliability"] for b in per) / len(per), abs=1e-6)
    cov = phase["coverage"]
    assert cov["mean"] == sorted(cov["mean"]) and cov["t_s"] == sorted(cov["t_s"])
    assert cov["mean"][-1] == pytest.approx(rel["mean"], abs=1e-6)
    assert all(lo <= m + 1e-9 for lo, m in zip(cov["min"], cov["mean"], strict=True))
    assert phase["cross_zone_datagrams"] <= phase["datagrams"]
    assert phase["speed"]["sim_s"] > 0


def _check_membership(s: dict, nodes: int, killed: int) -> None:
    d = s["detection"]
    assert d["killed"] == killed == len(d["per_node"])
    for k in d["per_node"]:
        assert k["observers"] == nodes - killed
        assert k["detected_by"] <= k["observers"]
        if k["all_s"] is not None:
            assert k["detected_by"] == k["observers"]
            assert 0 < k["first_s"] <= k["p50_s"] <= k["all_s"] <= 20
    for f in s["false_positives"]:
        assert f["down_events"] >= f["accused_nodes"] >= 0
        assert f["speed"]["sim_s"] == pytest.approx(f["quiet_s"])
    for phase in ("join", "detection"):
        speed = s[phase]["speed"]
        assert speed["sim_s"] >= 0 and speed["wall_s"] >= 0 and speed["cpu_s"] >= 0
    net = s["network"]
    assert net["datagrams_delivered"] + net["datagrams_dropped"] <= net["datagrams_sent"]


def test_200_nodes_warm_start_reports_consistent_numbers(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        *("--nodes", "200", "--strategy", "uniform", "--join", "warm", "--broadcasts", "4"),
        *("--kill", "2", "--fp-loss", "0,0.2", "--fp-seconds", "4"),
    )
    assert result["params"]["join_mode"] == "warm"
    assert "cpu_model" in result["machine"]
    s = result["strategies"]["uniform"]
    _check_strategy(s, nodes=200, losses=[0.0], killed=2)
    d = s["detection"]
    assert d["complete"] == 2  # every live node learned of both crashes
    # Detection (LAN preset) needs a whole probe (8 PINGs 0.1 s apart) before anyone
    # suspects, and at most the longest suspicion (6 s) plus a probe period and the flood.
    lan = Config.lan(psks=[b"k" * 32]).validate()
    window = lan.probe_attempts * (lan.probe_timeout_s or 0)
    assert window <= d["all_s"]["max"] < (lan.suspicion_max_s or 0) + window + 1.0
    no_loss, heavy = s["false_positives"]
    assert (no_loss["loss"], heavy["loss"]) == (0.0, 0.2)
    assert no_loss["down_events"] == 0 and no_loss["refutations"] == 0


def test_one_cluster_several_loss_levels(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        *("--nodes", "120", "--strategy", "prefer-local", "--join", "warm"),
        *("--broadcasts", "4", "--loss", "0,0.1", "--kill", "1", "--fp-loss", ""),
    )
    s = result["strategies"]["prefer-local"]
    _check_strategy(s, nodes=120, losses=[0.0, 0.1], killed=1)
    lossy = [b for b in s["broadcasts"][1]["per_broadcast"] if b["origin_subscribers"]]
    # 10 % of datagrams vanish: fewer copies arrive than were sent.
    assert sum(b["copies"] for b in lossy) < sum(b["packets"] for b in lossy)
    assert s["false_positives"] == []


def _cli(tmp_path: Path, name: str, hash_seed: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "sim", *FAST, "--json", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return orjson.loads(out.read_bytes()), proc.stdout.decode()  # the table on stdout


def test_same_seed_same_results_in_another_process(tmp_path: Path) -> None:
    args = (
        *("--nodes", "40", "--strategy", "all", "--join", "real", "--broadcasts", "2"),
        *("--kill", "1", "--fp-loss", "0.2", "--fp-seconds", "3", "--loss", "0.05"),
    )
    first, table = _cli(tmp_path, "a", "1", *args, "--plot", str(tmp_path / "plots"))
    second, _ = _cli(tmp_path, "b", "2", *args)
    assert sim.strip_wall(first) == sim.strip_wall(second)
    assert list(first["strategies"]) == [s.value for s in Strategy]
    for name, s in first["strategies"].items():
        assert name in table
        assert s["join"]["mode"] == "real"
        _check_strategy(s, nodes=40, losses=[0.05], killed=1)
    (png,) = first["plots"]
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = [("uniform" if a == "all" else a) for a in args]
    assert main(["sim", *FAST, "--json", str(tmp_path / "c.json"), *one, "--seed", "2"]) == 0
    other = orjson.loads((tmp_path / "c.json").read_bytes())["strategies"]["uniform"]
    assert sim.strip_wall(other) != sim.strip_wall(first["strategies"]["uniform"])


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--nodes", "1"]) == 2
    assert main(["sim", "--loss", "1.5"]) == 2
    assert main(["sim", "--loss", "x"]) == 2
    assert main(["sim", "--subscriptions", "0"]) == 2  # the Config's own check
    assert "bench sim:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pieces


def test_zone_link_latency_and_loss() -> None:
    a, b, c = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.1.0.1", 7000)
    zone_of = {a: 0, b: 0, c: 1}
    link = sim.ZoneLink(zone_of, dist="constant", local_s=0.001, cross_s=0.02, jitter=0.0, loss=0.0)
    rng = random.Random(1)
    assert link(a, b, rng) == 0.001 and link(a, c, rng) == 0.02
    link.dist, link.jitter = "uniform", 0.5
    assert all(0.0005 <= link(a, b, rng) <= 0.0015 for _ in range(200))
    link.dist = "lognormal"
    cross = sorted(link(a, c, rng) for _ in range(2001))  # type: ignore[type-var]
    assert cross[1000] == pytest.approx(0.02, rel=0.1)  # the median is the base
    link.loss = 0.3
    lost = sum(link(a, b, rng) is None for _ in range(10_000))
    assert 2700 < lost < 3300


def test_percentiles_and_summaries() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert sim.percentile(xs, 50) == 50 and sim.percentile(xs, 99) == 99
    assert sim.percentile([7.0], 99) == 7
    s = sim.summarize([3.0, None, 1.0, 2.0])
    assert s == {"n": 3, "missing": 1, "mean": 2.0, "p50": 2.0, "p99": 3.0, "min": 1.0, "max": 3.0}
    assert sim.summarize([None])["mean"] is None


def test_broadcast_result_definitions() -> None:
    t = sim.Tracked(0, ("10.0.0.1", 7000), 5, 1.0, targets=100)
    t.times = [0.01 * (i + 1) for i in range(100)]
    t.hops = [1] * 50 + [2] * 49 + [4]
    t.copies, t.packets, t.cross_zone = 450, 460, 40
    r = sim.broadcast_result(t)
    assert r["reliability"] == 1.0
    assert r["t99_s"] == pytest.approx(0.99) and r["t100_s"] == pytest.approx(1.0)
    assert r["last_hop"] == 4 and r["redundancy"] == pytest.approx(3.5)
    t.times.pop()
    r = sim.broadcast_result(t)
    assert r["t100_s"] is None and r["t99_s"] == pytest.approx(0.99)
    assert r["reliability"] == pytest.approx(0.99)


def test_warm_start_converges_with_real_sessions() -> None:
    net = SimNetwork(seed=3, link=constant_link(0.002), keep_events=False)
    configs = [
        Config.lan(
            bind=(f"10.{i % 3}.0.{i + 1}", 7000),
            psks=[KEY],
            zone=f"z{i % 3}",
            strategy=Strategy.HUB_AND_SPOKE,
            seed=3,
        )
        for i in range(30)
    ]
    nodes = net.warm_start(configs, spread_s=1.0)
    ids = {n.core.node_id for n in nodes}
    for node in nodes:
        core = node.core
        up = {m.node_id for m in core.members.members.values() if m.state == MemberState.UP}
        assert up == ids - {core.node_id}
        assert core.providers and all(st.confirmed for st in core.providers.values())
        zones = [core.members.get(p).zone for p in core.providers]  # type: ignore[union-attr]
        assert len(set(zones)) == 3  # hub-and-spoke: one provider per remote zone, and locals
        for p in core.providers:  # a real session both ways, and the provider serves us
            assert core.links[p].session is not None
            provider = core.members.get(p)
            assert provider is not None
            assert core.node_id in net.nodes[provider.host, provider.port].core.subscribers
        # Every view agreed from the start: each anti-entropy answer was one record.
        assert core.stats.get("peer_records_sent", 0) == core.stats.get("peer_syncs_answered", 0)
    origin = next(n for n in nodes if n.core.subscribers)
    got: list[tuple[str, int]] = []

    def on_event(node: SimNode, event: Event) -> None:
        if isinstance(event, Message) and event.id == msg:
            got.append(node.addr)

    net.on_event = on_event
    msg = net.broadcast(origin.addr, b"warm")
    net.run_for(1.0)
    assert sorted(got) == sorted(n.addr for n in nodes if n is not origin)


def test_dissemination_both_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(
        tmp_path,
        *("--nodes", "24", "--strategy", "uniform", "--dissemination", "both"),
        *("--senders", "2", "--warmup", "8", "--broadcasts", "6", "--loss", "0,0.1"),
        *("--crash", "2", "--kill", "0", "--fp-loss", ""),
    )
    eager, trees = result["strategies"]["uniform/eager"], result["strategies"]["uniform/trees"]
    assert eager["dissemination"] == "eager" and trees["dissemination"] == "trees"
    for s in (eager, trees):
        assert [b["crashed"] for b in s["broadcasts"]] == [0, 2]
        for phase in s["broadcasts"]:
            assert phase["per_broadcast"][0]["targets"] == 24 - 1 - phase["crashed"]
            assert phase["aggregate"]["t50_s"]["n"] > 0
    # Steady-state trees cut the copies eager push makes.
    redundancy = [s["broadcasts"][0]["aggregate"]["redundancy"]["mean"] for s in (eager, trees)]
    assert redundancy[1] < redundancy[0]
    assert "t99 p50" in capsys.readouterr().out
