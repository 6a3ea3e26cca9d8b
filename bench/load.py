"""`python -m bench load`: thousands of virtual peers against one gwyh-node.

Starts a node under test (``gwyh-node --stdio``), or targets one started elsewhere
(``--target HOST:PORT`` with its ``--psk-file``), and runs ``--peers`` virtual peers
against it from this process (bench/virtual_peers.py: every virtual peer is a real
NodeCore with its own node id, UDP port, handshake, keys, subscriptions and
heartbeats; one uvloop loop drives them all). Phases:

1. join: peers start at ``--join-rate``/s, bootstrapping through the node under test;
   a peer has joined once it holds a session with the node and ``--subscriptions``
   confirmed providers. Reported: time until every peer (and the node) is in.
2. steady: ``--rate`` broadcasts/s of ``--size`` bytes for ``--duration`` s, each from
   a random joined peer.
3. churn: as steady, while ``--churn`` peers/s leave (``--churn-mode``) and a fresh
   peer (new id, new port) joins in each one's place, for ``--churn-duration`` s.
4. report: JSON on stdout (and ``--json FILE``), PNG charts with ``--plot DIR``.

Each payload starts with ``<send time.time_ns(), 19 digits> <sequence, 10 digits>|``.
Delivery is measured where it is most direct:

- spawned node (default): at the node under test, from its stdout JSON lines, which a
  separate tap process (bench/load_tap.py) timestamps on arrival. Every broadcast
  should reach it exactly once.
- ``--target``: at the virtual peers (every peer alive until the end should get every
  broadcast sent after it joined, except its own).

The virtual-peer ("mesh") figures are reported in both modes. Latency is receive
time minus send time on the same wall clock. CPU and RSS of the node, of the load
generator and of the tap are sampled every second (psutil). All traffic stays on
127.0.0.1 and every phase is bounded in time.

The load generator is a real cluster of --peers nodes in one process, so it does
--peers times the node's work per broadcast and per membership change: watch
``loop_lag_ms`` -- when the loop is saturated, latencies include the generator's own
queueing, and above a few seconds of lag heartbeats and handshakes start timing out.
To fit thousands of peers on one core:

- the join is paced (``--join-rate``), windowed (``--join-window``) and paused while
  the loop lags, since each join costs every peer O(N) work (STATUS floods, and a full
  member list from the node and from each new provider);
- the virtual peers are default nodes (the core keeps its member counts incrementally,
  skips a provider reselection that cannot change anything, and its anti-entropy sync
  exchanges bucket digests, so a sync between agreeing peers carries no member list).

A broadcast whose sender has no subscriber at that moment is held by the core until
one subscribes: the JSON counts those (``held_at_sender``) apart from the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import os
import pstats
import random
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

from bench.common import (
    STATS_PREFIX,
    free_udp_port,
    last_json_line,
    machine_description,
    node_command,
    percentile_summary,
    rcvbuf_errors,
    write_json,
)
from bench.virtual_peers import (
    PeerDriver,
    VirtualPeer,
    confirmed_providers,
    ensure_fd_limit,
    has_session_with,
)
from gwyh_mp.config import Config, ConfigError, parse_addr

KEY = b"bench-load-key-0123456789abcdef-0123"
HEADER_BYTES = 31  # b"%019d %010d|"
SEP = ord("|")
FD_MARGIN = 64  # loop, pipes, files, psutil
JOIN_CHECK_S = 0.05
JOIN_MAX_LAG_S = 0.25
DRAIN_QUIET_S = 3.0
SAMPLE_S = 1.0
LATENCY_POINTS = (50, 90, 99, 99.9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = "Thousands of virtual peers against one gwyh-node (see bench/load.py)."
    g = parser.add_argument_group("node under test")
    g.add_argument("--target", metavar="HOST:PORT", help="use a node started elsewhere")
    g.add_argument("--psk-file", metavar="FILE", help="its key (required with --target)")
    g.add_argument("--target-pid", type=int, help="pid of --target, to sample CPU/RSS")
    g.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the spawned gwyh-node (repeat; e.g. --node-arg=--workers=1)",
    )
    g = parser.add_argument_group("load")
    g.add_argument("--peers", type=int, default=2000, help="virtual peers")
    g.add_argument("--rate", type=float, default=2.0, help="broadcasts/s over all peers")
    g.add_argument("--size", type=int, default=256, help="payload bytes (>= 32)")
    g.add_argument("--duration", type=float, default=30.0, help="steady phase seconds")
    g.add_argument("--churn", type=float, default=1.0, help="peers leaving+rejoining per s")
    g.add_argument("--churn-duration", type=float, default=15.0, help="churn phase seconds")
    g.add_argument("--churn-mode", choices=["graceful", "crash"], default="graceful")
    g.add_argument("--join-rate", type=float, default=50.0, help="peers started per second")
    g.add_argument(
        "--join-window",
        type=int,
        default=20,
        help="at most this many peers joining at once (and none while the loop lags)",
    )
    g.add_argument("--join-timeout", type=float, default=900.0, help="join phase bound (s)")
    g.add_argument("--settle", type=float, default=2.0, help="pause after the join (s)")
    g.add_argument("--drain", type=float, default=15.0, help="max wait for late deliveries")
    g = parser.add_argument_group("virtual peers")
    g.add_argument(
        "--subscriptions", type=int, default=5, help="providers per virtual peer (node default: 5)"
    )
    g.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        metavar="S",
        help="virtual peers' heartbeat, also passed to a spawned node (None: node default 5)",
    )
    g.add_argument(
        "--peer-sync-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="virtual peers' anti-entropy peer-list pull (node default: 30)",
    )
    g.add_argument(
        "--reassign-delay",
        default="0.05,0.5",
        metavar="LOW,HIGH",
        help="virtual peers' provider re-selection delay (same as the node's)",
    )
    g.add_argument("--tick", type=float, default=0.005, help="driver timer tick (s)")
    g.add_argument("--seed", type=int, default=1, help="sender/churn choices")
    g = parser.add_argument_group("output")
    g.add_argument("--json", metavar="FILE")
    g.add_argument("--plot", metavar="DIR", help="latency CDF, throughput and CPU PNGs")
    g.add_argument("--profile", metavar="FILE", help="cProfile the load generator")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    g.add_argument("--keep", action="store_true", help="keep the work directory")


def check_args(args: argparse.Namespace) -> str | None:
    if args.peers < 1:
        return "--peers must be >= 1"
    if args.rate < 0 or args.duration < 0 or args.churn < 0 or args.churn_duration < 0:
        return "--rate, --duration, --churn and --churn-duration must be >= 0"
    if args.size < HEADER_BYTES + 1:
        return f"--size must be >= {HEADER_BYTES + 1} (the timestamp header)"
    if args.join_rate <= 0 or args.join_timeout <= 0 or args.tick <= 0:
        return "--join-rate, --join-timeout and --tick must be > 0"
    if not 1 <= args.subscriptions <= 64:
        return "--subscriptions must be 1-64"
    if args.heartbeat_interval is not None and args.heartbeat_interval <= 0:
        return "--heartbeat-interval must be > 0"
    try:
        parse_pair(args.reassign_delay)
    except ValueError:
        return "--reassign-delay must be LOW,HIGH with 0 <= LOW <= HIGH"
    if args.join_window < 1 or args.peer_sync_interval <= 0:
        return "--join-window must be >= 1 and --peer-sync-interval > 0"
    if args.target and not args.psk_file:
        return "--target needs --psk-file (the key the node was started with)"
    if args.target:
        try:
            parse_addr(args.target)
        except ConfigError as exc:
            return f"--target: {exc}"
    return None


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


def parse_pair(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    if not 0 <= low <= high:
        raise ValueError(text)
    return low, high


# ---------------------------------------------------------------------------- stats


def percentiles_ms(values_ns: array | list[int]) -> dict[str, float | int | None]:
    """Nearest-rank latency percentiles of ns samples, in ms."""
    return percentile_summary(values_ns, LATENCY_POINTS, scale=1e-6)


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


# ---------------------------------------------------------------------------- node


@dataclass
class NodeUnderTest:
    """A spawned gwyh-node whose stdout goes through the timestamping tap."""

    proc: subprocess.Popen[bytes]
    tap: subprocess.Popen[bytes]
    cmd: list[str]
    out_path: Path
    err_path: Path
    out_offset: int = 0
    stats: dict[str, object] = field(default_factory=dict)

    def read_lines(self) -> list[bytes]:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self.out_offset)
                chunk = f.read()
        except OSError:
            return []
        cut = chunk.rfind(b"\n") + 1  # the tap may be mid-write: whole lines only
        self.out_offset += cut
        return chunk[:cut].splitlines()

    def last_stats(self) -> dict[str, object]:
        latest = last_json_line(self.err_path, STATS_PREFIX)
        if latest is not None:
            self.stats = latest
        return self.stats

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join([line for line in text if not line.startswith('{"event"')][-lines:])

    def stop(self) -> None:
        for proc in (self.proc, self.tap):
            if proc.poll() is None and proc is self.proc:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.proc, self.tap):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def spawn_node(
    args: argparse.Namespace, workdir: Path, key_path: Path
) -> tuple[NodeUnderTest, tuple[str, int]]:
    port = free_udp_port()
    cmd = node_command(port, key_path, "--stats-interval", "1")
    if args.heartbeat_interval is not None:
        cmd += ["--heartbeat-interval", str(args.heartbeat_interval)]
    cmd += list(args.node_arg)
    out_path, err_path = workdir / "node.out", workdir / "node.err"
    with open(err_path, "wb") as err:
        # stdin stays an open pipe we never write: --stdio then never broadcasts.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, close_fds=True
        )
    assert proc.stdout is not None
    tap = subprocess.Popen(
        [sys.executable, "-m", "bench.load_tap", str(out_path)],
        stdin=proc.stdout,
        cwd=Path(__file__).resolve().parents[1],
        close_fds=True,
    )
    proc.stdout.close()  # the tap owns the read end now
    return NodeUnderTest(proc, tap, cmd, out_path, err_path), ("127.0.0.1", port)


# ---------------------------------------------------------------------------- sampling


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


class ProcTreeSampler:
    """The node under test may be several processes (coordinator + receivers): sample
    each one, and their sum."""

    def __init__(self, pid: int | None) -> None:
        self.root = ProcSampler(pid)
        self.children: dict[int, ProcSampler] = {}
        self._refresh()

    def _refresh(self) -> None:
        if self.root.proc is None:
            return
        try:
            kids = self.root.proc.children(recursive=True)
        except psutil.Error:
            return
        for kid in kids:
            if kid.pid not in self.children:
                self.children[kid.pid] = ProcSampler(kid.pid)

    def _all(self) -> list[ProcSampler]:
        return [self.root, *self.children.values()]

    def cpu_seconds(self) -> float | None:
        if self.root.proc is None:
            return None
        self._refresh()
        return sum(x for x in (p.cpu_seconds() for p in self._all()) if x is not None)

    def sample(self) -> tuple[float | None, int | None, list[list[float | int | None]]]:
        if self.root.proc is None:
            return None, None, []
        self._refresh()
        per: list[list[float | int | None]] = []
        for sampler in self._all():
            pct, rss = sampler.sample()
            if pct is not None and sampler.proc is not None:
                per.append([sampler.proc.pid, pct, rss])
        if not per:
            return None, None, []
        return (
            round(sum(p[1] for p in per), 1),  # type: ignore[misc]
            sum(p[2] for p in per),  # type: ignore[misc]
            per,
        )


# ---------------------------------------------------------------------------- the run


class LoadRun:
    def __init__(
        self,
        args: argparse.Namespace,
        target: tuple[str, int],
        psk: bytes,
        node: NodeUnderTest | None,
        target_pid: int | None,
    ) -> None:
        self.args = args
        self.target = target
        self.psk = psk
        self.node = node
        self.rng = random.Random(args.seed)
        self.progress = not args.quiet
        self.tty = sys.stderr.isatty()
        # Broadcasts: seq -> send time (ns); phase seq ranges.
        self.send_ns = array("q")
        self.churn_first_seq: int | None = None
        # Node-side deliveries (seq -> arrival ns, 0 = not yet), from the tap.
        self.node_arrival = array("q")
        # 1 = its sender had no subscriber when it was sent: the core then holds the
        # broadcast until one subscribes (Fanout.flush with no targets).
        self.held = bytearray()
        self.node_dups = [0, 0]  # steady, churn
        self.node_delivered = 0
        self.node_foreign = 0
        # Virtual-peer ("mesh") deliveries.
        self.mesh_lat = (array("q"), array("q"))  # steady, churn
        self.mesh_dups = [0, 0]
        self.mesh_delivered = 0
        self.mesh_foreign = 0
        # Joined peers, for O(1) random picks and removal.
        self.ready: list[VirtualPeer] = []
        self._ready_pos: dict[int, int] = {}
        self.pending_join: dict[int, VirtualPeer] = {}
        self.churn_join_s: list[float] = []
        self.churn_left = 0
        self.churn_spawned = 0
        # Phase machine, driven from the driver's tick.
        self.phase = "join"
        self.phases: list[dict[str, object]] = []
        self.t0 = 0.0
        self.phase_t0 = 0.0
        self.phase_sent = 0
        self.churn_done = 0
        self.spawned = 0
        self.sending = False
        self.churning = False
        self._next_join_check = 0.0
        self._next_sample = 0.0
        self.samples: list[dict[str, object]] = []
        self.node_cpu = ProcTreeSampler(target_pid)
        self.tap_cpu = ProcSampler(node.tap.pid if node is not None else None)
        self.gen_cpu = ProcSampler(os.getpid())
        self.error: str | None = None
        self.driver: PeerDriver | None = None
        self._last_progress = 0.0

    # ------------------------------------------------------------ deliveries

    def on_mesh_message(self, peer: VirtualPeer, data: bytes, now_ns: int) -> None:
        if len(data) < HEADER_BYTES or data[HEADER_BYTES - 1] != SEP:
            self.mesh_foreign += 1
            return
        seq = int(data[20:30])
        got = peer.received
        if seq >= len(got):
            got.extend(bytes(max(seq + 1, 2 * len(got), 256) - len(got)))
        phase = 0 if self.churn_first_seq is None or seq < self.churn_first_seq else 1
        if got[seq]:
            self.mesh_dups[phase] += 1
            return
        got[seq] = 1
        self.mesh_delivered += 1
        self.mesh_lat[phase].append(now_ns - int(data[:19]))

    def read_node_deliveries(self) -> None:
        if self.node is None:
            return
        arrival = self.node_arrival
        for line in self.node.read_lines():
            space = line.find(b" ")
            try:
                stamp = int(line[:space])
                record = orjson.loads(line[space + 1 :])
                data = record["data"]
            except (ValueError, KeyError, orjson.JSONDecodeError):
                self.node_foreign += 1
                continue
            if record.get("encoding") or len(data) < HEADER_BYTES or data[30] != "|":
                self.node_foreign += 1
                continue
            seq = int(data[20:30])
            if seq >= len(arrival):
                self.node_foreign += 1
                continue
            if arrival[seq]:
                self.node_dups[0 if seq < self._churn_bound() else 1] += 1
                continue
            arrival[seq] = stamp
            self.node_delivered += 1

    def _churn_bound(self) -> int:
        return self.churn_first_seq if self.churn_first_seq is not None else len(self.send_ns)

    # ------------------------------------------------------------ peers

    def _mark_ready(self, peer: VirtualPeer, now: float) -> None:
        peer.joined_at = now
        peer.first_seq = len(self.send_ns)
        self._ready_pos[peer.index] = len(self.ready)
        self.ready.append(peer)

    def _unready(self, peer: VirtualPeer) -> None:
        pos = self._ready_pos.pop(peer.index, None)
        if pos is None:
            return
        last = self.ready.pop()
        if last is not peer:
            self.ready[pos] = last
            self._ready_pos[last.index] = pos

    def _check_joins(self, now: float) -> None:
        assert self.driver is not None
        need = min(self.args.subscriptions, len(self.driver.alive))
        for index, peer in list(self.pending_join.items()):
            core = peer.core
            if confirmed_providers(core) >= need and has_session_with(core, self.target):
                del self.pending_join[index]
                self._mark_ready(peer, now)
                if self.phase == "churn":
                    self.churn_join_s.append(now - peer.started_at)

    def _spawn(self) -> None:
        assert self.driver is not None
        peer = self.driver.spawn()
        self.pending_join[peer.index] = peer
        self.spawned += 1

    def _send_one(self) -> None:
        assert self.driver is not None
        if not self.ready:
            return
        peer = self.ready[self.rng.randrange(len(self.ready))]
        seq = len(self.send_ns)
        now_ns = time.time_ns()
        head = b"%019d %010d|" % (now_ns, seq)
        payload = head + b"x" * (self.args.size - len(head))
        self.send_ns.append(now_ns)
        self.held.append(0 if peer.core.subscribers else 1)
        self.node_arrival.append(0)
        peer.sent_seqs.append(seq)
        self.driver.broadcast(peer, payload)

    # ------------------------------------------------------------ phases

    def start_phase(self, name: str, now: float) -> None:
        if self.phases:
            self.phases[-1]["end_s"] = round(now - self.t0, 3)
        self.phases.append({"name": name, "start_s": round(now - self.t0, 3)})
        self.phase = name
        self.phase_t0 = now
        self.phase_sent = 0
        self.sending = name in ("steady", "churn")
        self.churning = name == "churn"
        if name == "churn":
            self.churn_first_seq = len(self.send_ns)
        self._progress(now, force=True)

    def on_tick(self, now: float) -> None:
        try:
            self._on_tick(now)
        except Exception as exc:  # the run stops at the next check instead of hanging
            self.error = f"{type(exc).__name__}: {exc}"
            raise

    def _on_tick(self, now: float) -> None:
        args = self.args
        assert self.driver is not None
        elapsed = now - self.phase_t0
        if self.phase == "join":
            # Paced, windowed and lag-aware: a join costs every peer O(N) work (peer
            # lists, STATUS floods), and a saturated loop would miss heartbeats and
            # handshake retries, turning the join into a storm of false DOWNs.
            due = min(args.peers, int(elapsed * args.join_rate) + 1)
            while (
                self.spawned < due
                and len(self.pending_join) < args.join_window
                and self.driver.last_lag < JOIN_MAX_LAG_S
            ):
                self._spawn()
        if self.sending and args.rate > 0:
            due = int(elapsed * args.rate) + 1
            while self.phase_sent < due:
                self._send_one()
                self.phase_sent += 1
        if self.churning and args.churn > 0:
            due = int(elapsed * args.churn)
            while self.churn_done < due:
                self.churn_done += 1
                if self.ready:
                    victim = self.ready[self.rng.randrange(len(self.ready))]
                    self._unready(victim)
                    self.driver.retire(victim, graceful=args.churn_mode == "graceful")
                    self.churn_left += 1
                    self._spawn()
                    self.churn_spawned += 1
        if now >= self._next_join_check:
            self._next_join_check = now + JOIN_CHECK_S
            if self.pending_join:
                self._check_joins(now)
        if now >= self._next_sample:
            self._next_sample = max(self._next_sample + SAMPLE_S, now + SAMPLE_S / 2)
            self.sample(now)

    def sample(self, now: float) -> None:
        assert self.driver is not None
        self.read_node_deliveries()
        node_pct, node_rss, node_procs = self.node_cpu.sample()
        gen_pct, gen_rss = self.gen_cpu.sample()
        tap_pct, _ = self.tap_cpu.sample()
        stats = self.node.last_stats() if self.node is not None else {}
        d = self.driver.stats
        self.samples.append(
            {
                "t_s": round(now - self.t0, 3),
                "phase": self.phase,
                "sent": len(self.send_ns),
                "node_delivered": self.node_delivered,
                "mesh_delivered": self.mesh_delivered,
                "peers_alive": len(self.driver.alive),
                "peers_joined": len(self.ready),
                "node_cpu_pct": node_pct,
                "node_rss_bytes": node_rss,
                "node_procs": node_procs,  # [pid, cpu %, rss] per node process
                "system_cpu_pct": psutil.cpu_percent(None),  # all cores: 100 = every core busy
                "node_members_up": stats.get("members_up"),
                "node_subscribers": stats.get("subscribers"),
                "node_packets_in": stats.get("packets_in"),
                "node_packets_out": stats.get("packets_out"),
                "gen_cpu_pct": gen_pct,
                "gen_rss_bytes": gen_rss,
                "tap_cpu_pct": tap_pct,
                "gen_datagrams_in": d.datagrams_in,
                "gen_datagrams_out": d.datagrams_out,
                "loop_lag_ms": round(self.driver.take_lag() * 1000, 2),
            }
        )
        if self.node is not None and self.node.proc.poll() is not None:
            self.error = f"node under test exited ({self.node.proc.returncode}): " + (
                self.node.stderr_tail()
            )
        self._progress(now)

    def _progress(self, now: float, force: bool = False) -> None:
        if not self.progress or not self.samples:
            return
        if not self.tty and not force and now - self._last_progress < 5.0:
            return
        self._last_progress = now
        s = self.samples[-1]
        sent = s["sent"]
        parts = [
            f"[{self.phase:>6} {now - self.phase_t0:6.1f}s]",
            f"peers {s['peers_joined']}/{s['peers_alive']} joined",
            f"sent {sent}",
        ]
        if self.node is not None:
            parts.append(f"node got {s['node_delivered']}")
            parts.append(f"members {s['node_members_up']}")
        parts.append(f"mesh {s['mesh_delivered']}")
        if s["node_cpu_pct"] is not None:
            parts.append(f"node cpu {s['node_cpu_pct']:.0f}% rss {s['node_rss_bytes'] >> 20}M")
        parts.append(f"gen cpu {s['gen_cpu_pct'] or 0:.0f}% lag {s['loop_lag_ms']:.0f}ms")
        line = " | ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _end_progress(self) -> None:
        if self.progress and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    # ------------------------------------------------------------ orchestration

    async def wait_until(self, predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.error:
                return False
            if predicate():
                return True
            await asyncio.sleep(step)
        return predicate()

    async def run(self) -> dict[str, object]:
        args = self.args
        loop = asyncio.get_running_loop()
        config = Config(
            psks=[self.psk],
            bootstrap=[self.target],
            subscriptions=args.subscriptions,
            peer_sync_interval_s=args.peer_sync_interval,
            reassign_delay_s=parse_pair(args.reassign_delay),
            # Every broadcast of the run fits: an evicted id would turn a late copy into
            # a duplicate delivery.
            seen_set_size=max(200_000, 4 * int(args.rate * (args.duration + args.churn_duration))),
        )
        if args.heartbeat_interval is not None:
            config = config.replace(heartbeat_interval_s=args.heartbeat_interval)
        config.validate()
        self.driver = driver = PeerDriver(
            loop,
            config,
            on_message=self.on_mesh_message,
            tick_s=args.tick,
        )
        driver.on_tick = self.on_tick
        self.t0 = loop.time()
        self._next_sample = self.t0
        self.start_phase("join", self.t0)
        driver.start()
        result: dict[str, object] = {}
        try:
            # ---- join
            ok = await self.wait_until(
                lambda: self.spawned == args.peers and not self.pending_join, args.join_timeout
            )
            t_peers = loop.time() - self.t0
            node_ok = True
            if self.node is not None and ok:
                remaining = max(1.0, args.join_timeout - t_peers)
                node_ok = await self.wait_until(
                    lambda: (self.node.last_stats().get("members_up") or 0) >= args.peers,  # type: ignore[union-attr]
                    remaining,
                    step=0.2,
                )
            t_all = loop.time() - self.t0
            stats = self.node.last_stats() if self.node is not None else {}
            result["join"] = {
                "peers": args.peers,
                "completed": ok and node_ok,
                "seconds": round(t_all, 3),
                "peers_joined_seconds": round(t_peers, 3),
                "joined": len(self.ready),
                "failures": args.peers - len(self.ready),
                "join_time_s": _spread([p.joined_at - p.started_at for p in self.ready]),
                "node_members_up": stats.get("members_up"),
                "node_providers": stats.get("providers"),
                "node_subscribers": stats.get("subscribers"),
            }
            if self.error:
                raise _Abort(self.error)
            if not ok:
                self.error = (
                    f"join phase timed out after {args.join_timeout:g}s: "
                    f"{len(self.ready)}/{args.peers} peers joined"
                )
                raise _Abort(self.error)
            # ---- settle, steady, churn
            self.start_phase("settle", loop.time())
            await self.wait_until(lambda: False, args.settle)
            marks = [self._mark()]
            self.start_phase("steady", loop.time())
            await self.wait_until(lambda: False, args.duration)
            marks.append(self._mark())
            steady_s = loop.time() - self.phase_t0
            churn_s = 0.0
            if args.churn > 0 and args.churn_duration > 0:
                self.start_phase("churn", loop.time())
                await self.wait_until(lambda: False, args.churn_duration)
                churn_s = loop.time() - self.phase_t0
                marks.append(self._mark())
            # ---- drain: no new sends; wait for stragglers
            self.start_phase("drain", loop.time())
            await self._drain(args.drain)
            self.read_node_deliveries()
            self.sample(loop.time())
            self.phases[-1]["end_s"] = round(loop.time() - self.t0, 3)
            result.update(self.report(steady_s, churn_s, marks))
        except _Abort:
            self.phases[-1]["end_s"] = round(loop.time() - self.t0, 3)
        finally:
            self._end_progress()
            driver.stop()
        return result

    def _mark(self) -> dict[str, object]:
        """Cumulative counters at a phase boundary."""
        return {
            "gen_cpu": self.gen_cpu.cpu_seconds(),
            "node_cpu": self.node_cpu.cpu_seconds(),
            "rcvbuf": rcvbuf_errors(),
            "node_drops": udp_drops({self.target[1]}),
            "peer_drops": udp_drops(self._peer_ports()),
        }

    def _peer_ports(self) -> set[int]:
        assert self.driver is not None
        return {peer.addr[1] for peer in self.driver.alive.values()}

    async def _drain(self, timeout: float) -> None:
        """Wait for late deliveries: until the node has every broadcast, or nothing
        arrived anywhere for DRAIN_QUIET_S (a broadcast held by a sender that nobody
        subscribes to may never come), or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = (-1, -1)
        quiet_since = loop.time()
        while loop.time() < deadline and not self.error:
            self.read_node_deliveries()
            if self.node is not None and self.node_delivered >= len(self.send_ns):
                return
            now_counts = (self.node_delivered, self.mesh_delivered)
            if now_counts != last:
                last, quiet_since = now_counts, loop.time()
            elif loop.time() - quiet_since >= DRAIN_QUIET_S:
                return
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ report

    def node_summary(self, lo: int, hi: int, seconds: float) -> dict[str, object]:
        send, arrival = self.send_ns, self.node_arrival
        lat = [arrival[s] - send[s] for s in range(lo, hi) if arrival[s]]
        sent = hi - lo
        delivered = len(lat)
        held = [s for s in range(lo, hi) if self.held[s]]
        held_delivered = sum(1 for s in held if arrival[s])
        return {
            "sent": sent,
            "delivered": delivered,
            "missing": sent - delivered,
            "ratio": ratio(delivered, sent),
            "held_at_sender": len(held),
            "held_delivered": held_delivered,
            "ratio_sender_had_subscribers": ratio(delivered - held_delivered, sent - len(held)),
            "duplicates": self.node_dups[0 if lo < self._churn_bound() else 1],
            "latency_ms": percentiles_ms(lat),
            "offered_per_s": round(sent / seconds, 2) if seconds > 0 else None,
            "delivered_per_s": round(delivered / seconds, 2) if seconds > 0 else None,
        }

    def mesh_summary(self, lo: int, hi: int, which: int, seconds: float) -> dict[str, object]:
        """Over peers alive at the end, for broadcasts sent after each one joined."""
        expected = delivered = receivers = 0
        for peer in self.driver.peers:  # type: ignore[union-attr]
            if not peer.alive or peer.joined_at is None:
                continue
            start = max(lo, peer.first_seq)
            if start >= hi:
                continue
            receivers += 1
            own = sum(1 for s in peer.sent_seqs if start <= s < hi)
            expected += (hi - start) - own
            delivered += peer.received[start:hi].count(1)
        return {
            "receivers": receivers,
            "expected": expected,
            "delivered": delivered,
            "missing": expected - delivered,
            "ratio": ratio(delivered, expected),
            "duplicates": self.mesh_dups[which],
            # Every delivery at any peer (also at peers that later left).
            "latency_ms": percentiles_ms(self.mesh_lat[which]),
            "deliveries_per_s": round(len(self.mesh_lat[which]) / seconds, 1)
            if seconds > 0
            else None,
        }

    def report(
        self,
        steady_s: float,
        churn_s: float,
        marks: list[dict[str, object]],
    ) -> dict[str, object]:
        args = self.args
        bound = self._churn_bound()
        total = len(self.send_ns)
        out: dict[str, object] = {}
        primary = "node" if self.node is not None else "virtual-peers"

        def phase_block(lo: int, hi: int, which: int, seconds: float, mark: int) -> dict:
            block: dict[str, object] = {"seconds": round(seconds, 3)}
            mesh = self.mesh_summary(lo, hi, which, seconds)
            if self.node is not None:
                block.update(self.node_summary(lo, hi, seconds))
            else:
                block.update(
                    {
                        "sent": hi - lo,
                        "delivered": mesh["delivered"],
                        "expected": mesh["expected"],
                        "missing": mesh["missing"],
                        "ratio": mesh["ratio"],
                        "duplicates": mesh["duplicates"],
                        "latency_ms": mesh["latency_ms"],
                        "offered_per_s": round((hi - lo) / seconds, 2) if seconds > 0 else None,
                        "held_at_sender": sum(self.held[lo:hi]),
                    }
                )
            block["measured_at"] = primary
            block["mesh"] = mesh
            a, b = marks[mark], marks[mark + 1]

            def delta(key: str) -> float | None:
                x, y = a[key], b[key]
                return None if x is None or y is None or x < 0 or y < 0 else y - x

            # Full receive buffers (/proc/net/udp): on the node's port (when the node
            # runs on this host) and on the virtual peers' sockets. The snmp
            # RcvbufErrors counter is system-wide: it includes other processes.
            block["node_udp_drops"] = drops_between(a["node_drops"], b["node_drops"])
            block["peer_udp_drops"] = drops_between(a["peer_drops"], b["peer_drops"])
            block["system_udp_rcvbuf_errors"] = delta("rcvbuf")
            for key, name in (("gen_cpu", "generator_cpu_pct"), ("node_cpu", "node_cpu_pct")):
                used = delta(key)
                pct = round(100 * used / seconds, 1) if used is not None and seconds else None
                block[name] = pct
            return block

        out["steady"] = phase_block(0, bound, 0, steady_s, 0)
        if self.churn_first_seq is not None:
            churn = phase_block(bound, total, 1, churn_s, 1)
            churn.update(
                {
                    "rate": args.churn,
                    "mode": args.churn_mode,
                    "left": self.churn_left,
                    "joined": len(self.churn_join_s),
                    # Joining takes seconds: the last few spawned may still be at it.
                    "not_joined_at_end": self.churn_spawned - len(self.churn_join_s),
                    "rejoin_s": _spread(self.churn_join_s),
                }
            )
            out["churn"] = churn
        out["resources"] = self.resources()
        d = self.driver.stats  # type: ignore[union-attr]
        out["generator"] = {
            "datagrams_in": d.datagrams_in,
            "datagrams_out": d.datagrams_out,
            "send_would_block": d.send_would_block,
            "send_errors": d.send_errors,
            "recv_refused": d.recv_refused,
            "timer_services": d.timer_services,
            "ticks": d.ticks,
            "max_tick_lag_ms": round(d.max_tick_lag_s * 1000, 2),
            "mesh_foreign_messages": self.mesh_foreign,
            "peers_created": len(self.driver.peers),  # type: ignore[union-attr]
        }
        if self.node is not None:
            out["node_foreign_lines"] = self.node_foreign
        return out

    def resources(self) -> dict[str, object]:
        def series(key: str, phases: tuple[str, ...]) -> dict[str, float | None]:
            xs = [s[key] for s in self.samples if s["phase"] in phases and s[key] is not None]
            if not xs:
                return {"mean": None, "max": None}
            return {"mean": round(sum(xs) / len(xs), 1), "max": max(xs)}

        load = ("steady", "churn")
        return {
            "node_cpu_pct": {p: series("node_cpu_pct", (p,)) for p in ("join", *load)},
            "node_rss_bytes": series("node_rss_bytes", ("join", "settle", *load, "drain")),
            "generator_cpu_pct": {p: series("gen_cpu_pct", (p,)) for p in ("join", *load)},
            "generator_rss_bytes": series("gen_rss_bytes", ("join", "settle", *load, "drain")),
            "tap_cpu_pct": series("tap_cpu_pct", load),
            "loop_lag_ms": {p: series("loop_lag_ms", (p,)) for p in ("join", *load)},
            "node_processes": self.node_processes(),
        }

    def node_processes(self) -> list[dict[str, object]]:
        """CPU % and RSS of each process of the node under test, over the run."""
        per: dict[int, list[tuple[float, int]]] = {}
        for sample in self.samples:
            for pid, pct, rss in sample["node_procs"]:  # type: ignore[attr-defined]
                per.setdefault(pid, []).append((pct, rss))
        return [
            {
                "pid": pid,
                "cpu_pct_mean": round(sum(c for c, _ in xs) / len(xs), 1),
                "cpu_pct_max": max(c for c, _ in xs),
                "rss_bytes_max": max(r for _, r in xs),
                "samples": len(xs),
            }
            for pid, xs in per.items()
        ]


