"""`python -m bench sim`: the real sans-IO protocol core, thousands of nodes, one process.

Every node is a real ``NodeCore`` (handshakes, X25519, XSalsa20-Poly1305, membership,
selection, fanout, loss repair); only the network is simulated (``gwyh_mp.simulation``):
a seeded discrete-event heap with a latency distribution per zone pair and loss. The
same ``--seed`` gives the same JSON byte for byte, wall-clock and CPU fields aside.

For each strategy (``--strategy all``: uniform, hub-and-spoke, prefer-local,
prefer-remote) a fresh cluster of ``--nodes`` runs these phases:

1. join, loss-free: ``real`` (node i starts at i / ``--join-rate`` and bootstraps
   through a seed and a random earlier node: every join is flooded, so O(N^2)) or
   ``warm`` (``SimNetwork.warm_start``: membership filled in, providers picked by each
   node's own selection over everyone, handshakes and subscriptions over the network).
   ``auto``: real up to 300 nodes.
2. one broadcast phase per ``--loss`` level: ``--broadcasts`` messages from random live
   nodes, ``--interval`` apart. Per broadcast: reliability (share of the other live
   nodes that delivered it), time to 99 % and 100 % of them, last delivery hop,
   redundancy (datagram copies of it received by any node / deliveries - 1), datagrams
   and cross-zone datagrams carrying it (sent, lost ones included).
3. failure detection at the last ``--loss`` level: ``--kill`` random nodes crash; time
   until the first and until every live node holds a MemberDown for each.
4. false positives: ``--fp-seconds`` simulated seconds at each ``--fp-loss`` level; every
   MemberDown about a live node counts, with refutations and DOWN views left at the end.

``--kill 0 --fp-loss ''`` leaves only the broadcast phases (10,000 nodes: every
membership change makes every core re-run provider selection over all members). A
lossy broadcast phase shorter than (missed_heartbeats - 1) heartbeat intervals cannot
produce false DOWNs, so it measures dissemination alone.

Output: a table on stdout, JSON with ``--json FILE`` (``-``: stdout), ``--plot DIR``
coverage-over-time PNGs (one per loss level, a curve per strategy), ``--profile FILE``
a cProfile dump of the whole run with the top functions on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import operator
import pstats
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import machine_description, percentile, write_json
from gwyh_mp.config import DEFAULT_DISSEMINATION, Config, ConfigError
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import Event, MemberDown, Message
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.protocol.wire import MemberState
from gwyh_mp.simulation import SimNetwork, SimNode

Addr = tuple[str, int]

KEY = b"bench-sim-psk-0123456789abcdef01"
PORT = 7000
SEEDS = 3  # real join: node i bootstraps through seed i % SEEDS and a random earlier node
AUTO_REAL_MAX = 300  # --join auto: real joins up to this many nodes (O(N^2)), warm above
COVERAGE_POINTS = 101
_BCAST = wire.PacketType.BROADCAST
_BHDR = wire.BROADCAST_HEADER.size
_IDLEN = wire.MESSAGE_ID_BYTES
_state = operator.attrgetter("state")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    strategies = ["all", *(s.value for s in Strategy)]
    g = parser.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=1000, help="simulated nodes")
    g.add_argument("--zones", type=int, default=4, help="zones z0..z{Z-1}, round robin")
    g.add_argument(
        "--strategy",
        default="all",
        choices=strategies,
        help="provider selection strategy to compare (all: each)",
    )
    g.add_argument("--subscriptions", type=int, default=5, help="providers per node")
    g.add_argument("--seed", type=int, default=1, help="random seed: same seed, same result")
    g.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds (LAN preset)")
    g.add_argument(
        "--missed-heartbeats", type=int, default=3, help="heartbeats missed before a DOWN"
    )
    g.add_argument("--peer-sync-interval", type=float, default=30.0, help="seconds")
    g.add_argument(
        "--join",
        choices=["auto", "real", "warm"],
        default="auto",
        help="real: join over the protocol; warm: start with full views; auto: by size",
    )
    g.add_argument("--join-rate", type=float, default=100.0, help="real join: nodes per sim s")
    g.add_argument("--settle", type=float, default=20.0, help="max sim s to wait after join")
    g = parser.add_argument_group("links")
    g.add_argument(
        "--latency",
        choices=["constant", "uniform", "lognormal"],
        default="lognormal",
        help="one-way latency distribution",
    )
    g.add_argument("--latency-ms", type=float, default=0.5, help="same-zone median one-way")
    g.add_argument("--cross-zone-ms", type=float, default=20.0, help="cross-zone median")
    g.add_argument(
        "--jitter", type=float, default=0.25, help="uniform: +/- fraction; lognormal: sigma"
    )
    g.add_argument(
        "--loss",
        default="0",
        help="comma list: one broadcast phase per level, in order; detection at the last",
    )
    g = parser.add_argument_group("workload")
    g.add_argument("--broadcasts", type=int, default=20, help="broadcasts per loss level")
    g.add_argument("--interval", type=float, default=1.0, help="sim s between broadcasts")
    g.add_argument("--size", type=int, default=100, help="payload bytes")
    g.add_argument(
        "--dissemination",
        choices=["eager", "trees", "both"],
        default=DEFAULT_DISSEMINATION,
        help="Config.dissemination (default: the node's); both: each, same seed, side by side",
    )
    g.add_argument(
        "--senders",
        type=int,
        default=0,
        help="broadcasts come from this many nodes picked once (0: a random live node each)",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="unmeasured broadcasts from the senders before the phases (trees: steady state)",
    )
    g.add_argument(
        "--crash",
        type=int,
        default=0,
        help="nodes (never senders) that crash as the last --loss phase starts",
    )
    g.add_argument("--kill", type=int, default=None, help="nodes to crash (default N/100, 1-10)")
    g.add_argument("--detect-timeout", type=float, default=60.0, help="sim s")
    g.add_argument("--fp-loss", default="0,0.05,0.2", help="loss levels for false positives")
    g.add_argument("--fp-seconds", type=float, default=30.0, help="sim s per false-positive level")
    g = parser.add_argument_group("output")
    g.add_argument("--plot", metavar="DIR", help="write coverage-over-time PNGs here")
    g.add_argument("--profile", metavar="FILE", help="cProfile the run; top functions on stderr")


# ---------------------------------------------------------------------------- network


class ZoneLink:
    """Per-datagram delay from the zone pair's distribution; ``loss`` is mutable."""

    def __init__(
        self,
        zone_of: dict[Addr, int],
        *,
        dist: str,
        local_s: float,
        cross_s: float,
        jitter: float,
        loss: float,
    ) -> None:
        self.zone_of = zone_of
        self.dist = dist
        self.local_s = local_s
        self.cross_s = cross_s
        self.jitter = jitter
        self.loss = loss

    def __call__(self, src: Addr, dst: Addr, rng: random.Random) -> float | None:
        if self.loss and rng.random() < self.loss:
            return None
        zone_of = self.zone_of
        base = self.local_s if zone_of.get(src) == zone_of.get(dst) else self.cross_s
        if self.dist == "lognormal":
            return base * rng.lognormvariate(0.0, self.jitter)  # median = base
        if self.dist == "uniform":
            return base * max(0.0, 1.0 + self.jitter * (2.0 * rng.random() - 1.0))
        return base


