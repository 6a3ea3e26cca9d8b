"""The report of ``bench load``: merges the generator shards' results with what the
parent measured (node deliveries, CPU samples), and renders it as JSON, a table on
stdout and PNG charts.

Kept apart from the driver (bench/load.py) so the measurement loop stays readable and
the figures are computed in one place, after the run, from plain data.
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import drops_between, percentile_summary

if TYPE_CHECKING:
    from bench.load import LoadRun

LATENCY_POINTS = (50, 90, 99, 99.9)
SAMPLE_S = 1.0
# A generator process above either bound cannot keep its own timing: the latencies it
# measures then include its queueing, not only the node's.
SATURATED_CPU_PCT = 90.0
SATURATED_LAG_MS = 50.0
# One colour per role, the same in every chart.
COLORS = {
    "node": "tab:blue",
    "generator": "tab:orange",
    "tap": "tab:gray",
    "sent": "tab:purple",
    "peers": "tab:green",
}


def percentiles_ms(values_ns: array | list[int]) -> dict[str, float | int | None]:
    """Nearest-rank latency percentiles of ns samples, in ms."""
    return percentile_summary(values_ns, LATENCY_POINTS, scale=1e-6)


def spread_s(xs: list[float]) -> dict[str, float | int | None]:
    """Spread of durations in seconds."""
    return percentile_summary(xs, (50, 90, 99))


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _per_s(count: int, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


class Merged:
    """The shards' send logs and receipts, indexed by broadcast sequence number."""

    def __init__(self, run: LoadRun) -> None:
        self.run = run
        self.send_ns: dict[int, int] = {}
        self.held: dict[int, int] = {}
        for r in run.results:
            seqs, sends = array("q"), array("q")
            seqs.frombytes(r.send_seqs)
            sends.frombytes(r.send_ns)
            for seq, ns, held in zip(seqs, sends, r.held, strict=True):
                self.send_ns[seq] = ns
                self.held[seq] = held
        churn = run.churn_start_ns
        ordered = sorted((ns, seq) for seq, ns in self.send_ns.items())
        self.phase_sends: tuple[list[tuple[int, int]], list[tuple[int, int]]] = (
            [x for x in ordered if churn is None or x[0] < churn],
            [x for x in ordered if churn is not None and x[0] >= churn],
        )
        self.mesh_lat: tuple[array, array] = (array("q"), array("q"))
        for r in run.results:
            for which in (0, 1):
                self.mesh_lat[which].frombytes(r.mesh_latency_ns[which])

    def node_block(self, which: int, seconds: float) -> dict[str, Any]:
        arrival = self.run.node_arrival
        lat: list[int] = []
        held = held_delivered = 0
        for ns, seq in self.phase_sends[which]:
            got = arrival[seq] if seq < len(arrival) else 0
            if got:
                lat.append(got - ns)
            if self.held[seq]:
                held += 1
                held_delivered += 1 if got else 0
        sent, delivered = len(self.phase_sends[which]), len(lat)
        return {
            "sent": sent,
            "delivered": delivered,
            "missing": sent - delivered,
            "ratio": ratio(delivered, sent),
            "held_at_sender": held,
            "held_delivered": held_delivered,
            "ratio_sender_had_subscribers": ratio(delivered - held_delivered, sent - held),
            "duplicates": self.run.node_dups[which],
            "latency_ms": percentiles_ms(lat),
            "offered_per_s": _per_s(sent, seconds),
            "delivered_per_s": _per_s(delivered, seconds),
        }

    def mesh_block(self, which: int, seconds: float) -> dict[str, Any]:
        """Over peers alive at the end, for broadcasts sent after each one joined."""
        sends = self.phase_sends[which]
        times = [ns for ns, _ in sends]
        expected = delivered = receivers = 0
        for r in self.run.results:
            for joined_ns, received, own in r.receivers:
                start = bisect.bisect_left(times, joined_ns)
                if start >= len(sends):
                    continue
                receivers += 1
                own_set = set(own)
                n = len(received)
                for _, seq in sends[start:]:
                    if seq in own_set:
                        continue
                    expected += 1
                    if seq < n and received[seq]:
                        delivered += 1
        lat = self.mesh_lat[which]
        return {
            "receivers": receivers,
            "expected": expected,
            "delivered": delivered,
            "missing": expected - delivered,
            "ratio": ratio(delivered, expected),
            "duplicates": sum(r.mesh_duplicates[which] for r in self.run.results),
            # Every delivery at any peer (also at peers that later left).
            "latency_ms": percentiles_ms(lat),
            "deliveries_per_s": round(len(lat) / seconds, 1) if seconds > 0 else None,
        }


