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

``NodeCore`` is the dispatcher: it decodes what arrives and routes it to the mechanism
that owns it, and its timer is the earliest of theirs (docs/ARCHITECTURE.md has the
table). Each mechanism is its own module: peers.py (handshakes, sessions, links, channel
keys), links.py (queues, pacing, loss repair), flood.py, large_messages.py, liveness.py,
subscriptions.py, membership_changes.py, anti_entropy.py. What stays here is the node's
identity and the dispatch.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.anti_entropy import AntiEntropy
from gwyh_mp.protocol.catch_up import CATCHUP_FRAMES, CatchUp
from gwyh_mp.protocol.crypto import DecryptError
from gwyh_mp.protocol.dissemination import BroadcastChannel, Datagram, Fanout, Outgoing, SeenSet
from gwyh_mp.protocol.events import Event, Member, RejectedHandshakes
from gwyh_mp.protocol.failure_detector import FailureDetector, detector_settings
from gwyh_mp.protocol.flood import Flood
from gwyh_mp.protocol.handshake import Established
from gwyh_mp.protocol.inbound import broadcast_ids_end, open_broadcast, open_control
from gwyh_mp.protocol.large_messages import LargeMessages
from gwyh_mp.protocol.links import LinkQueues, pacing_config
from gwyh_mp.protocol.liveness import Liveness
from gwyh_mp.protocol.local_member import LocalMember
from gwyh_mp.protocol.membership import MemberTable
from gwyh_mp.protocol.membership_changes import MembershipChanges
from gwyh_mp.protocol.offload import OffloadUpdate
from gwyh_mp.protocol.peers import PeerLink, Peers, Session
from gwyh_mp.protocol.selection import rng_for
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.subscriptions import Subscriptions
from gwyh_mp.protocol.trees import TREE_FRAMES, Trees
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, PacketType

Addr = tuple[str, int]

_FRAGMENT_HEADER = wire.FRAGMENT_HEADER
_ENTRY_HEADER = wire.ENTRY_HEADER
_BROADCAST_HEADER = wire.BROADCAST_HEADER
_IDS = _BROADCAST_HEADER.size  # where a BROADCAST's clear message ids start
_CONTROL_HEADER = wire.CONTROL_HEADER
# Plain ints for the per-datagram dispatch: an IntEnum member lookup costs ~90 ns.
_VERSION = wire.VERSION
_BROADCAST = int(PacketType.BROADCAST)
_CONTROL = int(PacketType.CONTROL)
_HELLO = int(PacketType.HELLO)
_GOTEAM = int(PacketType.GOTEAM)


class MessageTooLarge(ValueError):
    """The broadcast exceeds what this node is configured to send."""


