"""Peers: handshakes and seeds, the pairwise sessions, the per-peer link table, channel
keys, control sealing.

Why it exists: everything this node holds about one peer beyond its membership record
lives here, and so does its lifetime. A handshake (started here, run by handshake.py)
creates a session; a crossed handshake
supersedes one; sessions nobody uses any more, and links of members that are gone, are
freed here so memory stays bounded under churn. Control frames leave sealed under the
peer's session. The multiprocess runtime's receivers need the same keys: every change
is reported as a typed update (offload.py) for the runtime to copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import (
    AntiReplayWindow,
    DeferredDatagram,
    PskKeyring,
    SealJob,
    nonce,
    seal,
)
from gwyh_mp.protocol.dissemination import Datagram, FanoutTarget, SeenSet
from gwyh_mp.protocol.handshake import Established, Handshaker
from gwyh_mp.protocol.links import LinkState
from gwyh_mp.protocol.membership import MemberTable
from gwyh_mp.protocol.offload import (
    ChannelKeySet,
    IdsSeen,
    OffloadUpdate,
    SessionKeyInstalled,
    SessionKeyRetired,
)
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import ALIVE_STATES, PacketType

Addr = tuple[str, int]

SESSION_GRACE_S = 30.0  # a superseded or orphaned session is freed after this long idle
# An isolated node re-handshakes the members it knows at most this many per heartbeat,
# and after each pass over its table waits twice as long (up to REJOIN_MAX_WAIT
# heartbeats) before the next: a 10,000-member table must not burst.
REJOIN_BATCH = 8
REJOIN_MAX_WAIT = 64
_CONTROL_HEADER = wire.CONTROL_HEADER


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
    established_at: float = float("-inf")
    # Where the handshake completed: the peer proved it receives there. ``addr`` may
    # roam (moved()); large replies go out only while it is still this (§8.6).
    verified_addr: Addr = ("", 0)


@dataclass(slots=True)
class PeerLink(LinkState):
    """What we hold for one peer beyond its membership record: its session and channel
    key here, its data path (queue, pacer, loss detection) in LinkState."""

    session: Session | None = None
    channel_key: bytes | None = None  # the peer's provider channel key, if we subscribe
    channel_replay: AntiReplayWindow = field(default_factory=AntiReplayWindow)
    last_heard: float = 0.0
    last_peer_list: float = float("-inf")  # when we last answered its PEERS_REQUEST
    target: FanoutTarget | None = None  # the fanout's view of it, kept while the session holds


def _installed(session: Session) -> SessionKeyInstalled:
    return SessionKeyInstalled(
        session.local_session_id, session.peer_id, session.recv_key, session.addr
    )


class Peers:
    def __init__(
        self,
        config: Config,
        node_id: bytes,
        random_bytes: Callable[[int], bytes],
        stats: Stats,
        *,
        wall_offset_s: float,
        defer_sealing: bool,
        incarnation: Callable[[], int],
        advertised: Callable[[], Addr],
        send: Callable[[Datagram, Addr], None],
        on_link_dropped: Callable[[bytes, PeerLink], None],
    ) -> None:
        self._random_bytes = random_bytes
        self._max_datagram_bytes = config.max_datagram_bytes
        self.stats = stats
        self.wall_offset_s = wall_offset_s
        self.defer_sealing = defer_sealing
        self._incarnation = incarnation
        self._advertised = advertised
        self._send = send  # a datagram that leaves as it is (handshakes)
        self._on_link_dropped = on_link_dropped
        self.sids: set[int] = set()
        self.handshaker = Handshaker(
            node_id,
            config.zone,
            PskKeyring(config.psks),
            allocate_session_id=self.allocate_sid,
            release_session_id=self.sids.discard,
            window_s=config.handshake_window_s,
            timeout_s=config.handshake_timeout_s,
            retry_s=config.handshake_retry_s,
            max_half_open=config.max_half_open,
            random_bytes=random_bytes,
        )
        self.seeds: set[Addr] = set(config.bootstrap)
        self._peer_request_addrs: set[Addr] = set()  # seeds we owe a peer list request
        self.sessions: dict[int, Session] = {}
        self._rejoin_queue: list[Addr] = []  # members still to try in this pass
        self._rejoin_wait = 0  # heartbeats to skip before the next pass
        self._rejoin_skip = 0
        self.links: dict[bytes, PeerLink] = {}
        # Offloaded crypto needs the receivers to know keys: every change to the key
        # tables is reported here for the runtime to copy (see runtime/coordinator.py).
        self.key_updates: list[OffloadUpdate] | None = [] if defer_sealing else None

    def allocate_sid(self) -> int:
        while True:
            sid = int.from_bytes(self._random_bytes(4), "big")
            if sid and sid not in self.sids:
                self.sids.add(sid)
                return sid

    def initiate(self, addr: Addr, now: float) -> None:
        """Start a handshake with ``addr`` unless one is already running."""
        if self.handshaker.is_initiating(addr):
            return
        wall_ns = int((now + self.wall_offset_s) * 1e9)
        self._send(self.handshaker.initiate(addr, now, wall_ns, self._incarnation()), addr)

    def set_seeds(self, addrs: list[Addr], now: float, *, bootstrap: bool) -> None:
        """New seed addresses (names resolved again); ``bootstrap``: use them at once."""
        self.seeds = set(addrs)
        if bootstrap:
            self.bootstrap(now)

    def bootstrap(self, now: float) -> None:
        """(Re)join through the seeds: a handshake with each, then a peer list. Not with
        a seed whose handshake completed less than a handshake retry ago (its peer list
        is on its way): the first heartbeat tick, right after start, found the first
        handshake done but no provider confirmed yet and started a second one; a loaded
        generator's virtual peers did so ~2 times in 3 (977 sessions for 500 peers)."""
        if not self.seeds:
            return
        advertised = self._advertised()
        fresh = {
            session.addr
            for session in self.sessions.values()
            if now - session.established_at < self.handshaker.retry_s
        }
        for addr in sorted(self.seeds):
            if addr != advertised and addr not in fresh:
                self._peer_request_addrs.add(addr)
                self.initiate(addr, now)

    def rejoin(self, now: float, members: MemberTable, first: Iterable[bytes]) -> None:
        """Isolated (called once per heartbeat): our sessions may be dead at the other
        end (a peer frees those of a member it holds DOWN), and a seed node has no
        bootstrap address to start over from. So re-handshake with every member we
        know, ``first`` (our providers) then UP then DOWN ones, REJOIN_BATCH per call;
        a peer holding us DOWN answers the handshake with that DOWN and we refute."""
        if not self._rejoin_queue:
            if self._rejoin_skip > 0:
                self._rejoin_skip -= 1
                return
            self._rejoin_queue = self._rejoin_pass(members, first)
            self._rejoin_skip = self._rejoin_wait
            self._rejoin_wait = min(max(1, 2 * self._rejoin_wait), REJOIN_MAX_WAIT)
        batch = self._rejoin_queue[:REJOIN_BATCH]
        del self._rejoin_queue[:REJOIN_BATCH]
        advertised = self._advertised()
        for addr in batch:
            if addr != advertised:
                self.stats.bump("rejoin_handshakes")
                self.initiate(addr, now)

    def _rejoin_pass(self, members: MemberTable, first: Iterable[bytes]) -> list[Addr]:
        up: list[Addr] = []
        down: list[Addr] = []
        for member in members.members.values():
            (up if member.state in ALIVE_STATES else down).append((member.host, member.port))
        if up:
            # Start at a random member, so that nodes isolated together (a partition)
            # do not all call on the same ones first.
            start = int.from_bytes(self._random_bytes(4), "big") % len(up)
            up = up[start:] + up[:start]
        preferred = []
        for node_id in first:
            member = members.get(node_id)
            if member is not None:
                preferred.append((member.host, member.port))
        return list(dict.fromkeys(preferred + up + down))

    def rejoined(self) -> None:
        """Connected again: the next isolation starts a fresh pass without waiting."""
        self._rejoin_queue.clear()
        self._rejoin_wait = self._rejoin_skip = 0

    def has_session(self, peer_id: bytes) -> bool:
        link = self.links.get(peer_id)
        return link is not None and link.session is not None

    def owes_peer_request(self, addr: Addr) -> bool:
        """A session with ``addr`` was just established: is it a seed to ask for peers?"""
        if addr in self.seeds or addr in self._peer_request_addrs:
            self._peer_request_addrs.discard(addr)
            return True
        return False

    def control_session(self, sid: int, seq: int) -> Session | None:
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

    def link(self, peer_id: bytes) -> PeerLink:
        link = self.links.get(peer_id)
        if link is None:
            link = self.links[peer_id] = PeerLink(peer_id)
        return link

    def establish(self, est: Established, now: float) -> None:
        """A handshake completed: the new session becomes the peer's current one."""
        session = Session(
            est.peer_id,
            est.addr,
            est.local_session_id,
            est.remote_session_id,
            est.send_key,
            est.recv_key,
            verified_addr=est.addr,
        )
        self.sessions[est.local_session_id] = session
        self._report_session(session)
        link = self.link(est.peer_id)
        if link.session is not None and link.session is not session:
            # The peer may still be sending on the old one (two handshakes crossed):
            # it stays valid for receiving until it has been idle for SESSION_GRACE_S.
            link.session.superseded = True
        session.last_rx = session.established_at = now
        link.session = session
        link.last_heard = now

    def set_channel_key(self, peer_id: bytes, link: PeerLink, key: bytes) -> None:
        if len(key) != 32:
            raise wire.WireError("bad channel key")
        if link.channel_key != key:
            link.channel_key = key
            self._report_channel(peer_id, key)

    def moved(self, session: Session, addr: Addr) -> None:
        """An authenticated packet came from a new address: the peer really moved."""
        session.addr = addr
        self._report_session(session)

    def fanout_target(self, peer_id: bytes) -> FanoutTarget | None:
        link = self.links.get(peer_id)
        if link is None or link.session is None:
            return None
        session = link.session
        # Built once per session and address, not once per subscriber per flush (a node with
        # 5,000 subscribers built 5,000 per message).
        target = link.target
        if (
            target is None
            or target.addr is not session.addr
            or target.remote_session_id != session.remote_session_id
        ):
            target = link.target = FanoutTarget(
                peer_id, session.addr, session.remote_session_id, link.next_link_seq
            )
        return target

    def retire(self, now: float, members: MemberTable, keep: dict[bytes, object]) -> None:
        """Free sessions nobody uses: superseded ones, and those of members that are
        DOWN or forgotten, once idle for SESSION_GRACE_S; then the links left without a
        session, unless ``keep`` (our providers) holds them. Bounds memory under churn."""
        for sid, session in list(self.sessions.items()):
            if now - session.last_rx < SESSION_GRACE_S:
                continue
            member = members.get(session.peer_id)
            if session.superseded or member is None or member.state not in ALIVE_STATES:
                del self.sessions[sid]
                self.sids.discard(sid)
                if self.key_updates is not None:
                    self.key_updates.append(SessionKeyRetired(sid))
                link = self.links.get(session.peer_id)
                if link is not None and link.session is session:
                    link.session = None
        in_use = {session.peer_id for session in self.sessions.values()}
        for peer_id, link in list(self.links.items()):
            if link.session is None and peer_id not in keep and peer_id not in in_use:
                member = members.get(peer_id)
                if member is None or member.state not in ALIVE_STATES:
                    del self.links[peer_id]
                    self._on_link_dropped(peer_id, link)
                    self._report_channel(peer_id, None)

    # ------------------------------------------------------------------ key updates

    def _report_session(self, session: Session) -> None:
        if self.key_updates is not None:
            self.key_updates.append(_installed(session))

    def _report_channel(self, peer_id: bytes, key: bytes | None) -> None:
        if self.key_updates is not None:
            self.key_updates.append(ChannelKeySet(peer_id, key))

    def offload_updates(self, seen: SeenSet) -> list[OffloadUpdate]:
        """Every key-table change and new seen id since the last call: key changes
        first, then one IdsSeen with the ids (empty without ``defer_sealing``)."""
        updates = self.key_updates
        if updates is None:
            return []
        out = updates[:]
        updates.clear()
        journal = seen.journal
        if journal:
            out.append(IdsSeen(b"".join(journal)))
            journal.clear()
        return out

    def key_snapshot(self) -> list[OffloadUpdate]:
        """Every current key-table entry, as updates (for a new receiver)."""
        updates: list[OffloadUpdate] = [_installed(s) for s in self.sessions.values()]
        for peer_id, link in self.links.items():
            if link.channel_key is not None:
                updates.append(ChannelKeySet(peer_id, link.channel_key))
        return updates

    # ------------------------------------------------------------------ control sealing

    def seal_control(
        self, peer_id: bytes, frames: list[bytes], out: list[tuple[Datagram, Addr]], now: float
    ) -> None:
        """The control frames queued for one peer, as few sealed datagrams as fit."""
        link = self.links.get(peer_id)
        if link is None or link.session is None:
            self.stats.bump("control_no_session")
            return
        before = len(out)
        session = link.session
        budget = self._max_datagram_bytes - wire.CONTROL_OVERHEAD
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