class _Abort(Exception):
    pass


def _spread(xs: list[float]) -> dict[str, float | int | None]:
    """Spread of durations in seconds: p50, p90, p99, max."""
    return percentile_summary(xs, (50, 90, 99))


# ---------------------------------------------------------------------------- plots


def plot(result: dict, run: LoadRun, directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    peers = result["params"]["peers"]
    paths: list[str] = []

    # Latency CDF
    fig, ax = plt.subplots(figsize=(8, 5))
    bound = run._churn_bound()
    series: list[tuple[str, list[float]]] = []
    if run.node is not None:
        for name, lo, hi in (("node, steady", 0, bound), ("node, churn", bound, len(run.send_ns))):
            xs = [
                (run.node_arrival[s] - run.send_ns[s]) / 1e6
                for s in range(lo, hi)
                if run.node_arrival[s]
            ]
            series.append((name, xs))
    series.append(("virtual peers, steady", [x / 1e6 for x in run.mesh_lat[0]]))
    series.append(("virtual peers, churn", [x / 1e6 for x in run.mesh_lat[1]]))
    for name, xs in series:
        if not xs:
            continue
        xs.sort()
        n = len(xs)
        ax.plot(xs, [(i + 1) / n for i in range(n)], label=f"{name} (n={n})")
    ax.set_xscale("log")
    ax.set_xlabel("latency, send to delivery (ms)")
    ax.set_ylabel("fraction delivered within")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"bench load: {peers} virtual peers, latency CDF")
    paths.append(_save(fig, target / "load_latency_cdf.png", plt))

    samples = result["samples"]
    t = [s["t_s"] for s in samples]

    def rate(key: str) -> tuple[list[float], list[float]]:
        # Per-interval rates; an interval much shorter than the sampling period (the
        # final sample) is merged into the next, or its rate would be pure noise.
        xs, ys = [t[0]], [0.0]
        anchor = samples[0]
        for s in samples[1:]:
            dt = s["t_s"] - anchor["t_s"]
            if dt >= SAMPLE_S / 2:
                xs.append(s["t_s"])
                ys.append((s[key] - anchor[key]) / dt)
                anchor = s
        return xs, ys

    # Throughput
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(*rate("sent"), label="sent /s")
    if run.node is not None:
        ax1.plot(*rate("node_delivered"), label="delivered at node /s")
    ax1.set_ylabel("broadcasts / s")
    ax1.legend(loc="lower left")
    ax2.plot(*rate("mesh_delivered"), color="tab:green", label="deliveries at virtual peers /s")
    ax2.set_ylabel("deliveries / s")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="lower left")
    # Nothing is sent during the join: start the time axis where sending does.
    load_start = next((p["start_s"] for p in result["phases"] if p["name"] == "settle"), 0.0)
    for ax in (ax1, ax2):
        _phase_lines(ax, result["phases"])
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=load_start)
    ax1.set_title(f"bench load: {peers} virtual peers, throughput")
    paths.append(_save(fig, target / "load_throughput.png", plt))

    # CPU and RSS
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (
        ("node_cpu_pct", "node under test"),
        ("gen_cpu_pct", "load generator"),
        ("tap_cpu_pct", "stdout tap"),
    ):
        ys = [s[key] for s in samples]
        if any(y is not None for y in ys):
            ax1.plot(t, [math.nan if y is None else y for y in ys], label=label)
    procs = _per_process(samples)
    if len(procs) > 1:  # a multiprocess node: each process too, thin
        for pid, (pcts, _) in procs.items():
            ax1.plot(t, pcts, linewidth=0.8, alpha=0.7, label=f"node pid {pid}")
    ax1.set_ylabel("CPU % (100 = one core)")
    ax1.legend(loc="center left", fontsize=8)
    for key, label in (("node_rss_bytes", "node under test"), ("gen_rss_bytes", "load generator")):
        ys = [s[key] for s in samples]
        if any(y is not None for y in ys):
            ax2.plot(t, [math.nan if y is None else y / 2**20 for y in ys], label=label)
    if len(procs) > 1:
        for pid, (_, rss) in procs.items():
            ax2.plot(t, [x / 2**20 for x in rss], linewidth=0.8, alpha=0.7, label=f"node pid {pid}")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="center left", fontsize=8)
    for ax in (ax1, ax2):
        _phase_lines(ax, result["phases"])
        ax.grid(True, alpha=0.3)
    ax1.set_title(f"bench load: {peers} virtual peers, CPU and memory")
    paths.append(_save(fig, target / "load_cpu.png", plt))
    return paths


