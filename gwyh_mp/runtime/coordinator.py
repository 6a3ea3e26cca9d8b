"""The coordinator of a multiprocess node, and the supervisor of its receivers.

It runs the protocol core (membership, subscriptions, seen-set, fanout decisions,
pacing) in the application's process and event loop, and does no per-packet
cryptography: receivers decrypt, and they seal and send what the core decides
(see docs/ARCHITECTURE.md). Same interface as ``SingleProcessRuntime``, so the
library API is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from gwyh_mp.config import Config
from gwyh_mp.protocol.crypto import DeferredDatagram, SealJob
from gwyh_mp.protocol.events import Event
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.offload import (
    ChannelKeySet,
    IdsSeen,
    OffloadUpdate,
    SessionKeyInstalled,
    SessionKeyRetired,
)
from gwyh_mp.runtime import udp
from gwyh_mp.runtime.driver import CoreDriver
from gwyh_mp.runtime.host import fit_rings, min_ring_bytes, shm_free_bytes
from gwyh_mp.runtime.receiver import (
    BATCH,
    BROADCAST,
    CHANNEL_KEY,
    CONTROL,
    DUPLICATE,
    QUIT,
    RAW,
    SEEN_IDS,
    SEND_JOBS,
    SESSION_KEY,
    SESSION_RETIRED,
    STATS,
    receiver_main,
)
from gwyh_mp.runtime.shm_ring import ShmRing

log = logging.getLogger("gwyh_mp")

Addr = tuple[str, int]
RESTART_DELAY_S = 0.05
SENDS_PER_RECORD = 64  # keeps one ring record far below the ring's record size limit
_dumps = marshal.dumps
_loads = marshal.loads


def ring_record(update: OffloadUpdate) -> bytes:
    """One core update as the ring record a receiver applies (see receiver.py)."""
    if isinstance(update, IdsSeen):
        return _dumps((SEEN_IDS, update.ids))
    if isinstance(update, SessionKeyInstalled):
        host, port = update.addr
        return _dumps((SESSION_KEY, update.sid, update.peer_id, update.recv_key, host, port))
    if isinstance(update, ChannelKeySet):
        return _dumps((CHANNEL_KEY, update.peer_id, update.key or b""))
    if isinstance(update, SessionKeyRetired):
        return _dumps((SESSION_RETIRED, update.sid))
    raise TypeError(f"not an offload update: {update!r}")


class _Receiver:
    """One receiver process, its two rings and its last reported stats."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.up: ShmRing | None = None
        self.down: ShmRing | None = None
        self.stats: dict[str, Any] = {}
        self.restarts = 0