def _mark_delta(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None or x < 0 or y < 0 else y - x


def _cpu_pct(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    used, seconds = _mark_delta(a, b, key), b["t"] - a["t"]
    return round(100 * used / seconds, 1) if used is not None and seconds > 0 else None


def generator_load(run: LoadRun, phases: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per generator process over ``phases``: CPU %, worst loop lag, saturation."""
    per: dict[int, list[tuple[float, float]]] = {}
    for s in run.samples:
        if s["phase"] in phases:
            for shard, cpu, lag, _ in s["gen_procs"]:
                per.setdefault(shard, []).append((cpu, lag))
    out = []
    for shard in sorted(per):
        cpus = sorted(c for c, _ in per[shard])
        lags = sorted(lag for _, lag in per[shard])
        cpu_mean = round(sum(cpus) / len(cpus), 1)
        lag_p90 = percentile_summary(lags, (90,))["p90"]
        out.append(
            {
                "process": shard,
                "cpu_pct_mean": cpu_mean,
                "cpu_pct_max": cpus[-1],
                "loop_lag_ms_p90": lag_p90,
                "loop_lag_ms_max": lags[-1],
                "saturated": cpu_mean >= SATURATED_CPU_PCT or (lag_p90 or 0) >= SATURATED_LAG_MS,
            }
        )
    return out


def build_report(
    args: argparse.Namespace, run: LoadRun, measured: dict[str, Any], roles: dict[int, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {"generator_procs": run.procs}
    marks: list[dict[str, Any]] = measured.get("marks", [])
    if "join" in measured:
        join = dict(measured["join"])
        join["join_time_s"] = spread_s([x for r in run.results for x in r.join_s])
        if len(marks) >= 2:
            join["node_cpu_pct"] = _cpu_pct(marks[0], marks[1], "node_cpu")
            join["generator_cpu_pct"] = _cpu_pct(marks[0], marks[1], "gen_cpu")
        join["generator"] = generator_load(run, ("join",))
        out["join"] = join
    seconds: dict[str, float] = measured.get("seconds", {})
    if seconds and run.results:
        merged = Merged(run)
        primary = "node" if run.node is not None else "virtual-peers"
        # marks: start, joined, settled, steady end, (churn end)
        for which, name in enumerate(("steady", "churn")):
            if name not in seconds:
                continue
            secs = seconds[name]
            mesh = merged.mesh_block(which, secs)
            if run.node is not None:
                block: dict[str, Any] = {
                    "seconds": round(secs, 3),
                    **merged.node_block(which, secs),
                }
            else:
                sent = len(merged.phase_sends[which])
                block = {
                    "seconds": round(secs, 3),
                    "sent": sent,
                    **{k: mesh[k] for k in ("delivered", "expected", "missing", "ratio")},
                    "duplicates": mesh["duplicates"],
                    "latency_ms": mesh["latency_ms"],
                    "offered_per_s": _per_s(sent, secs),
                    "held_at_sender": sum(merged.held[s] for _, s in merged.phase_sends[which]),
                }
            block["measured_at"] = primary
            block["mesh"] = mesh
            a, b = marks[2 + which], marks[3 + which]
            # Full receive buffers on the node's port (/proc/net/udp; when the node runs
            # on this host). RcvbufErrors in /proc/net/snmp counts every process.
            block["node_udp_drops"] = drops_between(a["node_drops"], b["node_drops"])
            block["system_udp_rcvbuf_errors"] = _mark_delta(a, b, "rcvbuf")
            block["node_cpu_pct"] = _cpu_pct(a, b, "node_cpu")
            block["generator_cpu_pct"] = _cpu_pct(a, b, "gen_cpu")
            block["generator"] = generator_load(run, (name,))
            block["generator_saturated"] = any(g["saturated"] for g in block["generator"])
            # CPU per delivery (one message to one peer): for the node under test this is
            # its cost per message per subscriber.
            per_s = mesh["deliveries_per_s"]
            for role, key in (("node", "node_cpu_pct"), ("generator", "generator_cpu_pct")):
                pct = block[key]
                block[f"{role}_cpu_us_per_delivery"] = (
                    round(pct * 1e4 / per_s, 1) if pct is not None and per_s else None
                )
            if name == "churn":
                rejoin = [x for r in run.results for x in r.rejoin_s]
                left = sum(r.churn_left for r in run.results)
                spawned = sum(r.churn_spawned for r in run.results)
                block.update(
                    {
                        "rate": args.churn,
                        "mode": args.churn_mode,
                        "left": left,
                        "joined": len(rejoin),
                        # Joining takes seconds: the last few spawned may still be at it.
                        "not_joined_at_end": spawned - len(rejoin),
                        "rejoin_s": spread_s(rejoin),
                    }
                )
            out[name] = block
    out["resources"] = resources(run, roles)
    totals: dict[str, Any] = {}
    for r in run.results:
        for key, value in r.driver.items():
            totals[key] = (
                max(totals.get(key, 0), value)
                if key.startswith("max")
                else (totals.get(key, 0) + value)
            )
    totals["max_tick_lag_ms"] = round(totals.pop("max_tick_lag_s", 0.0) * 1000, 2)
    totals["mesh_foreign_messages"] = sum(r.mesh_foreign for r in run.results)
    totals["peers_created"] = sum(r.peers_created for r in run.results)
    out["generator"] = totals
    if run.node is not None:
        out["node_foreign_lines"] = run.node_foreign
    out["phases"] = run.phases
    out["samples"] = run.samples
    if run.error:
        out["error"] = run.error
    return out


def resources(run: LoadRun, roles: dict[int, str]) -> dict[str, Any]:
    def series(key: str, phases: tuple[str, ...]) -> dict[str, float | None]:
        xs = [s[key] for s in run.samples if s["phase"] in phases and s[key] is not None]
        if not xs:
            return {"mean": None, "max": None}
        return {"mean": round(sum(xs) / len(xs), 1), "max": max(xs)}

    load = ("steady", "churn")
    everything = ("join", "settle", *load, "drain")
    return {
        "node_cpu_pct": {p: series("node_cpu_pct", (p,)) for p in ("join", *load)},
        "node_rss_bytes": series("node_rss_bytes", everything),
        "generator_cpu_pct": {p: series("gen_cpu_pct", (p,)) for p in ("join", *load)},
        "generator_rss_bytes": series("gen_rss_bytes", everything),
        "tap_cpu_pct": series("tap_cpu_pct", load),
        # All CPUs together (100 = every core busy): other processes count too.
        "system_cpu_pct": {p: series("system_cpu_pct", (p,)) for p in ("join", *load)},
        "loop_lag_ms": {p: series("loop_lag_ms", (p,)) for p in ("join", *load)},
        "node_processes": node_processes(run, roles),
        "generator_processes": generator_processes(run),
    }


def generator_processes(run: LoadRun) -> list[dict[str, Any]]:
    """CPU % per phase and the largest RSS of each generator process."""
    per: dict[int, list[tuple[float, int, str]]] = {}
    for sample in run.samples:
        for shard, pct, _lag, rss in sample["gen_procs"]:
            per.setdefault(shard, []).append((pct, rss, sample["phase"]))
    out = []
    for shard, rows in sorted(per.items()):
        cpu: dict[str, float] = {}
        for phase in ("join", "steady", "churn"):
            xs = [c for c, _, p in rows if p == phase]
            if xs:
                cpu[phase] = round(sum(xs) / len(xs), 1)
        out.append(
            {
                "role": f"generator-{shard}",
                "cpu_pct_mean": cpu,
                "rss_bytes_max": max(r for _, r, _ in rows),
            }
        )
    return out


def node_processes(run: LoadRun, roles: dict[int, str]) -> list[dict[str, Any]]:
    """CPU % and RSS of each process of the node under test, by role, over the run."""
    per: dict[int, list[tuple[float, int, str]]] = {}
    for sample in run.samples:
        for pid, pct, rss in sample["node_procs"]:
            per.setdefault(pid, []).append((pct, rss, sample["phase"]))
    out = []
    for pid, xs in per.items():

        def mean(phase: str, rows: list[tuple[float, int, str]] = xs) -> float | None:
            cpus = [c for c, _, p in rows if p == phase]
            return round(sum(cpus) / len(cpus), 1) if cpus else None

        out.append(
            {
                "pid": pid,
                "role": roles.get(pid, "node"),
                "cpu_pct_mean": {p: mean(p) for p in ("join", "steady", "churn")},
                "cpu_pct_max": max(c for c, _, _ in xs),
                "rss_bytes_max": max(r for _, r, _ in xs),
                "samples": len(xs),
            }
        )
    return out


# ---------------------------------------------------------------------------- table


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# (label, key) of the node's own counters worth a line in the summary: the per-message cost
# they explain (extra sessions, tail probes, repairs) and what it dropped.
NODE_COUNTERS = (
    ("sessions established", "sessions_established"),
    ("tail probes", "tail_probes_sent"),
    ("NAKs received", "naks_received"),
    ("retransmits", "retransmits"),
    ("shed", "shed_datagrams"),
)


def node_counters(result: dict[str, Any]) -> dict[str, int]:
    """The node's final counters (NODE_COUNTERS), with the receivers' sends dropped at a
    full socket buffer summed over its processes (they are not in the core's stats)."""
    node = result.get("node") or {}
    stats = node.get("final_stats") or {}
    out = {label: int(stats.get(key) or 0) for label, key in NODE_COUNTERS if key in stats}
    procs = node.get("final_process_stats") or {}
    if procs:
        out["sends dropped (socket buffer full)"] = sum(
            int(r.get("send_dropped") or 0) for r in procs.values()
        )
    return out


def print_summary(result: dict[str, Any], out: Any = None) -> None:
    """The human table, on stdout."""
    out = out or sys.stdout
    p = result["params"]
    join = result.get("join", {})
    lines = [
        f"bench load: {p['peers']} virtual peers in {p['procs']} generator processes against "
        f"{result.get('target')} ({result.get('mode')} node; delivery measured at "
        f"{result.get('measured_at')})",
    ]
    if join:
        jt = join.get("join_time_s", {})
        lines.append(
            f"join: {join.get('joined')} of {join.get('peers')} peers in "
            f"{_fmt(join.get('seconds'), 1)} s; per peer p50 {_fmt(jt.get('p50'), 2)} s, "
            f"p99 {_fmt(jt.get('p99'), 2)} s; node CPU {_fmt(join.get('node_cpu_pct'))} %, "
            f"generator CPU {_fmt(join.get('generator_cpu_pct'))} %"
        )
    heads = (
        ("phase", 6), ("sent", 7), ("delivered", 10), ("ratio", 7), ("dups", 5),
        ("p50 ms", 8), ("p99 ms", 8), ("max ms", 8), ("peers ratio", 11),
        ("node CPU %", 10), ("gen CPU %", 9), ("gen lag p90 ms", 14),
    )  # fmt: skip
    rows = []
    for name in ("steady", "churn"):
        b = result.get(name)
        if not b:
            continue
        lat = b["latency_ms"]
        lag = max((g["loop_lag_ms_p90"] or 0 for g in b["generator"]), default=None)
        rows.append(
            (
                name, b["sent"], b["delivered"], _fmt(b["ratio"], 4), b["duplicates"],
                _fmt(lat["p50"], 1), _fmt(lat["p99"], 1), _fmt(lat["max"], 1),
                _fmt(b["mesh"]["ratio"], 4), _fmt(b["node_cpu_pct"]),
                _fmt(b["generator_cpu_pct"]), _fmt(lag),
            )
        )  # fmt: skip
    if rows:
        lines.append("  ".join(h.rjust(w) for h, w in heads))
        for row in rows:
            lines.append("  ".join(str(v).rjust(w) for v, (_, w) in zip(row, heads, strict=True)))
    for name in ("steady", "churn"):
        b = result.get(name)
        if not b:
            continue
        busy = [g for g in b["generator"] if g["saturated"]]
        if busy:
            worst = max(busy, key=lambda g: (g["loop_lag_ms_p90"] or 0, g["cpu_pct_mean"]))
            system = result.get("resources", {}).get("system_cpu_pct", {}).get(name, {})
            starved = (
                f"; the machine was busy (all CPUs {system['mean']:.0f} %), so it was "
                "starved of CPU"
                if system.get("mean") is not None and system["mean"] >= SATURATED_CPU_PCT
                else ""
            )
            lines.append(
                f"{name}: GENERATOR SATURATED (process {worst['process']}: CPU "
                f"{worst['cpu_pct_mean']:.0f} %, loop lag p90 {_fmt(worst['loop_lag_ms_p90'])} "
                f"ms{starved}): the latency above includes the generator's own queueing, it "
                "is not the node's; use more --procs, fewer --peers or a quieter machine"
            )
        elif b["generator"]:
            top = max(g["cpu_pct_mean"] for g in b["generator"])
            lines.append(f"{name}: generator not saturated (busiest process {top:.0f} % CPU)")
    for name in ("steady", "churn"):
        b = result.get(name)
        if b and b.get("node_cpu_us_per_delivery") is not None:
            lines.append(
                f"{name}: peers' latency p50 {_fmt(b['mesh']['latency_ms']['p50'], 1)} ms, p99 "
                f"{_fmt(b['mesh']['latency_ms']['p99'], 1)} ms over "
                f"{_fmt(b['mesh']['deliveries_per_s'])} deliveries/s; CPU per delivery: node "
                f"{_fmt(b['node_cpu_us_per_delivery'], 1)} us, generator "
                f"{_fmt(b['generator_cpu_us_per_delivery'], 1)} us"
            )
    counters = node_counters(result)
    if counters:
        lines.append("node counters: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    res = result.get("resources", {})
    procs = res.get("node_processes", []) + res.get("generator_processes", [])
    if procs:
        lines.append("CPU % (join / steady / churn) and max RSS per process:")
        for x in procs:
            cpu = x["cpu_pct_mean"]
            lines.append(
                f"  {x['role']:>16}  "
                + " / ".join(_fmt(cpu.get(p)) for p in ("join", "steady", "churn"))
                + f" %  {x['rss_bytes_max'] >> 20} MiB"
            )
    if "error" in result:
        lines.append(f"error: {result['error']}")
    out.write("\n".join(lines) + "\n")
    out.flush()


# ---------------------------------------------------------------------------- plots


def plot(result: dict[str, Any], run: LoadRun, roles: dict[int, str], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    title = f"bench load: {result['params']['peers']} virtual peers"
    paths = [
        _latency_cdf(plt, run, target, title),
        _throughput(plt, result, target, title),
        _cpu(plt, result, roles, target, title),
    ]
    return paths


def _latency_cdf(plt: Any, run: LoadRun, target: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    merged = Merged(run) if run.results else None
    series: list[tuple[str, str, str, list[float]]] = []
    if merged is not None and run.node is not None:
        for which, name in enumerate(("steady", "churn")):
            xs = [
                (run.node_arrival[seq] - ns) / 1e6
                for ns, seq in merged.phase_sends[which]
                if seq < len(run.node_arrival) and run.node_arrival[seq]
            ]
            series.append(
                (f"node under test, {name}", COLORS["node"], "-" if which == 0 else "--", xs)
            )
    if merged is not None:
        for which, name in enumerate(("steady", "churn")):
            xs = [x / 1e6 for x in merged.mesh_lat[which]]
            style = "-" if which == 0 else "--"
            series.append((f"virtual peers, {name}", COLORS["peers"], style, xs))
    for label, color, style, xs in series:
        if not xs:
            continue
        xs.sort()
        n = len(xs)
        ax.plot(xs, [(i + 1) / n for i in range(n)], color=color, linestyle=style,
                label=f"{label} (n={n})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("latency, send to delivery (ms)")
    ax.set_ylabel("fraction delivered within")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{title}, latency CDF")
    return _save(fig, target / "load_latency_cdf.png", plt)


def _rates(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    # Per-interval rates; an interval much shorter than the sampling period (the final
    # sample) is merged into the next, or its rate would be pure noise.
    xs, ys = [samples[0]["t_s"]], [0.0]
    anchor = samples[0]
    for s in samples[1:]:
        dt = s["t_s"] - anchor["t_s"]
        if dt >= SAMPLE_S / 2:
            xs.append(s["t_s"])
            ys.append((s[key] - anchor[key]) / dt)
            anchor = s
    return xs, ys


def _throughput(plt: Any, result: dict[str, Any], target: Path, title: str) -> str:
    samples = result["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(*_rates(samples, "sent"), color=COLORS["sent"], label="sent by the generator")
    if result.get("mode") == "spawned":
        ax1.plot(*_rates(samples, "node_delivered"), color=COLORS["node"],
                 label="delivered at the node under test")  # fmt: skip
    ax1.set_ylabel("broadcasts / s")
    ax1.legend(loc="lower left")
    ax2.plot(*_rates(samples, "mesh_delivered"), color=COLORS["peers"],
             label="deliveries at virtual peers")  # fmt: skip
    ax2.set_ylabel("deliveries / s")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="lower left")
    # Nothing is sent during the join: start the time axis where sending does.
    load_start = next((p["start_s"] for p in result["phases"] if p["name"] == "settle"), 0.0)
    for ax in (ax1, ax2):
        _phase_lines(ax, result["phases"])
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=load_start)
    ax1.set_title(f"{title}, throughput")
    return _save(fig, target / "load_throughput.png", plt)


def _cpu(plt: Any, result: dict[str, Any], roles: dict[int, str], target: Path, title: str) -> str:
    samples = result["samples"]
    t = [s["t_s"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    styles = ("-", "--", ":", "-.")

    def nan(ys: list[Any], scale: float = 1.0) -> list[float]:
        return [math.nan if y is None else y / scale for y in ys]

    node_pids = sorted({p[0] for s in samples for p in s["node_procs"]})
    for i, pid in enumerate(node_pids):
        rows = [next((p for p in s["node_procs"] if p[0] == pid), None) for s in samples]
        label = f"node: {roles.get(pid, f'process {pid}')}"
        style = styles[i % len(styles)]
        ax1.plot(t, nan([r and r[1] for r in rows]), color=COLORS["node"], linestyle=style,
                 label=label)  # fmt: skip
        ax2.plot(t, nan([r and r[2] for r in rows], 2**20), color=COLORS["node"],
                 linestyle=style, label=label)  # fmt: skip
    shards = sorted({g[0] for s in samples for g in s["gen_procs"]})
    for i, shard in enumerate(shards):
        rows = [next((g for g in s["gen_procs"] if g[0] == shard), None) for s in samples]
        label = f"generator {shard}"
        style = styles[i % len(styles)]
        ax1.plot(t, nan([r and r[1] for r in rows]), color=COLORS["generator"],
                 linestyle=style, label=label)  # fmt: skip
        ax2.plot(t, nan([r and r[3] for r in rows], 2**20), color=COLORS["generator"],
                 linestyle=style, label=label)  # fmt: skip
    if any(s["tap_cpu_pct"] is not None for s in samples):
        ax1.plot(t, nan([s["tap_cpu_pct"] for s in samples]), color=COLORS["tap"],
                 label="stdout tap")  # fmt: skip
    ax1.set_ylabel("CPU % (100 = one core)")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_xlabel("time (s)")
    for ax in (ax1, ax2):
        _phase_lines(ax, result["phases"])
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left", fontsize=7)
    ax1.set_title(f"{title}, CPU and memory per process")
    return _save(fig, target / "load_cpu.png", plt)


def _phase_lines(ax: Any, phases: list[dict[str, Any]]) -> None:
    for i, phase in enumerate(phases[1:]):
        ax.axvline(phase["start_s"], color="grey", linestyle=":", linewidth=1)
        ax.text(
            phase["start_s"],
            1.0 - 0.06 * (i % 2),  # staggered: short phases sit close together
            f" {phase['name']}",
            transform=ax.get_xaxis_transform(),
            fontsize=8,
            va="top",
            color="grey",
        )


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
