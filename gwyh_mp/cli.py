"""``gwyh-node``: run a node, operate a running one, generate a key, watch a demo.

    (umask 077; gwyh-node keygen > cluster.key)
    gwyh-node --bind 127.0.0.1:7001 --psk-file cluster.key --stdio
    gwyh-node --bind 127.0.0.1:7002 --psk-file cluster.key --bootstrap 127.0.0.1:7001 --stdio
    gwyh-node members --control /run/gwyh-node/7001.sock
    gwyh-node demo

Errors a user can cause (bad arguments, unreadable key files, a busy port) print
one line on stderr and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence

import orjson

from gwyh_mp import __version__, configfile, ctl, keys, logs
from gwyh_mp.api import Node, StreamOverflow
from gwyh_mp.cliargs import (
    Parser,
    addr,
    float_at_least,
    int_range,
    peer_addr,
    positive_float,
    seconds_0_to_1,
    strategy,
    tag_pair,
)
from gwyh_mp.config import (
    DEFAULT_DISSEMINATION,
    DISSEMINATION_MODES,
    MIN_HEARTBEAT_INTERVAL_S,
    Config,
    ConfigError,
)
from gwyh_mp.control import ControlError, ControlServer, default_path, message_line
from gwyh_mp.identity import DataDir, IdentityError
from gwyh_mp.metrics import MetricsServer
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.node import MessageTooLarge
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.runtime.driver import freeze_startup_heap
from gwyh_mp.runtime.host import socket_buffer_warnings, usable_cpus

log = logging.getLogger("gwyh_mp.cli")
PROG = "gwyh-node"
EXIT_USAGE = 2
EXIT_RUNTIME = 1
STDIN_CHUNK = 1 << 16
MIN_STATS_INTERVAL_S = 0.1

# Config fields as the flags that set them, so a range error names what the user typed.
FLAG_OF_FIELD = {
    "bind": "--bind",
    "advertise": "--advertise",
    "bootstrap": "--bootstrap",
    "zone": "--zone",
    "name": "--name",
    "tags": "--tag",
    "subscriptions": "--subscriptions",
    "heartbeat_interval_s": "--heartbeat-interval",
    "missed_heartbeats": "--missed-heartbeats",
    "handshake_retry_s": "--handshake-retry",
    "probe_interval_s": "--probe-interval",
    "probe_timeout_s": "--probe-timeout",
    "suspicion_min_s": "--suspicion-min",
    "suspicion_max_s": "--suspicion-max",
    "max_members": "--max-members",
    "catch_up_window_s": "--catch-up-window",
    "catch_up_bytes": "--catch-up-bytes",
    "max_datagram_bytes": "--max-datagram",
    "flush_interval_s": "--flush-interval",
    "dissemination": "--dissemination",
    "workers": "--workers",
    "psks": "--psk-file",
    "pre-shared keys": "--psk-file keys",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ---------------------------------------------------------------- parsers


def _epilog() -> str:
    lines = ["commands (each has its own --help):"]
    lines.append(f"  {'run':<9} run a node (the default when no command is given)")
    lines.append(f"  {'keygen':<9} print a new random pre-shared key")
    lines.append(f"  {'demo':<9} a small cluster on loopback, live")
    lines.append(f"  {'config':<9} check a config file, or show the effective configuration")
    for name, (_, _, summary) in ctl.COMMANDS.items():
        lines.append(f"  {name:<9} {summary} (control socket)")
    lines.append("")
    lines.append("every option is also a --config file key (heartbeat-interval = 2) and a")
    lines.append("variable (GWYH_HEARTBEAT_INTERVAL=2); flags win over variables over the file")
    return "\n".join(lines)


def build_run_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Run a gwyh_mp gossip node.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    configfile.add_config_option(p)
    _add_network_options(p)
    _add_membership_options(p)
    _add_tuning_options(p)
    _add_io_options(p)
    _add_operation_options(p)
    return p


def _add_network_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument(
        "--bind",
        type=addr,
        default=("127.0.0.1", 6969),
        metavar="HOST:PORT",
        help="UDP address to listen on (default 127.0.0.1:6969)",
    )
    g.add_argument(
        "--advertise",
        type=addr,
        metavar="HOST:PORT",
        help="address other nodes should use for this one",
    )
    g.add_argument(
        "--psk-file",
        action="append",
        required=True,
        metavar="FILE",
        help="file holding a pre-shared key (at least 128 bits: use keygen); repeat to "
        "accept several (rotation); SIGHUP re-reads them",
    )
    g.add_argument(
        "--bootstrap",
        type=peer_addr,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="seed peer: IP address or DNS name (re-resolved while isolated); repeat",
    )


def _add_membership_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("membership")
    g.add_argument("--zone", help="zone label of this node (datacenter, rack)")
    g.add_argument(
        "--name", default="", help="human-readable node name, shown by members (<= 64 bytes)"
    )
    g.add_argument(
        "--tag",
        type=tag_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label carried with the member record; repeatable (<= 16 tags)",
    )
    g.add_argument(
        "--strategy",
        type=strategy,
        default=Strategy.UNIFORM,
        help="peer selection: uniform, hub-and-spoke, prefer-local, prefer-remote",
    )
    g.add_argument(
        "--subscriptions",
        type=int_range(1, 64),
        default=5,
        metavar="N",
        help="how many providers to receive broadcasts from (default 5)",
    )
    g.add_argument(
        "--heartbeat-interval",
        type=float_at_least(MIN_HEARTBEAT_INTERVAL_S),
        default=5.0,
        metavar="S",
        help="seconds between heartbeats (default 5, at least 0.01)",
    )
    g.add_argument(
        "--missed-heartbeats",
        type=int_range(1, 100),
        default=3,
        metavar="N",
        help="missed heartbeats before a provider is declared DOWN (default 3)",
    )
    g.add_argument(
        "--handshake-retry",
        type=positive_float,
        default=None,
        metavar="S",
        help="seconds between handshake retransmissions (default: half the heartbeat "
        "interval, at most 1; at most the heartbeat interval)",
    )
    g.add_argument(
        "--probe-interval",
        type=positive_float,
        default=Config().probe_interval_s,
        metavar="S",
        help="failure detection period: one silent peer is PINGed this often (default "
        "0.5); the probe timeout (/5) and suspicion window (x2 to x12) follow it",
    )
    g.add_argument(
        "--probe-timeout",
        type=positive_float,
        default=None,
        metavar="S",
        help="wait for one PING's answer before the next attempt (default: probe interval "
        "/ 5; at most the probe interval)",
    )
    g.add_argument(
        "--suspicion-min",
        type=positive_float,
        default=None,
        metavar="S",
        help="suspicion timeout once 3 other members confirm it (default: 2 probe intervals)",
    )
    g.add_argument(
        "--suspicion-max",
        type=positive_float,
        default=None,
        metavar="S",
        help="longest a SUSPECT member waits for confirmations or a refutation before it "
        "is declared DOWN (default: 12 probe intervals)",
    )
    g.add_argument(
        "--max-members",
        type=int_range(16, 10_000_000),
        default=Config().max_members,
        metavar="N",
        help="most members held; news of more is refused and counted (default 20000)",
    )
    g.add_argument("--seed", type=int, help="seed for reproducible peer selection")
    g.add_argument(
        "--catch-up-window",
        type=float_at_least(0.0),
        default=Config().catch_up_window_s,
        metavar="S",
        help="a node back from a pause or partition this long gets every broadcast it "
        "missed; older misses are counted and logged (default 30; 0: off)",
    )
    g.add_argument(
        "--catch-up-bytes",
        type=int_range(1 << 16),
        default=Config().catch_up_bytes,
        metavar="BYTES",
        help="memory for that history, and what one peer may pull per window (default 16 MiB)",
    )


def _add_tuning_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("performance")
    g.add_argument(
        "--max-datagram",
        type=int_range(576, wire.MAX_DATAGRAM_BYTES),
        default=1400,
        metavar="BYTES",
        help="largest UDP payload to send (default 1400; up to 65507 on loopback)",
    )
    g.add_argument(
        "--flush-interval",
        type=seconds_0_to_1,
        default=0.0,
        metavar="S",
        help="coalescing window under load: flush forwarded traffic at most this often "
        "(default 0: after every receive batch; 0.005 halves CPU per delivery at high rates "
        "for up to 5 ms more latency per hop)",
    )
    g.add_argument(
        "--dissemination",
        choices=DISSEMINATION_MODES,
        default=DEFAULT_DISSEMINATION,
        help="eager: every provider sends each broadcast in full; trees: one provider per "
        "origin does, the others send only its id (fewer duplicate datagrams; see README)",
    )
    g.add_argument(
        "--workers",
        type=int_range(1, max(64, (os.cpu_count() or 1) * 4)),
        default=usable_cpus(),
        metavar="N",
        help="receiver processes sharing the port (default: the CPUs this process may use, "
        "after affinity and cgroup quota; 1 = one process)",
    )
    g.add_argument(
        "--ring-bytes",
        type=int_range(1 << 20, 1 << 30),
        default=Config().ring_bytes,
        metavar="BYTES",
        help="size of each of a receiver's two /dev/shm rings (default 16 MiB; shrunk "
        "with a warning when /dev/shm is too small)",
    )


def _add_io_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local application")
    g.add_argument(
        "--stdio",
        action="store_true",
        help="broadcast each stdin line; print each delivered message as JSON",
    )
    g.add_argument(
        "--stats-interval",
        type=float_at_least(MIN_STATS_INTERVAL_S),
        metavar="S",
        help="print statistics as JSON lines on stderr every S seconds (at least 0.1)",
    )
    g.add_argument(
        "--metrics",
        type=addr,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, /healthz and /readyz over HTTP here",
    )


def _add_operation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operation")
    g.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for the client commands (default: $RUNTIME_DIRECTORY/PORT.sock, "
        "else /run/gwyh-node/PORT.sock as root, else $XDG_RUNTIME_DIR/gwyh-node/PORT.sock, "
        "else /tmp/gwyh-node-UID/PORT.sock)",
    )
    g.add_argument("--no-control", action="store_true", help="open no control socket")
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep the node id here, so a restarted node rejoins as the same member",
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=logs.LEVELS,
        help="stderr log level (default info)",
    )
    g.add_argument(
        "--log-level-file",
        metavar="FILE",
        help="file holding a log level, read at start and on SIGHUP (overrides --log-level)",
    )
    g.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object a line (default text)",
    )


# ---------------------------------------------------------------- configuration


def read_psk_file(path: str) -> bytes:
    try:
        return keys.read_key_file(path)
    except keys.KeyFileError as exc:
        raise CliError(str(exc)) from None


def _flag_message(text: str) -> str:
    """Say a Config error in terms of flags: ``max_datagram_bytes`` -> ``--max-datagram``."""
    for field, flag in FLAG_OF_FIELD.items():
        if text.startswith(field + " ") or text.startswith(field + ":"):
            return flag + text[len(field) :]
    return text


def config_from_args(args: argparse.Namespace, node_id: bytes | None = None) -> Config:
    config = Config(
        bind=args.bind,
        advertise=args.advertise,
        psks=[read_psk_file(p) for p in args.psk_file],
        bootstrap=list(args.bootstrap),
        zone=args.zone,
        name=args.name,
        tags=tuple(args.tag),
        strategy=args.strategy,
        subscriptions=args.subscriptions,
        heartbeat_interval_s=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats,
        handshake_retry_s=args.handshake_retry,
        probe_interval_s=args.probe_interval,
        probe_timeout_s=args.probe_timeout,
        suspicion_min_s=args.suspicion_min,
        suspicion_max_s=args.suspicion_max,
        max_datagram_bytes=args.max_datagram,
        flush_interval_s=args.flush_interval,
        dissemination=args.dissemination,
        seed=args.seed,
        workers=args.workers,
        node_id=node_id,
        ring_bytes=args.ring_bytes,
        max_members=args.max_members,
        catch_up_window_s=args.catch_up_window,
        catch_up_bytes=args.catch_up_bytes,
    )
    try:
        return config.validate()
    except ConfigError as exc:
        raise CliError(_flag_message(str(exc))) from None


def message_json(msg: Message, received_at: float | None = None) -> bytes:
    return message_line(msg, received_at)


def messages_json(batch: list[Message], received_at: float) -> bytes:
    """``message_json`` of every message of a batch, joined: the same bytes, built
    without a dict per message and with the batch's one time stamp encoded once
    (this is per-delivery work on a busy node)."""
    dumps = orjson.dumps
    tail = b',"received_at":' + dumps(round(received_at, 6)) + b',"data":'
    lines = []
    for msg in batch:
        try:
            data = dumps(msg.data.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(message_json(msg, received_at))  # base64: the rare, general path
            continue
        lines.append(
            b'{"id":"%s","origin":"%s","hops":%d%s%s}\n'
            % (msg.id.hex().encode(), msg.origin.hex().encode(), msg.hops, tail, data)
        )
    return b"".join(lines)


def _read_log_level(path: str) -> str:
    try:
        with open(path) as f:
            level = f.read(64).strip().lower()
    except OSError as exc:
        raise CliError(f"cannot read --log-level-file {path}: {exc.strerror or exc}") from None
    if level not in logs.LEVELS:
        raise CliError(f"--log-level-file {path} holds {level!r}; expected one of {logs.LEVELS}")
    return level


# ---------------------------------------------------------------- running a node


class NodeProgram:
    """One ``gwyh-node run``: the node, its control socket, its stdio pumps, its
    signal handlers, and the watcher that logs what happens."""

    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        self.args = args
        self.config = config
        self.node = Node(config)
        self.stop = asyncio.Event()
        self.control: ControlServer | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.log_stats)
        node = self.node
        try:
            await node.start()
        except ConfigError as exc:  # e.g. /dev/shm too small for the receivers' rings
            raise CliError(str(exc)) from None
        except OSError as exc:
            host, port = self.config.bind
            raise CliError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
        metrics_server = None
        try:
            self._announce()
            metrics_server = await self._open_metrics()
            await self._open_control()
            self.tasks.append(asyncio.create_task(logs.NodeWatcher(node).run()))
            if self.args.stdio:
                self.tasks.append(asyncio.create_task(self._pump_stdin()))
                self.tasks.append(asyncio.create_task(self._pump_stdout()))
            if self.args.stats_interval:
                self.tasks.append(asyncio.create_task(self._print_stats()))
            freeze_startup_heap()  # this process is all node: see why there
            await self.stop.wait()
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.control is not None:
                await self.control.close()
            if metrics_server is not None:
                await metrics_server.stop()
            await node.stop()
            log.info("node stopped")
        return 0

    def _announce(self) -> None:
        host, port = self.node.address
        log.info(
            "node %s listening on %s:%d (%s %s)",
            self.node.node_id.hex(),
            host,
            port,
            PROG,
            __version__,
            extra={"fields": {"event": "listening", "node_id": self.node.node_id.hex()}},
        )
        for psk in self.config.psks:
            log.info("accepting key %s", keys.fingerprint(psk))
        for warning in socket_buffer_warnings(self.config.socket_buffer_bytes):
            log.warning("%s", warning)
        if self.config.bind[0] in ("0.0.0.0", "::") and self.config.advertise is None:
            log.warning(
                "bound to a wildcard address without --advertise: this node describes itself "
                "as %s:%d to others; pass --advertise HOST:PORT on a real network",
                *self.config.advertised,
            )

    async def _open_metrics(self) -> MetricsServer | None:
        where = self.args.metrics
        if where is None:
            return None
        try:
            server = await MetricsServer(self.node).start(*where)
        except OSError as exc:
            raise CliError(
                f"--metrics: cannot listen on {where[0]}:{where[1]}: {exc.strerror or exc}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", *server.address)
        return server

    async def _open_control(self) -> None:
        if self.args.no_control:
            return
        path = self.args.control or default_path(self.node.address[1])
        server = ControlServer(self.node, path, self.leave, private_dir=not self.args.control)
        try:
            await server.start()
        except ControlError as exc:
            if self.args.control:
                raise CliError(f"--control: {exc}") from None
            log.warning("no control socket: %s (pass --control PATH)", exc)
            return
        self.control = server
        log.info("control socket %s", path)

    # -------------------------------------------------------------- signals

    def leave(self) -> None:
        log.info("leave requested on the control socket")
        self.stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the key files and the log level; a bad file keeps the old."""
        try:
            if self.args.log_level_file:
                level = _read_log_level(self.args.log_level_file)
                logs.set_level(level)
                log.info("SIGHUP: log level %s", level)
            psks = [read_psk_file(p) for p in self.args.psk_file]
            self.node.set_psks(psks)
        except (CliError, ConfigError) as exc:
            log.error("SIGHUP: nothing changed: %s", exc)
            return
        if self.control is not None:
            self.control.keys_reloaded()
        log.info("SIGHUP: keys now %s", ", ".join(keys.fingerprint(k) for k in psks))

    def log_stats(self) -> None:
        """SIGUSR1: one statistics line in the log (it never stops the node)."""
        log.info(
            "stats %s",
            orjson.dumps(self.node.stats()).decode(),
            extra={"fields": {"event": "stats", **self.node.stats()}},
        )

    # -------------------------------------------------------------- stdio

    async def _pump_stdin(self) -> None:
        limit = self.node.max_message_bytes
        try:
            mode = os.fstat(0).st_mode
        except OSError:
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            await self._pump_stdin_pipe(limit)
        else:
            # Regular files, /dev/null and terminals cannot all be watched by epoll
            # (uvloop aborts on /dev/null): a thread reads them with plain read(2).
            await self._pump_stdin_thread(limit)
        log.info("stdin closed; still delivering messages")

    async def _pump_stdin_pipe(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit + 2)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    await self._broadcast_line(exc.partial)
                return
            except asyncio.LimitOverrunError:
                log.error("line not sent: longer than the largest message (%d bytes)", limit)
                await _skip_line(reader)
                continue
            await self._broadcast_line(line)

    async def _pump_stdin_thread(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue(16)
        threading.Thread(
            target=_read_fd_chunks, args=(0, loop, chunks), name="stdin", daemon=True
        ).start()
        pending = b""
        skipping = False
        while chunk := await chunks.get():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not skipping:
                    await self._broadcast_line(line)
                skipping = False
            if len(pending) > limit:
                if not skipping:
                    log.error("line not sent: longer than the largest message (%d bytes)", limit)
                pending, skipping = b"", True
        if pending and not skipping:
            await self._broadcast_line(pending)

    async def _broadcast_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r\n")
        try:
            await self.node.broadcast(line)
        except MessageTooLarge as exc:
            log.error("line not sent: %s", exc)

    async def _pump_stdout(self) -> None:
        out = sys.stdout.buffer
        stream = self.node.message_batches()
        while True:
            try:
                batch = await anext(stream)
            except StreamOverflow:  # pragma: no cover - a backpressure stream never drops
                continue
            now = time.time()  # one wall-clock stamp per batch: when the node handed it out
            try:
                out.write(messages_json(batch, now))
                out.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                # Nobody reads stdout any more: say so once and stop printing, but keep
                # running (and stop holding the node up with an unread stream).
                log.warning("stdout is gone (%s); no longer printing messages", exc)
                stream.close()
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                return

    async def _print_stats(self) -> None:
        interval = self.args.stats_interval
        node = self.node
        while True:
            await asyncio.sleep(interval)
            record = {
                "event": "stats",
                "time": time.time(),
                "node": node.node_id.hex(),
                **node.stats(),
            }
            lines = [orjson.dumps(record)]
            for proc in node.process_stats():  # multiprocess: one line per process
                lines.append(orjson.dumps({"event": "process", "time": record["time"], **proc}))
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.buffer.write(b"\n".join(lines) + b"\n")
                sys.stderr.flush()


def _read_fd_chunks(fd: int, loop: asyncio.AbstractEventLoop, out: asyncio.Queue[bytes]) -> None:
    """Runs in a thread: os.read, not sys.stdin, so no Python buffer lock is held at exit."""
    while True:
        try:
            chunk = os.read(fd, STDIN_CHUNK)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        try:
            asyncio.run_coroutine_threadsafe(out.put(chunk), loop).result()
        except (RuntimeError, asyncio.CancelledError, Exception):
            return  # the loop is gone
        if not chunk:
            return


async def _skip_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return


# ---------------------------------------------------------------- entry points


def keygen() -> int:
    print(keys.generate())
    return 0


def _keygen(argv: list[str]) -> int:
    Parser(
        prog=f"{PROG} keygen",
        description="Print a new random pre-shared key (32 bytes, base64url) on stdout. "
        f"Save it with: (umask 077; {PROG} keygen > cluster.key)",
    ).parse_args(argv)
    return keygen()


def _run_loop(coro: object) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)  # type: ignore[arg-type]


