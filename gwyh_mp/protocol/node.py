"""The node state machine: everything a gwyh_mp node decides, with no I/O.

The runtime drives it in the aioquic style:

    core.receive_datagram(data, addr, now)     # for every datagram
    core.handle_timer(now)                     # when core.get_timer() is due
    core.broadcast(data, now)                  # application sends
    for data, addr in core.datagrams_to_send(now): sock.sendto(data, addr)
    while (event := core.next_event()) is not None: ...

``now`` is seconds on a monotonic clock; ``wall_offset_s`` (wall clock minus that
clock) is used only for the handshake's time lock. Everything random comes from
``random_bytes`` and a seeded ``random.Random``, so a simulation is reproducible.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.congestion import AimdPacer, LinkLossDetector, PacingConfig
from gwyh_mp.protocol.crypto import (
    AntiReplayWindow,
    DecryptError,
    DeferredDatagram,
    PskKeyring,
    SealJob,
    ids_digest,
    nonce,
    open_sealed,
    seal,
)
from gwyh_mp.protocol.dissemination import (
    BroadcastChannel,
    Datagram,
    Fanout,
    FanoutTarget,
    Outgoing,
    SeenSet,
)
from gwyh_mp.protocol.events import Event, Member, MemberDown, MemberUp, Message, ProviderChanged
from gwyh_mp.protocol.framing import AddKind, OutgoingWindow, Reassembler, split_message
from gwyh_mp.protocol.handshake import Established, Handshaker
from gwyh_mp.protocol.membership import (
    DIGEST_BUCKETS,
    Change,
    MemberInfo,
    MemberTable,
)
from gwyh_mp.protocol.selection import Candidate, Strategy, rng_for, select_providers
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, PacketType, fragment_id

Addr = tuple[str, int]

SESSION_GRACE_S = 30.0  # a superseded or orphaned session is freed after this long idle
MAX_INCARNATION = 0xFFFFFFFF
FRAGMENT_RETAIN_S = 10.0  # own fragments kept for FRAGMENT_NAK answers
FRAGMENT_WINDOW_BYTES = 512 * 1024  # fragment bytes released per send round (sliding window)
FRAGMENT_INTERVAL_S = 0.002  # pause between windows while a large message drains
_FRAGMENT_HEADER = wire.FRAGMENT_HEADER
RETAIN_BYTES_PER_LINK = 4 << 20  # sent data datagrams kept per peer to answer NAKs
RETAIN_DATAGRAMS_PER_LINK = 8192
MAX_RETRANSMITS_PER_NAK = 256
TAIL_PROBE_S = 0.1  # quiet time after the last data datagram before a tail probe
# A silent peer is PINGed this many times, evenly over one heartbeat interval, before it
# is accused: at 20 % loss one PING/PONG round trip fails 36 % of the time, three 5 %.
PROBE_PINGS = 3
_TAIL = struct.Struct("!I")
_SUBSCRIBE_NEED_KEY = 0x01
_DIGESTS = struct.Struct(f"!{DIGEST_BUCKETS}Q")  # PEERS_REQUEST body: bucket digests
_ENTRY_HEADER = wire.ENTRY_HEADER
_BROADCAST_HEADER = wire.BROADCAST_HEADER
_CONTROL_HEADER = wire.CONTROL_HEADER


def _node_id_of(member: MemberInfo) -> bytes:
    return member.node_id


def _head(datagram: Datagram) -> bytes:
    """The clear leading bytes of a datagram, sealed or not."""
    return datagram.prefix if isinstance(datagram, DeferredDatagram) else datagram


def _restamp(datagram: Datagram, link_seq: int) -> Datagram:
    """The same BROADCAST datagram under a new link sequence (bytes 8-12 of the header,
    outside the AEAD), for a retransmission."""
    seq = link_seq.to_bytes(4, "big")
    if isinstance(datagram, DeferredDatagram):
        prefix = datagram.prefix
        return DeferredDatagram(prefix[:8] + seq + prefix[12:], datagram.job)
    return b"".join((datagram[:8], seq, datagram[12:]))


class MessageTooLarge(ValueError):
    """The broadcast exceeds what this node is configured to send."""


class NotRunning(RuntimeError):
    """The node has not been started, or has already left."""


@dataclass(slots=True)
class Session:
    peer_id: bytes
    addr: Addr
    local_session_id: int
    remote_session_id: int
    send_key: bytes
    recv_key: bytes
    send_seq: int = 0
    replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)
    last_rx: float = 0.0
    superseded: bool = False


@dataclass(slots=True)
class PeerLink:
    """What we hold for one peer beyond its membership record."""

    node_id: bytes
    session: Session | None = None
    channel_key: bytes | None = None  # the peer's provider channel key, if we subscribe
    channel_replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)
    link_seq_out: int = 0
    last_heard: float = 0.0
    # Congestion control. Receiving: loss detection on the peer's link sequence.
    # Sending: the pacer, the queue waiting for it, and what was sent (for NAKs).
    loss: LinkLossDetector | None = None
    pacer: AimdPacer | None = None
    queue: deque[tuple[Datagram, Addr]] = field(default_factory=deque)
    queue_bytes: int = 0
    sent: OrderedDict[int, Datagram] = field(default_factory=OrderedDict)
    sent_bytes: int = 0
    tail_due: float | None = None
    last_sent_seq: int = 0  # newest link sequence actually handed to the socket

    def next_link_seq(self) -> int:
        self.link_seq_out = (self.link_seq_out + 1) & 0xFFFFFFFF
        return self.link_seq_out

    def remember(self, datagram: Datagram) -> None:
        """Keep a sent data datagram, keyed by its link sequence, until NAKs for it are
        no longer plausible (bounded by bytes and count)."""
        seq = int.from_bytes(_head(datagram)[8:12], "big")
        self.sent[seq] = datagram
        self.sent_bytes += len(datagram)
        sent = self.sent
        while self.sent_bytes > RETAIN_BYTES_PER_LINK or len(sent) > RETAIN_DATAGRAMS_PER_LINK:
            _, old = sent.popitem(last=False)
            self.sent_bytes -= len(old)


@dataclass(slots=True)
class Probe:
    """A silent peer being PINGed before it is accused (any authenticated CONTROL from
    it ends the probe)."""

    give_up: float
    next_ping: float | None
    pings_left: int

    @property
    def due(self) -> float:
        return self.give_up if self.next_ping is None else self.next_ping


@dataclass(slots=True)
class ProviderState:
    since: float
    last_heard: float
    confirmed: bool = False


class Stats(dict[str, int]):
    def bump(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class NodeCore:
    def __init__(
        self,
        config: Config,
        now: float,
        *,
        wall_offset_s: float = 0.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
        defer_sealing: bool = False,
    ) -> None:
        """``defer_sealing``: outgoing encrypted datagrams come out of
        datagrams_to_send() as DeferredDatagram (prefix + SealJob) for worker processes
        to seal, instead of bytes. The multiprocess runtime's coordinator uses it."""
        config.validate()
        self.defer_sealing = defer_sealing
        self.config = config
        self.node_id: bytes = config.node_id or random_bytes(wire.NODE_ID_BYTES)
        self.incarnation = 0
        self.zone = config.zone
        self.wall_offset_s = wall_offset_s
        self._random_bytes = random_bytes
        self._rng = rng_for(self.node_id, config.seed)
        self.keyring = PskKeyring(config.psks)
        self._sids: set[int] = set()
        self.handshaker = Handshaker(
            self.node_id,
            self.zone,
            self.keyring,
            allocate_session_id=self._allocate_sid,
            release_session_id=self._sids.discard,
            window_s=config.handshake_window_s,
            timeout_s=config.handshake_timeout_s,
            retry_s=config.handshake_retry_s,
            max_half_open=config.max_half_open,
            random_bytes=random_bytes,
        )
        self.members = MemberTable()
        self.sessions: dict[int, Session] = {}
        self.links: dict[bytes, PeerLink] = {}
        self.providers: dict[bytes, ProviderState] = {}
        self.subscribers: dict[bytes, float] = {}  # node id -> expiry time
        self.seen = SeenSet(config.seen_set_size)
        self.fanout = Fanout(
            BroadcastChannel(random_bytes(32)),
            config.max_datagram_bytes,
            defer_sealing=defer_sealing,
        )
        # Offloaded crypto needs the receivers to know keys: every change to the key
        # tables is journalled here for the runtime to copy (see runtime/coordinator.py).
        self.key_journal: list[tuple[object, ...]] | None = [] if defer_sealing else None
        if defer_sealing:
            self.seen.journal = []
        self.reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes,
            max_bytes_per_peer=2 * config.max_message_bytes + 65_536,
            max_total_bytes=max(
                config.reassembly_memory_bytes, 2 * config.max_message_bytes + 65_536
            ),
            incomplete_timeout_s=config.reassembly_timeout_s,
        )
        self.own_fragments = OutgoingWindow(
            max_window_bytes=max(4 * config.max_message_bytes, 64 << 20), retain_s=FRAGMENT_RETAIN_S
        )
        # Large messages this node completed as a relay: kept briefly so it can answer
        # FRAGMENT_NAKs from peers downstream (its reassembly buffer is gone by then).
        self.relayed_fragments = OutgoingWindow(
            max_window_bytes=max(2 * config.max_message_bytes, 32 << 20), retain_s=FRAGMENT_RETAIN_S
        )
        # Fragments of large broadcasts wait here and leave one window per round, so a
        # 16 MiB message never lands in the kernel's buffers all at once.
        self._fragment_queue: deque[tuple[bytes, bytes]] = deque()
        self._fragment_queue_bytes = 0
        self._next_fragment_release: float | None = None
        # msg id -> (count, total, origin, hops, fragment size or 0) of large messages seen,
        # to answer NAKs and to ask the origin for what nobody else has
        self._large_info: OrderedDict[bytes, tuple[int, int, bytes, int, int]] = OrderedDict()
        self._resend_to: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        self.pacing = PacingConfig(
            initial_rate_bytes_per_s=float(config.send_rate_initial_bytes_per_s),
            min_rate_bytes_per_s=float(config.send_rate_min_bytes_per_s),
            max_rate_bytes_per_s=float(config.send_rate_max_bytes_per_s),
            increase_bytes_per_s=float(config.send_rate_increase_bytes_per_s),
            increase_interval_s=0.05,
            # As many loss ranges as one NAK frame can carry within a datagram.
            max_nak_ranges=max(
                1,
                min(
                    wire.MAX_NAK_RANGES,
                    (config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 13) // 6,
                ),
            ),
            burst_bytes=max(256 << 10, 4 * config.max_datagram_bytes),
            max_queued_data_bytes=config.link_queue_bytes,
        )
        # Dicts used as ordered sets: iteration order must not depend on the hash seed,
        # or a simulation would not be reproducible across processes.
        self._backlogged: dict[bytes, None] = {}  # peers with data waiting for their pacer
        self._backlog_bytes = 0
        self._rx_links: dict[bytes, None] = {}  # peers whose loss detector may owe a NAK
        self._next_nak_poll: float | None = None
        self._tail_links: dict[bytes, None] = {}  # peers owed a tail probe
        self.stats = Stats()
        self.warnings: deque[str] = deque(maxlen=100)
        self._outbox: list[tuple[Datagram, Addr]] = []
        self._control: dict[bytes, list[bytes]] = {}
        self._events: deque[Event] = deque()
        self._bootstrap_addrs: set[Addr] = set(config.bootstrap)
        self._peer_request_addrs: set[Addr] = set()
        self._reassign_at: float | None = None
        self._next_heartbeat = now
        self._last_now = now
        self._next_peer_sync = now + config.peer_sync_interval_s
        self._running = False
        self._left = False
        self._advertised = config.advertised
        # N missed heartbeats: the N-th is due N intervals after the last one heard;
        # half an interval more absorbs latency and jitter before we call it missed.
        self._watchdog_s = config.heartbeat_interval_s * (config.missed_heartbeats + 0.5)
        self._probing: dict[bytes, Probe] = {}  # silent provider or subscriber
        self._pending_swaps: list[tuple[bytes, bytes]] = []  # (provider out, newcomer in)

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        self._running = True
        self._next_heartbeat = now  # first tick bootstraps immediately
        self._bootstrap(now)

    def leave(self, now: float) -> None:
        """Graceful exit: tell the cluster we are DOWN and end our subscriptions."""
        if not self._running:
            return
        self._announce(self._self_record(MemberState.DOWN), now)
        for provider_id in list(self.providers):
            self._queue_control(provider_id, FrameType.UNSUBSCRIBE)
        self.providers.clear()
        self._running = False
        self._left = True

    @property
    def running(self) -> bool:
        return self._running

    def set_bound_port(self, port: int) -> None:
        """The runtime bound port 0 and learned the real one."""
        host, _ = self._advertised
        self._advertised = (host, port)

    # ------------------------------------------------------------------ public API

    @property
    def max_message_bytes(self) -> int:
        """Largest broadcast accepted (config.max_message_bytes)."""
        return self.config.max_message_bytes

    @property
    def single_datagram_bytes(self) -> int:
        """Largest broadcast that travels as one entry in one datagram."""
        return self.fanout.max_entry_bytes - _ENTRY_HEADER.size

    @property
    def fragment_bytes(self) -> int:
        return self.single_datagram_bytes - _FRAGMENT_HEADER.size

    @property
    def queued_fragment_bytes(self) -> int:
        """Bytes of large messages accepted but not yet handed to the socket."""
        return self._fragment_queue_bytes

    def broadcast(self, data: bytes, now: float) -> bytes:
        """Queue a broadcast to the whole cluster; returns its 16-byte message id.
        Messages larger than one datagram are fragmented and sent window by window."""
        if not self._running:
            raise NotRunning("node is not running")
        size = len(data)
        if size > self.config.max_message_bytes:
            raise MessageTooLarge(
                f"message is {size} bytes; the maximum is {self.config.max_message_bytes} "
                "(Config.max_message_bytes)"
            )
        msg_id = self._random_bytes(wire.MESSAGE_ID_BYTES)
        self.stats.bump("broadcasts")
        if size <= self.single_datagram_bytes:
            self.seen.add(msg_id)
            entry = _ENTRY_HEADER.pack(wire.EntryKind.APP, 1, self.node_id, size) + data
            self.fanout.add(msg_id, entry, None)
            return msg_id
        fragments = split_message(data, self.fragment_bytes)
        self.own_fragments.add_message(msg_id, fragments, now)
        self.reassembler.mark_completed(msg_id)  # copies coming back are not ours to deliver
        count = len(fragments)
        for index, fragment in enumerate(fragments):
            frag_id = fragment_id(msg_id, index)
            self.seen.add(frag_id)
            entry = self._fragment_entry(1, self.node_id, msg_id, index, count, size, fragment)
            self._fragment_queue.append((frag_id, entry))
            self._fragment_queue_bytes += len(entry)
        self.stats.bump("fragments_sent", count)
        return msg_id

    @staticmethod
    def _fragment_entry(
        hops: int,
        origin: bytes,
        msg_id: bytes,
        index: int,
        count: int,
        total: int,
        fragment: bytes | memoryview,
    ) -> bytes:
        body_len = _FRAGMENT_HEADER.size + len(fragment)
        return b"".join(
            (
                _ENTRY_HEADER.pack(wire.EntryKind.FRAGMENT, hops, origin, body_len),
                _FRAGMENT_HEADER.pack(msg_id, index, count, total),
                fragment,
            )
        )

    def local_member(self) -> Member:
        host, port = self._advertised
        state = MemberState.UP if self._running else MemberState.DOWN
        return Member(self.node_id, host, port, self.zone, state, self.incarnation)

    def member_list(self) -> list[Member]:
        return [m.snapshot() for m in self.members.members.values()]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[tuple[Datagram, Addr]]:
        """Everything produced since the last call: control frames per peer first
        (membership beats data), then coalesced broadcast datagrams."""
        out = self._outbox
        self._outbox = []
        if self._control:
            control, self._control = self._control, {}
            for peer_id, frames in control.items():
                self._seal_control(peer_id, frames, out, now)
        if self._fragment_queue and (
            self._next_fragment_release is None or now >= self._next_fragment_release
        ):
            self._release_fragments(now)
        data: list[Outgoing] = []
        if self._resend_to:
            resend, self._resend_to = self._resend_to, []
            for peer_id, entries in resend:
                target = self._fanout_target(peer_id)
                if target is not None:
                    self.fanout.send_to(entries, target, data)
        if self.fanout.pending:
            self.fanout.flush(self._fanout_targets(), data)
        for datagram, addr, peer_id in data:
            self._enqueue(peer_id, datagram, addr)
        if self._backlogged:
            self._drain_links(now, out)
        self.stats.bump("packets_out", len(out))
        return out

    @property
    def backlog_bytes(self) -> int:
        """Data accepted but not yet handed to the socket (large-message fragments
        waiting for their window, and datagrams waiting for a peer's pacer)."""
        return self._backlog_bytes + self._fragment_queue_bytes

    @property
    def accepting(self) -> bool:
        """False while the send backlog is above Config.send_queue_bytes: the runtime
        makes broadcast() wait (backpressure) instead of queueing more."""
        return self.backlog_bytes < self.config.send_queue_bytes

    def _link(self, peer_id: bytes) -> PeerLink:
        link = self.links.get(peer_id)
        if link is None:
            link = self.links[peer_id] = PeerLink(peer_id)
        return link

    def _pacer(self, link: PeerLink) -> AimdPacer:
        if link.pacer is None:
            link.pacer = AimdPacer(self.pacing, self._last_now)
        return link.pacer

    def _enqueue(self, peer_id: bytes, datagram: bytes, addr: Addr) -> None:
        link = self._link(peer_id)
        size = len(datagram)
        # Forwarded traffic cannot be pushed back on the network (our own is held back by
        # send_queue_bytes before it gets here): a peer that drains too slowly loses its
        # oldest queued data, counted as shed (never silently).
        while link.queue and link.queue_bytes + size > self.config.link_queue_bytes:
            old, _ = link.queue.popleft()
            link.queue_bytes -= len(old)
            self._backlog_bytes -= len(old)
            self.stats.bump("shed_datagrams")
        link.queue.append((datagram, addr))
        link.queue_bytes += size
        self._backlog_bytes += size
        self._backlogged[peer_id] = None

    def _drain_links(self, now: float, out: list[tuple[Datagram, Addr]]) -> None:
        for peer_id in list(self._backlogged):
            link = self.links.get(peer_id)
            if link is None:
                self._backlogged.pop(peer_id, None)
                continue
            pacer = self._pacer(link)
            pacer.on_tick(now)
            queue = link.queue
            while queue:
                datagram, addr = queue[0]
                size = len(datagram)
                if not pacer.can_send(size, now):
                    break
                queue.popleft()
                link.queue_bytes -= size
                self._backlog_bytes -= size
                pacer.consume(size, now)
                out.append((datagram, addr))
                link.remember(datagram)
                link.last_sent_seq = int.from_bytes(_head(datagram)[8:12], "big")
                link.tail_due = now + TAIL_PROBE_S
                self._tail_links[peer_id] = None
            if not queue:
                self._backlogged.pop(peer_id, None)

    def _release_fragments(self, now: float) -> None:
        # Sliding window: more fragments only once the pacers have drained the last ones,
        # and none while nobody subscribes (they wait here, under backpressure, rather
        # than overflow the fanout's no-subscriber buffer).
        targets = len(self._fanout_targets())
        if not targets:
            self._next_fragment_release = now + self.config.heartbeat_interval_s / 10
            return
        if self._backlog_bytes > FRAGMENT_WINDOW_BYTES * targets // 2:
            self._next_fragment_release = now + FRAGMENT_INTERVAL_S
            return
        budget = FRAGMENT_WINDOW_BYTES
        queue = self._fragment_queue
        while queue and budget > 0:
            frag_id, entry = queue.popleft()
            self._fragment_queue_bytes -= len(entry)
            budget -= len(entry)
            self.fanout.add(frag_id, entry, None)
        self._next_fragment_release = now + FRAGMENT_INTERVAL_S if queue else None

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest deadline of any timer-driven work. Called after every datagram,
        so it avoids building anything: one running minimum."""
        hs = self.handshaker.next_timer()
        if not self._running:
            return hs
        t = self._next_heartbeat
        if hs is not None and hs < t:
            t = hs
        if self._reassign_at is not None and self._reassign_at < t:
            t = self._reassign_at
        probing = self._probing
        if self.providers:
            watchdog = self._watchdog_s
            for provider_id, state in self.providers.items():
                due = state.last_heard + watchdog
                if due < t and provider_id not in probing:
                    t = due
        for probe in probing.values():
            due = probe.due
            if due < t:
                t = due
        if self._next_fragment_release is not None and self._next_fragment_release < t:
            t = self._next_fragment_release
        reassembly = self.reassembler.next_timer(self._last_now)
        if reassembly is not None and reassembly < t:
            t = reassembly
        if self._next_nak_poll is not None and self._next_nak_poll < t:
            t = self._next_nak_poll
        links = self.links
        for peer_id in self._tail_links:
            link = links.get(peer_id)
            if link is not None and link.tail_due is not None and link.tail_due < t:
                t = link.tail_due
        if self._backlogged:
            now = self._last_now
            for peer_id in self._backlogged:
                link = links.get(peer_id)
                if link is not None and link.queue:
                    due = self._pacer(link).next_send_time(len(link.queue[0][0]), now)
                    if due < t:
                        t = due
        return t

    def handle_timer(self, now: float) -> None:
        self._last_now = now
        retransmits, failed = self.handshaker.handle_timer(now)
        self._outbox.extend(retransmits)
        for addr in failed:
            self._on_handshake_failed(addr, now)
        if not self._running:
            return
        if self._reassign_at is not None and now >= self._reassign_at:
            self._reassign_at = None
            self._reassign(now)
        self._check_providers(now)
        self._check_probes(now)
        self.own_fragments.expire(now)
        self.relayed_fragments.expire(now)
        self._fragment_naks(now)
        if self._next_nak_poll is not None and now >= self._next_nak_poll:
            self._poll_naks(now)
        if self._tail_links:
            self._send_tail_probes(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self._heartbeat_tick(now)

    # ------------------------------------------------------------------ receive

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one datagram. Never raises: anything wrong is a counted drop."""
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        self._last_now = now
        if len(data) < 2:
            self.stats.bump("drop_short")
            return
        version, ptype = data[0], data[1]
        if version != wire.VERSION:
            self.stats.bump("drop_bad_version")
            if self.stats["drop_bad_version"] & (self.stats["drop_bad_version"] - 1) == 0:
                self.warnings.append(
                    f"dropped datagram from {addr[0]}:{addr[1]} with protocol version "
                    f"{version}; this node speaks version {wire.VERSION}"
                )
            return
        try:
            if ptype == PacketType.BROADCAST:
                self._on_broadcast(data, addr, now)
            elif ptype == PacketType.CONTROL:
                self._on_control(data, addr, now)
            elif PacketType.HELLO <= ptype <= PacketType.GOTEAM:
                self._on_handshake(ptype, data, addr, now)
            else:
                self.stats.bump("drop_bad_type")
        except DecryptError:
            self.stats.bump("drop_decrypt")
        except (wire.WireError, struct.error, ValueError, IndexError):
            self.stats.bump("drop_malformed")

    def _on_handshake(self, ptype: int, data: bytes, addr: Addr, now: float) -> None:
        if not self._running and ptype == PacketType.HELLO:
            return  # a leaving node accepts no new peers
        wall_ns = int((now + self.wall_offset_s) * 1e9)
        reply, established = self.handshaker.handle(
            ptype, data, addr, now, wall_ns, self.incarnation
        )
        if reply is not None:
            self._outbox.append((reply, addr))
        if established is not None:
            self._on_established(established, now)

    def _on_broadcast(self, data: bytes, addr: Addr, now: float) -> None:
        # Hot path: header, duplicate check, and only then decryption.
        _, _, count, _, sid, link_seq, chan_seq = _BROADCAST_HEADER.unpack_from(data)
        session = self.sessions.get(sid)
        if session is None:
            self.stats.bump("drop_unknown_session")
            return
        ids_end = _BROADCAST_HEADER.size + 16 * count
        if count == 0 or len(data) < ids_end + wire.TAG_BYTES:
            self.stats.bump("drop_malformed")
            return
        seen = self.seen.ids
        if count == 1:
            fresh = data[_BROADCAST_HEADER.size : ids_end] not in seen
        else:
            fresh = any(
                data[i : i + 16] not in seen for i in range(_BROADCAST_HEADER.size, ids_end, 16)
            )
        link = self.links.get(session.peer_id)
        if link is None:
            self.stats.bump("drop_unknown_session")
            return
        self._account_link(session, link, addr, link_seq, now)
        if not fresh:
            self.stats.bump("duplicates")  # datagrams dropped before decryption
            return
        key = link.channel_key
        if key is None:
            self.stats.bump("drop_no_channel_key")
            return
        if not link.channel_replay.check(chan_seq):
            self.stats.bump("drop_replay")
            return
        ids = data[_BROADCAST_HEADER.size : ids_end]
        plaintext = open_sealed(key, nonce(chan_seq, ids_digest(ids)), data[ids_end:])
        link.channel_replay.mark(chan_seq)
        link.last_heard = now
        self._on_entries(ids, count, plaintext, session.peer_id, now)

    def _account_link(
        self, session: Session, link: PeerLink, addr: Addr, link_seq: int, now: float
    ) -> None:
        session.last_rx = now  # only keeps the session from being freed as idle
        if session.addr == addr:
            # Loss detection counts every datagram from the peer's real address,
            # duplicates included (they are most of the traffic and prove delivery).
            loss = link.loss
            if loss is None:
                loss = link.loss = LinkLossDetector(self.pacing)
            loss.on_packet(link_seq, now)
            # In order with nothing outstanding (the common case): no NAK poll to arm.
            if loss.owes_poll and session.peer_id not in self._rx_links:
                self._rx_links[session.peer_id] = None
                if self._next_nak_poll is None:
                    self._next_nak_poll = now + self.pacing.nak_interval_s

    # -- entry points for a runtime that decrypts in other processes -----------------

    def receive_broadcast_plaintext(
        self,
        sid: int,
        addr: Addr,
        link_seq: int,
        chan_seq: int,
        ids: bytes,
        plaintext: bytes,
        now: float,
    ) -> None:
        """A BROADCAST datagram a worker already authenticated and decrypted. The
        coordinator still applies the authoritative replay window and seen-set."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        session = self.sessions.get(sid)
        link = self.links.get(session.peer_id) if session is not None else None
        if session is None or link is None:
            self.stats.bump("drop_unknown_session")
            return
        self._account_link(session, link, addr, link_seq, now)
        if not link.channel_replay.check(chan_seq):
            self.stats.bump("drop_replay")
            return
        link.channel_replay.mark(chan_seq)
        link.last_heard = now
        try:
            self._on_entries(ids, len(ids) // 16, plaintext, session.peer_id, now)
        except (wire.WireError, struct.error, ValueError, IndexError):
            self.stats.bump("drop_malformed")

    def receive_broadcast_duplicate(self, sid: int, addr: Addr, link_seq: int, now: float) -> None:
        """A worker dropped a BROADCAST datagram as a duplicate before decrypting it;
        its link sequence still counts for loss detection."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        self.stats.bump("duplicates")
        session = self.sessions.get(sid)
        link = self.links.get(session.peer_id) if session is not None else None
        if session is not None and link is not None:
            self._account_link(session, link, addr, link_seq, now)

    def receive_control_plaintext(
        self, sid: int, seq: int, addr: Addr, plaintext: bytes, now: float
    ) -> None:
        """A CONTROL datagram a worker already authenticated and decrypted."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        session = self._control_session(sid, seq)
        if session is None:
            return
        session.replay.mark(seq)
        try:
            self._on_control_plaintext(session, addr, plaintext, now)
        except (wire.WireError, struct.error, ValueError, IndexError):
            self.stats.bump("drop_malformed")

    def _on_entries(
        self, ids: bytes, count: int, plaintext: bytes, source: bytes, now: float
    ) -> None:
        offset = 0
        end = len(plaintext)
        seen = self.seen
        for i in range(count):
            if offset + _ENTRY_HEADER.size > end:
                raise wire.WireError("truncated entry")
            kind, hops, origin, length = _ENTRY_HEADER.unpack_from(plaintext, offset)
            body_start = offset + _ENTRY_HEADER.size
            offset = body_start + length
            if offset > end:
                raise wire.WireError("truncated entry body")
            msg_id = ids[16 * i : 16 * i + 16]
            if msg_id in seen.ids:
                self.stats.bump("duplicate_entries")
                continue
            body = plaintext[body_start:offset]
            # Check before forwarding: whatever we pass on must be well-formed.
            if kind == wire.EntryKind.APP:
                if length > self.config.max_message_bytes:
                    self.stats.bump("entries_too_large")
                    continue
                seen.add(msg_id)
                self._forward(msg_id, kind, hops, origin, body, source)
                self.stats.bump("delivered")
                self._events.append(Message(body, msg_id, origin, hops))
            elif kind == wire.EntryKind.STATUS:
                try:
                    record, used = wire.decode_member(body)
                    if used != length:
                        raise wire.WireError("trailing bytes in status")
                except (wire.WireError, struct.error):
                    self.stats.bump("entries_bad_status")
                    continue
                seen.add(msg_id)
                self._forward(msg_id, kind, hops, origin, body, source)
                self._apply_record(record, now, announce=False)
            elif kind == wire.EntryKind.FRAGMENT:
                self._on_fragment(msg_id, hops, origin, body, source, now)
            else:
                self.stats.bump("entries_unknown_kind")  # not forwarded either
        if offset != end:
            raise wire.WireError("trailing bytes after entries")

    def _forward(
        self, msg_id: bytes, kind: int, hops: int, origin: bytes, body: bytes, source: bytes
    ) -> None:
        # Forward first, so the copy leaves before any local work on it.
        header = _ENTRY_HEADER.pack(kind, min(hops + 1, 255), origin, len(body))
        self.fanout.add(msg_id, header + body, source)

    def _on_fragment(
        self, frag_id: bytes, hops: int, origin: bytes, body: bytes, source: bytes, now: float
    ) -> None:
        if len(body) < _FRAGMENT_HEADER.size:
            self.stats.bump("entries_bad_fragment")
            return
        msg_id, index, count, total = _FRAGMENT_HEADER.unpack_from(body)
        if frag_id != fragment_id(msg_id, index):
            self.stats.bump("entries_bad_fragment")
            return
        data = body[_FRAGMENT_HEADER.size :]
        result = self.reassembler.add(source, msg_id, index, count, total, data, now)
        if result.kind is not AddKind.REJECTED:
            info = self._large_info.get(msg_id)
            fragment_size = len(data) if index < count - 1 else 0
            if info is None:
                self._large_info[msg_id] = (count, total, origin, hops, fragment_size)
                if len(self._large_info) > 4096:
                    self._large_info.popitem(last=False)
            elif not info[4] and fragment_size:
                self._large_info[msg_id] = (*info[:4], fragment_size)
        if result.kind is AddKind.REJECTED:
            self.stats.bump("entries_bad_fragment")
            return
        self.seen.add(frag_id)
        if result.kind is AddKind.DUPLICATE:
            self.stats.bump("duplicate_entries")
            return
        # Cut-through: every new fragment moves on at once, before the message is whole.
        self._forward(frag_id, wire.EntryKind.FRAGMENT, hops, origin, body, source)
        self.stats.bump("fragments_received")
        if result.kind is AddKind.COMPLETE:
            assert result.data is not None
            whole = bytes(result.data)
            self.stats.bump("delivered")
            self.stats.bump("delivered_large")
            self._events.append(Message(whole, msg_id, origin, hops))
            size = self._large_info.get(msg_id, (0, 0, b"", 0, 0))[4]
            if size or count == 1:
                self.relayed_fragments.add_message(
                    msg_id, split_message(whole, size or total or 1), now
                )

    def _poll_naks(self, now: float) -> None:
        """Aggregated loss reports: at most one NAK per peer per nak_interval_s, and
        only when something was really lost (reordering inside the window is not)."""
        for peer_id in list(self._rx_links):
            link = self.links.get(peer_id)
            if link is None or link.loss is None:
                self._rx_links.pop(peer_id, None)
                continue
            report = link.loss.poll_nak(now)
            if report is not None:
                body = wire.encode_nak(report.received, report.lost, list(report.ranges))
                self._queue_control(peer_id, FrameType.NAK, body)
                self.stats.bump("naks_sent")
            if link.loss.next_timer(now) is None:
                self._rx_links.pop(peer_id, None)
        self._next_nak_poll = now + self.pacing.nak_interval_s if self._rx_links else None

    def _send_tail_probes(self, now: float) -> None:
        for peer_id in list(self._tail_links):
            link = self.links.get(peer_id)
            if link is None or link.tail_due is None:
                self._tail_links.pop(peer_id, None)
            elif now >= link.tail_due:
                link.tail_due = None
                self._tail_links.pop(peer_id, None)
                self._queue_control(peer_id, FrameType.TAIL, _TAIL.pack(link.last_sent_seq))

    def _on_tail(self, peer_id: bytes, link: PeerLink, body: bytes, now: float) -> None:
        if len(body) != _TAIL.size:
            raise wire.WireError("bad tail probe")
        if link.loss is None:
            return
        link.loss.on_tail(_TAIL.unpack(body)[0], now)
        if peer_id not in self._rx_links:
            self._rx_links[peer_id] = None
        if self._next_nak_poll is None or self._next_nak_poll > now:
            self._next_nak_poll = now

    def _on_nak(self, link: PeerLink, body: bytes, now: float) -> None:
        received, lost, ranges = wire.decode_nak(body)
        self.stats.bump("naks_received")
        if self._pacer(link).on_nak(lost, received, now):
            self.stats.bump("rate_decreases")
        # Resend what we still hold. Each copy gets a fresh link sequence (a lost copy is a
        # new gap, NAKed again) and joins the back of the queue, so link sequences leave
        # in increasing order and nothing queued behind looks reordered or lost.
        if link.session is None:
            return
        addr = link.session.addr
        budget = MAX_RETRANSMITS_PER_NAK
        resent = 0
        for start, count in ranges:
            for k in range(min(count, budget - resent)):
                datagram = link.sent.pop((start + k) & 0xFFFFFFFF, None)
                if datagram is None:
                    continue
                link.sent_bytes -= len(datagram)
                copy = _restamp(datagram, link.next_link_seq())
                link.queue.append((copy, addr))
                link.queue_bytes += len(copy)
                self._backlog_bytes += len(copy)
                resent += 1
            if resent >= budget:
                break
        if resent:
            self.stats.bump("retransmits", resent)
            self._backlogged[link.node_id] = None

    def _fragment_naks(self, now: float) -> None:
        for peer_id, msg_id, indexes in self.reassembler.pending_naks(now):
            # Fit one datagram whatever max_datagram_bytes is.
            room = (self.config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 24) // 4
            body = wire.encode_fragment_nak(msg_id, indexes[: max(1, room)])
            asked = set()
            if isinstance(peer_id, bytes) and peer_id in self.links:
                self._queue_control(peer_id, FrameType.FRAGMENT_NAK, body)
                asked.add(peer_id)
            # The last supplier may have lost the same fragments; the origin kept them all.
            info = self._large_info.get(msg_id)
            origin = info[2] if info is not None else None
            link = self.links.get(origin) if origin is not None else None
            if origin not in asked and link is not None and link.session is not None:
                self._queue_control(origin, FrameType.FRAGMENT_NAK, body)
                self.stats.bump("fragment_naks_sent")

    def _on_fragment_nak(self, peer_id: bytes, body: bytes) -> None:
        msg_id, indexes = wire.decode_fragment_nak(body)
        shape = self.own_fragments.message_shape(msg_id)
        if shape is not None:
            count, total = shape
            found = self.own_fragments.fragments_for_nak(msg_id, indexes)
            origin, hops = self.node_id, 1
        else:
            info = self._large_info.get(msg_id)
            if info is None:
                return
            count, total, origin, hops, _ = info
            hops = min(hops + 1, 255)
            if self.relayed_fragments.message_shape(msg_id) is not None:
                found = self.relayed_fragments.fragments_for_nak(msg_id, indexes)
            else:
                found = self.reassembler.fragments_for_nak(msg_id, indexes)
        link = self.links.get(peer_id)
        if not found or link is None or link.session is None:
            return
        entries = [
            (
                fragment_id(msg_id, index),
                self._fragment_entry(hops, origin, msg_id, index, count, total, data),
            )
            for index, data in found
        ]
        self._resend_to.append((peer_id, entries))
        self.stats.bump("fragments_resent", len(entries))

    def _on_control(self, data: bytes, addr: Addr, now: float) -> None:
        _, _, _, sid, seq = _CONTROL_HEADER.unpack_from(data)
        session = self._control_session(sid, seq)
        if session is None:
            return
        plaintext = open_sealed(session.recv_key, nonce(seq), data[_CONTROL_HEADER.size :])
        session.replay.mark(seq)
        self._on_control_plaintext(session, addr, plaintext, now)

    def _control_session(self, sid: int, seq: int) -> Session | None:
        """The session a CONTROL packet names, if it exists and ``seq`` is no replay
        (checked before any decryption; marked only once authenticated)."""
        session = self.sessions.get(sid)
        if session is None:
            self.stats.bump("drop_unknown_session")
            return None
        if not session.replay.check(seq):
            self.stats.bump("drop_replay")
            return None
        return session

    def _on_control_plaintext(
        self, session: Session, addr: Addr, plaintext: bytes, now: float
    ) -> None:
        session.last_rx = now
        if session.addr != addr:
            session.addr = addr  # authenticated: the peer's address really changed
            self._journal_session(session)
        peer_id = session.peer_id
        link = self.links.get(peer_id)
        if link is None:
            link = self.links[peer_id] = PeerLink(peer_id, session=session)
        link.last_heard = now
        self._probing.pop(peer_id, None)
        provider = self.providers.get(peer_id)
        if provider is not None:
            provider.last_heard = now
        for ftype, body in wire.iter_frames(plaintext):
            self._on_frame(ftype, body, peer_id, link, now)

    def _on_frame(
        self, ftype: int, body: bytes, peer_id: bytes, link: PeerLink, now: float
    ) -> None:
        if ftype == FrameType.HEARTBEAT or ftype == FrameType.PONG:
            return  # liveness was recorded by the caller
        if ftype == FrameType.SUBSCRIBE:
            self._on_subscribe(peer_id, body, now)
        elif ftype == FrameType.SUBSCRIBED:
            if len(body) != 32:
                raise wire.WireError("bad channel key")
            if link.channel_key != body:
                link.channel_key = body
                self._journal_channel(peer_id, body)
            provider = self.providers.get(peer_id)
            if provider is None:
                self._queue_control(peer_id, FrameType.UNSUBSCRIBE)
            elif not provider.confirmed:
                provider.confirmed = True
                provider.last_heard = now
                # Members that joined while we had no providers were announced to
                # nobody we listen to: one peer list from each new provider closes that gap.
                self._request_peers(peer_id)
        elif ftype == FrameType.UNSUBSCRIBE:
            self.subscribers.pop(peer_id, None)
        elif ftype == FrameType.PEERS_REQUEST:
            self._send_peer_list(peer_id, body)
        elif ftype == FrameType.PEERS:
            for record in wire.decode_members(body):
                self._apply_record(record, now, announce=False, source=peer_id)
        elif ftype == FrameType.CHANNEL_KEY:
            if len(body) != 32:
                raise wire.WireError("bad channel key")
            if link.channel_key != body:
                link.channel_key = body
                self._journal_channel(peer_id, body)
        elif ftype == FrameType.FRAGMENT_NAK:
            self._on_fragment_nak(peer_id, body)
        elif ftype == FrameType.NAK:
            self._on_nak(link, body, now)
        elif ftype == FrameType.TAIL:
            self._on_tail(peer_id, link, body, now)
        elif ftype == FrameType.PING:
            self._queue_control(peer_id, FrameType.PONG, body)
        else:
            self.stats.bump("ignored_frames")

    def _on_subscribe(self, peer_id: bytes, body: bytes, now: float) -> None:
        if not self._running:
            return
        member = self.members.get(peer_id)
        if member is None or member.state != MemberState.UP:
            # We believe it is DOWN: tell it, so it refutes with a higher incarnation.
            if member is not None:
                self._queue_control(
                    peer_id, FrameType.PEERS, wire.encode_members([member.record()])
                )
            return
        is_new = peer_id not in self.subscribers
        self.subscribers[peer_id] = now + self._watchdog_s
        need_key = bool(body) and body[0] & _SUBSCRIBE_NEED_KEY
        if is_new or need_key:
            self._queue_control(peer_id, FrameType.SUBSCRIBED, self.fanout.channel.key)
        if is_new:
            self.stats.bump("subscribers_added")

    # ------------------------------------------------------------------ sessions

    def _allocate_sid(self) -> int:
        while True:
            sid = int.from_bytes(self._random_bytes(4), "big")
            if sid and sid not in self._sids:
                self._sids.add(sid)
                return sid

    def _on_established(self, est: Established, now: float) -> None:
        session = Session(
            est.peer_id,
            est.addr,
            est.local_session_id,
            est.remote_session_id,
            est.send_key,
            est.recv_key,
        )
        self.sessions[est.local_session_id] = session
        self._journal_session(session)
        link = self.links.get(est.peer_id)
        if link is None:
            link = self.links[est.peer_id] = PeerLink(est.peer_id)
        if link.session is not None and link.session is not session:
            # The peer may still be sending on the old one (two handshakes crossed):
            # it stays valid for receiving until it has been idle for SESSION_GRACE_S.
            link.session.superseded = True
        session.last_rx = now
        link.session = session
        link.last_heard = now
        # Our channel key goes to every peer, so a broadcast it receives from us is
        # accepted whether or not it subscribed (fanout still follows subscriptions).
        self._queue_control(est.peer_id, FrameType.CHANNEL_KEY, self.fanout.channel.key)
        self.stats.bump("sessions_established")
        record = MemberRecord(
            est.peer_id,
            est.peer_incarnation,
            MemberState.UP,
            est.addr[0],
            est.addr[1],
            est.peer_zone,
        )
        self._apply_record(record, now, announce=True, direct=True)
        if est.addr in self._bootstrap_addrs or est.addr in self._peer_request_addrs:
            self._peer_request_addrs.discard(est.addr)
            self._request_peers(est.peer_id)
        provider = self.providers.get(est.peer_id)
        if provider is not None and not provider.confirmed:
            self._queue_control(est.peer_id, FrameType.SUBSCRIBE, bytes((_SUBSCRIBE_NEED_KEY,)))

    def _journal_session(self, session: Session) -> None:
        if self.key_journal is not None:
            host, port = session.addr
            self.key_journal.append(
                ("K", session.local_session_id, session.peer_id, session.recv_key, host, port)
            )

    def _journal_channel(self, peer_id: bytes, key: bytes | None) -> None:
        if self.key_journal is not None:
            self.key_journal.append(("C", peer_id, key or b""))

    def key_snapshot(self) -> list[tuple[object, ...]]:
        """Every current key-table entry, as journal records (for a new receiver)."""
        records: list[tuple[object, ...]] = []
        for session in self.sessions.values():
            host, port = session.addr
            records.append(
                ("K", session.local_session_id, session.peer_id, session.recv_key, host, port)
            )
        for peer_id, link in self.links.items():
            if link.channel_key is not None:
                records.append(("C", peer_id, link.channel_key))
        return records

    def _on_handshake_failed(self, addr: Addr, now: float) -> None:
        self.stats.bump("handshakes_failed")
        for member in self.members.up_members():
            if (member.host, member.port) == addr and member.node_id in self.providers:
                # It was chosen as a provider and never answered: treat as silent.
                self._declare_down(member.node_id, now)

    def _retire_sessions(self, now: float) -> None:
        """Free sessions nobody uses: superseded ones, and those of members that are
        DOWN or forgotten, once idle for SESSION_GRACE_S. Bounds memory under churn."""
        for sid, session in list(self.sessions.items()):
            if now - session.last_rx < SESSION_GRACE_S:
                continue
            member = self.members.get(session.peer_id)
            if session.superseded or member is None or member.state != MemberState.UP:
                del self.sessions[sid]
                self._sids.discard(sid)
                if self.key_journal is not None:
                    self.key_journal.append(("k", sid))
                link = self.links.get(session.peer_id)
                if link is not None and link.session is session:
                    link.session = None
        in_use = {session.peer_id for session in self.sessions.values()}
        for peer_id, link in list(self.links.items()):
            if link.session is None and peer_id not in self.providers and peer_id not in in_use:
                member = self.members.get(peer_id)
                if member is None or member.state != MemberState.UP:
                    del self.links[peer_id]
                    self._backlog_bytes -= link.queue_bytes  # its queue goes with it
                    self._backlogged.pop(peer_id, None)
                    self._tail_links.pop(peer_id, None)
                    self._rx_links.pop(peer_id, None)
                    self._journal_channel(peer_id, None)

    # ------------------------------------------------------------------ membership

    def _self_record(self, state: MemberState) -> MemberRecord:
        host, port = self._advertised
        return MemberRecord(self.node_id, self.incarnation, state, host, port, self.zone)

    def _apply_record(
        self,
        record: MemberRecord,
        now: float,
        *,
        announce: bool,
        direct: bool = False,
        source: bytes | None = None,
    ) -> None:
        if record.node_id == self.node_id:
            if record.state != MemberState.DOWN or not self._running:
                return
            if self.incarnation <= record.incarnation < MAX_INCARNATION:
                # Refute: only we may raise our incarnation, and UP(n+1) beats DOWN(n).
                self.incarnation = record.incarnation + 1
                self.stats.bump("refutations")
                own = self._self_record(MemberState.UP)
                self._announce(own, now)
                # Also tell our direct peers: the flood may reach nobody if the
                # accusation already cost us our subscribers.
                notice = wire.encode_members([own])
                told = {*self.providers, *self.subscribers}
                if source is not None:
                    told.add(source)
                for peer_id in told:
                    self._queue_control(peer_id, FrameType.PEERS, notice)
            elif source is not None and record.incarnation < self.incarnation:
                # The sender still holds an old DOWN for us: correct it directly.
                notice = wire.encode_members([self._self_record(MemberState.UP)])
                self._queue_control(source, FrameType.PEERS, notice)
            return
        link = self.links.get(record.node_id)
        has_session = link is not None and link.session is not None
        change = self.members.apply(record, keep_address=has_session and not direct)
        if change is Change.NONE and direct:
            member = self.members.get(record.node_id)
            if member is not None and member.state == MemberState.DOWN:
                # It talks to us, yet we hold a DOWN for it: let it refute.
                self._queue_control(
                    record.node_id, FrameType.PEERS, wire.encode_members([member.record()])
                )
            return
        if change in (Change.JOINED, Change.UP):
            member = self.members.get(record.node_id)
            assert member is not None
            self._events.append(MemberUp(member.snapshot()))
            self._maybe_swap_in(record.node_id)
            if announce:
                self._announce(member.record(), now)
            self._schedule_reassign(now)
        elif change is Change.DOWN:
            member = self.members.get(record.node_id)
            assert member is not None
            self._events.append(MemberDown(member.snapshot()))
            if record.node_id in self.subscribers:
                # It will not get our forward of this news any more: tell it directly.
                self._queue_control(
                    record.node_id, FrameType.PEERS, wire.encode_members([member.record()])
                )
                del self.subscribers[record.node_id]
            self._probing.pop(record.node_id, None)
            if self.providers.pop(record.node_id, None) is not None:
                # If it is in fact alive, it must not keep us as a subscriber, let the
                # subscription expire and then accuse *us*.
                self._queue_control(record.node_id, FrameType.UNSUBSCRIBE)
                self._events.append(ProviderChanged(tuple(sorted(self.providers))))
            if announce:
                self._announce(member.record(), now)
            self._schedule_reassign(now)

    def _declare_down(self, node_id: bytes, now: float) -> None:
        member = self.members.get(node_id)
        if member is None or member.state == MemberState.DOWN:
            return
        self.stats.bump("declared_down")
        record = MemberRecord(
            node_id, member.incarnation, MemberState.DOWN, member.host, member.port, member.zone
        )
        self._apply_record(record, now, announce=True)

    def _announce(self, record: MemberRecord, now: float) -> None:
        """Originate a STATUS broadcast; it floods like any message."""
        body = record.encode()
        msg_id = self._random_bytes(wire.MESSAGE_ID_BYTES)
        self.seen.add(msg_id)
        entry = _ENTRY_HEADER.pack(wire.EntryKind.STATUS, 1, self.node_id, len(body)) + body
        self.fanout.add(msg_id, entry, None)
        self.stats.bump("status_announced")

    def _maybe_swap_in(self, newcomer: bytes) -> None:
        """Give a newcomer its fair share of subscribers: with probability N / members,
        trade one of our providers for it. Without this, nodes that join a settled
        cluster (where everyone already has N providers) would have no subscribers
        and their broadcasts would reach nobody."""
        n = self.config.subscriptions
        if len(self.providers) < n or newcomer in self.providers:
            return
        if self._rng.random() < n / max(self.members.up_count, 1):
            victim = self._rng.choice(sorted(self.providers))
            self._pending_swaps.append((victim, newcomer))

    def _schedule_reassign(self, now: float) -> None:
        low, high = self.config.reassign_delay_s
        due = now + self._rng.uniform(low, high)
        if self._reassign_at is None or due < self._reassign_at:
            self._reassign_at = due

    def _selection_settled(self) -> bool:
        """Would provider selection return exactly the providers we have? Selection is a
        fixed point on its own result (see selection.py), so it is when every provider
        is still UP, no swap is pending and the count per zone is what the strategy
        asks for. Checked in O(providers + zones) from the table's incremental counts,
        instead of a selection over every member after every membership change."""
        if self._pending_swaps:
            return False
        members = self.members
        zones: dict[str | None, int] = {}
        for provider_id in self.providers:
            member = members.get(provider_id)
            if member is None or member.state != MemberState.UP:
                return False
            zones[member.zone] = zones.get(member.zone, 0) + 1
        n = self.config.subscriptions
        if self.config.strategy is not Strategy.HUB_AND_SPOKE:
            return len(self.providers) == min(n, members.up_count)
        # One provider per remote zone, then the local share of what is left.
        up_zones = members.up_zones
        remote = [zone for zone in up_zones if zone != self.zone]
        local_target = min(max(0, n - len(remote)), up_zones.get(self.zone, 0))
        if zones.pop(self.zone, 0) != local_target:
            return False
        return len(zones) == len(remote) and all(zones.get(zone) == 1 for zone in remote)

    def reselect_providers(self, now: float) -> None:
        """Run provider selection now over the current member table (it otherwise runs
        a short random delay after membership changes). For embedders that seeded the
        table with ``learn_members``."""
        self._reassign_at = None
        self._reassign(now)

    def learn_members(self, records: list[MemberRecord]) -> int:
        """Seed the member table with known members, silently: no events, no
        announcements, no reselection (call ``reselect_providers`` after). Meant for
        restoring a saved view or building a simulated cluster; records about this node
        are skipped. Returns how many records changed the table."""
        apply = self.members.apply
        own = self.node_id
        return sum(
            1 for record in records if record.node_id != own and apply(record) is not Change.NONE
        )

    def _reassign(self, now: float) -> None:
        if self._selection_settled():
            return
        up = self.members.up_members()
        up.sort(key=_node_id_of)
        candidates = [Candidate(m.node_id, m.zone) for m in up]
        keep = set(self.providers)
        for victim, newcomer in self._pending_swaps:
            if victim in keep:
                keep.discard(victim)
                keep.add(newcomer)
        self._pending_swaps.clear()
        desired = set(
            select_providers(
                own_zone=self.zone,
                candidates=candidates,
                current=keep,
                n=self.config.subscriptions,
                strategy=self.config.strategy,
                rng=self._rng,
            )
        )
        current = set(self.providers)
        if desired == current:
            return
        for node_id in sorted(current - desired):
            del self.providers[node_id]
            self._queue_control(node_id, FrameType.UNSUBSCRIBE)
        for node_id in sorted(desired - current):
            self.providers[node_id] = ProviderState(since=now, last_heard=now)
            self._subscribe(node_id, now)
        self.stats.bump("reassignments")
        self._events.append(ProviderChanged(tuple(sorted(self.providers))))

    def _subscribe(self, node_id: bytes, now: float) -> None:
        link = self.links.get(node_id)
        if link is not None and link.session is not None:
            need_key = link.channel_key is None or not self.providers[node_id].confirmed
            self._queue_control(
                node_id, FrameType.SUBSCRIBE, bytes((_SUBSCRIBE_NEED_KEY if need_key else 0,))
            )
            return
        member = self.members.get(node_id)
        if member is not None:
            self._initiate((member.host, member.port), now)

    def _initiate(self, addr: Addr, now: float) -> None:
        if self.handshaker.is_initiating(addr):
            return
        wall_ns = int((now + self.wall_offset_s) * 1e9)
        self._outbox.append((self.handshaker.initiate(addr, now, wall_ns, self.incarnation), addr))

    def set_seeds(self, addrs: list[Addr], now: float) -> None:
        """The runtime resolved the seed names (again): bootstrap from these from now
        on, and at once if this node has no provider."""
        self._bootstrap_addrs = set(addrs)
        if self._running and not self.providers:
            self._bootstrap(now)

    def _bootstrap(self, now: float) -> None:
        for addr in sorted(self._bootstrap_addrs):
            if addr != self._advertised:
                self._peer_request_addrs.add(addr)
                self._initiate(addr, now)

    def _check_providers(self, now: float) -> None:
        if not self.providers:
            return
        silent = [
            pid for pid, st in self.providers.items() if now >= st.last_heard + self._watchdog_s
        ]
        if not silent:
            return
        if len(silent) == len(self.providers) and len(self.providers) >= 2:
            # Every provider went quiet at once: far likelier that *we* are cut off
            # than that they all died. Do not accuse them; start over from the seeds.
            self.stats.bump("isolated")
            for provider_id in silent:
                self._probing.pop(provider_id, None)
            self.providers.clear()
            self._events.append(ProviderChanged(()))
            self._bootstrap(now)
            self._schedule_reassign(now)
            return
        for provider_id in silent:
            # Suspect, do not accuse yet: a few lost heartbeats are likelier than a death
            # under loss. It stays our provider while the PINGs run (_check_probes).
            if provider_id not in self._probing:
                self._start_probe(provider_id, now)

    def _start_probe(self, peer_id: bytes, now: float) -> None:
        self.stats.bump("probes")
        self._probing[peer_id] = Probe(now + self.config.heartbeat_interval_s, now, PROBE_PINGS)
        self._check_probe(peer_id, self._probing[peer_id], now)

    def _check_probe(self, peer_id: bytes, probe: Probe, now: float) -> None:
        if probe.next_ping is not None and now >= probe.next_ping:
            self._queue_control(peer_id, FrameType.PING)
            probe.pings_left -= 1
            if probe.pings_left > 0:
                spacing = self.config.heartbeat_interval_s / PROBE_PINGS
                probe.next_ping = max(now, probe.next_ping + spacing)
            else:
                probe.next_ping = None

    def _check_probes(self, now: float) -> None:
        if not self._probing:
            return
        for peer_id, probe in list(self._probing.items()):
            if now >= probe.give_up:
                del self._probing[peer_id]
                # A provider: the isolation rule in _check_providers already spared it if
                # all of them fell silent. A subscriber: accused only while we are
                # demonstrably connected.
                if peer_id in self.providers or self._heard_from_a_provider(now):
                    self.stats.bump("probes_failed")
                    self._declare_down(peer_id, now)
                    if self.providers.pop(peer_id, None) is not None:
                        # Already DOWN in our table, so nothing above replaced it.
                        self._events.append(ProviderChanged(tuple(sorted(self.providers))))
                        self._schedule_reassign(now)
            else:
                self._check_probe(peer_id, probe, now)

    def _heartbeat_tick(self, now: float) -> None:
        for subscriber_id, expires in list(self.subscribers.items()):
            if now >= expires:
                # It stopped refreshing: maybe it just moved on, maybe it died. Drop it,
                # and only accuse it if it does not answer a direct PING either (and we
                # are not the one cut off).
                del self.subscribers[subscriber_id]
                self.stats.bump("subscribers_expired")
                if self._heard_from_a_provider(now) and subscriber_id not in self._probing:
                    self._start_probe(subscriber_id, now)
            else:
                self._queue_control(subscriber_id, FrameType.HEARTBEAT)
        for provider_id, state in self.providers.items():
            link = self.links.get(provider_id)
            if link is not None and link.session is not None:
                flag = (
                    0 if (state.confirmed and link.channel_key is not None) else _SUBSCRIBE_NEED_KEY
                )
                self._queue_control(provider_id, FrameType.SUBSCRIBE, bytes((flag,)))
            else:
                self._subscribe(provider_id, now)
        if not any(st.confirmed for st in self.providers.values()) and not self.subscribers:
            self._bootstrap(now)  # alone: (re)join through the seeds
        elif now >= self._next_peer_sync and self.providers:
            # Slow anti-entropy: a lost STATUS flood must not leave a member unknown forever.
            self._next_peer_sync = now + self.config.peer_sync_interval_s
            provider_id = self._rng.choice(sorted(self.providers))
            self._request_peers(provider_id)
        self._retire_sessions(now)

    def _heard_from_a_provider(self, now: float) -> bool:
        """Are we connected? Only a confirmed provider that is still talking counts: a
        freshly chosen one proves nothing about our own reachability."""
        return any(
            st.confirmed and now < st.last_heard + self._watchdog_s
            for st in self.providers.values()
        )

    # ------------------------------------------------------------------ sending

    def _queue_control(self, peer_id: bytes, ftype: FrameType, body: bytes = b"") -> None:
        self._control.setdefault(peer_id, []).append(wire.encode_frame(ftype, body))

    def _seal_control(
        self, peer_id: bytes, frames: list[bytes], out: list[tuple[Datagram, Addr]], now: float
    ) -> None:
        link = self.links.get(peer_id)
        if link is None or link.session is None:
            self.stats.bump("control_no_session")
            return
        before = len(out)
        session = link.session
        budget = self.config.max_datagram_bytes - wire.CONTROL_OVERHEAD
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > budget:
                self._seal_one(session, b"".join(batch), out)
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            self._seal_one(session, b"".join(batch), out)
        if link.pacer is not None:
            # Control is never held back (membership beats data, so a node under full
            # load is not declared DOWN), but the pacer accounts for its bytes.
            link.pacer.consume(sum(len(d) for d, _ in out[before:]), now)

    def _seal_one(
        self, session: Session, plaintext: bytes, out: list[tuple[Datagram, Addr]]
    ) -> None:
        session.send_seq += 1
        header = _CONTROL_HEADER.pack(
            wire.VERSION, PacketType.CONTROL, 0, session.remote_session_id, session.send_seq
        )
        nonce24 = nonce(session.send_seq)
        if self.defer_sealing:
            job = SealJob(session.send_key, nonce24, plaintext)
            out.append((DeferredDatagram(header, job), session.addr))
        else:
            out.append((header + seal(session.send_key, nonce24, plaintext), session.addr))

    def _member_digests(self) -> list[int]:
        """Per-bucket digests of our view of the whole cluster, ourselves included (so
        two nodes that agree have equal digests)."""
        return self.members.digests_with(self.node_id, self.incarnation)

    def _request_peers(self, peer_id: bytes) -> None:
        """Anti-entropy pull: our bucket digests go along, so the answer carries only
        the buckets where our views differ."""
        body = _DIGESTS.pack(*self._member_digests())
        self._queue_control(peer_id, FrameType.PEERS_REQUEST, body)

    def _send_peer_list(self, peer_id: bytes, request: bytes = b"") -> None:
        # Empty request: everything UP (a newcomer's or an older peer's request). With
        # digests: every member, UP and DOWN, of each bucket that differs, so a missed
        # DOWN or refutation is repaired too; nothing but our own record if none does.
        encoded = [self._self_record(MemberState.UP).encode()]
        if not request:
            members = self.members.up_members()
        else:
            if len(request) != _DIGESTS.size:
                raise wire.WireError("bad peers request")
            theirs = _DIGESTS.unpack(request)
            ours = self._member_digests()
            differ = {b for b in range(DIGEST_BUCKETS) if theirs[b] != ours[b]}
            members = self.members.bucket_members(differ) if differ else []
            self.stats.bump("peer_syncs_answered")
        encoded.extend(m.record().encode() for m in members if m.node_id != peer_id)
        self.stats.bump("peer_records_sent", len(encoded))
        budget = min(
            wire.MAX_FRAME_BODY, self.config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 16
        )
        chunk: list[bytes] = []
        size = 2
        for record in encoded:
            if chunk and size + len(record) > budget:
                self._queue_peers(peer_id, chunk)
                chunk, size = [], 2
            chunk.append(record)
            size += len(record)
        if chunk:
            self._queue_peers(peer_id, chunk)

    def _queue_peers(self, peer_id: bytes, encoded: list[bytes]) -> None:
        body = struct.pack("!H", len(encoded)) + b"".join(encoded)
        self._queue_control(peer_id, FrameType.PEERS, body)

    def _fanout_target(self, peer_id: bytes) -> FanoutTarget | None:
        link = self.links.get(peer_id)
        if link is None or link.session is None:
            return None
        session = link.session
        return FanoutTarget(peer_id, session.addr, session.remote_session_id, link.next_link_seq)

    def _fanout_targets(self) -> list[FanoutTarget]:
        # Nobody subscribes to us (a late joiner the swap-in passed over): push to our
        # providers instead, who hold our channel key, so our broadcasts still get out.
        # They drop what they already have before decrypting it.
        peers = self.subscribers or {p: 0.0 for p, st in self.providers.items() if st.confirmed}
        targets = []
        for peer_id in peers:
            target = self._fanout_target(peer_id)
            if target is not None:
                targets.append(target)
        return targets
