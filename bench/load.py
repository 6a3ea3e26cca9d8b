"""`python -m bench load`: thousands of virtual peers against one gwyh-node.

Starts a node under test (``gwyh-node --stdio``), or targets one started elsewhere
(``--target HOST:PORT`` with its ``--psk-file``), and runs ``--peers`` virtual peers
against it, sharded over ``--procs`` generator processes (bench/load_generator.py; every
virtual peer is a real NodeCore with its own node id, UDP port, handshake, keys,
subscriptions and heartbeats). Phases:

1. join: peers start at ``--join-rate``/s (windowed, paused while a generator lags),
   bootstrapping through the node; a peer has joined once it holds a session with the
   node and its confirmed providers. Reported: time until every peer (and the node) is
   in, join time per peer, the node's CPU meanwhile.
2. steady: ``--rate`` broadcasts/s of ``--size`` bytes for ``--duration`` s, each from a
   random joined peer.
3. churn: as steady, while ``--churn`` peers/s leave (``--churn-mode``) and a fresh peer
   joins in each one's place, for ``--churn-duration`` s.
4. report (bench/load_report.py): a table on stdout, JSON with ``--json FILE`` (``-``:
   stdout), PNG charts with ``--plot DIR``.

Each payload starts with ``<send time.time_ns(), 19 digits> <sequence, 10 digits>|``.
Delivery is measured at the node under test when we spawned it (its stdout lines,
timestamped on arrival by bench/load_tap.py; every broadcast should reach it exactly
once), else at the virtual peers (every peer alive at the end should get every broadcast
sent after it joined, except its own). Latency is receive time minus send time on the
same wall clock, so it includes the generator's own queueing: each generator process
reports its CPU and loop lag, and a run whose generator was saturated says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomultiprocess
import orjson
import psutil

from bench.common import (
    STATS_PREFIX,
    ProcSampler,
    free_udp_port,
    last_json_line,
    machine_description,
    node_command,
    rcvbuf_errors,
    udp_drops,
    write_json,
)
from bench.load_generator import HEADER_BYTES, ShardResult, ShardSpec, run_shard
from bench.load_report import build_report, plot, print_summary
from bench.virtual_peers import ensure_fd_limit
from gwyh_mp.config import ConfigError, parse_addr

KEY = b"bench-load-key-0123456789abcdef-0123"
FD_MARGIN = 64  # loop, pipes, files, psutil
DRAIN_QUIET_S = 3.0
SAMPLE_S = 1.0
PHASE_LEAD_S = 0.3  # phases start this far ahead, so every shard switches at once
# Default --procs: a generator process costs roughly this much of a core (%) per virtual
# peer, idle and per broadcast/s. Full peers (each broadcast reaches, and is relayed by,
# every peer: ~300 us per delivery): 500 peers at 10 msg/s of 1 KB took ~140 % of a core
# on the 2-core project VM. Light peers (no relaying, no membership): ~45 us per delivery
# and ~0.01 % idle per peer (2,000-5,000 peers at 1-10 msg/s on the same VM). The default
# keeps each process under TARGET_GEN_CPU_PCT at the steady rate.
GEN_PCT_PER_PEER = {"light": 0.002, "full": 0.01}
GEN_PCT_PER_PEER_MSG = {"light": 0.0045, "full": 0.03}
TARGET_GEN_CPU_PCT = 70.0
MAX_DEFAULT_PROCS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        help="extra argument for the spawned gwyh-node (repeat; e.g. --node-arg=--workers=2)",
    )
    g = parser.add_argument_group("load")
    g.add_argument("--peers", type=int, default=2000, help="virtual peers")
    g.add_argument(
        "--procs",
        type=int,
        default=None,
        help="generator processes the peers are sharded over (default: enough that "
        f"none should exceed ~{TARGET_GEN_CPU_PCT:.0f} %% of a core)",
    )
    g.add_argument("--rate", type=float, default=2.0, help="broadcasts/s over all peers")
    g.add_argument("--size", type=int, default=256, help="payload bytes (>= 32)")
    g.add_argument("--duration", type=float, default=30.0, help="steady phase seconds")
    g.add_argument("--churn", type=float, default=1.0, help="peers leaving+rejoining per s")
    g.add_argument("--churn-duration", type=float, default=15.0, help="churn phase seconds")
    g.add_argument(
        "--churn-mode",
        choices=["graceful", "crash"],
        default="graceful",
        help="how a churned peer leaves: announce DOWN, or go silent",
    )
    g.add_argument("--join-rate", type=float, default=50.0, help="peers started per second")
    g.add_argument(
        "--join-window",
        type=int,
        default=20,
        help="at most this many peers joining at once (and none while a generator lags)",
    )
    g.add_argument("--join-timeout", type=float, default=900.0, help="join phase bound (s)")
    g.add_argument("--settle", type=float, default=2.0, help="pause after the join (s)")
    g.add_argument("--drain", type=float, default=15.0, help="max wait for late deliveries (s)")
    g = parser.add_argument_group("virtual peers")
    g.add_argument(
        "--peer-mode",
        choices=["light", "full"],
        default="light",
        help="light: peers subscribe to the node only and drop membership floods (cost per "
        "message independent of --peers); full: every peer a complete node (O(N^2) join)",
    )
    g.add_argument("--subscriptions", type=int, default=5, help="providers per virtual peer")
    g.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        metavar="S",
        help="virtual peers' heartbeat, also passed to a spawned node (default: the node's)",
    )
    g.add_argument(
        "--peer-sync-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="virtual peers' anti-entropy peer-list pull",
    )
    g.add_argument(
        "--reassign-delay",
        default="0.05,0.5",
        metavar="LOW,HIGH",
        help="virtual peers' provider re-selection delay (s)",
    )
    g.add_argument("--tick", type=float, default=0.005, help="generator timer tick (s)")
    g.add_argument("--seed", type=int, default=1, help="sender and churn choices")
    g = parser.add_argument_group("output")
    g.add_argument("--plot", metavar="DIR", help="latency CDF, throughput and CPU PNGs")
    g.add_argument("--profile", metavar="FILE", help="cProfile generator process 0 into FILE")
    g.add_argument("--keep", action="store_true", help="keep the work directory")


def check_args(args: argparse.Namespace) -> str | None:
    if args.peers < 1:
        return "--peers must be >= 1"
    if args.procs is not None and not 1 <= args.procs <= min(64, args.peers):
        return "--procs must be 1-64 and at most --peers"
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


def parse_pair(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    if not 0 <= low <= high:
        raise ValueError(text)
    return low, high


def default_procs(peers: int, rate: float, mode: str = "light") -> int:
    """Generator processes so that none should exceed TARGET_GEN_CPU_PCT of a core."""
    load_pct = peers * (GEN_PCT_PER_PEER[mode] + GEN_PCT_PER_PEER_MSG[mode] * rate)
    return max(1, min(MAX_DEFAULT_PROCS, peers, math.ceil(load_pct / TARGET_GEN_CPU_PCT)))


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

    def process_records(self) -> dict[str, dict[str, Any]]:
        """role (coordinator, receiver-N) -> its latest process record (multiprocess
        runtime: the receivers' own counters, e.g. send_dropped, are only there)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            lines = self.err_path.read_bytes().splitlines()[-64:]
        except OSError:
            lines = []
        for line in lines:
            if line.startswith(b'{"event":"process"'):
                record = orjson.loads(line)
                out[str(record.get("role"))] = record
        return out

    def roles(self) -> dict[int, str]:
        """pid -> role (coordinator, receiver-N) from the node's process records."""
        return {
            r["pid"]: role
            for role, r in self.process_records().items()
            if isinstance(r.get("pid"), int)
        }

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join([line for line in text if not line.startswith('{"event"')][-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
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
        close_fds=True,
    )
    proc.stdout.close()  # the tap owns the read end now
    return NodeUnderTest(proc, tap, cmd, out_path, err_path), ("127.0.0.1", port)


class ProcTreeSampler:
    """The node under test may be several processes (coordinator + receivers): sample
    each one, and their sum."""

    def __init__(self, pid: int | None) -> None:
        self.root = ProcSampler(pid)
        self.children: dict[int, ProcSampler] = {}
        self.helpers: dict[int, str] = {}  # pid -> role of a process that is not the node's own
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
                with contextlib.suppress(psutil.Error):
                    if "resource_tracker" in " ".join(kid.cmdline()):
                        self.helpers[kid.pid] = "resource tracker"

    def _all(self) -> list[ProcSampler]:
        return [self.root, *self.children.values()]

    def cpu_seconds(self) -> float | None:
        if self.root.proc is None:
            return None
        self._refresh()
        return sum(x for x in (p.cpu_seconds() for p in self._all()) if x is not None)

    def sample(self) -> tuple[float | None, int | None, list[list[Any]]]:
        if self.root.proc is None:
            return None, None, []
        self._refresh()
        per: list[list[Any]] = []
        for sampler in self._all():
            pct, rss = sampler.sample()
            if pct is not None and sampler.proc is not None:
                per.append([sampler.proc.pid, pct, rss])
        if not per:
            return None, None, []
        return round(sum(p[1] for p in per), 1), sum(p[2] for p in per), per


# ---------------------------------------------------------------------------- the run


class _Abort(Exception):
    pass


class LoadRun:
    """Drives the phases from the parent: starts the generator shards, tells them when
    each phase starts, samples the node and the shards, and gathers the shards' results."""

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
        self.procs = args.procs or default_procs(args.peers, args.rate, args.peer_mode)
        self.progress = not args.quiet
        self.phases: list[dict[str, Any]] = []
        self.phase = "join"
        self.t0 = self.phase_t0 = 0.0
        self.samples: list[dict[str, Any]] = []
        self.status: dict[int, dict[str, Any]] = {}
        self.node_cpu = ProcTreeSampler(target_pid)
        self.tap_cpu = ProcSampler(node.tap.pid if node is not None else None)
        self.error: str | None = None
        # Node-side deliveries: seq -> tap arrival ns (0 = not yet).
        self.node_arrival = array("q")
        self.node_dups = [0, 0]  # steady, churn
        self.node_delivered = self.node_foreign = 0
        self.churn_start_ns: int | None = None
        self.workers: list[aiomultiprocess.Worker] = []
        self.controls: list[Any] = []
        self.results: list[ShardResult] = []
        self.stopping = False
        self._last_progress = self._next_sample = 0.0

    # ------------------------------------------------------------ shards

    def shard_specs(self) -> list[ShardSpec]:
        args, n = self.args, self.procs
        low, high = parse_pair(args.reassign_delay)
        total_s = args.duration + args.churn_duration
        return [
            ShardSpec(
                index=i,
                procs=n,
                peers=args.peers // n + (1 if i < args.peers % n else 0),
                total_peers=args.peers,
                target=self.target,
                psk=self.psk,
                # A light peer knows only the node: one provider is all it can have.
                subscriptions=1 if args.peer_mode == "light" else args.subscriptions,
                peer_sync_interval=args.peer_sync_interval,
                reassign_delay=(low, high),
                heartbeat_interval=args.heartbeat_interval,
                seen_set_size=max(200_000, 4 * int(args.rate * total_s)),
                tick_s=args.tick,
                seed=args.seed,
                size=args.size,
                rate=args.rate / n,
                churn=args.churn / n,
                graceful_churn=args.churn_mode == "graceful",
                join_rate=args.join_rate / n,
                join_window=max(1, math.ceil(args.join_window / n)),
                light=args.peer_mode == "light",
                profile=args.profile if i == 0 else None,
            )
            for i in range(n)
        ]

    def start_shards(self) -> None:
        ctx = aiomultiprocess.core.get_context()
        self.status_queue = ctx.Queue()
        loop_init = _uvloop_factory()
        for spec in self.shard_specs():
            control = ctx.Queue()
            worker = aiomultiprocess.Worker(
                target=run_shard,
                args=(spec, control, self.status_queue),
                loop_initializer=loop_init,
                daemon=True,
            )
            worker.start()
            self.controls.append(control)
            self.workers.append(worker)

    def tell(self, name: str, start_ns: int = 0) -> None:
        for control in self.controls:
            control.put((name, start_ns))

    def read_status(self) -> None:
        q = self.status_queue
        while True:
            try:
                record = q.get_nowait()
            except Exception:  # queue.Empty; a dead shard shows in check_shards
                return
            self.status[record["shard"]] = record
            if record.get("error") and not self.error:
                self.error = f"generator {record['shard']}: {record['error']}"

    def check_shards(self) -> None:
        if self.stopping:
            return
        for i, worker in enumerate(self.workers):
            if worker.exitcode is not None and not self.error:
                self.error = f"generator {i} exited early ({worker.exitcode})"

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.status.values())

    async def stop_shards(self) -> None:
        self.stopping = True
        self.tell("stop")
        for i, worker in enumerate(self.workers):
            try:
                await worker.join(60)
                result = worker.result
            except Exception as exc:  # a hung or failed shard: the report says so
                self.error = self.error or f"generator {i}: {type(exc).__name__}: {exc}"
                worker.terminate()
                continue
            if isinstance(result, BaseException):
                self.error = self.error or f"generator {i}: {result!r}"
            elif isinstance(result, ShardResult):
                self.results.append(result)
        self.read_status()

    # ------------------------------------------------------------ node deliveries

    def read_node_deliveries(self) -> None:
        if self.node is None:
            return
        arrival = self.node_arrival
        churn_ns = self.churn_start_ns
        for line in self.node.read_lines():
            space = line.find(b" ")
            try:
                stamp = int(line[:space])
                record = orjson.loads(line[space + 1 :])
                data = record["data"]
                if record.get("encoding") or len(data) < HEADER_BYTES or data[30] != "|":
                    raise ValueError(data[:40])
                send_ns, seq = int(data[:19]), int(data[20:30])
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                self.node_foreign += 1
                continue
            if seq >= len(arrival):
                arrival.extend(bytes(8 * (max(seq + 1, 2 * len(arrival), 1024) - len(arrival))))
                arrival = self.node_arrival
            if arrival[seq]:
                self.node_dups[1 if churn_ns is not None and send_ns >= churn_ns else 0] += 1
                continue
            arrival[seq] = stamp
            self.node_delivered += 1

    # ------------------------------------------------------------ phases

    def start_phase(self, name: str, now: float, start_ns: int | None = None) -> None:
        if self.phases:
            self.phases[-1]["end_s"] = round(now - self.t0, 3)
        self.phases.append(
            {"name": name, "start_s": round(now - self.t0, 3), "start_ns": start_ns or 0}
        )
        self.phase, self.phase_t0 = name, now
        self.progress_line(now, force=True)

    async def timed_phase(self, name: str, seconds: float) -> float:
        """Start ``name`` at the same wall-clock instant in every shard; run it for
        ``seconds``; return how long it really ran."""
        loop = asyncio.get_running_loop()
        start_ns = time.time_ns() + int(PHASE_LEAD_S * 1e9)
        if name == "churn":
            self.churn_start_ns = start_ns
        self.tell(name, start_ns)
        await self.wait_until(lambda: time.time_ns() >= start_ns, PHASE_LEAD_S + 1)
        self.start_phase(name, loop.time(), start_ns)
        await self.wait_until(lambda: False, seconds)
        return loop.time() - self.phase_t0

    async def wait_until(self, predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self.poll(loop.time())
            if self.error:
                return False
            if predicate():
                return True
            await asyncio.sleep(step)
        return predicate()

    def poll(self, now: float) -> None:
        self.read_status()
        if now >= self._next_sample:
            self._next_sample = max(self._next_sample + SAMPLE_S, now + SAMPLE_S / 2)
            self.sample(now)

    async def run(self) -> dict[str, Any]:
        args = self.args
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        self._next_sample = self.t0
        self.start_shards()
        self.start_phase("join", self.t0, time.time_ns())
        self.tell("join", time.time_ns())
        result: dict[str, Any] = {"generator_procs": self.procs}
        marks: list[dict[str, Any]] = [self.mark()]
        try:
            ok = await self.wait_until(
                lambda: self.total("joined") >= args.peers, args.join_timeout
            )
            t_peers = loop.time() - self.t0
            node_ok = True
            if self.node is not None and ok:
                node_ok = await self.wait_until(
                    lambda: (self.node.last_stats().get("members_up") or 0) >= args.peers,  # type: ignore[union-attr]
                    max(1.0, args.join_timeout - t_peers),
                    step=0.2,
                )
            stats = self.node.last_stats() if self.node is not None else {}
            result["join"] = {
                "peers": args.peers,
                "completed": ok and node_ok,
                "seconds": round(loop.time() - self.t0, 3),
                "peers_joined_seconds": round(t_peers, 3),
                "joined": self.total("joined"),
                "failures": args.peers - self.total("joined"),
                "node_members_up": stats.get("members_up"),
                "node_providers": stats.get("providers"),
                "node_subscribers": stats.get("subscribers"),
            }
            marks.append(self.mark())
            if self.error:
                raise _Abort(self.error)
            if not ok:
                self.error = (
                    f"join phase timed out after {args.join_timeout:g}s: "
                    f"{self.total('joined')}/{args.peers} peers joined"
                )
                raise _Abort(self.error)
            self.start_phase("settle", loop.time(), time.time_ns())
            await self.wait_until(lambda: False, args.settle)
            marks.append(self.mark())
            seconds = {"steady": await self.timed_phase("steady", args.duration)}
            marks.append(self.mark())
            if args.churn > 0 and args.churn_duration > 0:
                seconds["churn"] = await self.timed_phase("churn", args.churn_duration)
                marks.append(self.mark())
            await self.timed_phase("drain", 0)
            await self.drain(args.drain)
            self.read_node_deliveries()
            result["marks"] = marks
            result["seconds"] = seconds
        except _Abort:
            pass
        finally:
            await self.stop_shards()
            self.read_node_deliveries()
            self.sample(loop.time())
            self.phases[-1]["end_s"] = round(loop.time() - self.t0, 3)
            self.end_progress()
        return result

    def mark(self) -> dict[str, Any]:
        """Cumulative counters at a phase boundary."""
        self.read_status()
        return {
            "gen_cpu": sum(s.get("cpu_s", 0.0) for s in self.status.values()),
            "node_cpu": self.node_cpu.cpu_seconds(),
            "rcvbuf": rcvbuf_errors(),
            "node_drops": udp_drops({self.target[1]}),
            "t": time.monotonic(),
        }

    async def drain(self, timeout: float) -> None:
        """Wait for late deliveries: until the node has every broadcast, or nothing
        arrived anywhere for DRAIN_QUIET_S (a broadcast held by a sender that nobody
        subscribes to may never come), or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = (-1, -1)
        quiet_since = loop.time()
        while loop.time() < deadline and not self.error:
            self.poll(loop.time())
            self.read_node_deliveries()
            settled = all(s.get("phase") == "drain" for s in self.status.values())
            if self.node is not None and settled and self.node_delivered >= self.total("sent"):
                return
            counts = (self.node_delivered, self.total("mesh_delivered"))
            if counts != last:
                last, quiet_since = counts, loop.time()
            elif loop.time() - quiet_since >= DRAIN_QUIET_S:
                return
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------ sampling

    def sample(self, now: float) -> None:
        self.read_node_deliveries()
        self.check_shards()
        node_pct, node_rss, node_procs = self.node_cpu.sample()
        tap_pct, _ = self.tap_cpu.sample()
        stats = self.node.last_stats() if self.node is not None else {}
        shards = [self.status[i] for i in sorted(self.status)]
        self.samples.append(
            {
                "t_s": round(now - self.t0, 3),
                "phase": self.phase,
                "sent": self.total("sent"),
                "node_delivered": self.node_delivered,
                "mesh_delivered": self.total("mesh_delivered"),
                "peers_alive": self.total("alive"),
                "peers_joined": self.total("joined"),
                "node_cpu_pct": node_pct,
                "node_rss_bytes": node_rss,
                "node_procs": node_procs,  # [pid, cpu %, rss] per node process
                "system_cpu_pct": psutil.cpu_percent(None),  # 100 = every core busy
                "node_members_up": stats.get("members_up"),
                "node_packets_in": stats.get("packets_in"),
                "node_packets_out": stats.get("packets_out"),
                "node_subscribers": stats.get("subscribers"),
                "node_sessions_established": stats.get("sessions_established"),
                "node_tail_probes": stats.get("tail_probes_sent"),
                "node_hello_overload": stats.get("handshake_hello_overload"),
                # [shard, cpu %, worst loop lag ms, rss] per generator process
                "gen_procs": [
                    [s["shard"], s["cpu_pct"], s["lag_ms"], s["rss_bytes"]] for s in shards
                ],
                "gen_cpu_pct": round(sum(s["cpu_pct"] for s in shards), 1) if shards else None,
                "gen_rss_bytes": sum(s["rss_bytes"] for s in shards) if shards else None,
                "loop_lag_ms": max((s["lag_ms"] for s in shards), default=None),
                "tap_cpu_pct": tap_pct,
            }
        )
        if self.node is not None and self.node.proc.poll() is not None and not self.error:
            self.error = f"node under test exited ({self.node.proc.returncode}): " + (
                self.node.stderr_tail()
            )
        self.progress_line(now)

    def progress_line(self, now: float, force: bool = False) -> None:
        if not self.progress or not self.samples:
            return
        if not force and now - self._last_progress < 5.0:
            return
        self._last_progress = now
        s = self.samples[-1]
        parts = [
            f"[{self.phase:>6} {now - self.phase_t0:5.0f} s]",
            f"joined {s['peers_joined']} of {self.args.peers} peers",
            f"sent {s['sent']}",
        ]
        if self.node is not None:
            parts.append(f"node got {s['node_delivered']}, sees {s['node_members_up']} up")
        parts.append(f"peers got {s['mesh_delivered']}")
        if s["node_cpu_pct"] is not None:
            parts.append(f"node CPU {s['node_cpu_pct']:.0f} %, {s['node_rss_bytes'] >> 20} MiB")
        if s["gen_procs"]:
            worst = max(s["gen_procs"], key=lambda g: g[1])
            parts.append(
                f"generator CPU {s['gen_cpu_pct']:.0f} % over {len(s['gen_procs'])} procs "
                f"(max {worst[1]:.0f} %), lag {s['loop_lag_ms']:.0f} ms"
            )
        sys.stderr.write(" | ".join(parts) + "\n")
        sys.stderr.flush()

    def end_progress(self) -> None:
        if self.progress:
            sys.stderr.flush()


# ---------------------------------------------------------------------------- entry


def _uvloop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


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
    procs = args.procs or default_procs(args.peers, args.rate, args.peer_mode)
    per_shard = math.ceil(args.peers / procs)
    limit = ensure_fd_limit(per_shard + FD_MARGIN)
    if not limit.ok:
        print(
            f"bench load: {per_shard} peers per generator process need {limit.needed} file "
            f"descriptors but RLIMIT_NOFILE is {limit.soft} (hard {limit.hard}) and the system "
            f"refused to raise it ({limit.error}); raise it (ulimit -n) or use more --procs",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gwyh-load-"))
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    params["procs"] = procs
    result: dict[str, Any] = {
        "bench": "load",
        "machine": machine_description(),
        "params": params,
        "fd_limit": {"needed": limit.needed, "soft": limit.soft, "raised": limit.raised},
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
        # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwinds
        # through the finally blocks, so neither the node nor a generator outlives us.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_exit)

        async def main() -> tuple[LoadRun, dict[str, Any]]:
            load = LoadRun(args, target, psk, node, target_pid)
            return load, await load.run()

        load, measured = _run_loop(main())
        roles = {**load.node_cpu.helpers, **(node.roles() if node is not None else {})}
        if node is not None:
            result["node"]["final_stats"] = node.last_stats()
            result["node"]["final_process_stats"] = node.process_records()
        result.update(build_report(args, load, measured, roles))
        if args.plot and "steady" in result:
            result["plots"] = plot(result, load, roles, args.plot)
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