def node_addr(i: int, zones: int) -> Addr:
    z, k = i % zones, i // zones
    return f"10.{z}.{k // 250}.{k % 250 + 1}", PORT


# ---------------------------------------------------------------------------- recording


@dataclass(slots=True)
class Tracked:
    index: int
    origin: Addr
    origin_subscribers: int
    t0: float
    targets: int
    times: list[float] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    copies: int = 0
    packets: int = 0
    cross_zone: int = 0


class Recorder:
    """The network's hooks: deliveries, copies, cross-zone datagrams and DOWN events."""

    def __init__(self, net: SimNetwork, zone_of: dict[Addr, int]) -> None:
        self.net = net
        self.zone_of = zone_of
        self.tracked: dict[bytes, Tracked] = {}
        self.datagrams = 0
        self.cross_zone = 0
        # detection: killed node id -> {observer addr: first DOWN time}
        self.watch: dict[bytes, dict[Addr, float]] = {}
        self.watch_need = 0
        self.watch_open = 0
        self.killed_ids: set[bytes] = set()
        self.dead_addrs: set[Addr] = set()
        self.fp_events = 0
        self.fp_accused: dict[bytes, int] = {}
        net.on_event = self.on_event
        net.on_datagram = self.on_datagram
        net.on_receive = self.on_receive

    def on_datagram(self, src: Addr, dst: Addr, data: bytes) -> None:
        self.datagrams += 1
        zone_of = self.zone_of
        cross = zone_of[src] != zone_of.get(dst, -1)
        self.cross_zone += cross
        if data[1] == _BCAST and self.tracked:
            tracked = self.tracked
            for i in range(_BHDR, _BHDR + _IDLEN * data[2], _IDLEN):
                t = tracked.get(data[i : i + _IDLEN])
                if t is not None:
                    t.packets += 1
                    t.cross_zone += cross

    def on_receive(self, src: Addr, dst: Addr, data: bytes) -> None:
        if data[1] == _BCAST and self.tracked:
            tracked = self.tracked
            for i in range(_BHDR, _BHDR + _IDLEN * data[2], _IDLEN):
                t = tracked.get(data[i : i + _IDLEN])
                if t is not None:
                    t.copies += 1

    def on_event(self, node: SimNode, event: Event) -> None:
        kind = type(event)
        if kind is Message:
            t = self.tracked.get(event.id)  # type: ignore[union-attr]
            if t is not None:
                t.times.append(self.net.now - t.t0)
                t.hops.append(event.hops)  # type: ignore[union-attr]
        elif kind is MemberDown:
            subject = event.member.node_id  # type: ignore[union-attr]
            seen = self.watch.get(subject)
            if seen is not None:
                if node.addr not in seen and node.addr not in self.dead_addrs:
                    seen[node.addr] = self.net.now
                    if len(seen) == self.watch_need:
                        self.watch_open -= 1
            elif subject not in self.killed_ids:
                self.fp_events += 1
                self.fp_accused[subject] = self.fp_accused.get(subject, 0) + 1


