"""One load-generator process of ``bench load``: a shard of the virtual peers.

A single event loop that hosts thousands of real protocol peers saturates long before
the node under test does, and then its own queueing shows up as the node's latency.
``bench load --procs P`` therefore shards the peers over P of these processes
(aiomultiprocess workers, one uvloop loop each). A shard:

- joins its peers at its share of the join rate, windowed, and pauses while its loop
  lags (a saturated loop misses heartbeats and turns the join into a storm of DOWNs);
- sends its share of the broadcasts, numbering them ``k * P + shard`` so sequence
  numbers are unique without any coordination;
- churns its share of the peers;
- every STATUS_S reports its counters, its CPU and its worst loop lag on a queue, and
  at the end returns what the report needs (send log, per-peer receipts, latencies).

Phases arrive on a control queue as ``(name, wall_ns)``: every shard switches at the
same wall-clock instant, so a broadcast's phase is simply the phase its send time
falls in, the same for every shard and for the node under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import os
import queue
import random
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from bench.virtual_peers import PeerDriver, VirtualPeer, confirmed_providers, has_session_with
from gwyh_mp.config import Config

Addr = tuple[str, int]
HEADER_BYTES = 31  # b"%019d %010d|": send time.time_ns(), sequence number
SEP = ord("|")
STATUS_S = 0.5
CONTROL_S = 0.02
JOIN_CHECK_S = 0.05
JOIN_MAX_LAG_S = 0.25
SENDING_PHASES = ("steady", "churn")


@dataclass(frozen=True)
class ShardSpec:
    """What one generator process is asked to do (pickled to it at start)."""

    index: int
    procs: int
    peers: int  # this shard's peers
    total_peers: int
    target: Addr
    psk: bytes
    subscriptions: int
    peer_sync_interval: float
    reassign_delay: tuple[float, float]
    heartbeat_interval: float | None
    seen_set_size: int
    tick_s: float
    seed: int
    size: int
    rate: float  # this shard's broadcasts/s
    churn: float  # this shard's peers leaving (and replaced) per s
    graceful_churn: bool
    join_rate: float
    join_window: int
    light: bool = True  # light virtual peers (bench/virtual_peers.py make_light)
    profile: str | None = None


def header(send_ns: int, seq: int) -> bytes:
    return b"%019d %010d|" % (send_ns, seq)


def parse_header(data: bytes) -> tuple[int, int] | None:
    """(send_ns, seq) of one of our payloads; None for anything else."""
    if len(data) < HEADER_BYTES or data[HEADER_BYTES - 1] != SEP:
        return None
    try:
        return int(data[:19]), int(data[20:30])
    except ValueError:
        return None


@dataclass
class ShardResult:
    """Everything the report needs from one shard; plain types so it pickles cheaply."""

    index: int
    send_seqs: bytes  # array("q")
    send_ns: bytes  # array("q")
    held: bytes  # 1 = its sender had no subscriber when it was sent
    # Peers alive at the end that had joined: (joined wall ns, receipts by seq, own seqs).
    receivers: list[tuple[int, bytes, list[int]]]
    mesh_latency_ns: tuple[bytes, bytes]  # array("q") per phase: steady, churn
    mesh_duplicates: tuple[int, int]
    mesh_delivered: int
    mesh_foreign: int
    join_s: list[float]  # first join of each initial peer, seconds
    rejoin_s: list[float]  # peers spawned during churn
    churn_left: int
    churn_spawned: int
    peers_created: int
    driver: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Shard:
    def __init__(self, spec: ShardSpec, control: Any, status: Any) -> None:
        self.spec = spec
        self.control = control
        self.status = status
        self.rng = random.Random(spec.seed * 1_000_003 + spec.index)
        self.loop = asyncio.get_running_loop()
        self.phase = "idle"
        self.pending_phases: list[tuple[str, int]] = []
        self.phase_t0 = 0.0
        self.phase_sent = 0
        self.churn_done = 0
        self.churn_start_ns: int | None = None
        self.spawned = 0
        self.pending_join: dict[int, VirtualPeer] = {}
        self.ready: list[VirtualPeer] = []
        self._ready_pos: dict[int, int] = {}
        self.joined_ns: dict[int, int] = {}
        self.join_s: list[float] = []
        self.replacements: set[int] = set()  # peers spawned by churn, in a leaver's place
        self.rejoin_s: list[float] = []
        self.churn_left = self.churn_spawned = 0
        self.send_seqs, self.send_ns, self.held = array("q"), array("q"), bytearray()
        self.sent_by: dict[int, list[int]] = {}
        self.mesh_lat = (array("q"), array("q"))
        self.mesh_dups = [0, 0]
        self.mesh_delivered = self.mesh_foreign = 0
        self.stopping = False
        self.error: str | None = None
        self._next_control = self._next_status = self._next_join_check = 0.0
        self._proc = psutil.Process(os.getpid())
        self._cpu_last = (time.monotonic(), self._cpu())
        config = Config(
            psks=[spec.psk],
            bootstrap=[spec.target],
            subscriptions=spec.subscriptions,
            peer_sync_interval_s=spec.peer_sync_interval,
            reassign_delay_s=spec.reassign_delay,
            # Every broadcast of the run fits: an evicted id would turn a late copy into
            # a duplicate delivery.
            seen_set_size=spec.seen_set_size,
        )
        if spec.heartbeat_interval is not None:
            config = config.replace(heartbeat_interval_s=spec.heartbeat_interval)
        config.validate()
        self.driver = PeerDriver(
            self.loop, config, on_message=self.on_message, tick_s=spec.tick_s, light=spec.light
        )
        self.driver.on_tick = self.on_tick

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    # ------------------------------------------------------------ deliveries

    def on_message(self, peer: VirtualPeer, data: bytes, now_ns: int) -> None:
        parsed = parse_header(data)
        if parsed is None:
            self.mesh_foreign += 1
            return
        send_ns, seq = parsed
        got = peer.received
        if seq >= len(got):
            got.extend(bytes(max(seq + 1, 2 * len(got), 256) - len(got)))
        phase = 1 if self.churn_start_ns is not None and send_ns >= self.churn_start_ns else 0
        if got[seq]:
            self.mesh_dups[phase] += 1
            return
        got[seq] = 1
        self.mesh_delivered += 1
        self.mesh_lat[phase].append(now_ns - send_ns)

    # ------------------------------------------------------------ peers

    def _mark_ready(self, peer: VirtualPeer, now: float) -> None:
        peer.joined_at = now
        self.joined_ns[peer.index] = time.time_ns()
        self._ready_pos[peer.index] = len(self.ready)
        self.ready.append(peer)
        took = now - peer.started_at
        (self.rejoin_s if peer.index in self.replacements else self.join_s).append(took)

    def _unready(self, peer: VirtualPeer) -> None:
        pos = self._ready_pos.pop(peer.index, None)
        if pos is None:
            return
        last = self.ready.pop()
        if last is not peer:
            self.ready[pos] = last
            self._ready_pos[last.index] = pos

    def _check_joins(self, now: float) -> None:
        # Peers the whole generator has started, as far as this shard can tell: a peer
        # cannot confirm more providers than there are members.
        started = min(self.spec.total_peers, self.spawned * self.spec.procs)
        need = min(self.spec.subscriptions, started)
        for index, peer in list(self.pending_join.items()):
            if confirmed_providers(peer.core) >= need and has_session_with(
                peer.core, self.spec.target
            ):
                del self.pending_join[index]
                self._mark_ready(peer, now)

    def _spawn(self) -> VirtualPeer:
        peer = self.driver.spawn()
        self.pending_join[peer.index] = peer
        self.spawned += 1
        return peer

    def _send_one(self) -> None:
        if not self.ready:
            return
        peer = self.ready[self.rng.randrange(len(self.ready))]
        seq = len(self.send_seqs) * self.spec.procs + self.spec.index
        now_ns = time.time_ns()
        head = header(now_ns, seq)
        self.send_seqs.append(seq)
        self.send_ns.append(now_ns)
        self.held.append(0 if peer.core.subscribers else 1)
        self.sent_by.setdefault(peer.index, []).append(seq)
        self.driver.broadcast(peer, head + b"x" * (self.spec.size - len(head)))

    # ------------------------------------------------------------ the tick

    def on_tick(self, now: float) -> None:
        try:
            self._on_tick(now)
        except Exception as exc:  # stop at the next check instead of hanging
            self.error = f"{type(exc).__name__}: {exc}"
            self.stopping = True
            raise

    def _on_tick(self, now: float) -> None:
        spec = self.spec
        if now >= self._next_control:
            self._next_control = now + CONTROL_S
            self._read_control()
        if self.pending_phases and time.time_ns() >= self.pending_phases[0][1]:
            name, start_ns = self.pending_phases.pop(0)
            self.phase, self.phase_t0, self.phase_sent = name, now, 0
            if name == "churn":
                self.churn_start_ns = start_ns
        elapsed = now - self.phase_t0
        if self.phase == "join":
            due = min(spec.peers, int(elapsed * spec.join_rate) + 1)
            while (
                self.spawned < due
                and len(self.pending_join) < spec.join_window
                and self.driver.last_lag < JOIN_MAX_LAG_S
            ):
                self._spawn()
        if self.phase in SENDING_PHASES and spec.rate > 0:
            due = int(elapsed * spec.rate) + 1
            while self.phase_sent < due:
                self._send_one()
                self.phase_sent += 1
        if self.phase == "churn" and spec.churn > 0:
            due = int(elapsed * spec.churn)
            while self.churn_done < due:
                self.churn_done += 1
                if self.ready:
                    victim = self.ready[self.rng.randrange(len(self.ready))]
                    self._unready(victim)
                    self.driver.retire(victim, graceful=spec.graceful_churn)
                    self.churn_left += 1
                    self.replacements.add(self._spawn().index)
                    self.churn_spawned += 1
        if now >= self._next_join_check:
            self._next_join_check = now + JOIN_CHECK_S
            if self.pending_join:
                self._check_joins(now)
        if now >= self._next_status:
            self._next_status = now + STATUS_S
            self.report_status()

    def _read_control(self) -> None:
        while True:
            try:
                name, start_ns = self.control.get_nowait()
            except queue.Empty:
                return
            if name == "stop":
                self.stopping = True
            else:
                self.pending_phases.append((name, start_ns))

    def report_status(self) -> None:
        now, cpu = time.monotonic(), self._cpu()
        t0, c0 = self._cpu_last
        self._cpu_last = (now, cpu)
        d = self.driver.stats
        self.status.put(
            {
                "shard": self.spec.index,
                "pid": os.getpid(),
                "phase": self.phase,
                "spawned": self.spawned,
                "joined": len(self.ready),
                "alive": len(self.driver.alive),
                "sent": len(self.send_seqs),
                "mesh_delivered": self.mesh_delivered,
                "cpu_pct": round(100.0 * (cpu - c0) / (now - t0), 1) if now > t0 else 0.0,
                "cpu_s": round(cpu, 3),
                "rss_bytes": self._proc.memory_info().rss,
                "lag_ms": round(self.driver.take_lag() * 1000, 2),
                "datagrams_in": d.datagrams_in,
                "datagrams_out": d.datagrams_out,
                "error": self.error,
            }
        )

    # ------------------------------------------------------------ run

    async def run(self) -> ShardResult:
        self.driver.start()
        try:
            while not self.stopping:
                await asyncio.sleep(0.05)
        finally:
            self.report_status()
            result = self.result()
            self.driver.stop()
        return result

    def result(self) -> ShardResult:
        receivers = []
        for peer in self.driver.peers:
            joined = self.joined_ns.get(peer.index)
            if peer.alive and joined is not None:
                own = self.sent_by.get(peer.index, [])
                receivers.append((joined, bytes(peer.received), own))
        return ShardResult(
            index=self.spec.index,
            send_seqs=self.send_seqs.tobytes(),
            send_ns=self.send_ns.tobytes(),
            held=bytes(self.held),
            receivers=receivers,
            mesh_latency_ns=(self.mesh_lat[0].tobytes(), self.mesh_lat[1].tobytes()),
            mesh_duplicates=(self.mesh_dups[0], self.mesh_dups[1]),
            mesh_delivered=self.mesh_delivered,
            mesh_foreign=self.mesh_foreign,
            join_s=self.join_s,
            rejoin_s=self.rejoin_s,
            churn_left=self.churn_left,
            churn_spawned=self.churn_spawned,
            peers_created=len(self.driver.peers),
            driver=asdict(self.driver.stats),
            error=self.error,
        )


async def run_shard(spec: ShardSpec, control: Any, status: Any) -> ShardResult:
    """aiomultiprocess target: drive one shard until told to stop."""
    shard = Shard(spec, control, status)
    if spec.profile is None:
        return await shard.run()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return await shard.run()
    finally:
        profiler.disable()
        with contextlib.suppress(OSError):
            profiler.dump_stats(spec.profile)