class NotRunning(RuntimeError):
    """The node has not been started, or has already left."""


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
        datagrams_to_send() as DeferredDatagram (prefix + SealJob) for receiver processes
        to seal, instead of bytes. The multiprocess runtime's coordinator uses it."""
        config.validate()
        self.defer_sealing = defer_sealing
        self.config = config
        self.node_id: bytes = config.node_id or random_bytes(wire.NODE_ID_BYTES)
        self.zone = config.zone
        self.wall_offset_s = wall_offset_s
        self._random_bytes = random_bytes
        self._rng = rng_for(self.node_id, config.seed)
        self.stats = Stats()
        self.warnings: deque[str] = deque(maxlen=100)
        self._outbox: list[tuple[Datagram, Addr]] = []
        self._control: dict[bytes, list[bytes]] = {}
        self._events: deque[Event] = deque()
        self._last_now = now
        self.me = LocalMember(config, self.node_id, lambda: self.incarnation)
        self._self_record = self.me.record
        self.peers = Peers(
            config,
            self.node_id,
            random_bytes,
            self.stats,
            wall_offset_s=wall_offset_s,
            defer_sealing=defer_sealing,
            incarnation=lambda: self.incarnation,
            advertised=lambda: self.me.advertised,
            send=lambda datagram, addr: self._outbox.append((datagram, addr)),
            on_link_dropped=lambda peer_id, link: self.link_queues.forget(peer_id, link),
        )
        self.sessions = self.peers.sessions
        self.links = self.peers.links
        self.handshaker = self.peers.handshaker
        self.keyring = self.handshaker.keyring
        self.members = MemberTable(max_up=config.max_members)
        self.seen = SeenSet(config.seen_set_size)
        self.fanout = Fanout(
            BroadcastChannel(random_bytes(32)),
            config.max_datagram_bytes,
            defer_sealing=defer_sealing,
        )
        if defer_sealing:
            self.seen.journal = []
        self.flood = Flood(
            self.node_id,
            config.max_message_bytes,
            self.seen,
            self.fanout,
            self.stats,
            deliver=self._events.append,
            on_status=lambda record, now: _on_status(self, record, now),
        )
        self._on_entries = self.flood.on_entries
        self.pacing = pacing_config(config)
        self.link_queues = LinkQueues(
            self.peers.links,  # type: ignore[arg-type]  # PeerLink is a LinkState
            self.peers.link,
            self.pacing,
            self.stats,
            self._queue_control,
            lambda: self._last_now,
            config.retransmit_buffer_bytes,
        )
        self._on_link_packet = self.link_queues.on_packet
        self.anti_entropy = AntiEntropy(
            self.node_id, self.members, config.peer_sync_interval_s, config.max_datagram_bytes,
            config.peer_list_max_records, self._rng, self.stats, now,
            incarnation=lambda: self.incarnation, self_record=self._self_record,
            queue_control=self._queue_control,
        )  # fmt: skip
        watchdog_s = config.heartbeat_interval_s * (config.missed_heartbeats + 0.5)
        self.subscriptions = Subscriptions(
            config,
            self.zone,
            self.members,
            self.peers,
            self._rng,
            self.stats,
            channel_key=self.fanout.channel.key,
            watchdog_s=watchdog_s,
            queue_control=self._queue_control,
            emit=self._events.append,
            initiate=self.peers.initiate,
            bootstrap=self.peers.bootstrap,
            request_peers=self.anti_entropy.request_peers,
        )
        self.providers = self.subscriptions.providers
        self.subscribers = self.subscriptions.subscribers
        self.liveness = _liveness(self)
        self.large = LargeMessages(
            config,
            self.node_id,
            self.peers.links,
            self.seen,
            self.fanout,
            self.stats,
            forward=self.flood.forward,
            deliver=self._events.append,
            queue_control=self._queue_control,
            target_count=lambda: len(self.subscriptions.fanout_targets()),
            link_backlog_bytes=lambda: self.link_queues.backlog_bytes,
        )
        self.flood.on_fragment = self.large.on_fragment
        self.catch_up = CatchUp(
            config, self.seen.ids, self.stats, self.peers, self.subscriptions, self.flood,
            watchdog_s=watchdog_s, clock=lambda: self._last_now, warn=self.warnings.append,
            queue_control=self._queue_control, connected=self.liveness.heard_from_a_provider,
        )  # fmt: skip
        self.large.record = self.catch_up.record
        self.trees = self.flood.trees = Trees(
            self.node_id, config.dissemination == "trees", self.seen, self.stats,
            queue_control=self._queue_control, clock=lambda: self._last_now,
            history=self.catch_up.history, links=self.peers.links,
        )  # fmt: skip
        self.fanout.on_lazy = self.trees.announce
        self.membership = MembershipChanges(
            self.node_id,
            self.members,
            self.peers.links,
            self.flood,
            self.subscriptions,
            self.liveness,
            self.stats,
            running=lambda: self._running,
            random_bytes=random_bytes,
            queue_control=self._queue_control,
            emit=self.catch_up.watching(self._events.append),
            on_suspected=lambda node_id, inc, now: self.detector.on_suspected(node_id, inc, now),
            on_cleared=lambda node_id: self.detector.forget(node_id),
        )
        self.detector = _failure_detector(self)
        self._next_heartbeat = now
        self._running = False
        self._left = False

    @property
    def incarnation(self) -> int:
        return self.liveness.incarnation

    @incarnation.setter
    def incarnation(self, value: int) -> None:
        self.liveness.incarnation = value

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        self._running = True
        self._next_heartbeat = now  # first tick bootstraps immediately
        self.detector.start(now)
        self.peers.bootstrap(now)

    def leave(self, now: float) -> None:
        """Graceful exit: tell the cluster we LEFT and end our subscriptions."""
        if not self._running:
            return
        self.membership.announce(self._self_record(MemberState.LEFT), now)
        self.subscriptions.unsubscribe_all()
        self._running = False
        self._left = True

    @property
    def running(self) -> bool:
        return self._running

    def set_bound_port(self, port: int) -> None:
        """The runtime bound port 0 and learned the real one."""
        self.me.set_bound_port(port)

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
        return self.large.queued_bytes

    def broadcast(self, data: bytes, now: float) -> bytes:
        """Queue a broadcast (fragmented if over one datagram); returns its message id."""
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
            self.flood.originate(msg_id, wire.EntryKind.APP, data)
            return msg_id
        self.large.broadcast(msg_id, data, self.fragment_bytes, now)
        return msg_id

    def local_member(self) -> Member:
        if self._running:
            return self.me.member(MemberState.UP)
        return self.me.member(MemberState.LEFT if self._left else MemberState.DOWN)

    def member_list(self) -> list[Member]:
        return list(self.members.members.values())

    def take_rejected_handshakes(self) -> list[RejectedHandshakes]:
        """Handshakes refused (wrong key, expired) by source since the last call (bounded)."""
        return self.handshaker.rejected.drain()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[tuple[Datagram, Addr]]:
        """Everything produced since the last call: control frames per peer first
        (membership beats data), then coalesced broadcast datagrams."""
        out = self._outbox
        self._outbox = []
        if self._control:
            control, self._control = self._control, {}
            seal_control = self.peers.seal_control
            for peer_id, frames in control.items():
                seal_control(peer_id, frames, out, now)
        large = self.large
        if large.release_due(now):
            large.release(now)
        data: list[Outgoing] = []
        resend = large.take_resends() + self.trees.take_resends() + self.catch_up.take_resends()
        if resend:
            for peer_id, entries in resend:
                target = self.peers.fanout_target(peer_id)
                if target is not None:
                    self.fanout.send_to(entries, target, data)
        if self.fanout.pending:
            self.fanout.flush(self.subscriptions.fanout_targets(), data)
        link_queues = self.link_queues
        if data:
            enqueue = link_queues.enqueue
            for datagram, addr, peer_id in data:
                enqueue(peer_id, datagram, addr)
        if link_queues.backlogged:
            link_queues.drain(now, out)
        self.stats.bump("packets_out", len(out))
        return out

    @property
    def backlog_bytes(self) -> int:
        """Accepted data not yet sent (fragments awaiting a window, datagrams a pacer)."""
        return self.link_queues.backlog_bytes + self.large.queued_bytes

    def set_reading_paused(self, paused: bool) -> None:
        """Socket reading paused/resumed: the app is not consuming (see Subscriptions)."""
        self.liveness.set_deaf(paused, self._last_now)
        self.detector.set_deaf(paused, self._last_now)
        self.subscriptions.set_reading_paused(paused, self._last_now)

    @property
    def accepting(self) -> bool:
        """False above Config.send_queue_bytes of backlog: broadcast() waits (backpressure)."""
        return self.backlog_bytes < self.config.send_queue_bytes

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The earliest mechanism deadline; called per datagram, so it builds nothing."""
        hs = self.handshaker.next_timer()
        if not self._running:
            return hs
        now = self._last_now
        t = self._next_heartbeat
        for due in (
            hs, self.subscriptions.next_timer(), self.liveness.next_timer(),
            self.detector.next_timer(), self.membership.next_timer(), self.large.next_timer(now),
            self.link_queues.next_timer(now), self.trees.next_timer(), self.catch_up.next_timer(),
        ):  # fmt: skip
            if due is not None and due < t:
                t = due
        return t

    def handle_timer(self, now: float) -> None:
        self._last_now = now
        retransmits, failed = self.handshaker.handle_timer(now)
        self._outbox.extend(retransmits)
        for addr in failed:
            self.membership.handshake_failed(addr, now)
        if not self._running:
            return
        self.subscriptions.handle_timer(now)
        self.liveness.handle_timer(now)
        self.detector.handle_timer(now)
        self.membership.handle_timer(now)
        self.large.handle_timer(now)
        self.link_queues.handle_timer(now)
        self.trees.handle_timer(now)
        self.catch_up.handle_timer(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self._heartbeat_tick(now)

    def _heartbeat_tick(self, now: float) -> None:
        self.liveness.heartbeat(now)
        self.liveness.check_isolation(now)
        warning = self.subscriptions.check_saturation(now)
        if warning is not None:
            self.warnings.append(warning)
        self.subscriptions.refresh(now)
        if not any(st.confirmed for st in self.providers.values()) and not self.subscribers:
            self.peers.bootstrap(now)  # alone: (re)join through the seeds
        elif self.anti_entropy.sync_due(now) and self.providers:
            # Slow anti-entropy: a lost STATUS flood must not leave a member unknown forever.
            confirmed = [p for p, st in self.providers.items() if st.confirmed]
            self.anti_entropy.sync(now, confirmed, self.peers.has_session)
        self.peers.retire(now, self.members, self.providers)

    # ------------------------------------------------------------------ receive

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one datagram. Never raises: anything wrong is a counted drop."""
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        self._last_now = now
        if len(data) < 2:
            self.stats.bump("drop_short")
            return
        version, ptype = data[0], data[1]
        if version != _VERSION:
            self.stats.bump("drop_bad_version")
            if self.stats["drop_bad_version"] & (self.stats["drop_bad_version"] - 1) == 0:
                self.warnings.append(
                    f"dropped datagram from {addr[0]}:{addr[1]} with protocol version "
                    f"{version}; this node speaks version {wire.VERSION}"
                )
            return
        try:
            if ptype == _BROADCAST:
                self._on_broadcast(data, addr, now)
            elif ptype == _CONTROL:
                self._on_control(data, addr, now)
            elif _HELLO <= ptype <= _GOTEAM:
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
        ids_end = broadcast_ids_end(data, count, self.seen.ids)
        if ids_end < 0:
            self.stats.bump("drop_malformed")
            return
        link = self.links.get(session.peer_id)
        if link is None:
            self.stats.bump("drop_unknown_session")
            return
        session.last_rx = now  # only keeps the session from being freed as idle
        if session.addr == addr:
            self._on_link_packet(link, link_seq, now)
        if not ids_end:
            self.stats.bump("duplicates")  # datagrams dropped before decryption
            self.trees.on_duplicate_ids(data[_IDS : _IDS + 16 * count], session.peer_id)
            return
        key = link.channel_key
        if key is None:
            self.stats.bump("drop_no_channel_key")
            return
        ids = data[_BROADCAST_HEADER.size : ids_end]
        plaintext = open_broadcast(key, link.channel_replay, chan_seq, ids, data[ids_end:])
        if plaintext is None:
            self.stats.bump("drop_replay")
            return
        link.last_heard = now
        self._on_entries(ids, count, plaintext, session.peer_id, now)

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
        """A BROADCAST datagram a receiver already authenticated and decrypted. The
        coordinator still applies the authoritative replay window and seen-set."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        session = self.sessions.get(sid)
        link = self.links.get(session.peer_id) if session is not None else None
        if session is None or link is None:
            self.stats.bump("drop_unknown_session")
            return
        session.last_rx = now
        if session.addr == addr:
            self._on_link_packet(link, link_seq, now)
        if not link.channel_replay.check(chan_seq):
            self.stats.bump("drop_replay")
            return
        link.channel_replay.mark(chan_seq)
        link.last_heard = now
        try:
            self._on_entries(ids, len(ids) // 16, plaintext, session.peer_id, now)
        except (wire.WireError, struct.error, ValueError, IndexError):
            self.stats.bump("drop_malformed")

    def receive_broadcast_duplicate(
        self, sid: int, addr: Addr, link_seq: int, now: float, ids: bytes = b""
    ) -> None:
        """A BROADCAST of duplicate ``ids`` a receiver dropped; its link_seq still counts."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        self.stats.bump("duplicates")
        session = self.sessions.get(sid)
        link = self.links.get(session.peer_id) if session is not None else None
        if session is not None and link is not None:
            session.last_rx = now
            if session.addr == addr:
                self._on_link_packet(link, link_seq, now)
            self.trees.on_duplicate_ids(ids, session.peer_id)

    def receive_control_plaintext(
        self, sid: int, seq: int, addr: Addr, plaintext: bytes, now: float
    ) -> None:
        """A CONTROL datagram a receiver already authenticated and decrypted."""
        self._last_now = now
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
        session = self.peers.control_session(sid, seq)
        if session is None:
            return
        session.replay.mark(seq)
        try:
            self._on_control_plaintext(session, addr, plaintext, now)
        except (wire.WireError, struct.error, ValueError, IndexError):
            self.stats.bump("drop_malformed")

    def _on_control(self, data: bytes, addr: Addr, now: float) -> None:
        _, _, _, sid, seq = _CONTROL_HEADER.unpack_from(data)
        session = self.sessions.get(sid)
        if session is None:
            self.stats.bump("drop_unknown_session")
            return
        plaintext = open_control(session.recv_key, session.replay, seq, data)
        if plaintext is None:
            self.stats.bump("drop_replay")
            return
        self._on_control_plaintext(session, addr, plaintext, now)

    def _on_control_plaintext(
        self, session: Session, addr: Addr, plaintext: bytes, now: float
    ) -> None:
        session.last_rx = now
        if session.addr != addr:
            self.peers.moved(session, addr)
        peer_id = session.peer_id
        link = self.links.get(peer_id)
        if link is None:
            link = self.links[peer_id] = PeerLink(peer_id, session=session)
        link.last_heard = now
        self.detector.heard(peer_id, now)
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
            if self._running:
                self.subscriptions.on_subscribe(peer_id, body, now)
        elif ftype == FrameType.SUBSCRIBED:
            self.subscriptions.on_subscribed(peer_id, link, body, now)
        elif ftype == FrameType.UNSUBSCRIBE:
            self.subscriptions.on_unsubscribe(peer_id, body, now)
        elif ftype == FrameType.PEERS_REQUEST:
            self.anti_entropy.answer(peer_id, body, link, now)
        elif ftype == FrameType.PEERS:
            changed = self.membership.on_peers(peer_id, body, now)
            self.anti_entropy.on_records(peer_id, changed, now)
        elif ftype == FrameType.CHANNEL_KEY:
            self.peers.set_channel_key(peer_id, link, body)
        elif ftype == FrameType.FRAGMENT_NAK:
            self.large.on_fragment_nak(peer_id, body)
        elif ftype == FrameType.NAK:
            addr = link.session.addr if link.session is not None else None
            self.link_queues.on_nak(link, addr, body, now)
        elif ftype == FrameType.TAIL:
            self.link_queues.on_tail(peer_id, link, body, now)
        elif ftype == FrameType.PING:
            self._queue_control(peer_id, FrameType.PONG, body)
        elif ftype in TREE_FRAMES:
            self.trees.on_frame(ftype, body, peer_id, now)
        elif ftype == FrameType.PING_REQ:
            self.detector.on_ping_req(peer_id, body, now)
        elif ftype == FrameType.PING_ACK:
            self.detector.on_ping_ack(peer_id, body, now)
        elif ftype in CATCHUP_FRAMES:
            self.catch_up.on_frame(ftype, body, peer_id, now)
        else:
            self.stats.bump("ignored_frames")

    # ------------------------------------------------------------------ sessions

    def _on_established(self, est: Established, now: float) -> None:
        self.peers.establish(est, now)
        # Our channel key goes to every peer, so a broadcast it receives from us is
        # accepted whether or not it subscribed (fanout still follows subscriptions).
        self._queue_control(est.peer_id, FrameType.CHANNEL_KEY, self.fanout.channel.key)
        self.stats.bump("sessions_established")
        self.membership.on_handshake(
            est.peer_id, est.peer_incarnation, est.addr, est.peer_zone, now
        )
        if self.config.name or self.config.tags:
            # A handshake carries no name or tags: tell this peer directly.
            own = wire.encode_members([self._self_record(MemberState.UP)])
            self._queue_control(est.peer_id, FrameType.PEERS, own)
        if self.peers.owes_peer_request(est.addr):
            self.anti_entropy.request_peers(est.peer_id)
        self.subscriptions.on_established(est.peer_id)

    # -- what a runtime that decrypts in other processes must copy ------------------

    def offload_updates(self) -> list[OffloadUpdate]:
        """Key-table changes, then one IdsSeen of new ids, since the last call."""
        return self.peers.offload_updates(self.seen)

    def offload_snapshot(self) -> list[OffloadUpdate]:
        """Every current key-table entry, as updates (for a new receiver)."""
        return self.peers.key_snapshot()

    # ------------------------------------------------------------------ membership

    def reselect_providers(self, now: float) -> None:
        """Run provider selection now (else it runs a short random delay after
        membership changes); for embedders that seeded the table with learn_members."""
        self.subscriptions.reassign_at = None
        self.subscriptions.reassign(now)

    def learn_members(self, records: list[MemberRecord]) -> int:
        """Seed the table silently (no events, announcements or reselection; records about
        this node skipped): for saved views and simulations. Returns how many changed."""
        return self.membership.learn(records)

    def set_seeds(self, addrs: list[Addr], now: float) -> None:
        """Resolved seed addresses: bootstrap from these (at once if we have no provider)."""
        self.peers.set_seeds(addrs, now, bootstrap=self._running and not self.providers)

    # ------------------------------------------------------------------ sending

    def _queue_control(self, peer_id: bytes, ftype: FrameType, body: bytes = b"") -> None:
        self._control.setdefault(peer_id, []).append(wire.encode_frame(ftype, body))


