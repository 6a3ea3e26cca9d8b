"""`python -m bench membership`: how fast a real cluster converges, how fast it notices a
crash, and how often it accuses a live node, as a user of the library would see it.

For each of ``--repeat`` rounds a fresh cluster of ``--nodes`` nodes of ``--preset`` runs:

1. convergence: every node starts (all bootstrap through node 0); the time from the
   moment every node runs until every node reports the other N - 1 UP (JSON: also from
   the first node's start, and the start-up time in between).
2. quiet period: ``--quiet-period`` seconds of nothing; every DOWN a node reports about
   a live node is a false DOWN. Membership traffic is measured here (packets received
   per node per second from the nodes' stats; bytes sent per node per second when the
   traffic crosses the relay, which counts bytes).
3. crash: one node (not the seed) stops without leaving; the time until the first and
   until every survivor reports it DOWN (kinship: dead, with the first suspicion too).

Modes: by default every node runs in this process on one event loop through the public
``gwyh_mp.api.Node`` (``Config.<preset>(workers=1)``), except the crash victim, which
runs in a child process so that it can really crash (SIGKILL; ``Node.stop()`` would
leave gracefully). ``--processes`` starts one ``gwyh-node`` process per node instead and
reads the membership from their ``--stats-interval`` lines (``members_up``), so its
times are quantized to that interval. ``--loss P`` puts every node behind the fault
relay (``python -m gwyh_mp.relay``) dropping P of the datagrams. ``--compare kinship``
runs kinship's preset of the same name side by side, rounds interleaved; its victim
crashes in-process with ``close()`` (no leave), which kinship documents as a crash.

Output: a table on stdout (stderr when ``--json -`` takes stdout), JSON with the machine
description through ``--json FILE`` or ``--json -``; progress lines on stderr unless
``--quiet``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from bench.common import machine_description, median, node_command
from gwyh_mp.api import MemberEvent, Node
from gwyh_mp.config import Config
from gwyh_mp.protocol.events import MemberDown, MemberSuspect, MemberUp

PRESETS = ("local", "lan", "wan")
KEY = b"bench-membership-key-0123456789ab"
STATS_INTERVAL_S = 0.1  # --processes: resolution of every time measured from stats lines
POLL_S = 0.02

# Per-round figures summarized as medians, in table order.
FIGURES = (
    "convergence_s",
    "convergence_from_first_start_s",
    "crash_first_s",
    "crash_all_s",
    "suspect_first_s",
    "false_down_events",
    "accused_live_nodes",
    "declared_down",
    "packets_in_per_node_per_s",
    "bytes_out_per_node_per_s",
    "loop_lag_max_s",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    g = parser.add_argument_group("cluster")
    g.add_argument("--preset", choices=PRESETS, default="local", help="Config preset")
    g.add_argument("--nodes", type=int, default=50, help="cluster size N (>= 3)")
    g.add_argument(
        "--processes",
        action="store_true",
        help="one gwyh-node process per node instead of one process for all",
    )
    g.add_argument(
        "--loss",
        type=float,
        default=None,
        metavar="P",
        help="route every datagram through the fault relay, dropping P of them "
        "(0 relays without loss, to count membership bytes); unset: no relay",
    )
    g = parser.add_argument_group("measurement")
    g.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    g.add_argument(
        "--quiet-period",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds of quiet between convergence and the crash (false DOWNs, traffic)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="give up waiting for convergence or for the crash to be detected after this",
    )
    g.add_argument("--seed", type=int, default=1, help="relay loss seed")
    g.add_argument(
        "--compare",
        choices=["kinship"],
        action="append",
        default=[],
        help="also run this system's preset of the same name (pip install '.[compare]')",
    )


def check_args(args: argparse.Namespace) -> str | None:
    """One line naming the bad flag, or None."""
    if args.nodes < 3:
        return "--nodes must be at least 3 (a seed, a victim and a survivor)"
    if args.repeat < 1:
        return "--repeat must be at least 1"
    if not args.quiet_period >= 0:
        return "--quiet-period must be >= 0 seconds"
    if not args.timeout > 0:
        return "--timeout must be > 0 seconds"
    if args.loss is not None and not 0 <= args.loss < 1:
        return "--loss must be a probability in [0, 1)"
    if "kinship" in args.compare:
        if args.loss is not None:
            return (
                "--compare kinship cannot be combined with --loss: kinship's push-pull "
                "runs over TCP, which the UDP fault relay cannot carry"
            )
        try:
            importlib.metadata.version("kinship")
        except importlib.metadata.PackageNotFoundError:
            return (
                "--compare kinship needs kinship installed: pip install -e '.[compare]' "
                "(or pip install 'kinship>=0.4')"
            )
    return None


# ---------------------------------------------------------------------------- tracking


class Tracker:
    """Every observed node's view (how many others it holds UP), with the moment each
    view changed, plus every DOWN and suspicion reported about anyone."""

    def __init__(self, nodes: int, observers: list[object], expected_external: int = 0) -> None:
        self.expected = nodes - 1  # a complete view: every other node UP
        self.counts: dict[object, int] = dict.fromkeys(observers, 0)
        self.complete = 0
        # Views reported from outside the loop (the gwyh victim's child process).
        self.external_pending = expected_external
        self.started_at = time.monotonic()  # the first node starts
        self.running_at: float | None = None  # every node has started
        self.converged_at: float | None = None
        self.converged = asyncio.Event()
        self.victim: object | None = None
        self.crashed_at: float | None = None
        self.survivors: set[object] = set()
        self.victim_down: dict[object, float] = {}
        self.victim_suspect: dict[object, float] = {}
        self.detected = asyncio.Event()
        self.false_downs: list[tuple[float, object, object]] = []
        self.false_suspects: list[tuple[float, object, object]] = []
        self.recording = True
        self.views_complete = 0  # observers holding a complete view when the wait ended

    def set_count(self, observer: object, count: int) -> None:
        if not self.recording:
            return
        before = self.counts[observer]
        self.counts[observer] = count
        if before >= self.expected > count:
            self.complete -= 1
        elif count >= self.expected > before:
            self.complete += 1
            self._check_converged()

    def external_converged(self, at: float) -> None:
        self.external_pending -= 1
        self._check_converged(at)

    def _check_converged(self, at: float | None = None) -> None:
        if (
            self.converged_at is None
            and self.complete == len(self.counts)
            and self.external_pending <= 0
        ):
            self.converged_at = max(at or 0.0, time.monotonic())
            self.converged.set()

    def down(self, observer: object, subject: object, *, suspect: bool = False) -> None:
        if not self.recording or observer == self.victim:
            return
        now = time.monotonic()
        if subject == self.victim and self.crashed_at is not None:
            if suspect:
                self.victim_suspect.setdefault(observer, now)
            elif observer not in self.victim_down:
                self.victim_down[observer] = now
                if len(self.victim_down) >= len(self.survivors):
                    self.detected.set()
        elif suspect:
            self.false_suspects.append((now, observer, subject))
        else:
            self.false_downs.append((now, observer, subject))

    def crash(self, victim: object, survivors: list[object]) -> None:
        self.victim = victim
        self.survivors = set(survivors)
        self.crashed_at = time.monotonic()

    async def wait_converged(self, timeout: float) -> bool:
        done = await self.wait(self.converged, timeout)
        self.views_complete = self.complete
        return done

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return event.is_set()

    def figures(self, quiet_from: float, quiet_to: float) -> dict[str, Any]:
        crash = self.crashed_at or 0.0
        detect = sorted(t - crash for t in self.victim_down.values())
        suspect = sorted(t - crash for t in self.victim_suspect.values())
        quiet = [(t, o, s) for t, o, s in self.false_downs if quiet_from <= t <= quiet_to]
        running = self.running_at or self.started_at
        converged = self.converged_at
        return {
            # From the moment every node runs: start-up costs (Python, keys) are not
            # membership, and they differ between the modes.
            "convergence_s": _round(max(0.0, converged - running)) if converged else None,
            "convergence_from_first_start_s": _round(converged - self.started_at)
            if converged
            else None,
            "startup_s": _round(running - self.started_at),
            "views_complete": self.views_complete,
            "crash_first_s": _round(detect[0]) if detect else None,
            "crash_all_s": _round(detect[-1])
            if detect and len(detect) >= len(self.survivors)
            else None,
            "crash_median_s": _round(median(detect)) if detect else None,
            "crash_detected_by": len(detect),
            "survivors": len(self.survivors),
            "suspect_first_s": _round(suspect[0]) if suspect else None,
            "false_down_events": len(quiet),
            "accused_live_nodes": len({s for _, _, s in quiet}),
            "false_down_events_all_phases": len(self.false_downs),
            "false_suspect_events": len(self.false_suspects),
        }


class LoopLag:
    """How late this event loop wakes up (a timer every ``PROBE_S``): nodes sharing a
    starved loop send heartbeats late, which is what false DOWNs on a busy machine
    come from."""

    PROBE_S = 0.05

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.PROBE_S)
            self.lags.append(time.monotonic() - before - self.PROBE_S)

    def figures(self) -> dict[str, float | None]:
        self._task.cancel()
        lags = sorted(self.lags)
        if not lags:
            return {"loop_lag_max_s": None, "loop_lag_p99_s": None}
        return {
            "loop_lag_max_s": _round(lags[-1]),
            "loop_lag_p99_s": _round(lags[min(len(lags) - 1, int(len(lags) * 0.99))]),
        }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _round(x: float) -> float:
    return round(x, 4)


# ---------------------------------------------------------------------------- relay


class Relay:
    """``python -m gwyh_mp.relay`` in front of every node: node i binds ``targets[i]``
    and tells the others ``listen[i]``. Its stats lines (read by a thread, stamped on
    arrival) give the bytes the nodes sent."""

    def __init__(self, targets: list[int], loss: float, seed: int) -> None:
        cmd = [sys.executable, "-m", "gwyh_mp.relay", "--seed", str(seed), "--loss", str(loss)]
        for port in targets:
            cmd += ["--route", f"127.0.0.1:0=127.0.0.1:{port}"]
        cmd += ["--stats-interval", "0.25"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.samples: list[tuple[float, dict[str, Any]]] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()  # the ready line, or EOF if it failed
        if not line.startswith(b"{"):
            self.proc.kill()
            err = self.proc.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"fault relay did not start: {err[-300:]}")
        self.listen = [listen for listen, _ in orjson.loads(line)["routes"]]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.samples.append((time.monotonic(), orjson.loads(line)))

    def bytes_between(self, start: float, end: float) -> float | None:
        """Bytes/s the nodes sent between two monotonic times (nearest stats samples)."""
        inside = [(t, s["bytes_received"]) for t, s in self.samples if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (t0, b0), (t1, b1) = inside[0], inside[-1]
        return (b1 - b0) / (t1 - t0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------- gwyh_mp


def preset_config(preset: str, **overrides: object) -> Config:
    factory: Callable[..., Config] = getattr(Config, preset)
    return factory(psks=[KEY], workers=1, **overrides)


def _victim_main(conn: multiprocessing.connection.Connection) -> None:
    """Child process: one node that the parent SIGKILLs. Protocol on ``conn``: send
    "ready"; receive a Config; send (node_id, address); receive the number of others to
    wait for; send the monotonic time it saw them all UP; then idle until killed. If the
    parent dies first, the pipe's end of file ends this process too."""

    def parent_gone() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                conn.recv()

    async def main() -> None:
        config: Config = conn.recv()
        node = await Node(config).start()
        conn.send((node.node_id, node.address))
        others: int = await asyncio.to_thread(conn.recv)
        orphaned = asyncio.create_task(asyncio.to_thread(parent_gone))
        converged = asyncio.create_task(node.wait_for_members(others, timeout=3600))
        await asyncio.wait([orphaned, converged], return_when=asyncio.FIRST_COMPLETED)
        if converged.done() and not converged.exception():
            conn.send(time.monotonic())
            await orphaned
        os._exit(0)  # no goodbye: to the cluster this is a crash like the SIGKILL

    conn.send("ready")
    _run_loop(main())


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


