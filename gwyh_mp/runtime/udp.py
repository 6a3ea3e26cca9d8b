"""UDP sockets for the runtimes: creation with deep buffers, and claiming a port.

Batched I/O on these sockets is ``gwyh_mp.runtime.mmsg`` (recvmmsg/sendmmsg, with its
own plain-call fallback); this module only makes the sockets.
"""

from __future__ import annotations

import socket

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
