"""Membership changes: what a member record learned does to the node.

Why it exists: records arrive from floods (STATUS entries), peer lists and handshakes,
and a change reaches several mechanisms at once: a member going UP may win a swap-in
and triggers reselection; one going DOWN loses its subscription, its probe and its
place among our providers, and is told directly. A record about ourselves goes to
liveness (refutation). membership.py is the table; this is the behaviour around it.
"""

from __future__ import annotations

from collections.abc import Callable

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import (
    Event,
    MemberDown,
    MemberLeft,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
)
from gwyh_mp.protocol.flood import Flood
from gwyh_mp.protocol.liveness import Liveness
from gwyh_mp.protocol.membership import Change, MemberTable, record_of
from gwyh_mp.protocol.peers import PeerLink
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.subscriptions import Subscriptions
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState

# News about other members leaves at once when it is rare; when it is not (a join
# storm: every newcomer is announced to every subscriber), what comes within this long
# of the last announcement waits and leaves together, so N joins cost about N/17
# datagrams per subscriber (full datagrams of STATUS entries), not N.
STATUS_COALESCE_S = 0.5


class MembershipChanges:
    def __init__(
        self,
        node_id: bytes,
        members: MemberTable,
        links: dict[bytes, PeerLink],
        flood: Flood,
        subscriptions: Subscriptions,
        liveness: Liveness,
        stats: Stats,
        *,
        running: Callable[[], bool],
        random_bytes: Callable[[int], bytes],
        queue_control: Callable[..., None],
        emit: Callable[[Event], None],
        on_suspected: Callable[[bytes, int, float], None],
        on_cleared: Callable[[bytes], None],
    ) -> None:
        self.node_id = node_id
        self.members = members
        self.links = links
        self.flood = flood
        self.subscriptions = subscriptions
        self.liveness = liveness
        self.stats = stats
        self._running = running
        self._random_bytes = random_bytes
        self._queue_control = queue_control
        self._emit = emit
        self._on_suspected = on_suspected  # the failure detector times the suspicion
        self._on_cleared = on_cleared  # ... until it is refuted, DOWN or LEFT
        self._held: dict[bytes, MemberRecord] = {}  # news waiting for the coalescing timer
        self._last_announce = float("-inf")
        self._announce_due: float | None = None

    def apply(
        self,
        record: MemberRecord,
        now: float,
        *,
        announce: bool,
        direct: bool = False,
        source: bytes | None = None,
    ) -> None:
        """One member record learned (flood, peer list or handshake): update the table
        and let every mechanism react to the change."""
        if record.node_id == self.node_id:
            if self._running():
                self.liveness.about_us(record, source, now)
            return
        link = self.links.get(record.node_id)
        has_session = link is not None and link.session is not None
        if (
            self.members.full
            and record.state == MemberState.UP
            and self.members.get(record.node_id) is None
        ):
            if not direct:
                self.stats.bump("members_refused")  # Config.max_members reached
                return
            self._make_room()
        change = self.members.apply(record, keep_address=has_session and not direct)
        if change is Change.NONE and direct:
            member = self.members.get(record.node_id)
            if member is not None and member.state != MemberState.UP:
                # It talks to us, yet we hold a DOWN (or LEFT) for it: let it refute.
                self._queue_control(
                    record.node_id, FrameType.PEERS, wire.encode_members([record_of(member)])
                )
            return
        subscriptions = self.subscriptions
        if record.state == MemberState.SUSPECT and change in (Change.REFRESHED, Change.UP):
            # Suspected again at a newer incarnation (we missed its refutation), or a
            # DOWN we held turned SUSPECT: the detector times the new suspicion.
            self._on_suspected(record.node_id, record.incarnation, now)
        if change is Change.SUSPECT:
            # Still alive for every purpose (subscriptions, sessions, digests) until
            # the suspicion times out: a refutation then costs no reshuffle.
            member = self.members.get(record.node_id)
            assert member is not None
            self._emit(MemberSuspect(member))
            self._on_suspected(record.node_id, record.incarnation, now)
            if announce:
                self.announce(record_of(member), now)
            return
        if change is Change.ALIVE or (
            change is Change.REFRESHED and record.state == MemberState.UP
        ):
            self._on_cleared(record.node_id)
        if (
            source == record.node_id
            and not announce
            and record.state == MemberState.UP
            and change in (Change.ALIVE, Change.REFRESHED, Change.UP)
        ):
            # The member's own refutation, sent to us directly: it may have no
            # subscriber to flood it, so we do.
            announce = True
            if change is Change.REFRESHED:
                member = self.members.get(record.node_id)
                assert member is not None
                self.announce(record_of(member), now, urgent=True)
        if change is Change.ALIVE:
            member = self.members.get(record.node_id)
            assert member is not None
            self._emit(MemberUp(member))  # it refuted the suspicion
            if announce:
                self.announce(record_of(member), now, urgent=True)
            subscriptions.schedule_reassign(now)  # a choice again (settled: no-op)
            return
        if change in (Change.JOINED, Change.UP):
            member = self.members.get(record.node_id)
            assert member is not None
            self._emit(MemberUp(member))
            subscriptions.maybe_swap_in(record.node_id)
            if announce:
                # A newcomer's UP may be coalesced; DOWN -> UP (a refutation) may not.
                self.announce(record_of(member), now, urgent=change is Change.UP)
            subscriptions.schedule_reassign(now)
        elif change is Change.UPDATED:
            member = self.members.get(record.node_id)
            assert member is not None
            self._emit(MemberUpdated(member))
            if source == record.node_id:
                # The member told us its own name and tags (its handshake carried none).
                self.announce(record_of(member), now)
        elif change in (Change.DOWN, Change.LEFT):
            member = self.members.get(record.node_id)
            assert member is not None
            self._emit(MemberDown(member) if change is Change.DOWN else MemberLeft(member))
            self._on_cleared(record.node_id)
            if record.node_id in subscriptions.subscribers:
                # It will not get our forward of this news any more: tell it directly.
                self._queue_control(
                    record.node_id, FrameType.PEERS, wire.encode_members([record_of(member)])
                )
                del subscriptions.subscribers[record.node_id]
            if subscriptions.providers.pop(record.node_id, None) is not None:
                # If it is in fact alive, it must not keep us as a subscriber, let the
                # subscription expire and then accuse *us*.
                self._queue_control(record.node_id, FrameType.UNSUBSCRIBE)
                subscriptions.providers_changed()
            if announce:
                self.announce(record_of(member), now)
            subscriptions.schedule_reassign(now)

    def _make_room(self) -> None:
        """The table is full and a member just completed a handshake with us: it
        replaces the oldest member we only know by hearsay (no session, not a provider
        or subscriber), so a table filled by gossip never locks out a real peer."""
        links = self.links
        busy = self.subscriptions.providers.keys() | self.subscriptions.subscribers.keys()
        for node_id in self.members.members:
            link = links.get(node_id)
            if (link is None or link.session is None) and node_id not in busy:
                self.members.forget(node_id)
                self.stats.bump("members_evicted")
                return

    def declare_down(self, node_id: bytes, now: float, incarnation: int | None = None) -> None:
        """Accuse a member; with ``incarnation``, only if still SUSPECT at it (a refutation
        in the meantime wins)."""
        member = self.members.get(node_id)
        if member is None or member.state not in wire.ALIVE_STATES:
            return  # already DOWN, or LEFT: a member that said goodbye is never accused
        if incarnation is not None and (
            member.state != MemberState.SUSPECT or member.incarnation != incarnation
        ):
            return
        self.stats.bump("declared_down")
        self.apply(record_of(member, MemberState.DOWN), now, announce=True)

    def suspect(self, node_id: bytes, now: float) -> int | None:
        """Our probe of an UP member failed: mark it SUSPECT and flood that; returns the
        incarnation suspected (None: not UP here). Already SUSPECT: flood our own
        SUSPECT anyway, which the others count as a confirmation."""
        member = self.members.get(node_id)
        if member is None or member.state not in wire.ALIVE_STATES:
            return None
        self.stats.bump("suspected")
        record = record_of(member, MemberState.SUSPECT)
        if member.state == MemberState.SUSPECT:
            self.announce(record, now)
        else:
            self.apply(record, now, announce=True)
        return member.incarnation

    def tell_suspect(self, node_id: bytes) -> None:
        """The suspect talks to us: hand it the suspicion so that it refutes."""
        member = self.members.get(node_id)
        if member is not None and member.state == MemberState.SUSPECT:
            self._queue_control(node_id, FrameType.PEERS, wire.encode_members([record_of(member)]))

    def announce(self, record: MemberRecord, now: float, *, urgent: bool = False) -> None:
        """Originate a STATUS broadcast; it floods like any message. Our own record
        (a refutation, our leaving), failure news (SUSPECT, DOWN, LEFT) and ``urgent``
        UPs (a refutation we flood on: accusers are timing out) go at once, as detection
        time is what they are judged by; a newcomer's UP may wait up to STATUS_COALESCE_S
        to share datagrams with others (joins come in storms; a later record about the
        same member replaces the held one: it is newer)."""
        if urgent or record.state != MemberState.UP:
            self._held.pop(record.node_id, None)  # this one is newer
        elif record.node_id != self.node_id:
            if self._held or now - self._last_announce < STATUS_COALESCE_S:
                self._held[record.node_id] = record
                if self._announce_due is None:
                    self._announce_due = max(now, self._last_announce + STATUS_COALESCE_S)
                self.stats.bump("status_coalesced")
                return
            self._last_announce = now
        self._originate(record)

    def next_timer(self) -> float | None:
        return self._announce_due

    def handle_timer(self, now: float) -> None:
        if self._announce_due is None or now < self._announce_due:
            return
        held, self._held = self._held, {}
        self._announce_due = None
        self._last_announce = now
        for record in held.values():
            self._originate(record)

    def _originate(self, record: MemberRecord) -> None:
        body = record.encode()
        msg_id = self._random_bytes(wire.MESSAGE_ID_BYTES)
        self.flood.originate(msg_id, wire.EntryKind.STATUS, body)
        self.stats.bump("status_announced")

    def handshake_failed(self, addr: tuple[str, int], now: float) -> None:
        self.stats.bump("handshakes_failed")
        providers = self.subscriptions.providers
        for member in self.members.up_members():
            if (member.host, member.port) == addr and member.node_id in providers:
                # It was chosen as a provider and never answered a whole handshake
                # timeout of retries: choose another, and suspect it (refutable) rather
                # than accuse it outright.
                del providers[member.node_id]
                self.subscriptions.lost_provider(now)
                self.suspect(member.node_id, now)

    def on_handshake(
        self, peer_id: bytes, incarnation: int, addr: tuple[str, int], zone: str | None, now: float
    ) -> None:
        """A handshake completed: the peer is UP at the address it came from."""
        record = MemberRecord(
            node_id=peer_id,
            incarnation=incarnation,
            state=MemberState.UP,
            host=addr[0],
            port=addr[1],
            zone=zone,
        )
        self.apply(record, now, announce=True, direct=True)

    def on_peers(self, peer_id: bytes, body: bytes, now: float) -> bool:
        """A PEERS frame: apply its records; did the UP view (the digests) change?"""
        digests = self.members.digests[:]
        for record in wire.decode_members(body):
            self.apply(record, now, announce=False, source=peer_id)
        return digests != self.members.digests

    def learn(self, records: list[MemberRecord]) -> int:
        """Seed the table silently: no events, no announcements, no reselection."""
        apply = self.members.apply
        own = self.node_id
        return sum(
            1 for record in records if record.node_id != own and apply(record) is not Change.NONE
        )