# -- wiring of the liveness mechanisms (kept out of the class: each is a module) -------


def _liveness(core: NodeCore) -> Liveness:
    config = core.config
    liveness = Liveness(
        config.heartbeat_interval_s,
        config.missed_heartbeats,
        core.providers,
        core.subscribers,
        core.stats,
        queue_control=core._queue_control,
        isolated=lambda now: core.subscriptions.start_over(now),
        self_record=core._self_record,
        announce=lambda record, now: core.membership.announce(record, now),
        rejoin=lambda now: core.peers.rejoin(now, core.members, core.providers),
        rejoined=core.peers.rejoined,
    )
    liveness.on_refuted = lambda: core.detector.refuted_us()
    return liveness


def _failure_detector(core: NodeCore) -> FailureDetector:
    """Probe our providers and subscribers (the members we hold a session and a
    relation with); suspicion and DOWN go through the membership rules."""
    links = core.links
    providers, subscribers = core.providers, core.subscribers

    def last_heard(peer_id: bytes) -> float:
        link = links.get(peer_id)
        return link.last_heard if link is not None else float("-inf")

    def declare_down(node_id: bytes, incarnation: int, now: float) -> None:
        core.membership.declare_down(node_id, now, incarnation)

    def lost(peer_id: bytes, now: float) -> None:
        subscribers.pop(peer_id, None)
        if providers.pop(peer_id, None) is not None:
            core.subscriptions.lost_provider(now)

    return FailureDetector(
        detector_settings(core.config),
        core._rng,
        core.stats,
        watched=lambda: list(dict.fromkeys([*providers, *subscribers])),  # ordered: replayable
        has_session=core.peers.has_session,
        last_heard=last_heard,
        queue_control=core._queue_control,
        suspect=core.membership.suspect,
        declare_down=declare_down,
        tell_suspect=core.membership.tell_suspect,
        lost=lost,
    )


def _on_status(core: NodeCore, record: MemberRecord, now: float) -> None:
    """A STATUS entry: membership news; each SUSPECT flood is one accuser's confirmation."""
    core.membership.apply(record, now, announce=False)
    if record.state == MemberState.SUSPECT:
        core.detector.on_suspect_status(record.node_id, record.incarnation, now)