def _per_process(samples: list[dict]) -> dict[int, tuple[list[float], list[float]]]:
    """pid -> (CPU %, RSS) aligned with samples, NaN where the process was not seen."""
    pids = sorted({p[0] for s in samples for p in s["node_procs"]})
    out: dict[int, tuple[list[float], list[float]]] = {}
    for pid in pids:
        cpu: list[float] = []
        rss: list[float] = []
        for s in samples:
            row = next((p for p in s["node_procs"] if p[0] == pid), None)
            cpu.append(math.nan if row is None else row[1])
            rss.append(math.nan if row is None else row[2])
        out[pid] = (cpu, rss)
    return out


def _phase_lines(ax, phases: list[dict]) -> None:  # type: ignore[no-untyped-def]
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


def _save(fig, path: Path, plt) -> str:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- entry


def _run_loop(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"bench load: {problem}", file=sys.stderr)
        return 2
    limit = ensure_fd_limit(args.peers + FD_MARGIN)
    if not limit.ok:
        print(
            f"bench load: --peers {args.peers} needs {limit.needed} file descriptors but "
            f"RLIMIT_NOFILE is {limit.soft} (hard {limit.hard}) and the system refused to "
            f"raise it ({limit.error}); raise it (ulimit -n) or use fewer peers",
            file=sys.stderr,
        )
        return 2
    if limit.raised and not args.quiet:
        print(
            f"bench load: raised RLIMIT_NOFILE soft limit {limit.soft_before} -> {limit.soft}",
            file=sys.stderr,
        )
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-load-"))
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    result: dict[str, object] = {
        "bench": "load",
        "machine": machine_description(),
        "params": params,
        "fd_limit": {
            "needed": limit.needed,
            "soft_before": limit.soft_before,
            "soft": limit.soft,
            "hard": limit.hard,
            "raised": limit.raised,
        },
    }
    node: NodeUnderTest | None = None
    try:
        if args.target:
            target = parse_addr(args.target)
            try:
                psk = Path(args.psk_file).read_bytes().strip()
            except OSError as exc:
                print(f"bench load: cannot read {args.psk_file}: {exc}", file=sys.stderr)
                return 2
            target_pid = args.target_pid
            result["mode"] = "target"
        else:
            key_path = workdir / "load.key"
            key_path.write_bytes(KEY + b"\n")
            psk = KEY
            node, target = spawn_node(args, workdir, key_path)
            target_pid = node.proc.pid
            result["mode"] = "spawned"
            result["node"] = {"cmd": node.cmd[1:], "pid": node.proc.pid}
            if not _wait_node_ready(node):
                result["error"] = "node under test did not start: " + node.stderr_tail()
                write_json(args.json, result)
                print(f"bench load: {result['error']}", file=sys.stderr)
                return 1
        result["target"] = f"{target[0]}:{target[1]}"
        result["measured_at"] = "node" if node is not None else "virtual-peers"
        profiler = cProfile.Profile() if args.profile else None

        async def main() -> tuple[LoadRun, dict[str, object]]:
            load = LoadRun(args, target, psk, node, target_pid)
            if profiler is not None:
                profiler.enable()
            try:
                return load, await load.run()
            finally:
                if profiler is not None:
                    profiler.disable()
                    _dump_profile(profiler, args.profile)  # also when interrupted

        # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwinds
        # through the finally blocks, so the node under test never outlives us.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_exit)
        load, measured = _run_loop(main())
        result.update(measured)
        if node is not None:
            result["node"]["final_stats"] = node.last_stats()  # type: ignore[index]
        result["phases"] = load.phases
        result["samples"] = load.samples
        if load.error:
            result["error"] = load.error
        if args.plot and "steady" in result:
            result["plots"] = plot(result, load, args.plot)
        write_json(args.json, result)
        print_summary(result)
        return 1 if load.error else 0
    finally:
        if node is not None:
            node.stop()
        if args.keep:
            print(f"bench load: work directory kept: {workdir}", file=sys.stderr)
        else:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