# ---------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float | None], digits: int = 6) -> dict[str, float | int | None]:
    present = sorted(v for v in values if v is not None)
    out: dict[str, float | int | None] = {"n": len(present), "missing": len(values) - len(present)}
    if not present:
        out.update(mean=None, p50=None, p99=None, min=None, max=None)
        return out
    out.update(
        mean=round(sum(present) / len(present), digits),
        p50=round(percentile(present, 50), digits),
        p99=round(percentile(present, 99), digits),
        min=round(present[0], digits),
        max=round(present[-1], digits),
    )
    return out


def broadcast_result(t: Tracked) -> dict[str, object]:
    times = sorted(t.times)
    delivered = len(times)
    need99 = math.ceil(0.99 * t.targets)
    need50 = math.ceil(0.5 * t.targets)
    return {
        "index": t.index,
        "origin": f"{t.origin[0]}:{t.origin[1]}",
        "origin_subscribers": t.origin_subscribers,
        "targets": t.targets,
        "delivered": delivered,
        "reliability": delivered / t.targets if t.targets else 1.0,
        "t50_s": round(times[need50 - 1], 6) if need50 and delivered >= need50 else None,
        "t99_s": round(times[need99 - 1], 6) if need99 and delivered >= need99 else None,
        "t100_s": round(times[-1], 6) if t.targets and delivered == t.targets else None,
        "last_hop": max(t.hops) if t.hops else None,
        "mean_hop": round(sum(t.hops) / len(t.hops), 4) if t.hops else None,
        "copies": t.copies,
        "redundancy": round(t.copies / delivered - 1.0, 6) if delivered else None,
        "packets": t.packets,
        "cross_zone_packets": t.cross_zone,
    }


def coverage_curve(tracks: Sequence[Tracked]) -> dict[str, list[float]]:
    """Mean and minimum coverage (share of targets) against time since the broadcast."""
    horizon = max((max(t.times) for t in tracks if t.times), default=0.0)
    grid = [horizon * k / (COVERAGE_POINTS - 1) for k in range(COVERAGE_POINTS)]
    mean = [0.0] * COVERAGE_POINTS
    low = [1.0] * COVERAGE_POINTS
    for t in tracks:
        times = sorted(t.times)
        j = 0
        for k, x in enumerate(grid):
            while j < len(times) and times[j] <= x:
                j += 1
            cov = j / t.targets if t.targets else 1.0
            mean[k] += cov / len(tracks)
            low[k] = min(low[k], cov)
    return {
        "t_s": [round(x, 6) for x in grid],
        "mean": [round(x, 6) for x in mean],
        "min": [round(x, 6) for x in low],
    }


# ---------------------------------------------------------------------------- phases


class Clock:
    """Simulated and wall seconds of one phase, and datagrams delivered in it."""

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self.sim0 = net.now
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.events0 = net.datagrams_delivered + net.timers_fired

    def done(self) -> dict[str, float | int | None]:
        sim = self.net.now - self.sim0
        wall = time.perf_counter() - self.wall0
        # CPU seconds too: on a shared machine, wall time also counts the neighbours.
        cpu = time.process_time() - self.cpu0
        events = self.net.datagrams_delivered + self.net.timers_fired - self.events0
        return {
            "sim_s": round(sim, 6),
            "events": events,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "sim_per_wall": round(sim / wall, 3) if wall > 0 else None,
            "sim_per_cpu": round(sim / cpu, 3) if cpu > 0 else None,
            "events_per_wall_s": round(events / wall) if wall > 0 else None,
        }


def join_mode(args: argparse.Namespace) -> str:
    if args.join != "auto":
        return args.join
    return "real" if args.nodes <= AUTO_REAL_MAX else "warm"


