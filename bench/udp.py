"""`python -m bench udp`: batched recvmmsg/sendmmsg (gwyh_mp.runtime.mmsg) vs plain calls.

Two single-process loopback measurements, each variant timed in short interleaved
slices so VM noise hits all variants alike:

* send: packets/s into an unread sink (its buffer fills, then the kernel drops),
  plain ``sendto`` loop vs ``BatchSender`` (fallback loop, and sendmmsg).
* drain: a receiver socket with a big buffer (SO_RCVBUFFORCE where permitted) is
  pre-filled while nobody reads, then drained against the clock with ``recvfrom``,
  ``recvfrom_into`` and ``BatchReceiver`` (fallback, and recvmmsg). Every variant
  touches each datagram's payload and source address, as a node would.

Every loop is bounded by both time and packet count. Output: datagrams/s
per variant on stdout; ``--json FILE`` adds machine info and the mmsg/plain ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    counter_delta,
    machine_description,
    rcvbuf_errors,
    set_big_buffers,
    write_json,
)
from gwyh_mp.runtime import mmsg
from gwyh_mp.runtime.mmsg import BatchReceiver, BatchSender

HOST = "127.0.0.1"
SLICE_S = 0.25  # interleaving granularity of the send variants
MAX_PACKETS = 50_000_000  # per variant; time is the real bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per variant")
    parser.add_argument("--size", type=int, default=584, help="UDP payload bytes")
    parser.add_argument("--batch", type=int, default=64, help="datagrams per mmsg call")
    parser.add_argument(
        "--fill", type=int, default=100_000, help="datagrams queued per drain round (upper bound)"
    )
    parser.add_argument("--rcvbuf-mib", type=int, default=256, help="drain socket buffer request")


def machine_info() -> dict[str, object]:
    """The common machine description plus what decides this bench's figures."""
    try:
        rmem_max: int | None = int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        rmem_max = None
    return {
        **machine_description(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mmsg_available": mmsg.MMSG_AVAILABLE,
        "rmem_max": rmem_max,
    }


def _udp(rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        set_big_buffers(sock, rcvbuf)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def _rate(packets: int, seconds: float) -> dict[str, float]:
    return {
        "packets": packets,
        "seconds": round(seconds, 4),
        "pps": round(packets / seconds, 1) if seconds > 0 else 0.0,
    }


def _ratio(results: dict[str, dict], num: str, den: str) -> float | None:
    if num not in results or den not in results or not results[den]["pps"]:
        return None
    return round(results[num]["pps"] / results[den]["pps"], 3)


# -- send ---------------------------------------------------------------------------------

SendFn = Callable[[float, int], int]  # (deadline, max packets) -> packets sent


def _plain_sender(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> SendFn:
    def run(deadline: float, cap: int) -> int:
        sendto, now, n = sock.sendto, time.perf_counter, 0
        while n < cap and now() < deadline:
            for _ in range(64):  # amortise the clock read as the batch variants do
                try:
                    sendto(data, addr)
                except BlockingIOError:
                    continue
                n += 1
        return n

    return run


def _batch_sender(tx: BatchSender, data: bytes, addr: tuple[str, int]) -> SendFn:
    items = [(data, addr)] * tx.batch

    def run(deadline: float, cap: int) -> int:
        send, now, n = tx.send_batch, time.perf_counter, 0
        while n < cap and now() < deadline:
            n += send(items)
        return n

    return run


def bench_send(args: argparse.Namespace, data: bytes) -> dict[str, object]:
    sink, tx_sock = _udp(), _udp()
    try:
        addr = sink.getsockname()
        variants: dict[str, SendFn] = {
            "plain_sendto": _plain_sender(tx_sock, data, addr),
            "batch_fallback": _batch_sender(
                BatchSender(tx_sock, args.batch, use_mmsg=False), data, addr
            ),
        }
        if mmsg.MMSG_AVAILABLE:
            variants["batch_mmsg"] = _batch_sender(BatchSender(tx_sock, args.batch), data, addr)
        packets = dict.fromkeys(variants, 0)
        spent = dict.fromkeys(variants, 0.0)
        drops0 = rcvbuf_errors()
        for rnd in range(10_000):  # bounded; ends when every variant has had its time
            names = [v for v in variants if spent[v] < args.seconds and packets[v] < MAX_PACKETS]
            if not names:
                break
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                budget = min(SLICE_S, args.seconds - spent[name])
                packets[name] += variants[name](start + budget, MAX_PACKETS - packets[name])
                spent[name] += time.perf_counter() - start
        drops1 = rcvbuf_errors()
        out: dict[str, object] = {v: _rate(packets[v], spent[v]) for v in variants}
        out["sink_rcvbuf_errors"] = counter_delta(drops0, drops1)
        return out
    finally:
        sink.close()
        tx_sock.close()


# -- drain --------------------------------------------------------------------------------

DrainFn = Callable[[int], int]  # (max packets) -> packets read before EAGAIN


def _drain_recvfrom(sock: socket.socket, bufsize: int) -> DrainFn:
    def run(cap: int) -> int:
        recv, n = sock.recvfrom, 0
        while n < cap:
            try:
                _data, _addr = recv(bufsize)
            except BlockingIOError:
                break
            n += 1
        return n

    return run


def _drain_recvfrom_into(sock: socket.socket, bufsize: int) -> DrainFn:
    buf = bytearray(bufsize)

    def run(cap: int) -> int:
        recv, n = sock.recvfrom_into, 0
        while n < cap:
            try:
                _nbytes, _addr = recv(buf)
            except BlockingIOError:
                break
            n += 1
        return n

    return run


def _drain_batch(rx: BatchReceiver) -> DrainFn:
    def run(cap: int) -> int:
        recv, packet, address, n = rx.recv_batch, rx.packet, rx.address, 0
        while n < cap:
            k = recv()
            if not k:
                break
            for i in range(k):
                _view, _addr = packet(i), address(i)
            n += k
        return n

    return run


def _fill(tx: BatchSender, items: list, count: int) -> int:
    sent = 0
    for _ in range(count):  # bounded: one pass per datagram at worst
        if sent >= count:
            break
        chunk = items if count - sent >= len(items) else items[: count - sent]
        sent += tx.send_batch(chunk)
    return sent


def bench_drain(args: argparse.Namespace, data: bytes) -> dict[str, object]:
    bufsize = max(2048, args.size)
    rx_sock, tx_sock = _udp(args.rcvbuf_mib << 20), _udp()
    try:
        items = [(data, rx_sock.getsockname())] * args.batch
        filler = BatchSender(tx_sock, args.batch)
        variants: dict[str, DrainFn] = {
            "recvfrom": _drain_recvfrom(rx_sock, bufsize),
            "recvfrom_into": _drain_recvfrom_into(rx_sock, bufsize),
            "batch_fallback": _drain_batch(
                BatchReceiver(rx_sock, args.batch, bufsize, use_mmsg=False)
            ),
        }
        if mmsg.MMSG_AVAILABLE:
            variants["batch_mmsg"] = _drain_batch(BatchReceiver(rx_sock, args.batch, bufsize))

        # Calibrate: how many datagrams fit in the buffer (truesize >> payload size).
        fill = args.fill
        queued = _fill(filler, items, fill)
        held = variants["recvfrom_into"](queued + 1)
        if held < queued:
            fill = max(args.batch, int(held * 0.9))

        packets = dict.fromkeys(variants, 0)
        spent = dict.fromkeys(variants, 0.0)
        lost = 0
        wall_cap = time.perf_counter() + 10 * args.seconds * len(variants) + 10
        drops0 = rcvbuf_errors()
        rounds = 0
        for rnd in range(100_000):
            names = [v for v in variants if spent[v] < args.seconds]
            if not names or time.perf_counter() > wall_cap:
                break
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                queued = _fill(filler, items, fill)
                start = time.perf_counter()
                got = variants[name](queued + 1)
                spent[name] += time.perf_counter() - start
                packets[name] += got
                lost += queued - got
            rounds += 1
        drops1 = rcvbuf_errors()
        out: dict[str, object] = {v: _rate(packets[v], spent[v]) for v in variants}
        out.update(
            rcvbuf_effective=rx_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            bufsize=bufsize,
            fill_per_round=fill,
            rounds=rounds,
            lost_while_filling=lost,
            rcvbuf_errors=counter_delta(drops0, drops1),
        )
        return out
    finally:
        rx_sock.close()
        tx_sock.close()


def run(args: argparse.Namespace) -> int:
    if args.seconds <= 0 or not 0 <= args.size <= 65507 or args.batch < 1 or args.fill < 1:
        print(
            "bench udp: need --seconds > 0, 0 <= --size <= 65507, --batch/--fill >= 1",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    data = os.urandom(args.size)
    send = bench_send(args, data)
    drain = bench_drain(args, data)
    report = {
        "bench": "udp",
        "machine": machine_info(),
        "params": {
            "seconds": args.seconds,
            "size": args.size,
            "batch": args.batch,
            "fill": args.fill,
            "rcvbuf_mib": args.rcvbuf_mib,
        },
        "send": send,
        "drain": drain,
        "ratios": {
            "send_mmsg_vs_sendto": _ratio(send, "batch_mmsg", "plain_sendto"),
            "send_fallback_vs_sendto": _ratio(send, "batch_fallback", "plain_sendto"),
            "drain_mmsg_vs_recvfrom": _ratio(drain, "batch_mmsg", "recvfrom"),
            "drain_mmsg_vs_recvfrom_into": _ratio(drain, "batch_mmsg", "recvfrom_into"),
            "drain_fallback_vs_recvfrom": _ratio(drain, "batch_fallback", "recvfrom"),
        },
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    print_table(report)
    write_json(args.json, report)
    return 0


def print_table(report: dict) -> None:
    """Datagrams per second of each variant, on stdout."""
    print(f"{'part':<6}{'variant':<18}{'datagrams/s':>14}")
    for part in ("send", "drain"):
        for variant, figures in report[part].items():
            if isinstance(figures, dict) and "pps" in figures:
                print(f"{part:<6}{variant:<18}{figures['pps']:>14,.0f}")
    ratios = ", ".join(f"{k} x{v}" for k, v in report["ratios"].items() if v is not None)
    print(f"ratios: {ratios}")
