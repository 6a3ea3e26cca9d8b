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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import (
    AntiReplayWindow,
    DecryptError,
    PskKeyring,
    ids_digest,
    nonce,
    open_sealed,
    seal,
)
from gwyh_mp.protocol.dissemination import BroadcastChannel, Fanout, FanoutTarget, SeenSet
from gwyh_mp.protocol.events import Event, Member, MemberDown, MemberUp, Message, ProviderChanged
from gwyh_mp.protocol.handshake import Established, Handshaker
from gwyh_mp.protocol.membership import Change, MemberTable
from gwyh_mp.protocol.selection import Candidate, rng_for, select_providers
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState, PacketType

Addr = tuple[str, int]

SESSION_GRACE_S = 30.0  # a superseded session still decrypts for this long
_SUBSCRIBE_NEED_KEY = 0x01
_ENTRY_HEADER = wire.ENTRY_HEADER
_BROADCAST_HEADER = wire.BROADCAST_HEADER
_CONTROL_HEADER = wire.CONTROL_HEADER


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
    retire_at: float | None = None


@dataclass(slots=True)
class PeerLink:
    """What we hold for one peer beyond its membership record."""

    node_id: bytes
    session: Session | None = None
    channel_key: bytes | None = None  # the peer's provider channel key, if we subscribe
    channel_replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)
    link_seq_out: int = 0
    last_heard: float = 0.0

    def next_link_seq(self) -> int:
        self.link_seq_out = (self.link_seq_out + 1) & 0xFFFFFFFF
        return self.link_seq_out


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
    ) -> None:
        config.validate()
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
        self.fanout = Fanout(BroadcastChannel(random_bytes(32)), config.max_datagram_bytes)
        self.stats = Stats()
        self.warnings: deque[str] = deque(maxlen=100)
        self._outbox: list[tuple[bytes, Addr]] = []
        self._control: dict[bytes, list[bytes]] = {}
        self._events: deque[Event] = deque()
        self._bootstrap_addrs: set[Addr] = set(config.bootstrap)
        self._peer_request_addrs: set[Addr] = set()
        self._reassign_at: float | None = None
        self._next_heartbeat = now
        self._next_peer_sync = now + config.peer_sync_interval_s
        self._running = False
        self._left = False
        self._advertised = config.advertised
        self._watchdog_s = config.heartbeat_interval_s * config.missed_heartbeats

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
        """Largest broadcast that fits one datagram with this configuration."""
        return min(
            self.config.max_message_bytes,
            self.fanout.max_entry_bytes - _ENTRY_HEADER.size,
        )

    def broadcast(self, data: bytes, now: float) -> bytes:
        """Queue a broadcast to the whole cluster; returns its 16-byte message id."""
        if not self._running:
            raise NotRunning("node is not running")
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f"message is {len(data)} bytes; at most {self.max_message_bytes} fit "
                f"(max_datagram_bytes={self.config.max_datagram_bytes})"
            )
        msg_id = self._random_bytes(wire.MESSAGE_ID_BYTES)
        self.seen.add(msg_id)
        entry = _ENTRY_HEADER.pack(wire.EntryKind.APP, 1, self.node_id, len(data)) + data
        self.fanout.add(msg_id, entry, None)
        self.stats.bump("broadcasts")
        return msg_id

    def local_member(self) -> Member:
        host, port = self._advertised
        state = MemberState.UP if self._running else MemberState.DOWN
        return Member(self.node_id, host, port, self.zone, state, self.incarnation)

    def member_list(self) -> list[Member]:
        return [m.snapshot() for m in self.members.members.values()]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        """Everything produced since the last call: control frames per peer first
        (membership beats data), then coalesced broadcast datagrams."""
        out = self._outbox
        self._outbox = []
        if self._control:
            control, self._control = self._control, {}
            for peer_id, frames in control.items():
                self._seal_control(peer_id, frames, out)
        if self.fanout.pending:
            self.fanout.flush(self._fanout_targets(), out)
        self.stats.bump("packets_out", len(out))
        return out

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        if not self._running:
            return self.handshaker.next_timer()
        deadlines = [self._next_heartbeat]
        if self._reassign_at is not None:
            deadlines.append(self._reassign_at)
        hs = self.handshaker.next_timer()
        if hs is not None:
            deadlines.append(hs)
        for state in self.providers.values():
            deadlines.append(state.last_heard + self._watchdog_s)
        return min(deadlines)

    def handle_timer(self, now: float) -> None:
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
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self._heartbeat_tick(now)

    # ------------------------------------------------------------------ receive

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one datagram. Never raises: anything wrong is a counted drop."""
        self.stats["packets_in"] = self.stats.get("packets_in", 0) + 1
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
        _, _, count, _, sid, _link_seq, chan_seq = _BROADCAST_HEADER.unpack_from(data)
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
        if not fresh:
            self.stats.bump("duplicates", count)
            if session.addr == addr:
                link.last_heard = now
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
            if not seen.add(msg_id):
                self.stats.bump("duplicates")
                continue
            body = plaintext[body_start:offset]
            # Forward first, so the copy leaves before any local work on it.
            forward = _ENTRY_HEADER.pack(kind, min(hops + 1, 255), origin, length) + body
            self.fanout.add(msg_id, forward, source)
            if kind == wire.EntryKind.APP:
                self.stats.bump("delivered")
                self._events.append(Message(body, msg_id, origin, hops))
            elif kind == wire.EntryKind.STATUS:
                record, _ = wire.decode_member(body)
                self._apply_record(record, now, announce=False)
            else:
                self.stats.bump("drop_unknown_entry")
        if offset != end:
            raise wire.WireError("trailing bytes after entries")

    def _on_control(self, data: bytes, addr: Addr, now: float) -> None:
        _, _, _, sid, seq = _CONTROL_HEADER.unpack_from(data)
        session = self.sessions.get(sid)
        if session is None:
            self.stats.bump("drop_unknown_session")
            return
        if not session.replay.check(seq):
            self.stats.bump("drop_replay")
            return
        plaintext = open_sealed(session.recv_key, nonce(seq), data[_CONTROL_HEADER.size :])
        session.replay.mark(seq)
        if session.addr != addr:
            session.addr = addr  # authenticated: the peer's address really changed
        peer_id = session.peer_id
        link = self.links[peer_id]
        link.last_heard = now
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
            link.channel_key = body
            provider = self.providers.get(peer_id)
            if provider is None:
                self._queue_control(peer_id, FrameType.UNSUBSCRIBE)
            elif not provider.confirmed:
                provider.confirmed = True
                provider.last_heard = now
                # Members that joined while we had no providers were announced to
                # nobody we listen to: one peer list from each new provider closes that gap.
                self._queue_control(peer_id, FrameType.PEERS_REQUEST)
        elif ftype == FrameType.UNSUBSCRIBE:
            self.subscribers.pop(peer_id, None)
        elif ftype == FrameType.PEERS_REQUEST:
            self._send_peer_list(peer_id)
        elif ftype == FrameType.PEERS:
            for record in wire.decode_members(body):
                self._apply_record(record, now, announce=False)
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
        self.subscribers[peer_id] = now + self._watchdog_s + self.config.heartbeat_interval_s
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
        link = self.links.get(est.peer_id)
        if link is None:
            link = self.links[est.peer_id] = PeerLink(est.peer_id)
        if link.session is not None and link.session is not session:
            link.session.retire_at = now + SESSION_GRACE_S
        link.session = session
        link.last_heard = now
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
            self._queue_control(est.peer_id, FrameType.PEERS_REQUEST)
        provider = self.providers.get(est.peer_id)
        if provider is not None and not provider.confirmed:
            self._queue_control(est.peer_id, FrameType.SUBSCRIBE, bytes((_SUBSCRIBE_NEED_KEY,)))

    def _on_handshake_failed(self, addr: Addr, now: float) -> None:
        self.stats.bump("handshakes_failed")
        for member in self.members.up_members():
            if (member.host, member.port) == addr and member.node_id in self.providers:
                # It was chosen as a provider and never answered: treat as silent.
                self._declare_down(member.node_id, now)

    def _retire_sessions(self, now: float) -> None:
        for sid, session in list(self.sessions.items()):
            if session.retire_at is not None and now >= session.retire_at:
                del self.sessions[sid]
                self._sids.discard(sid)

    # ------------------------------------------------------------------ membership

    def _self_record(self, state: MemberState) -> MemberRecord:
        host, port = self._advertised
        return MemberRecord(self.node_id, self.incarnation, state, host, port, self.zone)

    def _apply_record(
        self, record: MemberRecord, now: float, *, announce: bool, direct: bool = False
    ) -> None:
        if record.node_id == self.node_id:
            if (
                record.state == MemberState.DOWN
                and record.incarnation >= self.incarnation
                and self._running
            ):
                # Refute: only we may raise our incarnation, and UP(n+1) beats DOWN(n).
                self.incarnation = record.incarnation + 1
                self.stats.bump("refutations")
                self._announce(self._self_record(MemberState.UP), now)
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
            if self.providers.pop(record.node_id, None) is not None:
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

    def _schedule_reassign(self, now: float) -> None:
        low, high = self.config.reassign_delay_s
        due = now + self._rng.uniform(low, high)
        if self._reassign_at is None or due < self._reassign_at:
            self._reassign_at = due

    def _reassign(self, now: float) -> None:
        candidates = [Candidate(m.node_id, m.zone) for m in self.members.up_members()]
        desired = set(
            select_providers(
                own_zone=self.zone,
                candidates=candidates,
                current=self.providers.keys(),
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

    def _bootstrap(self, now: float) -> None:
        for addr in sorted(self._bootstrap_addrs):
            if addr != self._advertised:
                self._peer_request_addrs.add(addr)
                self._initiate(addr, now)

    def _check_providers(self, now: float) -> None:
        if not self.providers:
            return
        silent = [
            pid for pid, st in self.providers.items() if now - st.last_heard >= self._watchdog_s
        ]
        if not silent:
            return
        if len(silent) == len(self.providers) and len(self.providers) >= 2:
            # Every provider went quiet at once: far likelier that *we* are cut off
            # than that they all died. Do not accuse them; start over from the seeds.
            self.stats.bump("isolated")
            self.providers.clear()
            self._events.append(ProviderChanged(()))
            self._bootstrap(now)
            self._schedule_reassign(now)
            return
        for provider_id in silent:
            self._declare_down(provider_id, now)
            self.providers.pop(provider_id, None)

    def _heartbeat_tick(self, now: float) -> None:
        for subscriber_id, expires in list(self.subscribers.items()):
            if now >= expires:
                del self.subscribers[subscriber_id]
                self.stats.bump("subscribers_expired")
                if self._heard_from_a_provider(now):
                    self._declare_down(subscriber_id, now)
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
            self._queue_control(provider_id, FrameType.PEERS_REQUEST)
        self._retire_sessions(now)

    def _heard_from_a_provider(self, now: float) -> bool:
        if not self.providers:
            return True
        return any(now - st.last_heard < self._watchdog_s for st in self.providers.values())

    # ------------------------------------------------------------------ sending

    def _queue_control(self, peer_id: bytes, ftype: FrameType, body: bytes = b"") -> None:
        self._control.setdefault(peer_id, []).append(wire.encode_frame(ftype, body))

    def _seal_control(
        self, peer_id: bytes, frames: list[bytes], out: list[tuple[bytes, Addr]]
    ) -> None:
        link = self.links.get(peer_id)
        if link is None or link.session is None:
            self.stats.bump("control_no_session")
            return
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

    def _seal_one(self, session: Session, plaintext: bytes, out: list[tuple[bytes, Addr]]) -> None:
        session.send_seq += 1
        header = _CONTROL_HEADER.pack(
            wire.VERSION, PacketType.CONTROL, 0, session.remote_session_id, session.send_seq
        )
        out.append(
            (header + seal(session.send_key, nonce(session.send_seq), plaintext), session.addr)
        )

    def _send_peer_list(self, peer_id: bytes) -> None:
        records = [self._self_record(MemberState.UP)]
        records.extend(m.record() for m in self.members.up_members() if m.node_id != peer_id)
        budget = min(
            wire.MAX_FRAME_BODY, self.config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 16
        )
        chunk: list[MemberRecord] = []
        size = 2
        for record in records:
            cost = len(record.encode())
            if chunk and size + cost > budget:
                self._queue_control(peer_id, FrameType.PEERS, wire.encode_members(chunk))
                chunk, size = [], 2
            chunk.append(record)
            size += cost
        if chunk:
            self._queue_control(peer_id, FrameType.PEERS, wire.encode_members(chunk))

    def _fanout_targets(self) -> list[FanoutTarget]:
        targets = []
        for subscriber_id in self.subscribers:
            link = self.links.get(subscriber_id)
            if link is None or link.session is None:
                continue
            session = link.session
            targets.append(
                FanoutTarget(
                    subscriber_id, session.addr, session.remote_session_id, link.next_link_seq
                )
            )
        return targets