def make_configs(
    args: argparse.Namespace, strategy: Strategy, mode: str, dissemination: str = "eager"
) -> list[Config]:
    rng = random.Random(f"{args.seed}/bootstrap")
    addrs = [node_addr(i, args.zones) for i in range(args.nodes)]
    configs = []
    for i, a in enumerate(addrs):
        boot: list[Addr] = []
        if mode == "real" and i:
            boot = sorted({addrs[i % min(i, SEEDS)], addrs[rng.randrange(i)]})
        configs.append(
            Config.lan(
                bind=a,
                psks=[KEY],
                bootstrap=boot,
                zone=f"z{i % args.zones}",
                strategy=strategy,
                subscriptions=args.subscriptions,
                heartbeat_interval_s=args.heartbeat_interval,
                missed_heartbeats=args.missed_heartbeats,
                peer_sync_interval_s=args.peer_sync_interval,
                seed=args.seed,
                dissemination=dissemination,
            )
        )
    return configs


def topology(net: SimNetwork, nodes: Sequence[SimNode]) -> dict[str, object]:
    """Membership views and the subscription graph right after the join."""
    n = len(nodes)
    views = [
        Counter(map(_state, node.core.members.members.values()))[MemberState.UP] for node in nodes
    ]
    subs = sorted(len(node.core.subscribers) for node in nodes)
    providers = [len(node.core.providers) for node in nodes]
    return {
        "full_views": sum(1 for v in views if v >= n - 1),
        "mean_view_share": round(sum(views) / (n * max(1, n - 1)), 6),
        "min_view": min(views),
        "providers": summarize(providers, 3),
        "subscribers": summarize(subs, 3),
        "nodes_without_subscribers": sum(1 for s in subs if s == 0),
    }


def converged(nodes: Sequence[SimNode], want_view: int, want_providers: int) -> bool:
    for node in nodes:
        core = node.core
        if len(core.members.members) < want_view or len(core.providers) < want_providers:
            return False
        if not all(st.confirmed for st in core.providers.values()):
            return False
    return True


def join(args: argparse.Namespace, net: SimNetwork, configs: list[Config], mode: str) -> dict:
    clock = Clock(net)
    if mode == "warm":
        nodes = net.warm_start(configs, spread_s=args.heartbeat_interval)
    else:
        nodes = []
        for i, config in enumerate(configs):
            net.run_until(i / args.join_rate)
            nodes.append(net.add_node(config))
    added = net.now
    want_providers = min(args.subscriptions, len(nodes) - 1)
    ok = net.run_until_true(
        lambda: converged(nodes, len(nodes) - 1, want_providers),
        timeout_s=args.settle,
        step_s=1.0,
    )
    result = {
        "mode": mode,
        "converged": ok,
        "added_at_s": round(added, 6),
        "settled_at_s": round(net.now, 6),
        **topology(net, nodes),
        "speed": clock.done(),
        "datagrams": net.datagrams_sent,
    }
    return result


def live_addrs(net: SimNetwork) -> list[Addr]:
    return [a for a, n in net.nodes.items() if n.alive]


def pick_senders(args: argparse.Namespace, net: SimNetwork, rng: random.Random) -> list[Addr]:
    """The fixed senders (--senders), or [] for a random live node per broadcast."""
    if not args.senders:
        return []
    return sorted(rng.sample(live_addrs(net), min(args.senders, len(net.nodes))))


def warmup(args: argparse.Namespace, net: SimNetwork, senders: list[Addr]) -> None:
    """Unmeasured broadcasts, round robin over the senders: in trees mode the first
    messages of each origin build its tree (they travel as in eager mode)."""
    for b in range(args.warmup):
        node = net.nodes[senders[b % len(senders)]]
        node.core.broadcast(b"warmup %d" % b, net.now)
        net.pump(node)
        net.run_for(args.interval)


def crash(args: argparse.Namespace, net: SimNetwork, rng: random.Random, keep: list[Addr]) -> int:
    """Crash --crash random live nodes other than the senders; returns how many."""
    spared = set(keep)
    live = [a for a in live_addrs(net) if a not in spared]
    victims = sorted(rng.sample(live, min(args.crash, max(0, len(live) - 2))))
    for a in victims:
        net.kill(a)
    return len(victims)