class MultiProcessRuntime(CoreDriver):
    def __init__(self, config: Config, on_event: Callable[[Event], None]) -> None:
        super().__init__(on_event)
        self.config = config
        self.address: Addr | None = None
        self._receivers = [_Receiver(i) for i in range(config.workers)]
        # fork: the child runs only receiver_main and never touches the parent's event loop;
        # spawn would re-import the application's __main__ (surprising for library users).
        self._ctx = multiprocessing.get_context("fork")
        self._stopping = False
        self._reading = True
        self._holder_fd = -1
        self._port_lock: socket.socket | None = None
        self._ring_bytes = config.ring_bytes

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        # Hold the port (and learn it, for port 0) while the receivers bind beside us.
        # Exclusive: a busy port is refused even where SO_REUSEPORT would share it.
        holder, self._port_lock = udp.open_exclusive(self.config.bind, 1 << 16)
        self._holder_fd = holder.fileno()
        try:
            smallest = min_ring_bytes(self.config.max_datagram_bytes, SENDS_PER_RECORD)
            self._ring_bytes = fit_rings(
                len(self._receivers), self.config.ring_bytes, smallest, shm_free_bytes()
            )
            self.address = holder.getsockname()[:2]
            now = loop.time()
            self.core = NodeCore(
                self.config, now, wall_offset_s=time.time() - now, defer_sealing=True
            )
            self.core.set_bound_port(self.address[1])
            for receiver in self._receivers:
                self._spawn(receiver)
            await self._wait_bound()
        except BaseException:
            holder.close()
            await self._shutdown_receivers()
            raise
        holder.close()  # the receivers own the port now
        self._holder_fd = -1
        self.core.start(loop.time())
        self._flush()

    async def _wait_bound(self, timeout: float = 20.0) -> None:
        """Wait until every receiver has bound the port (it reports stats once bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for receiver in self._receivers:
                if receiver.process is not None and receiver.process.exitcode is not None:
                    raise OSError(f"receiver {receiver.index} failed to start")
            if all(r.stats for r in self._receivers):
                return
            await asyncio.sleep(0.02)
        raise OSError("receivers did not start in time")

    def _spawn(self, receiver: _Receiver) -> None:
        assert self._loop is not None and self.address is not None
        # Named after the node's pid, so an operator (or a test) can tell them apart.
        tag = f"gwyh_{os.getpid()}_{receiver.index}_{receiver.restarts}"
        receiver.up = ShmRing.create(self._ring_bytes, name=f"{tag}_up")
        receiver.down = ShmRing.create(self._ring_bytes, name=f"{tag}_down")
        receiver.stats = {}
        process = self._ctx.Process(
            target=receiver_main,
            args=(
                receiver.index,
                self.address,
                self.config.socket_buffer_bytes,
                receiver.up.handle,
                receiver.down.handle,
                os.getpid(),
                self.config.seen_set_size,
                (self._holder_fd,) if self._holder_fd >= 0 else (),
            ),
            name=f"gwyh-receiver-{receiver.index}",
            daemon=True,
        )
        process.start()
        receiver.process = process
        if self.core is not None:
            # A new receiver knows nothing yet: give it every key.
            snapshot = [ring_record(u) for u in self.core.offload_snapshot()]
            receiver.down.put_all(snapshot, timeout=1.0)
        self._loop.add_reader(receiver.up.fileno(), self._on_ready, receiver)
        self._loop.add_reader(process.sentinel, self._on_exit, receiver)
        # Drain (and arm the wakeup) soon: the child may have written before we armed it,
        # and an unarmed ring never signals.
        self._loop.call_soon(self._on_ready, receiver)

    def _on_exit(self, receiver: _Receiver) -> None:
        """A receiver died. Unless we are stopping, replace it at once."""
        assert self._loop is not None
        process = receiver.process
        if process is None:
            return
        self._loop.remove_reader(process.sentinel)
        process.join(0)
        self._release(receiver)
        if self._stopping:
            return
        receiver.restarts += 1
        log.warning(
            "receiver %d (pid %s) exited with %s; restarting",
            receiver.index,
            process.pid,
            process.exitcode,
        )
        self._loop.call_later(RESTART_DELAY_S, self._respawn, receiver)

    def _respawn(self, receiver: _Receiver) -> None:
        if not self._stopping:
            self._spawn(receiver)

    def _release(self, receiver: _Receiver) -> None:
        assert self._loop is not None
        for ring in (receiver.up, receiver.down):
            if ring is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(ring.fileno())
                with contextlib.suppress(Exception):
                    ring.close()
                with contextlib.suppress(Exception):
                    ring.unlink()
        receiver.up = receiver.down = None

    async def stop(self, linger_s: float = 0.3) -> None:
        if self.core is None or self._loop is None or self._stopping:
            return
        if self.core.running:
            self.core.leave(self._loop.time())
            self._flush()
        await asyncio.sleep(linger_s)  # let the receivers put the goodbyes on the wire
        self._stopping = True
        self._cancel_timer()
        await self._shutdown_receivers()

    async def _shutdown_receivers(self) -> None:
        self._stopping = True
        if self._port_lock is not None:
            self._port_lock.close()
        for receiver in self._receivers:
            if receiver.down is not None:
                with contextlib.suppress(Exception):
                    receiver.down.put_all([_dumps((QUIT,))], timeout=0.5)
        deadline = time.monotonic() + 3.0
        for receiver in self._receivers:
            process = receiver.process
            if process is None:
                continue
            while process.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if process.exitcode is None:
                process.terminate()
                await asyncio.sleep(0.1)
            if process.exitcode is None:
                process.kill()
            process.join(1)
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(process.sentinel)
            self._release(receiver)

    @property
    def closed(self) -> bool:
        return self._stopping

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            for receiver in self._receivers:
                if receiver.up is not None:
                    self._on_ready(receiver)

    # ------------------------------------------------------------ application side

    def process_stats(self) -> list[dict[str, Any]]:
        """Per process: role, pid, CPU %, RSS, and the receiver's own counters."""
        out = []
        procs: list[tuple[str, int | None, dict[str, Any]]] = [("coordinator", os.getpid(), {})]
        for r in self._receivers:
            pid = r.process.pid if r.process is not None else None
            extra = dict(r.stats, restarts=r.restarts)
            if r.up is not None:
                extra["up_ring_bytes"] = r.up.used_bytes()
            procs.append((f"receiver-{r.index}", pid, extra))
        for role, pid, extra in procs:
            record: dict[str, Any] = {"role": role, "pid": pid, **extra}
            with contextlib.suppress(psutil.Error, TypeError):
                p = psutil.Process(pid)
                times = p.cpu_times()
                record["cpu_s"] = round(times.user + times.system, 3)
                record["rss_bytes"] = p.memory_info().rss
            out.append(record)
        return out

    # ------------------------------------------------------------ receivers -> core

    def _on_ready(self, receiver: _Receiver) -> None:
        ring = receiver.up
        core, loop = self.core, self._loop
        if ring is None or core is None or loop is None:
            return
        ring.finish_wait()
        if not self._reading:
            return  # backpressure: records wait in the ring (and the socket) meanwhile
        while True:
            records = ring.get_many(4096)
            if records:
                self._dispatch(records, receiver, loop.time())
                self.flush_after_receive()
            if ring.prepare_wait():
                return

    def _dispatch(self, records: list[bytes], receiver: _Receiver, now: float) -> None:
        for raw in records:
            record = _loads(raw)
            kind = record[0]
            if kind == BATCH:
                self._apply(record[1], now)
            elif kind == STATS:
                receiver.stats = record[2]
            else:
                self._apply((record,), now)

    def _apply(self, entries: list[tuple[Any, ...]] | tuple[tuple[Any, ...]], now: float) -> None:
        """What receivers made of datagrams, into the core (one loop per ring record)."""
        core = self.core
        assert core is not None
        plaintext_in = core.receive_broadcast_plaintext
        duplicate_in = core.receive_broadcast_duplicate
        for record in entries:
            kind = record[0]
            if kind == BROADCAST:
                _, sid, host, port, link_seq, chan_seq, ids, plaintext = record
                plaintext_in(sid, (host, port), link_seq, chan_seq, ids, plaintext, now)
            elif kind == DUPLICATE:
                _, sid, host, port, link_seq, ids = record
                duplicate_in(sid, (host, port), link_seq, now, ids)
            elif kind == CONTROL:
                _, sid, seq, host, port, plaintext = record
                core.receive_control_plaintext(sid, seq, (host, port), plaintext, now)
            elif kind == RAW:
                _, host, port, data = record
                core.receive_datagram(data, (host, port), now)

    # ------------------------------------------------------------ core -> receivers

    def _flush(self) -> None:
        self._flush_scheduled = False
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return
        datagrams = core.datagrams_to_send(loop.time())
        live = [r for r in self._receivers if r.down is not None]
        if live:
            # One put per receiver and flush: key/seen-id updates (every receiver) and
            # its share of the sends travel together, so it is woken once, not twice.
            offload = [ring_record(u) for u in core.offload_updates()]
            sends = self._send_records(datagrams, len(live)) if datagrams else {}
            for slot, receiver in enumerate(live):
                records = offload + sends[slot] if slot in sends else offload
                if records:
                    assert receiver.down is not None
                    receiver.down.put_all(records, timeout=1.0)
        self._after_flush(core)

    def _active(self) -> bool:
        return not self._stopping

    @staticmethod
    def _send_records(datagrams: list[tuple[Any, Addr]], n: int) -> dict[int, list[bytes]]:
        """SEND_JOBS records per receiver slot. One destination always goes through the
        same receiver's socket, so its datagrams keep their order; destinations spread
        over the receivers."""
        per_receiver: dict[int, list[tuple[Any, Addr]]] = {}
        for item in datagrams:
            per_receiver.setdefault(hash(item[1]) % n, []).append(item)
        out: dict[int, list[bytes]] = {}
        for slot, items in per_receiver.items():
            records = out[slot] = []
            for start in range(0, len(items), SENDS_PER_RECORD):
                jobs: list[tuple[bytes, bytes, bytes]] = []
                index: dict[int, int] = {}
                sends: list[tuple[bytes, int, str, int]] = []
                for datagram, (host, port) in items[start : start + SENDS_PER_RECORD]:
                    if isinstance(datagram, DeferredDatagram):
                        job: SealJob = datagram.job
                        j = index.get(id(job))
                        if j is None:
                            j = index[id(job)] = len(jobs)
                            jobs.append((job.key, job.nonce, job.plaintext))
                        sends.append((datagram.prefix, j, host, port))
                    else:
                        sends.append((datagram, -1, host, port))
                records.append(_dumps((SEND_JOBS, jobs, sends)))
        return out


def reuseport_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")