class Victim:
    """The gwyh_mp node that crashes, in a spawned child so SIGKILL is a real crash."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_victim_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    async def recv(self, timeout: float) -> Any:
        def get() -> Any:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"victim process did not answer within {timeout} s")
            return self.conn.recv()

        return await asyncio.to_thread(get)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        self.proc.join(10)


async def gwyh_round(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    n = args.nodes
    victim = Victim()
    relay: Relay | None = None
    nodes: list[Node] = []
    watchers: list[asyncio.Task[None]] = []
    try:
        await victim.recv(args.timeout)  # imports done: they must not count as convergence
        ports = [free_udp_port() for _ in range(n)]
        relay = Relay(ports, args.loss, args.seed) if args.loss is not None else None
        tracker = Tracker(n, list(range(n - 1)), expected_external=1)

        def config(i: int, seed: tuple[str, int] | None) -> Config:
            boot = [seed] if seed else []
            if relay is None:
                return preset_config(args.preset, bind=("127.0.0.1", 0), bootstrap=boot)
            return preset_config(
                args.preset,
                bind=("127.0.0.1", ports[i]),
                advertise=_addr(relay.listen[i]),
                bootstrap=boot,
            )

        # Observers are 0..n-2; the victim is node n-1 (never the seed).
        tracker.started_at = time.monotonic()
        seed_node = await Node(config(0, None)).start()
        nodes.append(seed_node)
        seed_addr = _addr(relay.listen[0]) if relay else seed_node.address
        victim.conn.send(config(n - 1, seed_addr))
        for i in range(1, n - 1):
            nodes.append(await Node(config(i, seed_addr)).start())
            # start() does not yield; without this the started nodes would not read a
            # datagram until all are up, and then face every retransmitted handshake
            # at once, unlike nodes started anywhere else.
            await asyncio.sleep(0)
        victim_id, _ = await victim.recv(args.timeout)
        tracker.running_at = time.monotonic()
        victim.conn.send(n - 1)
        for i, node in enumerate(nodes):
            watchers.append(asyncio.create_task(_watch_gwyh(node, i, tracker)))
        ext = asyncio.create_task(victim.recv(args.timeout * 2))
        ext.add_done_callback(
            lambda t: tracker.external_converged(t.result()) if not t.exception() else None
        )
        if not await tracker.wait_converged(args.timeout):
            log(f"  not converged after {args.timeout} s ({tracker.complete} views complete)")
        quiet_from = time.monotonic()
        packets0 = sum(node.stats().get("packets_in", 0) for node in nodes)
        declared0 = sum(node.stats().get("declared_down", 0) for node in nodes)
        lag = LoopLag()
        await asyncio.sleep(args.quiet_period)
        lag_figures = lag.figures()
        quiet_to = time.monotonic()
        packets1 = sum(node.stats().get("packets_in", 0) for node in nodes)
        declared = sum(node.stats().get("declared_down", 0) for node in nodes) - declared0
        tracker.crash(victim_id, list(range(n - 1)))
        victim.kill()
        if not await tracker.wait(tracker.detected, args.timeout):
            log(f"  crash seen by {len(tracker.victim_down)} of {n - 1} after {args.timeout} s")
        tracker.recording = False
        out = tracker.figures(quiet_from, quiet_to)
        out["declared_down"] = declared
        out.update(lag_figures)
        span = max(quiet_to - quiet_from, 1e-9)
        out["packets_in_per_node_per_s"] = round((packets1 - packets0) / (n - 1) / span, 1)
        rate = relay.bytes_between(quiet_from, quiet_to) if relay else None
        out["bytes_out_per_node_per_s"] = round(rate / n, 1) if rate is not None else None
        return out
    finally:
        for task in watchers:
            task.cancel()
        victim.kill()
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
        if relay is not None:
            relay.stop()


def _watch_gwyh(node: Node, index: int, tracker: Tracker) -> Coroutine[Any, Any, None]:
    """Open the node's event stream now (a stream sees events from the moment it is
    opened) and start from its current view; the returned coroutine follows changes."""
    events = node.member_events()
    up = {m.node_id for m in node.members() if m.is_up}
    tracker.set_count(index, len(up))
    return _follow_gwyh(events, up, index, tracker)


async def _follow_gwyh(
    events: AsyncIterator[MemberEvent], up: set[bytes], index: int, tracker: Tracker
) -> None:
    async for event in events:
        subject = event.member.node_id
        if isinstance(event, MemberUp):
            up.add(subject)
        elif isinstance(event, MemberSuspect):
            tracker.down(index, subject, suspect=True)  # still counted UP
        elif isinstance(event, MemberDown):
            up.discard(subject)
            tracker.down(index, subject)
        tracker.set_count(index, len(up))


# ---------------------------------------------------------------------------- --processes


class StatsReader:
    """One ``gwyh-node`` process; a thread turns its stats lines into tracker calls on
    the loop (stamped by the node's own wall clock, converted to monotonic time)."""

    def __init__(self, cmd: list[str], index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.loop = loop
        self.tracker: Tracker | None = None
        self.last: dict[str, Any] = {}
        self.started_at: float | None = None
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,  # kept open: --stdio would stop at EOF otherwise
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        offset = time.monotonic() - time.time()
        for raw in self.proc.stderr:
            if not raw.startswith(b'{"event":"stats"'):
                self.errors.append(raw.decode(errors="replace").rstrip()[-200:])
                continue
            with contextlib.suppress(orjson.JSONDecodeError, RuntimeError):
                record = orjson.loads(raw)
                self.loop.call_soon_threadsafe(self._apply, record, record["time"] + offset)

    def _apply(self, record: dict[str, Any], at: float) -> None:
        previous = int(self.last.get("members_up", 0))
        if not self.last:
            # The first line comes one interval after the node started.
            self.started_at = at - STATS_INTERVAL_S
        self.last = record
        tracker = self.tracker
        if tracker is None or not tracker.recording:
            return
        count = int(record.get("members_up", 0))
        was_converged = tracker.converged.is_set()
        tracker.set_count(self.index, count)
        if not was_converged and tracker.converged.is_set():
            # The line's own time, not its arrival: late by at most one stats interval.
            tracker.converged_at = max(at, tracker.started_at)
        if tracker.crashed_at is None:
            if was_converged and count < tracker.expected <= previous:
                tracker.down(self.index, None)  # a dip: this node holds someone live DOWN
        elif (
            count < tracker.expected
            and self.index in tracker.survivors
            and self.index not in tracker.victim_down
        ):
            tracker.down(self.index, tracker.victim)
            tracker.victim_down[self.index] = max(at, tracker.crashed_at)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def cli_preset_flags(preset: str) -> tuple[list[str], str]:
    """gwyh-node flags for the preset: ``--preset`` where the CLI has it, else the
    preset's values that have a flag today (the rest stays at the CLI's defaults)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "gwyh_mp.cli", "--help"], capture_output=True, text=True
    ).stdout
    if "--preset" in help_text:
        return ["--preset", preset], "exact"
    config = getattr(Config, preset)()
    detection = {
        "probe_interval_s": config.probe_interval_s,
        "probe_timeout_s": config.probe_timeout_s,
        "suspicion_min_s": config.suspicion_min_s,
        "suspicion_max_s": config.suspicion_max_s,
    }
    flags = [
        "--heartbeat-interval",
        str(config.heartbeat_interval_s),
        "--missed-heartbeats",
        str(config.missed_heartbeats),
        "--max-datagram",
        str(config.max_datagram_bytes),
    ]
    for name, value in detection.items():
        if value is not None:  # None: derived the same way by the node
            flags += ["--" + name.removesuffix("_s").replace("_", "-"), str(value)]
    exact = config == Config(
        heartbeat_interval_s=config.heartbeat_interval_s,
        missed_heartbeats=config.missed_heartbeats,
        max_datagram_bytes=config.max_datagram_bytes,
        **detection,  # type: ignore[arg-type]
    )
    return flags, "exact" if exact else "approximate (gwyh-node has no flag for the rest)"


async def processes_round(
    args: argparse.Namespace, log: Callable[[str], None], preset_flags: list[str]
) -> dict[str, Any]:
    n = args.nodes
    loop = asyncio.get_running_loop()
    ports = [free_udp_port() for _ in range(n)]
    relay = Relay(ports, args.loss, args.seed) if args.loss is not None else None
    advertised = relay.listen if relay else [f"127.0.0.1:{p}" for p in ports]
    readers: list[StatsReader] = []
    with tempfile.TemporaryDirectory(prefix="gwyh-membership-") as tmp:
        key_path = Path(tmp) / "cluster.key"
        key_path.write_bytes(KEY + b"\n")
        tracker = Tracker(n, list(range(n)))
        try:
            tracker.started_at = time.monotonic()
            for i, port in enumerate(ports):
                extra = [*preset_flags, "--workers", "1", "--stats-interval"]
                extra += [str(STATS_INTERVAL_S)]
                if relay:
                    extra += ["--advertise", advertised[i]]
                if i:
                    extra += ["--bootstrap", advertised[0]]
                reader = StatsReader(node_command(port, key_path, *extra), i, loop)
                reader.tracker = tracker
                readers.append(reader)
            if not await tracker.wait_converged(args.timeout):
                dead = [r for r in readers if r.proc.poll() is not None]
                hint = f"; node {dead[0].index} exited: {dead[0].errors[-1:]}" if dead else ""
                log(f"  not converged after {args.timeout} s{hint}")
            await asyncio.sleep(2 * STATS_INTERVAL_S)  # let late lines settle the time
            starts = [r.started_at for r in readers if r.started_at is not None]
            if len(starts) == n:
                tracker.running_at = max(starts)
            quiet_from = time.monotonic()
            before = [dict(r.last) for r in readers]
            await asyncio.sleep(args.quiet_period)
            quiet_to = time.monotonic()
            after = [dict(r.last) for r in readers]
            victim = readers[-1]
            tracker.crash(n - 1, list(range(n - 1)))
            victim.kill()
            if not await tracker.wait(tracker.detected, args.timeout):
                log(f"  crash seen by {len(tracker.victim_down)} of {n - 1}")
            tracker.recording = False
            out = tracker.figures(quiet_from, quiet_to)
            out["accused_live_nodes"] = None  # stats lines do not say whom
            out["declared_down"] = _delta(before, after, "declared_down")
            span = max(quiet_to - quiet_from, 1e-9)
            packets = _delta(before, after, "packets_in")
            out["packets_in_per_node_per_s"] = round(packets / n / span, 1)
            rate = relay.bytes_between(quiet_from, quiet_to) if relay else None
            out["bytes_out_per_node_per_s"] = round(rate / n, 1) if rate is not None else None
            out["time_resolution_s"] = STATS_INTERVAL_S
            out["loop_lag_max_s"] = None  # every node has its own loop
            return out
        finally:
            for r in readers:
                r.stop()
            for r in readers:
                r.kill()
            if relay is not None:
                relay.stop()


def _delta(before: list[dict[str, Any]], after: list[dict[str, Any]], key: str) -> int:
    pairs = zip(before, after, strict=True)
    return sum(int(end.get(key, 0)) - int(start.get(key, 0)) for start, end in pairs)


# ---------------------------------------------------------------------------- kinship


async def kinship_round(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import kinship

    n = args.nodes
    key = kinship._kinship.generate_key()
    factory = getattr(kinship.Config, args.preset)
    clusters: list[Any] = []
    watchers: list[asyncio.Task[None]] = []
    tracker = Tracker(n, [f"n{i}" for i in range(n)])
    try:
        tracker.started_at = time.monotonic()
        seed: list[str] = []
        for i in range(n):
            cfg = factory(name=f"n{i}", bind="127.0.0.1:0", seeds=seed, keys=[key])
            cluster = await kinship.Cluster(cfg).start()
            # A stream only sees events from its creation on; what start() already
            # learned (the join) is read from members() right after subscribing.
            stream = cluster.events()
            watchers.append(asyncio.create_task(_watch_kinship(cluster, stream, f"n{i}", tracker)))
            clusters.append(cluster)
            if not seed:
                seed = [cluster.local.addr]
        tracker.running_at = time.monotonic()
        if not await tracker.wait_converged(args.timeout):
            log(f"  kinship not converged after {args.timeout} s")
        quiet_from = time.monotonic()
        packets0 = sum(c.stats().packets_received for c in clusters)
        suspicions0 = sum(c.stats().suspicions for c in clusters)
        lag = LoopLag()  # kinship's protocol runs on its own threads; this is ours
        await asyncio.sleep(args.quiet_period)
        lag_figures = lag.figures()
        quiet_to = time.monotonic()
        packets1 = sum(c.stats().packets_received for c in clusters)
        suspicions = sum(c.stats().suspicions for c in clusters) - suspicions0
        names = [f"n{i}" for i in range(n)]
        tracker.crash(names[-1], names[:-1])
        await clusters[-1].close()  # no leave: kinship documents this as a crash
        if not await tracker.wait(tracker.detected, args.timeout):
            log(f"  kinship crash seen by {len(tracker.victim_down)} of {n - 1}")
        tracker.recording = False
        out = tracker.figures(quiet_from, quiet_to)
        out["declared_down"] = None
        out["suspicions_started"] = suspicions
        out.update(lag_figures)
        span = max(quiet_to - quiet_from, 1e-9)
        out["packets_in_per_node_per_s"] = round((packets1 - packets0) / n / span, 1)
        out["bytes_out_per_node_per_s"] = None
        return out
    finally:
        tracker.recording = False
        for task in watchers:
            task.cancel()
        await asyncio.gather(*(c.close() for c in clusters), return_exceptions=True)


async def _watch_kinship(cluster: Any, stream: Any, name: str, tracker: Tracker) -> None:
    import kinship

    def alive() -> set[str]:
        members = cluster.members()
        return {m.name for m in members if m.name != name and m.state == kinship.State.ALIVE}

    up = alive()
    tracker.set_count(name, len(up))
    async for event in stream:
        if isinstance(event, kinship.EventsLost):
            up = alive()
        elif isinstance(event, kinship.MemberJoined | kinship.MemberRecovered):
            if event.member.name != name:
                up.add(event.member.name)
        elif isinstance(event, kinship.MemberSuspect):
            up.discard(event.member.name)
            tracker.down(name, event.member.name, suspect=True)
        elif isinstance(event, kinship.MemberDead | kinship.MemberLeft):
            up.discard(event.member.name)
            tracker.down(name, event.member.name)
        else:
            continue
        tracker.set_count(name, len(up))


# ---------------------------------------------------------------------------- driver


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


async def run_all(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    systems: list[dict[str, Any]] = []
    gwyh: dict[str, Any] = {
        "system": "gwyh_mp",
        "version": _version("gwyh_mp"),
        "preset": args.preset,
        "mode": "processes" if args.processes else "in-process (victim in a child process)",
        "loss": args.loss,
        "runs": [],
    }
    preset_flags: list[str] = []
    if args.processes:
        preset_flags, fidelity = cli_preset_flags(args.preset)
        gwyh["cli_preset_flags"] = preset_flags
        gwyh["preset_fidelity"] = fidelity
    systems.append(gwyh)
    if "kinship" in args.compare:
        systems.append(
            {
                "system": "kinship",
                "version": _version("kinship"),
                "preset": args.preset,
                "mode": "in-process",
                "loss": None,
                "runs": [],
            }
        )
    for k in range(args.repeat):
        for system in systems:  # interleaved, so machine noise hits every system alike
            log(f"round {k + 1}/{args.repeat}: {system['system']} {args.preset} N={args.nodes}")
            load = _loadavg()
            if system["system"] == "kinship":
                result = await kinship_round(args, log)
            elif args.processes:
                result = await processes_round(args, log, preset_flags)
            else:
                result = await gwyh_round(args, log)
            result["loadavg_1m_at_start"] = load
            log("  " + ", ".join(f"{key}={result.get(key)}" for key in FIGURES))
            system["runs"].append(result)
    for system in systems:
        system["median"] = {
            key: _median_or_none([r.get(key) for r in system["runs"]]) for key in FIGURES
        }
    return systems


def _median_or_none(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(median(present), 4) if present else None


async def _interruptible(work: Any) -> Any:
    """SIGINT/SIGTERM cancel the run, so every round's cleanup (nodes, victim process,
    relay) still happens."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await work


def format_table(result: dict[str, Any]) -> str:
    params = result["params"]
    head = (
        f"membership: N={params['nodes']}, preset {params['preset']}, "
        f"median of {params['repeat']}, quiet period {params['quiet_period']} s"
        + (f", loss {params['loss']:.0%} via relay" if params["loss"] is not None else "")
    )
    cols = [
        ("system", 9),
        ("mode", 12),
        ("converge s", 10),
        ("from 1st s", 10),
        ("crash 1st s", 11),
        ("crash all s", 11),
        ("suspect 1st s", 13),
        ("false DOWNs", 11),
        ("accused", 7),
        ("pkts/s/node", 11),
        ("B/s/node", 9),
        ("lag max s", 9),
    ]
    loads = [r["loadavg_1m_at_start"] for x in result["systems"] for r in x["runs"]]
    loads = [x for x in loads if x is not None]
    if loads:  # a shared machine: say how busy it was
        head += f"; load average {min(loads):.1f}-{max(loads):.1f} at round starts"
    lines = [head, "  ".join(name.rjust(width) for name, width in cols)]
    for system in result["systems"]:
        m = system["median"]
        mode = "processes" if system["mode"] == "processes" else "in-process"
        cells = [
            system["system"],
            mode,
            _cell(m["convergence_s"], 2),
            _cell(m["convergence_from_first_start_s"], 2),
            _cell(m["crash_first_s"], 2),
            _cell(m["crash_all_s"], 2),
            _cell(m["suspect_first_s"], 2),
            _cell(m["false_down_events"], 0),
            _cell(m["accused_live_nodes"], 0),
            _cell(m["packets_in_per_node_per_s"], 1),
            _cell(m["bytes_out_per_node_per_s"], 0),
            _cell(m["loop_lag_max_s"], 2),
        ]
        lines.append("  ".join(c.rjust(width) for c, (_, width) in zip(cells, cols, strict=True)))
    missed = [
        f"{s['system']}: crash seen by {r['crash_detected_by']}/{r['survivors']} in round {i + 1}"
        for s in result["systems"]
        for i, r in enumerate(s["runs"])
        if r["crash_all_s"] is None
    ]
    lines += missed
    lines.append(
        "(- : not measured; crash times run from the crash to the survivor's report; "
        "lag max: how late this process's event loop woke up during the quiet period)"
    )
    return "\n".join(lines)


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"bench membership: {problem}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    result: dict[str, Any] = {"bench": "membership", "params": params}
    result["machine"] = machine_description()
    result["machine"]["packages"]["kinship"] = _version("kinship")
    wall0 = time.perf_counter()
    try:
        result["systems"] = _run_loop(_interruptible(run_all(args, log)))
    except asyncio.CancelledError:
        print("bench membership: interrupted; nodes stopped, nothing written", file=sys.stderr)
        return 130
    result["wall_s"] = round(time.perf_counter() - wall0, 2)
    table = format_table(result)
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n"
    if args.json == "-":
        print(table, file=sys.stderr)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        print(table)
        if args.json:
            target = Path(args.json)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return 0
