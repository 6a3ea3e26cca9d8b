"""One-process runtime: a UDP socket and timers on an asyncio (uvloop) loop around
:class:`NodeCore`.

The loop watches the socket with ``add_reader`` and drains it in batches (recvmmsg
where available): every datagram goes to the core, then everything the core wants
to send leaves in one batch. Processing a whole batch before flushing is what lets
the core coalesce forwards into few datagrams under load.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Event
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.runtime import udp
from gwyh_mp.runtime.driver import CoreDriver
from gwyh_mp.runtime.mmsg import BatchReceiver, BatchSender, RefusalLog, send_skipping_refused

log = logging.getLogger("gwyh_mp")

Addr = tuple[str, int]
RECV_BATCH = 64
MAX_RECV_PER_WAKEUP = 2048  # bound one wakeup so timers and the app still get to run


class SingleProcessRuntime(CoreDriver):
    def __init__(self, config: Config, on_event: Callable[[Event], None]) -> None:
        super().__init__(on_event)
        self.config = config
        self._sock: socket.socket | None = None
        self._unsent: deque[tuple[bytes, Addr]] = deque()
        self._writer_armed = False
        self._reading = False
        self._receiver: BatchReceiver | None = None
        self._sender: BatchSender | None = None
        self._refusals = RefusalLog(log)
        self.address: Addr | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._sock = udp.open_socket(self.config.bind, self.config.socket_buffer_bytes)
        self.address = self._sock.getsockname()[:2]
        self._receiver = BatchReceiver(self._sock, RECV_BATCH, udp.MAX_DATAGRAM)
        self._sender = BatchSender(self._sock)
        now = loop.time()
        self.core = NodeCore(self.config, now, wall_offset_s=time.time() - now)
        self.core.set_bound_port(self.address[1])
        self.core.start(now)
        self.resume_reading()
        self._flush()

    async def stop(self, linger_s: float = 0.2) -> None:
        """Leave gracefully: announce LEFT, end subscriptions, give the packets a
        moment to leave, then close."""
        if self.core is None or self._sock is None or self._loop is None:
            return
        if self.core.running:
            self.core.leave(self._loop.time())
            self._flush()
            deadline = self._loop.time() + linger_s
            while self._unsent and self._loop.time() < deadline:
                await asyncio.sleep(0.01)
        self.pause_reading()
        self._cancel_timer()
        if self._writer_armed:
            self._loop.remove_writer(self._sock.fileno())
            self._writer_armed = False
        self._sock.close()
        self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def pause_reading(self) -> None:
        if self._reading and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    # ------------------------------------------------------------ application side

    # ------------------------------------------------------------ I/O

    def _on_readable(self) -> None:
        core, receiver, loop = self.core, self._receiver, self._loop
        assert core is not None and receiver is not None and loop is not None
        now = loop.time()
        receive = core.receive_datagram
        total = nbytes = 0
        while total < MAX_RECV_PER_WAKEUP:
            try:
                count = receiver.recv_batch()
            except OSError as exc:
                log.debug("recv error: %s", exc)
                break
            if not count:
                break
            for data, addr in receiver.datagrams():
                nbytes += len(data)
                receive(data, addr, now)
            total += count
            if count < receiver.batch:
                break
        core.stats.bump("bytes_in", nbytes)
        self.flush_after_receive()

    def _flush(self) -> None:
        self._flush_scheduled = False
        core, loop = self.core, self._loop
        if core is None or loop is None or self._sock is None:
            return
        datagrams = core.datagrams_to_send(loop.time())
        if datagrams:
            core.stats.bump("bytes_out", sum([len(d) for d, _ in datagrams]))
            if self._unsent:
                self._unsent.extend(datagrams)
            else:
                self._send(datagrams)
        self._after_flush(core)

    def _refused(self, addr: tuple, exc: Exception) -> None:
        if self.core is not None:
            self.core.stats.bump("send_errors")
        self._refusals.refused(addr, exc)

    def _send(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        assert self._sender is not None
        sent = send_skipping_refused(self._sender, datagrams, self._refused)
        if sent < len(datagrams):
            # Kernel buffer full: keep the rest, in order, until the socket drains.
            self._unsent.extend(datagrams[sent:])
            self._arm_writer()

    def _arm_writer(self) -> None:
        if not self._writer_armed and self._sock is not None and self._loop is not None:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            self._writer_armed = True

    def _on_writable(self) -> None:
        assert self._sender is not None and self._loop is not None and self._sock is not None
        pending = list(self._unsent)
        self._unsent.clear()
        sent = send_skipping_refused(self._sender, pending, self._refused)
        if sent < len(pending):
            self._unsent.extend(pending[sent:])
            return
        self._loop.remove_writer(self._sock.fileno())
        self._writer_armed = False


def is_address_in_use(exc: OSError) -> bool:
    return exc.errno in (errno.EADDRINUSE, errno.EACCES)