def _dump_profile(profiler: cProfile.Profile, path: str) -> None:
    profiler.dump_stats(path)
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
    sys.stderr.write(buf.getvalue())


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_node_ready(node: NodeUnderTest, timeout: float = 15.0) -> bool:
    """The node prints its first stats line once its loop runs (--stats-interval 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            return False
        if node.last_stats():
            return True
        time.sleep(0.05)
    return False


def print_summary(result: dict) -> None:
    join = result.get("join", {})
    lines = [
        f"bench load: {result['params']['peers']} peers against {result.get('target')} "
        f"({result.get('mode')}, measured at {result.get('measured_at')})",
        f"  join: {join.get('joined')}/{join.get('peers')} in {join.get('seconds')} s "
        f"(failures {join.get('failures')})",
    ]
    for name in ("steady", "churn"):
        block = result.get(name)
        if not block:
            continue
        lat = block["latency_ms"]
        got = (
            f"delivered {block['delivered']}"
            if block["measured_at"] == "node"
            else f"deliveries {block['delivered']}/{block['expected']} expected"
        )
        lines.append(
            f"  {name}: sent {block['sent']} {got} "
            f"ratio {_fmt(block['ratio'], 4)} dup {block['duplicates']} | latency ms "
            f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} p99.9 {lat['p99_9']} "
            f"max {lat['max']} | mesh ratio {_fmt(block['mesh']['ratio'], 4)} "
            f"| node cpu {block['node_cpu_pct']}% gen cpu {block['generator_cpu_pct']}%"
        )
    if "error" in result:
        lines.append(f"  error: {result['error']}")
    sys.stderr.write("\n".join(lines) + "\n")


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
