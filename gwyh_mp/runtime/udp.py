"""UDP sockets for the runtimes: creation with deep buffers, and claiming a port.

Batched I/O on these sockets is ``gwyh_mp.runtime.mmsg`` (recvmmsg/sendmmsg, with its
own plain-call fallback); this module only makes the sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

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


def open_exclusive(bind: Addr, buffer_bytes: int) -> tuple[socket.socket, socket.socket | None]:
    """Open a SO_REUSEPORT socket on ``bind`` for a node whose receivers will share
    the port, refusing a port anything else holds: ``(socket, port lock)``.

    SO_REUSEPORT alone lets a second node of the same user bind a busy port and split
    its traffic. So the port is first bound without it (fails if any socket holds the
    address), then the address is locked with an abstract Unix socket named after it
    (Linux; per network namespace, like the port; released when the process dies),
    so of two nodes starting at once only the first gets it. Close the lock to
    release the port for others; it raises EADDRINUSE naming nothing, so callers
    name the address in their message."""
    host, port = bind
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    sock = open_socket(bind, buffer_bytes, reuse_port=True)
    lock: socket.socket | None = None
    if sys.platform.startswith("linux"):
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            lock.bind(f"\0gwyh-node/udp/{host}:{sock.getsockname()[1]}")
        except OSError:
            lock.close()
            sock.close()
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
    return sock, lock
