"""``gwyh-node``: run a node, generate a key, or watch a demo cluster.

    gwyh-node keygen > cluster.key
    gwyh-node --bind 127.0.0.1:7001 --psk-file cluster.key --stdio
    gwyh-node --bind 127.0.0.1:7002 --psk-file cluster.key --bootstrap 127.0.0.1:7001 --stdio
    gwyh-node demo

Errors a user can cause (bad arguments, unreadable key files, a busy port) print
one line on stderr and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import orjson

from gwyh_mp.api import Node
from gwyh_mp.config import Config, ConfigError, parse_addr
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.node import MessageTooLarge
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.runtime.host import socket_buffer_warnings, usable_cpus

log = logging.getLogger("gwyh_mp.cli")
PROG = "gwyh-node"
EXIT_USAGE = 2
EXIT_RUNTIME = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of a usage dump.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1 (seconds)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _addr(text: str) -> tuple[str, int]:
    try:
        return parse_addr(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _strategy(text: str) -> Strategy:
    try:
        return Strategy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a gwyh_mp gossip node.")
    p.add_argument(
        "--bind",
        type=_addr,
        default=("127.0.0.1", 6969),
        metavar="HOST:PORT",
        help="UDP address to listen on (default 127.0.0.1:6969)",
    )
    p.add_argument(
        "--advertise",
        type=_addr,
        metavar="HOST:PORT",
        help="address other nodes should use for this one",
    )
    p.add_argument(
        "--psk-file",
        action="append",
        required=True,
        metavar="FILE",
        help="file holding a pre-shared key; repeat to accept several (rotation)",
    )
    p.add_argument(
        "--bootstrap",
        type=_addr,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="seed peer: IP address or DNS name (re-resolved while isolated); repeat",
    )
    p.add_argument("--zone", help="zone label of this node (datacenter, rack)")
    p.add_argument(
        "--strategy",
        type=_strategy,
        default=Strategy.UNIFORM,
        help="peer selection: uniform, hub-and-spoke, prefer-local, prefer-remote",
    )
    p.add_argument(
        "--subscriptions",
        type=_positive_int,
        default=5,
        metavar="N",
        help="how many providers to receive broadcasts from (default 5)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="seconds between heartbeats (default 5)",
    )
    p.add_argument(
        "--missed-heartbeats",
        type=_positive_int,
        default=3,
        metavar="N",
        help="missed heartbeats before a provider is declared DOWN (default 3)",
    )
    p.add_argument(
        "--max-datagram",
        type=_positive_int,
        default=1400,
        metavar="BYTES",
        help="largest UDP payload to send (default 1400; up to 65507 on loopback)",
    )
    p.add_argument(
        "--flush-interval",
        type=_seconds_or_zero,
        default=0.0,
        metavar="S",
        help="coalescing window under load: flush forwarded traffic at most this often "
        "(default 0: after every receive batch; 0.005 halves CPU per delivery at high rates "
        "for up to 5 ms more latency per hop)",
    )
    p.add_argument("--seed", type=int, help="seed for reproducible peer selection")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=usable_cpus(),
        metavar="N",
        help="receiver processes sharing the port (default: the CPUs this process may use, "
        "after affinity and cgroup quota; 1 = one process)",
    )
    p.add_argument(
        "--ring-bytes",
        type=_positive_int,
        default=Config().ring_bytes,
        metavar="BYTES",
        help="size of each of a receiver's two /dev/shm rings (default 16 MiB; shrunk "
        "with a warning when /dev/shm is too small)",
    )
    p.add_argument(
        "--stats-interval",
        type=_positive_float,
        metavar="S",
        help="print statistics as JSON lines on stderr every S seconds",
    )
    p.add_argument(
        "--metrics",
        type=_addr,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, /healthz and /readyz over HTTP here",
    )
    p.add_argument(
        "--stdio",
        action="store_true",
        help="broadcast each stdin line; print each delivered message as JSON",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level",
    )
    return p


def read_psk_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError as exc:
        raise CliError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    key = raw.strip()
    if not key:
        raise CliError(f"key file {path} is empty (generate one: {PROG} keygen > {path})")
    if len(key) < 16:
        raise CliError(f"key in {path} is shorter than 16 bytes; use {PROG} keygen")
    return key


def config_from_args(args: argparse.Namespace) -> Config:
    config = Config(
        bind=args.bind,
        advertise=args.advertise,
        psks=[read_psk_file(p) for p in args.psk_file],
        bootstrap=list(args.bootstrap),
        zone=args.zone,
        strategy=args.strategy,
        subscriptions=args.subscriptions,
        heartbeat_interval_s=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats,
        max_datagram_bytes=args.max_datagram,
        flush_interval_s=args.flush_interval,
        seed=args.seed,
        workers=args.workers,
        ring_bytes=args.ring_bytes,
    )
    try:
        return config.validate()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def message_json(msg: Message, received_at: float | None = None) -> bytes:
    record: dict[str, object] = {"id": msg.id.hex(), "origin": msg.origin.hex(), "hops": msg.hops}
    if received_at is not None:
        record["received_at"] = round(received_at, 6)
    try:
        record["data"] = msg.data.decode("utf-8")
    except UnicodeDecodeError:
        record["data"] = base64.b64encode(msg.data).decode()
        record["encoding"] = "base64"
    return orjson.dumps(record) + b"\n"


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None]) -> None:
    """Runs in a thread: blocking reads work for pipes, files and terminals alike."""
    stream = sys.stdin.buffer
    try:
        for line in stream:
            asyncio.run_coroutine_threadsafe(queue.put(line.rstrip(b"\r\n")), loop).result()
    except (OSError, RuntimeError, ValueError):
        pass
    with contextlib.suppress(RuntimeError):
        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()


async def run_node(
    config: Config,
    *,
    stdio: bool,
    stats_interval: float | None,
    metrics: tuple[str, int] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    try:
        await node.start()
    except ConfigError as exc:  # e.g. /dev/shm too small for the receivers' rings
        raise CliError(str(exc)) from None
    except OSError as exc:
        host, port = config.bind
        raise CliError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    host, port = node.address
    log.info("node %s listening on %s:%d", node.node_id.hex(), host, port)
    for warning in socket_buffer_warnings(config.socket_buffer_bytes):
        log.warning("%s", warning)
    if config.bind[0] in ("0.0.0.0", "::") and config.advertise is None:
        log.warning(
            "bound to a wildcard address without --advertise: this node describes itself as "
            "%s:%d to others; pass --advertise HOST:PORT on a real network",
            *config.advertised,
        )
    metrics_server = None
    if metrics is not None:
        from gwyh_mp.metrics import MetricsServer

        try:
            metrics_server = await MetricsServer(node).start(*metrics)
        except OSError as exc:
            await node.stop()
            where = f"{metrics[0]}:{metrics[1]}"
            raise CliError(f"--metrics: cannot listen on {where}: {exc.strerror or exc}") from None
        log.info("metrics on http://%s:%d/metrics", *metrics_server.address)
    tasks: list[asyncio.Task[None]] = []
    if stdio:
        tasks.append(asyncio.create_task(_pump_stdin(node, loop)))
        tasks.append(asyncio.create_task(_pump_stdout(node)))
    if stats_interval:
        tasks.append(asyncio.create_task(_print_stats(node, stats_interval)))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if metrics_server is not None:
            await metrics_server.stop()
        await node.stop()
        log.info("node stopped")
    return 0


async def _pump_stdin(node: Node, loop: asyncio.AbstractEventLoop) -> None:
    if stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
        # Regular files cannot be watched by epoll; a thread reads them to EOF.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(1024)
        threading.Thread(target=_stdin_lines, args=(loop, queue), daemon=True).start()
        while (line := await queue.get()) is not None:
            await _broadcast_line(node, line)
        return
    limit = node.max_message_bytes + 2
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                await _broadcast_line(node, exc.partial)
            return
        except asyncio.LimitOverrunError:
            log.error("line not sent: longer than the largest message (%d bytes)", limit - 2)
            await _skip_line(reader)
            continue
        await _broadcast_line(node, line)


async def _skip_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return


async def _broadcast_line(node: Node, line: bytes) -> None:
    line = line.rstrip(b"\r\n")
    try:
        await node.broadcast(line)
    except MessageTooLarge as exc:
        log.error("line not sent: %s", exc)


async def _pump_stdout(node: Node) -> None:
    out = sys.stdout.buffer
    async for batch in node.message_batches():
        now = time.time()  # one wall-clock stamp per batch: when the node handed it out
        out.write(b"".join([message_json(msg, now) for msg in batch]))
        out.flush()


async def _print_stats(node: Node, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        record = {"event": "stats", "time": time.time(), "node": node.node_id.hex(), **node.stats()}
        lines = [orjson.dumps(record)]
        for proc in node.process_stats():  # multiprocess: one line per process
            lines.append(orjson.dumps({"event": "process", "time": record["time"], **proc}))
        sys.stderr.buffer.write(b"\n".join(lines) + b"\n")
        sys.stderr.flush()


def keygen() -> int:
    print(base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="))
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run_loop(coro: object) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "keygen":
            if len(argv) > 1:
                _Parser(prog=f"{PROG} keygen").error("keygen takes no arguments")
            return keygen()
        if argv and argv[0] == "demo":
            from gwyh_mp.demo import main as demo_main

            return demo_main(argv[1:])
        if argv and argv[0] == "run":
            argv = argv[1:]
        args = build_run_parser().parse_args(argv)
        _setup_logging(args.log_level)
        config = config_from_args(args)
        return _run_loop(
            run_node(
                config,
                stdio=args.stdio,
                stats_interval=args.stats_interval,
                metrics=args.metrics,
            )
        )
    except CliError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