def broadcasts(
    args: argparse.Namespace,
    net: SimNetwork,
    rec: Recorder,
    rng: random.Random,
    loss: float,
    senders: list[Addr],
) -> dict:
    clock = Clock(net)
    d0, x0 = rec.datagrams, rec.cross_zone
    tracks = []
    for b in range(args.broadcasts):
        live = live_addrs(net)
        origin = senders[b % len(senders)] if senders else live[rng.randrange(len(live))]
        data = (b"bench-sim #%d " % b).ljust(args.size, b".")[: max(args.size, 1)]
        node = net.nodes[origin]
        msg_id = node.core.broadcast(data, net.now)
        tracked = Tracked(b, origin, len(node.core.subscribers), net.now, len(live) - 1)
        rec.tracked[msg_id] = tracked
        tracks.append(tracked)
        net.pump(node)  # tracked before its first datagrams leave, so they are counted
        net.run_for(args.interval)
    net.run_for(args.interval)  # stragglers of the last one
    per = [broadcast_result(t) for t in tracks]
    keys = (
        "reliability",
        "t50_s",
        "t99_s",
        "t100_s",
        "last_hop",
        "mean_hop",
        "redundancy",
        "packets",
        "cross_zone_packets",
    )
    aggregate = {k: summarize([p[k] for p in per]) for k in keys}  # type: ignore[misc]
    zero_origin = [p for p in per if p["origin_subscribers"] == 0]
    result = {
        "loss": loss,
        "aggregate": aggregate,
        "from_origins_without_subscribers": len(zero_origin),
        "datagrams": rec.datagrams - d0,
        "cross_zone_datagrams": rec.cross_zone - x0,
        "per_broadcast": per,
        "coverage": coverage_curve(tracks),
        "speed": clock.done(),
    }
    rec.tracked.clear()
    return result


