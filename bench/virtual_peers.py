"""Many real protocol peers in one process: one NodeCore and one UDP socket each, all
driven by a single asyncio (uvloop) loop.

Every virtual peer is a full gwyh_mp node: its own node id and source port, a real
handshake with real keys, real subscriptions and heartbeats. What is shared is only the
driving machinery, kept O(1) per event so thousands of peers fit on one core:

- one ``add_reader`` per socket; a readable socket is drained, then the core's output
  is sent at once (the same "process a batch, then flush" rule as the real runtime);
- one periodic tick (``tick_s``) instead of a TimerHandle per core: cores' deadlines
  sit in one heap, re-pushed only when a core's deadline moves earlier (stale entries
  are skipped when popped).

Light peers (``light=True``, bench load's default) keep everything the node under test
sees of a peer (handshake, session, channel key, SUBSCRIBE, heartbeats, link sequence
accounting and NAKs, de-duplication of what it delivers) but drop what only matters to
a peer that relays for others: STATUS and fragment entries are discarded unread after
authentication (no table, no re-flood), peer lists are neither asked for nor applied,
and nothing is held for subscribers it does not have. A full peer applies every member
record it hears, so N of them in one process cost O(N^2) during a join; a light peer's
cost per datagram does not grow with the cluster (see make_light).
"""

from __future__ import annotations

import asyncio
import heapq
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.runtime.udp import set_buffers

Addr = tuple[str, int]
RECV_PER_WAKEUP = 64  # bound one socket's turn so timers and other sockets still run
SOCKET_BUFFER_BYTES = 1 << 20  # thousands of sockets: deep enough for bursts, not 8 MiB each
MAX_DATAGRAM = 65_535


_ENTRY_HEADER = wire.ENTRY_HEADER
_APP = wire.EntryKind.APP


def make_light(core: NodeCore) -> None:
    """Turn a NodeCore into a light virtual peer (module doc): it still authenticates
    and decrypts every BROADCAST datagram, accounts its link sequence (NAKs on gaps)
    and drops duplicates by message id, but keeps no membership beyond its sessions.

    Only the instance's entry points are replaced, so the node under test cannot tell:
    the same frames reach it as from a real peer that simply subscribes to it."""
    seen = core.seen
    deliver = core._events.append
    stats = core.stats

    def on_entries(ids: bytes, count: int, plaintext: bytes, source: bytes, now: float) -> None:
        offset, end = 0, len(plaintext)
        unpack = _ENTRY_HEADER.unpack_from
        head = _ENTRY_HEADER.size
        for i in range(count):
            if offset + head > end:
                raise wire.WireError("truncated entry")
            kind, hops, origin, length = unpack(plaintext, offset)
            start = offset + head
            offset = start + length
            if offset > end:
                raise wire.WireError("truncated entry body")
            if kind != _APP:
                continue  # membership and fragments: nobody relies on us for them
            msg_id = ids[16 * i : 16 * i + 16]
            if not seen.add(msg_id):
                stats.bump("duplicate_entries")
                continue
            deliver(Message(plaintext[start:offset], msg_id, origin, hops))

    def no_records(peer_id: bytes, body: bytes, now: float) -> bool:
        return False

    def no_request(peer_id: bytes) -> None:
        return None

    core._on_entries = on_entries  # type: ignore[method-assign]
    core.membership.on_peers = no_records  # type: ignore[method-assign]
    core.anti_entropy.request_peers = no_request  # type: ignore[method-assign]
    core.subscriptions._request_peers = no_request
    # Without subscribers, a full peer keeps up to 10,000 entries for the day one
    # subscribes; a light peer has nothing anyone waits for.
    core.fanout.max_pending_entries = 0


@dataclass(eq=False, slots=True)
class VirtualPeer:
    index: int
    core: NodeCore
    sock: socket.socket
    fd: int
    addr: Addr
    started_at: float  # loop time
    joined_at: float | None = None
    left_at: float | None = None
    first_seq: int = -1  # first broadcast sequence number sent after it joined
    timer_at: float | None = None
    received: bytearray = field(default_factory=bytearray)  # seq -> delivered (0/1)
    sent_seqs: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.left_at is None


@dataclass(slots=True)
class DriverStats:
    datagrams_in: int = 0
    datagrams_out: int = 0
    send_would_block: int = 0
    send_errors: int = 0
    recv_refused: int = 0
    timer_services: int = 0
    ticks: int = 0
    max_tick_lag_s: float = 0.0


MessageHook = Callable[[VirtualPeer, bytes, int], None]