def _reserve_std_fds() -> None:
    """A closed stdin/stdout/stderr (``<&-``, some supervisors) would let the next socket
    take fd 0-2 and be read or written as if it were a terminal: hold them on /dev/null."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def run(argv: Sequence[str], prog: str = PROG) -> int:
    parser = build_run_parser(prog)
    layered = configfile.parse_or_exit(parser, argv)
    args = layered.args
    logs.setup(args.log_level, args.log_format)
    if args.log_level_file:
        logs.set_level(_read_log_level(args.log_level_file))
    data_dir = DataDir(args.data_dir) if args.data_dir else None
    try:
        node_id = data_dir.open() if data_dir is not None else None
        try:
            config = config_from_args(args, node_id)
        except CliError as exc:  # name the config file or variable, if one set it
            raise CliError(configfile.name_origin(str(exc), parser, layered)) from None
        return _run_loop(NodeProgram(args, config).run())
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    finally:
        if data_dir is not None:
            data_dir.close()


def _client(name: str, argv: Sequence[str]) -> int:
    make_parser, command, _ = ctl.COMMANDS[name]
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ctl.UsageError as exc:
        parser.error(str(exc))
    except ControlError as exc:
        sys.stderr.write(f"{PROG} {name}: error: {exc}\n")
        return EXIT_RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    _reserve_std_fds()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    handlers: dict[str, Callable[[list[str]], int]] = {
        "run": lambda rest: run(rest, f"{PROG} run"),
        "keygen": _keygen,
        "demo": _demo,
        "config": lambda rest: configfile.config_command(rest, build_run_parser, PROG),
    }
    try:
        if command in handlers:
            return handlers[command](argv[1:])
        if command in ctl.COMMANDS:
            return _client(command, argv[1:])
        return run(argv)
    except CliError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


def _demo(argv: list[str]) -> int:
    from gwyh_mp.demo import main as demo_main  # the demo is not needed to run a node

    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
