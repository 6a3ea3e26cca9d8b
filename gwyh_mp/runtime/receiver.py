"""A receiver process: one of N sharing the node's UDP port with SO_REUSEPORT.

It does the per-packet work in parallel with its siblings: header checks, the
duplicate pre-filter, anti-replay, decryption (the same checks as the core's, from
protocol/inbound.py). It hands the coordinator compact records over a shared-memory
ring, in batches, and it seals and sends the coordinator's send jobs (one encryption
per job, however many copies).

Records are marshal-encoded tuples whose first item is one of the kinds below (both
ends are this program; see shm_ring). What one receive turn produced travels as BATCH
records of up to BATCH_ENTRIES tuples each (one ring frame and one marshal call per
batch instead of per datagram: the coordinator is the process every receiver shares):

    coordinator -> receiver                         receiver -> coordinator
    (SESSION_KEY, sid, peer, recv_key, host, port)  (BROADCAST, sid, host, port, link_seq,
    (SESSION_RETIRED, sid)                              chan_seq, ids, plaintext)
    (CHANNEL_KEY, peer, channel_key or b"")         (DUPLICATE, sid, host, port, link_seq, ids)
    (SEEN_IDS, ids)          new seen ids           (CONTROL, sid, seq, host, port, plaintext)
    (SEND_JOBS, jobs, sends) seal and send          (RAW, host, port, datagram)
    (QUIT,)                                         (STATS, index, stats)
                                                    (BATCH, [any of the first four, ...])
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import marshal
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import AntiReplayWindow, DecryptError, seal
from gwyh_mp.protocol.dissemination import SeenSet
from gwyh_mp.protocol.inbound import broadcast_ids_end, open_broadcast, open_control
from gwyh_mp.runtime import udp
from gwyh_mp.runtime.driver import freeze_startup_heap
from gwyh_mp.runtime.mmsg import SEND_ERRORS, BatchReceiver, BatchSender, RefusalLog
from gwyh_mp.runtime.shm_ring import ShmRing, ShmRingHandle

# Ring record kinds, coordinator -> receiver.
SESSION_KEY = 1
SESSION_RETIRED = 2
CHANNEL_KEY = 3
SEEN_IDS = 4
SEND_JOBS = 5
QUIT = 6
# Ring record kinds, receiver -> coordinator.
BROADCAST = 11
DUPLICATE = 12
CONTROL = 13
RAW = 14  # anything the receiver cannot handle: the coordinator's core processes it
STATS = 15
BATCH = 16
BATCH_ENTRIES = 256  # bounds the coordinator's work per ring record

log = logging.getLogger("gwyh_mp.receiver")
PR_SET_PDEATHSIG = 1
# Datagrams a receiver cannot judge itself (handshakes, wrong version, a session whose
# keys have not reached it yet) go to the coordinator, at most this many per second
# and receiver: real ones are rare, so a junk flood is shed here, counted, instead
# of costing the coordinator (the one process every receiver shares) a record each.
RAW_PER_S = 2000.0
# The smallest well-formed packet of each handshake type (the rest fails in the core).
_HANDSHAKE_MIN_BYTES = {
    wire.PacketType.HELLO: wire.HELLO_FIXED.size,
    wire.PacketType.OHAI: wire.OHAI_FIXED.size,
    wire.PacketType.OKBOSS: wire.CONFIRM.size,
    wire.PacketType.GOTEAM: wire.CONFIRM.size,
}
RECV_BUDGET = 1024  # datagrams per loop turn before looking at the down ring again
STATS_INTERVAL_S = 1.0
_BROADCAST = wire.BROADCAST_HEADER
_CONTROL = wire.CONTROL_HEADER
_IDS_START = _BROADCAST.size
# Plain ints for the per-datagram dispatch: an IntEnum member lookup costs ~90 ns.
_VERSION = wire.VERSION
_PT_BROADCAST = int(wire.PacketType.BROADCAST)
_PT_CONTROL = int(wire.PacketType.CONTROL)
_dumps = marshal.dumps
_loads = marshal.loads


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us the moment the coordinator dies (Linux); the
    once-a-second parent check in the loop covers other systems."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(slots=True)
class SessionEntry:
    """A copy of one of the core's sessions: enough to open its CONTROL datagrams."""

    peer_id: bytes
    recv_key: bytes
    addr: tuple[str, int]
    replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)


@dataclass(slots=True)
class ChannelEntry:
    """A copy of a peer's channel key: enough to open its BROADCAST datagrams."""

    key: bytes
    replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)