def detection(args: argparse.Namespace, net: SimNetwork, rec: Recorder, rng: random.Random) -> dict:
    clock = Clock(net)
    live = live_addrs(net)
    count = args.kill if args.kill is not None else max(1, min(10, args.nodes // 100))
    count = min(count, max(0, len(live) - 2))
    victims = sorted(rng.sample(live, count))
    t_kill = net.now
    for a in victims:
        net.kill(a)
        rec.dead_addrs.add(a)
        subject = net.nodes[a].core.node_id
        rec.killed_ids.add(subject)
        rec.watch[subject] = {}
    rec.watch_need = len(live) - count
    rec.watch_open = count
    net.run_until_true(lambda: rec.watch_open <= 0, timeout_s=args.detect_timeout, step_s=0.25)
    per = []
    for a in victims:
        seen = rec.watch[net.nodes[a].core.node_id]
        times = sorted(t - t_kill for t in seen.values())
        per.append(
            {
                "node": f"{a[0]}:{a[1]}",
                "observers": rec.watch_need,
                "detected_by": len(times),
                "first_s": round(times[0], 6) if times else None,
                "p50_s": round(percentile(times, 50), 6) if times else None,
                "all_s": round(times[-1], 6) if len(times) == rec.watch_need else None,
            }
        )
    result = {
        "killed": count,
        "complete": sum(1 for p in per if p["all_s"] is not None),
        "first_s": summarize([p["first_s"] for p in per]),
        "all_s": summarize([p["all_s"] for p in per]),
        "per_node": per,
        "speed": clock.done(),
    }
    rec.watch.clear()
    return result


def false_positives(
    args: argparse.Namespace, net: SimNetwork, rec: Recorder, link: ZoneLink
) -> list[dict]:
    out = []
    live = [n for n in net.nodes.values() if n.alive]
    for loss in parse_levels(args.fp_loss):
        link.loss = loss
        clock = Clock(net)
        rec.fp_events = 0
        rec.fp_accused = {}
        refute0 = sum(n.core.stats.get("refutations", 0) for n in live)
        isolated0 = sum(n.core.stats.get("isolated", 0) for n in live)
        suspected0 = sum(n.core.stats.get("suspected", 0) for n in live)
        bytes0 = net.bytes_sent
        net.run_for(args.fp_seconds)
        # Nothing but membership runs in a quiet period: its cost per node.
        membership_bps = (net.bytes_sent - bytes0) / len(live) / args.fp_seconds
        stale = 0
        for subject in rec.fp_accused:
            for n in live:
                m = n.core.members.get(subject)
                if m is not None and m.state == MemberState.DOWN:
                    stale += 1
        out.append(
            {
                "loss": loss,
                "quiet_s": args.fp_seconds,
                "down_events": rec.fp_events,
                "accused_nodes": len(rec.fp_accused),
                "refutations": sum(n.core.stats.get("refutations", 0) for n in live) - refute0,
                "isolated": sum(n.core.stats.get("isolated", 0) for n in live) - isolated0,
                "suspicions": sum(n.core.stats.get("suspected", 0) for n in live) - suspected0,
                "membership_bytes_per_node_per_s": round(membership_bps, 1),
                "stale_down_views_at_end": stale,
                "speed": clock.done(),
            }
        )
    return out


def parse_levels(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_strategy(args: argparse.Namespace, strategy: Strategy, dissemination: str) -> dict:
    mode = join_mode(args)
    zone_of = {node_addr(i, args.zones): i % args.zones for i in range(args.nodes)}
    link = ZoneLink(
        zone_of,
        dist=args.latency,
        local_s=args.latency_ms / 1000.0,
        cross_s=args.cross_zone_ms / 1000.0,
        jitter=args.jitter,
        loss=0.0,  # the cluster is built loss-free; the measured phases use --loss
    )
    net = SimNetwork(seed=args.seed, link=link, keep_events=False)
    rec = Recorder(net, zone_of)
    rng = random.Random(f"{args.seed}/workload")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    gc.disable()  # the cluster is millions of long-lived objects; see _release
    try:
        joined = join(args, net, make_configs(args, strategy, mode, dissemination), mode)
        gc.freeze()
    finally:
        gc.enable()
    progress(args, strategy, "join", joined["speed"])
    measured = Clock(net)
    senders = pick_senders(args, net, rng)
    if senders and args.warmup:
        warmup(args, net, senders)
        progress(args, strategy, "warmup", measured.done())
    phases = []
    levels = parse_levels(args.loss)
    crashed = 0
    for i, loss in enumerate(levels):
        link.loss = loss
        if args.crash and i == len(levels) - 1:
            crashed = crash(args, net, rng, senders)
        phases.append(broadcasts(args, net, rec, rng, loss, senders))
        phases[-1]["crashed"] = crashed
        progress(args, strategy, f"broadcasts at {loss:.0%} loss", phases[-1]["speed"])
    detect = detection(args, net, rec, rng)
    progress(args, strategy, "detection", detect["speed"])
    fps = false_positives(args, net, rec, link)
    progress(args, strategy, "false positives", {"wall_s": sum(f["speed"]["wall_s"] for f in fps)})
    result = {
        "strategy": strategy.value,
        "dissemination": dissemination,
        "join": joined,
        "broadcasts": phases,
        "detection": detect,
        "false_positives": fps,
        "speed": {"measured_phases": measured.done()},
        "network": {
            "datagrams_sent": net.datagrams_sent,
            "datagrams_dropped": net.datagrams_dropped,
            "datagrams_delivered": net.datagrams_delivered,
            "timers_fired": net.timers_fired,
            "bytes_sent": net.bytes_sent,
        },
        "wall_s": round(time.perf_counter() - wall0, 3),
        "cpu_s": round(time.process_time() - cpu0, 3),
    }
    _release(net)
    return result


def progress(args: argparse.Namespace, strategy: Strategy, phase: str, speed: dict) -> None:
    if args.quiet:
        return
    print(
        f"bench sim: {strategy.value}: {phase} done in {speed['wall_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _release(net: SimNetwork) -> None:
    # Cores sit in reference cycles (bound methods); emptying the big tables first
    # frees most memory by refcount instead of one long full collection.
    for node in net.nodes.values():
        node.core.members.members.clear()
    net.nodes.clear()
    gc.unfreeze()
    gc.collect()


# ---------------------------------------------------------------------------- output


def fmt(x: object, scale: float = 1.0, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{float(x) * scale:.{digits}f}"  # type: ignore[arg-type]


def print_table(result: dict, out: io.TextIOBase | None = None) -> None:
    out = out or sys.stdout  # type: ignore[assignment]
    p = result["params"]

    def line(text: str) -> None:
        print(text, file=out)

    line(
        f"bench sim: {p['nodes']} nodes, {p['zones']} zones, {p['latency']} latency "
        f"{p['latency_ms']} ms same zone / {p['cross_zone_ms']} ms across, "
        f"{p['subscriptions']} providers, seed {p['seed']}, join {p['join_mode']}"
    )
    heads = (
        ("strategy", "", 14), ("loss", "", 5), ("delivered", "mean", 10), ("delivered", "min", 10),
        ("99 % in", "p50 ms", 9), ("99 % in", "p99 ms", 9), ("all in", "p50 ms", 9),
        ("all in", "max ms", 9), ("hops", "max", 5), ("extra", "copies", 7),
        ("packets", "/bcast", 8), ("x-zone", "/bcast", 8),
    )  # fmt: skip
    nw = max(14, *(len(name) + 1 for name in result["strategies"]))
    line(f"{heads[0][0]:<{nw}}" + "".join(f"{h:>{w}}" for h, _, w in heads[1:]))
    line(f"{'':<{nw}}" + "".join(f"{u:>{w}}" for _, u, w in heads[1:]))
    for name, s in result["strategies"].items():
        for b in s["broadcasts"]:
            a = b["aggregate"]
            line(
                f"{name:<{nw}}{b['loss']:>5.0%}{fmt(a['reliability']['mean'], 1, 4):>10}"
                f"{fmt(a['reliability']['min'], 1, 3):>10}"
                f"{fmt(a['t99_s']['p50'], 1000):>9}{fmt(a['t99_s']['p99'], 1000):>9}"
                f"{fmt(a['t100_s']['p50'], 1000):>9}{fmt(a['t100_s']['max'], 1000):>9}"
                f"{fmt(a['last_hop']['max'], 1, 0):>5}{fmt(a['redundancy']['mean'], 1, 2):>7}"
                f"{fmt(a['packets']['mean'], 1, 0):>8}"
                f"{fmt(a['cross_zone_packets']['mean'], 1, 0):>8}"
            )
    if p.get("dissemination") == "both":
        print_dissemination(result, nw, line)
    fp_levels = "/".join(f"{x:.0%}" for x in parse_levels(p["fp_loss"])) or "-"
    line(
        f"{'strategy':<{nw}}{'join sim s':>11}{'join wall s':>12}{'unsubscribed':>13}"
        f"{'killed':>7}{'detect s':>9}{'max s':>6}  {'false DOWNs at ' + fp_levels:<24}"
        f"{'sim s/wall s':>13}{'sim s/CPU s':>12}"
    )
    for name, s in result["strategies"].items():
        j, d = s["join"], s["detection"]
        fps = "/".join(str(f["down_events"]) for f in s["false_positives"]) or "-"
        speed = s["speed"]["measured_phases"]
        line(
            f"{name:<{nw}}{fmt(j['speed']['sim_s'], 1, 1):>11}{fmt(j['speed']['wall_s'], 1, 1):>12}"
            f"{j['nodes_without_subscribers']:>13}{d['killed']:>7}"
            f"{fmt(d['all_s']['mean'], 1, 1):>9}{fmt(d['all_s']['max'], 1, 1):>6}  "
            f"{fps:<24}{fmt(speed['sim_per_wall'], 1, 2):>13}"
            f"{fmt(speed['sim_per_cpu'], 1, 2):>12}"
        )
    line(
        f"{'quiet period':<14}{'loss':>5}{'sim s':>7}{'false DOWNs':>12}{'accused':>8}"
        f"{'suspicions':>11}{'refutations':>12}{'membership B/s/node':>20}"
    )
    for name, s in result["strategies"].items():
        for f in s["false_positives"]:
            line(
                f"{name:<14}{f['loss']:>5.0%}{f['quiet_s']:>7.0f}{f['down_events']:>12}"
                f"{f['accused_nodes']:>8}{f.get('suspicions', 0):>11}{f['refutations']:>12}"
                f"{fmt(f.get('membership_bytes_per_node_per_s'), 1, 0):>20}"
            )
    # Speed per phase: a broadcast costs every node ~15 events (copies in and out, tail
    # probes, timers), an idle second ~3, so the phases differ by an order of magnitude.
    first = next(iter(result["strategies"].values()), None)
    if first is not None:
        phase_heads = [f"bcast@{b['loss']:.0%}" for b in first["broadcasts"]] + ["detect"]
        phase_heads += [f"idle@{f['loss']:.0%}" for f in first["false_positives"]]
        line(f"{'sim s per CPU s':<16}" + "".join(f"{h:>10}" for h in phase_heads))
        for name, s in result["strategies"].items():
            phases = [*s["broadcasts"], s["detection"], *s["false_positives"]]
            cells = "".join(f"{fmt(ph['speed']['sim_per_cpu'], 1, 2):>10}" for ph in phases)
            line(f"{name:<16}{cells}")
    line(
        "(99 % in / all in: time until 99 % / all of the other live nodes have a broadcast; "
        "extra copies: copies received per delivery - 1; unsubscribed: nodes nobody "
        "subscribes to; detect: s until every live node has the DOWN; false DOWNs: "
        "MemberDown events about live nodes per loss level; sim s/wall s, sim s/CPU s: "
        "simulated seconds per wall or CPU second after the join; bcast@L, idle@L: "
        "broadcast and idle phases at loss L)"
    )


def print_dissemination(result: dict, nw: int, line: Callable[[str], None]) -> None:
    """Eager push against broadcast trees: redundancy, reliability, t50/t99 per phase,
    and t99 relative to eager push in the same run (same strategy, same phase)."""
    line(
        f"{'dissemination':<{nw}}{'loss':>5}{'crashed':>8}{'delivered':>10}{'min':>7}"
        f"{'t50 ms':>8}{'t99 ms':>8}{'t99 ms':>8}{'extra':>7}{'t99 p50':>9}{'t99 p99':>9}"
    )
    line(
        f"{'':<{nw}}{'':>5}{'':>8}{'mean':>10}{'':>7}{'p50':>8}{'p50':>8}{'p99':>8}"
        f"{'copies':>7}{'/eager':>9}{'/eager':>9}"
    )
    strategies = result["strategies"]
    for name, s in strategies.items():
        eager = strategies.get(f"{s['strategy']}/eager")
        for i, b in enumerate(s["broadcasts"]):
            a = b["aggregate"]
            ratio = ["-", "-"]
            if eager is not None:
                e = eager["broadcasts"][i]["aggregate"]["t99_s"]
                for k, q in enumerate(("p50", "p99")):
                    if e[q] and a["t99_s"][q] is not None:
                        ratio[k] = f"{a['t99_s'][q] / e[q]:.2f}"
            line(
                f"{name:<{nw}}{b['loss']:>5.0%}{b.get('crashed', 0):>8}"
                f"{fmt(a['reliability']['mean'], 1, 4):>10}{fmt(a['reliability']['min'], 1, 3):>7}"
                f"{fmt(a['t50_s']['p50'], 1000):>8}{fmt(a['t99_s']['p50'], 1000):>8}"
                f"{fmt(a['t99_s']['p99'], 1000):>8}{fmt(a['redundancy']['mean'], 1, 2):>7}"
                f"{ratio[0]:>9}{ratio[1]:>9}"
            )


def plot(result: dict, directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    p = result["params"]
    paths = []
    for level in parse_levels(p["loss"]):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, s in result["strategies"].items():
            for b in s["broadcasts"]:
                if b["loss"] != level:
                    continue
                cov = b["coverage"]
                t_ms = [x * 1000 for x in cov["t_s"]]
                (curve,) = ax.plot(t_ms, cov["mean"], label=f"{name} (mean)")
                ax.fill_between(t_ms, cov["min"], cov["mean"], color=curve.get_color(), alpha=0.15)
        ax.set_xlabel("time since broadcast (ms, simulated)")
        ax.set_ylabel("coverage (share of the other live nodes)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(
            f"bench sim: {p['nodes']} nodes, {p['zones']} zones, loss {level:.0%} "
            "(band down to the worst broadcast)",
            fontsize=10,
        )
        ax.legend(loc="lower right")
        path = target / f"sim_coverage_{p['nodes']}n_loss{level:g}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def profile_summary(profiler: cProfile.Profile, path: str, top: int = 30) -> None:
    profiler.dump_stats(path)
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(top)
    sys.stderr.write(buf.getvalue())


# ---------------------------------------------------------------------------- entry


def check_args(args: argparse.Namespace) -> str | None:
    if args.nodes < 2:
        return "--nodes must be >= 2"
    if not 1 <= args.zones <= 250 or args.nodes // args.zones > 62_500:
        return "--zones must be 1-250 with at most 62,500 nodes per zone"
    try:
        levels = parse_levels(args.loss) + parse_levels(args.fp_loss)
    except ValueError:
        return "--loss and --fp-loss take comma-separated numbers"
    if not parse_levels(args.loss) or any(not 0 <= x < 1 for x in levels):
        return "--loss (at least one level) and --fp-loss levels must be in [0, 1)"
    if args.broadcasts < 1 or args.interval <= 0 or args.join_rate <= 0:
        return "--broadcasts >= 1, --interval > 0 and --join-rate > 0 required"
    if args.latency_ms < 0 or args.cross_zone_ms < 0 or args.jitter < 0:
        return "latencies and --jitter must be >= 0"
    if args.kill is not None and args.kill < 0:
        return "--kill must be >= 0"
    if args.senders < 0 or args.warmup < 0 or args.crash < 0:
        return "--senders, --warmup and --crash must be >= 0"
    if args.warmup and not args.senders:
        return "--warmup needs --senders"
    try:
        make_configs(args, Strategy.UNIFORM, "warm")[0].validate()
    except ConfigError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"bench sim: {problem}", file=sys.stderr)
        return 2
    strategies = list(Strategy) if args.strategy == "all" else [Strategy(args.strategy)]
    profiler = cProfile.Profile() if args.profile else None
    wall0 = time.perf_counter()
    params = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "profile"}
    params["join_mode"] = join_mode(args)
    result: dict = {"bench": "sim", "params": params, "machine": machine_description()}
    result["strategies"] = {}
    if profiler is not None:
        profiler.enable()
    try:
        modes = ["eager", "trees"] if args.dissemination == "both" else [args.dissemination]
        for strategy in strategies:
            for mode in modes:
                name = strategy.value if len(modes) == 1 else f"{strategy.value}/{mode}"
                result["strategies"][name] = run_strategy(args, strategy, mode)
    finally:
        if profiler is not None:
            profiler.disable()
    result["wall_s"] = round(time.perf_counter() - wall0, 3)
    if args.plot:
        result["plots"] = plot(result, args.plot)
    print_table(result)
    if profiler is not None:
        profile_summary(profiler, args.profile)
    write_json(args.json, result)
    return 0


def strip_wall(value: object) -> object:
    """The result without wall-clock fields: what must repeat exactly for a seed."""
    if isinstance(value, dict):
        return {
            k: strip_wall(v)
            for k, v in value.items()
            if "wall" not in k and "cpu" not in k and k not in ("machine", "plots", "json", "plot")
        }
    if isinstance(value, list):
        return [strip_wall(v) for v in value]
    return value