class PeerDriver:
    """Creates, drives and retires virtual peers on the running loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        base_config: Config,
        *,
        on_message: MessageHook,
        tick_s: float = 0.005,
        light: bool = False,
    ) -> None:
        self.loop = loop
        self.light = light
        self.base_config = base_config
        self.on_message = on_message
        self.tick_s = tick_s
        self.peers: list[VirtualPeer] = []
        self.alive: dict[int, VirtualPeer] = {}
        self.stats = DriverStats()
        self._heap: list[tuple[float, int, VirtualPeer]] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        self._lag_window = 0.0  # worst tick lateness since last read
        self.last_lag = 0.0
        self.on_tick: Callable[[float], None] | None = None
        self._wall_offset = time.time() - loop.time()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._next_tick = self.loop.time() + self.tick_s
        self._tick_handle = self.loop.call_at(self._next_tick, self._tick)

    def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for peer in list(self.alive.values()):
            self.retire(peer, graceful=False)

    def spawn(self) -> VirtualPeer:
        """A fresh peer: new socket on 127.0.0.1:0, new node id, bootstrapping."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            set_buffers(sock, SOCKET_BUFFER_BYTES)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        addr: Addr = sock.getsockname()[:2]
        now = self.loop.time()
        config = self.base_config.replace(bind=addr)
        core = NodeCore(config, now, wall_offset_s=self._wall_offset)
        if self.light:
            make_light(core)
        peer = VirtualPeer(len(self.peers), core, sock, sock.fileno(), addr, now)
        self.peers.append(peer)
        self.alive[peer.index] = peer
        core.start(now)
        self.loop.add_reader(peer.fd, self._on_readable, peer)
        self.flush(peer, now)
        return peer

    def retire(self, peer: VirtualPeer, *, graceful: bool) -> None:
        """Take a peer out: graceful = announce DOWN and unsubscribe first, else it
        simply goes silent (a crash)."""
        if not peer.alive:
            return
        now = self.loop.time()
        if graceful:
            peer.core.leave(now)
            self._send(peer, peer.core.datagrams_to_send(now))
        peer.left_at = now
        peer.timer_at = None
        del self.alive[peer.index]
        self.loop.remove_reader(peer.fd)
        peer.sock.close()

    # ------------------------------------------------------------ application side

    def broadcast(self, peer: VirtualPeer, data: bytes) -> None:
        now = self.loop.time()
        peer.core.broadcast(data, now)
        self.flush(peer, now)

    # ------------------------------------------------------------ I/O

    def _on_readable(self, peer: VirtualPeer) -> None:
        now = self.loop.time()
        recv = peer.sock.recvfrom
        receive = peer.core.receive_datagram
        n = 0
        for _ in range(RECV_PER_WAKEUP):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # ICMP port unreachable from a peer that left: harmless.
                self.stats.recv_refused += 1
                continue
            except OSError:
                break
            n += 1
            receive(data, addr, now)
        self.stats.datagrams_in += n
        self.flush(peer, now)

    def flush(self, peer: VirtualPeer, now: float) -> None:
        core = peer.core
        out = core.datagrams_to_send(now)
        if out:
            self._send(peer, out)
        now_ns = 0
        next_event = core.next_event
        while (event := next_event()) is not None:
            if type(event) is Message:
                if not now_ns:  # one clock read per batch, as a runtime would deliver it
                    now_ns = time.time_ns()
                self.on_message(peer, event.data, now_ns)
        if core.warnings:
            core.warnings.clear()
        when = core.get_timer()
        if when is not None and (peer.timer_at is None or when < peer.timer_at):
            peer.timer_at = when
            heapq.heappush(self._heap, (when, peer.index, peer))

    def _send(self, peer: VirtualPeer, out: list[tuple[bytes, Addr]]) -> None:
        sendto = peer.sock.sendto
        stats = self.stats
        for data, addr in out:
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                stats.send_would_block += 1
            except OSError:
                stats.send_errors += 1
        stats.datagrams_out += len(out)

    # ------------------------------------------------------------ timers

    def _tick(self) -> None:
        loop = self.loop
        now = loop.time()
        lag = now - self._next_tick
        self.last_lag = lag
        if lag > self._lag_window:
            self._lag_window = lag
        if lag > self.stats.max_tick_lag_s:
            self.stats.max_tick_lag_s = lag
        self.stats.ticks += 1
        heap = self._heap
        due: list[VirtualPeer] = []
        while heap and heap[0][0] <= now:
            when, _, peer = heapq.heappop(heap)
            if peer.timer_at == when and peer.left_at is None:
                peer.timer_at = None
                due.append(peer)
        # Serviced after collecting, so a core that re-arms in the past waits a tick.
        for peer in due:
            if peer.left_at is None:
                peer.core.handle_timer(now)
                self.flush(peer, now)
        self.stats.timer_services += len(due)
        if self.on_tick is not None:
            self.on_tick(now)
        # Fixed cadence, but never schedule in the past after a long stall.
        self._next_tick = max(self._next_tick + self.tick_s, loop.time() + self.tick_s / 4)
        self._tick_handle = loop.call_at(self._next_tick, self._tick)

    def take_lag(self) -> float:
        """Worst tick lateness (s) since the previous call: the loop's saturation."""
        lag, self._lag_window = self._lag_window, 0.0
        return lag


def confirmed_providers(core: NodeCore) -> int:
    return sum(1 for state in core.providers.values() if state.confirmed)


def has_session_with(core: NodeCore, addr: Addr) -> bool:
    return any(s.addr == addr for s in core.sessions.values())


# ------------------------------------------------------------ file descriptors


@dataclass(slots=True)
class FdLimit:
    needed: int
    soft_before: int
    hard_before: int
    soft: int
    hard: int
    raised: bool
    ok: bool
    error: str | None = None


def ensure_fd_limit(needed: int) -> FdLimit:
    """Raise RLIMIT_NOFILE's soft limit (to the hard limit, or above it when we are
    allowed to) so ``needed`` descriptors fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft == infinite or soft >= needed:
        return FdLimit(needed, soft, hard, soft, hard, False, True)
    error = None
    new_soft, new_hard = soft, hard
    target_hard = hard if hard == infinite or hard >= needed else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, target_hard))
        new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError) as exc:
        error = str(exc)
        try:  # at least as far as the hard limit allows
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass
    ok = new_soft == infinite or new_soft >= needed
    return FdLimit(needed, soft, hard, new_soft, new_hard, new_soft != soft, ok, error)
