"""UDP sockets for the runtimes: creation with deep buffers, and batched I/O.

Batching uses recvmmsg/sendmmsg (``gwyh_mp.runtime.mmsg``) where the platform has
them and plain recvfrom/sendto otherwise; callers see one interface.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

Addr = tuple[str, int]
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
MAX_DATAGRAM = 65_535


def set_buffers(sock: socket.socket, nbytes: int) -> None:
    """Ask for deep buffers: with many processes on few cores a node is descheduled
    for milliseconds, and a 208 KiB default buffer overflows (spec/cluster-ceiling)."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
        except OSError:  # not root: the plain option, capped by net.core.*mem_max
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)
            except OSError:
                pass


def open_socket(bind: Addr, buffer_bytes: int, *, reuse_port: bool = False) -> socket.socket:
    host, port = bind
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_buffers(sock, buffer_bytes)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


try:
    from gwyh_mp.runtime.mmsg import BatchReceiver as _MmsgReceiver
    from gwyh_mp.runtime.mmsg import BatchSender as _MmsgSender
except ImportError:  # pragma: no cover - module optional during development
    _MmsgReceiver = None  # type: ignore[assignment,misc]
    _MmsgSender = None  # type: ignore[assignment,misc]


class _PlainReceiver:
    def __init__(self, sock: socket.socket, batch: int) -> None:
        self._sock = sock
        self.batch = batch
        self._packets: list[tuple[bytes, Addr]] = []

    def recv_batch(self) -> int:
        packets = self._packets
        packets.clear()
        recvfrom = self._sock.recvfrom
        for _ in range(self.batch):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            packets.append((data, addr[:2]))
        return len(packets)

    def packet_bytes(self, i: int) -> bytes:
        return self._packets[i][0]

    def address(self, i: int) -> Addr:
        return self._packets[i][1]


class _PlainSender:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send_batch(self, items: Sequence[tuple[bytes, Addr]]) -> int:
        sendto = self._sock.sendto
        for i, (data, addr) in enumerate(items):
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return i
            except OSError:
                continue  # unreachable peer, too large: that datagram is lost, not the rest
        return len(items)


class BatchReceiver:
    """recv_batch() -> count; then packet_bytes(i) and address(i) for i < count."""

    def __init__(self, sock: socket.socket, batch: int = 64) -> None:
        self.batch = batch
        if _MmsgReceiver is not None:
            impl = _MmsgReceiver(sock, batch=batch, bufsize=MAX_DATAGRAM)
            self.recv_batch = impl.recv_batch
            self.address = impl.address
            packet = impl.packet
            self.packet_bytes = lambda i: bytes(packet(i))
        else:
            plain = _PlainReceiver(sock, batch)
            self.recv_batch = plain.recv_batch
            self.packet_bytes = plain.packet_bytes
            self.address = plain.address


class BatchSender:
    """send_batch(items) -> how many were sent (the rest hit a full socket buffer)."""

    def __init__(self, sock: socket.socket) -> None:
        if _MmsgSender is not None:
            self.send_batch = _MmsgSender(sock).send_batch
        else:
            self.send_batch = _PlainSender(sock).send_batch