class Receiver:
    def __init__(
        self,
        index: int,
        sock: socket.socket,
        up: ShmRing,
        down: ShmRing,
        parent_pid: int,
        seen_set_size: int,
    ) -> None:
        self.index = index
        self.sock = sock
        self.up = up
        self.down = down
        self.parent_pid = parent_pid
        self.receiver = BatchReceiver(sock, 64, udp.MAX_DATAGRAM)
        self.sender = BatchSender(sock)
        self._refusals = RefusalLog(log)
        self.sessions: dict[int, SessionEntry] = {}
        self.channels: dict[bytes, ChannelEntry] = {}
        self.seen = SeenSet(seen_set_size)
        self.pending: list[tuple[Any, ...]] = []
        self.stats: dict[str, int] = {}
        self.running = True
        self.raw_tokens = RAW_PER_S  # token bucket for records the coordinator must judge
        self.raw_refilled = time.monotonic()

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def refill_raw(self, now: float) -> None:
        """Once per receive batch: top up the RAW budget for the time that passed."""
        self.raw_tokens = min(RAW_PER_S, self.raw_tokens + (now - self.raw_refilled) * RAW_PER_S)
        self.raw_refilled = now

    def raw(self, host: str, port: int, data: bytes) -> tuple[Any, ...] | None:
        """A record for the coordinator's core, or None (counted) once the budget is spent."""
        if self.raw_tokens < 1.0:
            self.bump("drop_raw_shed")
            return None
        self.raw_tokens -= 1.0
        return (RAW, host, port, data)

    # ------------------------------------------------------------ coordinator -> us

    def apply(self, record: tuple[Any, ...]) -> None:
        kind = record[0]
        if kind == SEND_JOBS:
            self.send_jobs(record[1], record[2])
        elif kind == SEEN_IDS:
            ids = record[1]
            add = self.seen.add
            for i in range(0, len(ids), 16):
                add(ids[i : i + 16])
        elif kind == SESSION_KEY:
            _, sid, peer, key, host, port = record
            session = self.sessions.get(sid)
            if session is None:
                self.sessions[sid] = SessionEntry(peer, key, (host, port))
            else:
                session.addr = (host, port)
        elif kind == SESSION_RETIRED:
            self.sessions.pop(record[1], None)
        elif kind == CHANNEL_KEY:
            _, peer, key = record
            if key:
                channel = self.channels.get(peer)
                if channel is None or channel.key != key:
                    self.channels[peer] = ChannelEntry(key)
            else:
                self.channels.pop(peer, None)
        elif kind == QUIT:
            self.running = False

    def send_jobs(
        self, jobs: list[tuple[bytes, bytes, bytes]], sends: list[tuple[Any, ...]]
    ) -> None:
        sealed = [seal(key, nonce24, plaintext) for key, nonce24, plaintext in jobs]
        self.bump("encryptions", len(sealed))
        datagrams = [
            (prefix + sealed[job] if job >= 0 else prefix, (host, port))
            for prefix, job, host, port in sends
        ]
        done = 0
        deadline = time.monotonic() + 0.05
        while done < len(datagrams):
            try:
                done += self.sender.send_batch(datagrams[done:])
            except SEND_ERRORS as exc:
                # That one destination cannot be sent to (unreachable, port 0, a host
                # IDNA refuses): count it and go on with the rest.
                self._refusals.refused(datagrams[done][1], exc)
                done += 1
                self.bump("send_errors")
                continue
            if done < len(datagrams):
                if time.monotonic() > deadline:
                    self.bump("send_dropped", len(datagrams) - done)
                    break
                select.select([], [self.sock], [], 0.01)
        self.bump("packets_out", done)
        self.bump("bytes_out", sum([len(d) for d, _ in datagrams[:done]]))

    # ------------------------------------------------------------ network -> coordinator

    def receive(self) -> int:
        receiver = self.receiver
        total = nbytes = 0
        pending = self.pending
        while total < RECV_BUDGET:
            try:
                count = receiver.recv_batch()
            except OSError:
                break
            if not count:
                break
            total += count
            self.refill_raw(time.monotonic())
            classify = self.classify
            for data, (host, port) in receiver.datagrams():
                nbytes += len(data)
                try:
                    record = classify(data, host, port)
                except (DecryptError, struct.error, IndexError, ValueError):
                    self.bump("drop_decrypt")
                    continue
                if record is not None:
                    pending.append(record)
            if count < receiver.batch:
                break
        self.bump("packets_in", total)
        self.bump("bytes_in", nbytes)
        return total

    def classify(self, data: bytes, host: str, port: int) -> tuple[Any, ...] | None:
        """The record (a tuple, see the module doc) this datagram becomes for the
        coordinator, or None if it was dropped here (counted)."""
        if len(data) < 2:
            self.bump("drop_short")  # the core's reasons, so /metrics reads the same
            return None
        if data[0] != _VERSION:
            return self.raw(host, port, data)  # the coordinator counts and logs it
        ptype = data[1]
        if ptype == _PT_BROADCAST:
            if len(data) < _BROADCAST.size:
                self.bump("drop_malformed")
                return None
            _, _, count, _, sid, link_seq, chan_seq = _BROADCAST.unpack_from(data)
            session = self.sessions.get(sid)
            if session is None:
                return self.raw(host, port, data)  # keys may still be on their way
            ids_end = broadcast_ids_end(data, count, self.seen.ids)
            if ids_end < 0:
                self.bump("drop_malformed")
                return None
            if not ids_end:
                self.bump("duplicates")
                # The ids let a core in trees mode prune the sender (protocol/trees.py).
                ids = data[_IDS_START : _IDS_START + count * wire.MESSAGE_ID_BYTES]
                return (DUPLICATE, sid, host, port, link_seq, ids)
            channel = self.channels.get(session.peer_id)
            if channel is None:
                return self.raw(host, port, data)
            ids = data[_IDS_START:ids_end]
            plaintext = open_broadcast(channel.key, channel.replay, chan_seq, ids, data[ids_end:])
            if plaintext is None:
                self.bump("drop_replay")
                return None
            add = self.seen.add
            for i in range(0, len(ids), 16):
                add(ids[i : i + 16])
            self.bump("decrypted")
            return (BROADCAST, sid, host, port, link_seq, chan_seq, ids, plaintext)
        if ptype == _PT_CONTROL:
            if len(data) < _CONTROL.size:
                self.bump("drop_malformed")
                return None
            _, _, _, sid, seq = _CONTROL.unpack_from(data)
            session = self.sessions.get(sid)
            if session is None:
                return self.raw(host, port, data)
            plaintext = open_control(session.recv_key, session.replay, seq, data)
            if plaintext is None:
                self.bump("drop_replay")
                return None
            return (CONTROL, sid, seq, host, port, plaintext)
        minimum = _HANDSHAKE_MIN_BYTES.get(ptype)
        if minimum is None:
            self.bump("drop_bad_type")
            return None
        if len(data) < minimum:
            self.bump("drop_malformed")
            return None
        return self.raw(host, port, data)  # handshakes: rare, the coordinator's job

    def flush_up(self) -> None:
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        # Byte budget per record: half what the ring takes, payloads plus a margin for
        # the tuple's other fields and marshal's framing.
        budget = self.up.max_record // 2
        records: list[bytes] = []
        counts: list[int] = []
        start = size = 0
        for i, entry in enumerate(entries):
            last = entry[-1]
            cost = 96 + (len(last) if type(last) is bytes else 0)
            if i > start and (size + cost > budget or i - start == BATCH_ENTRIES):
                records.append(_dumps((BATCH, entries[start:i])))
                counts.append(i - start)
                start, size = i, 0
            size += cost
        records.append(_dumps((BATCH, entries[start:])))
        counts.append(len(entries) - start)
        written = self.up.put_all(records, timeout=1.0)
        if written < len(records):
            self.bump("up_ring_dropped", sum(counts[written:]))

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.down.fileno(), select.POLLIN)
        next_stats = time.monotonic()  # report at once: the coordinator waits for it
        while self.running:
            busy = False
            for record in self.down.get_many(4096):
                self.apply(_loads(record))
                busy = True
            if self.receive():
                busy = True
            self.flush_up()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                if os.getppid() != self.parent_pid:
                    return  # the coordinator is gone: so are we
                stats = dict(
                    self.stats, sessions=len(self.sessions), down_ring_bytes=self.down.used_bytes()
                )
                self.up.put_all([_dumps((STATS, self.index, stats))], timeout=0.1)
            if not busy and self.down.prepare_wait():
                try:
                    poller.poll(200)
                finally:
                    self.down.finish_wait()


def receiver_main(
    index: int,
    bind: tuple[str, int],
    buffer_bytes: int,
    up_handle: ShmRingHandle,
    down_handle: ShmRingHandle,
    parent_pid: int,
    seen_set_size: int,
    inherited_fds: tuple[int, ...] = (),
) -> None:
    # A forked child holds copies of the coordinator's sockets. One left open in the
    # port's SO_REUSEPORT group would get its share of flows and never read them.
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _die_with_parent()
    # Ctrl-C, `kill -TERM <group>` and a closed terminal's SIGHUP reach every process
    # of the node at once: the coordinator alone decides when receivers stop (after its
    # goodbyes went out) and what a signal means.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        return
    up = ShmRing.attach(up_handle)
    down = ShmRing.attach(down_handle)
    sock = udp.open_socket(bind, buffer_bytes, reuse_port=True)
    try:
        receiver = Receiver(index, sock, up, down, parent_pid, seen_set_size)
        freeze_startup_heap()  # the inherited heap too: see why there
        receiver.run()
    finally:
        sock.close()
        up.close()
        down.close()
