"""Anti-entropy: the slow peer-list sync that repairs what a lost STATUS flood missed.

Why it exists: membership news floods like any broadcast, and a flood can miss a node.
Now and then a node asks one provider for its peer list, sending per-bucket digests of
its own view; the answer carries only the buckets where the two views differ (every
member of them, UP and DOWN, so a missed DOWN or refutation is repaired too).

Answers are bounded (docs/PROTOCOL.md §8.6): at most Config.peer_list_max_records
records (a page; successive answers start where the last one stopped, so views larger
than a page converge over rounds), one answer per peer per PEER_LIST_MIN_INTERVAL_S, and
only to the address the peer's session was handshaken from, never to one it roamed to.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Collection

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import Member
from gwyh_mp.protocol.membership import DIGEST_BUCKETS, MemberTable, metadata_hash, record_of
from gwyh_mp.protocol.peers import PeerLink
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState

_DIGESTS = struct.Struct(f"!{DIGEST_BUCKETS}Q")  # PEERS_REQUEST body: bucket digests
_COUNT = struct.Struct("!H")
# One answered peer-list request per peer per this long: a request costs a table scan
# and up to a page of records, so an insider asking in a loop gets one page at a time.
PEER_LIST_MIN_INTERVAL_S = 0.5


class AntiEntropy:
    def __init__(
        self,
        node_id: bytes,
        members: MemberTable,
        interval_s: float,
        max_datagram_bytes: int,
        max_records: int,
        rng: random.Random,
        stats: Stats,
        now: float,
        *,
        incarnation: Callable[[], int],
        self_record: Callable[[MemberState], MemberRecord],
        queue_control: Callable[..., None],
    ) -> None:
        self.node_id = node_id
        self.members = members
        self.interval_s = interval_s
        self._max_datagram_bytes = max_datagram_bytes
        self._max_records = max_records
        self._next_page = 0  # where the next answer starts: a bucket, or an UP index
        # The peer last asked: while its answers change our view, there may be more
        # pages, so the next is asked for on the next tick (see on_records).
        self._pulling: bytes | None = None
        self._follow_up: bytes | None = None
        self._rng = rng  # the node's: one stream of draws keeps a simulation reproducible
        self.stats = stats
        self._incarnation = incarnation
        self._self_record = self_record
        self._queue_control = queue_control
        self.next_sync = now + interval_s

    def sync_due(self, now: float) -> bool:
        return now >= self.next_sync

    def sync(
        self, now: float, providers: Collection[bytes], in_session: Callable[[bytes], bool]
    ) -> None:
        """Pull from one confirmed provider at random (checked on the heartbeat tick),
        or go on paging from the peer we were paging from while we still have a session
        with it, provider or not: re-selection must not cut a newcomer's paging short,
        and a request to a provider still handshaking (perhaps a member that no longer
        exists) would end it unanswered for a whole ``interval_s``."""
        follow_up, self._follow_up = self._follow_up, None
        if follow_up is not None and in_session(follow_up):
            self.next_sync = now + self.interval_s
            self.request_peers(follow_up)
            return
        if providers:
            self.next_sync = now + self.interval_s
            self.request_peers(self._rng.choice(sorted(providers)))

    def on_records(self, peer_id: bytes, changed_view: bool, now: float) -> None:
        """A PEERS frame came from ``peer_id``. If it answers our request and changed
        who we count UP, the next page is asked for on the first heartbeat tick past
        the peer's answer interval, not a whole ``peer_sync_interval_s`` later; an
        answer that changes nothing (views agree, or our table is full) ends that."""
        if peer_id != self._pulling or not changed_view:
            return
        self._pulling = None
        self._follow_up = peer_id
        # Past the peer's answer interval, or the follow-up would be dropped there.
        self.next_sync = min(self.next_sync, now + 2 * PEER_LIST_MIN_INTERVAL_S)

    def member_digests(self) -> list[int]:
        """Per-bucket digests of our view of the whole cluster, ourselves included (so
        two nodes that agree have equal digests)."""
        own = self._self_record(MemberState.UP)
        meta = metadata_hash(own.name, own.tags)
        return self.members.digests_with(self.node_id, self._incarnation(), meta)

    def request_peers(self, peer_id: bytes) -> None:
        """Anti-entropy pull: our bucket digests go along, so the answer carries only
        the buckets where our views differ."""
        body = _DIGESTS.pack(*self.member_digests())
        self._pulling = peer_id
        self._queue_control(peer_id, FrameType.PEERS_REQUEST, body)

    def answer(self, peer_id: bytes, request: bytes, link: PeerLink, now: float) -> None:
        """A PEERS_REQUEST arrived: answer it unless the rate or the address forbids."""
        session = link.session
        if session is None or session.addr != session.verified_addr:
            # The session roamed to an address that never completed a handshake: a
            # spoofed source could point the answer at a third party (§8.6).
            self.stats.bump("peer_list_unverified_address")
            return
        if now - link.last_peer_list < PEER_LIST_MIN_INTERVAL_S:
            self.stats.bump("peer_list_rate_limited")
            return
        link.last_peer_list = now
        self.send_peer_list(peer_id, request)

    def send_peer_list(self, peer_id: bytes, request: bytes = b"") -> None:
        # Empty request: UP members (a newcomer's or an older peer's request). With
        # digests: every member, UP and DOWN, of each bucket that differs, so a missed
        # DOWN or refutation is repaired too; nothing but our own record if none does.
        # Either way one page at most (see the module doc).
        encoded = [self._self_record(MemberState.UP).encode()]
        page = self._max_records - 1
        if not request:
            members = self._up_page(page)
        else:
            if len(request) != _DIGESTS.size:
                raise wire.WireError("bad peers request")
            theirs = _DIGESTS.unpack(request)
            ours = self.member_digests()
            differ = [b for b in range(DIGEST_BUCKETS) if theirs[b] != ours[b]]
            members = self._bucket_page(differ, page) if differ else []
            self.stats.bump("peer_syncs_answered")
        # A SUSPECT goes out as UP: suspicion travels in STATUS floods only, so a peer
        # list never carries a state an older node cannot decode.
        encoded.extend(
            record_of(m, MemberState.UP if m.state == MemberState.SUSPECT else None).encode()
            for m in members
            if m.node_id != peer_id
        )
        self.stats.bump("peer_records_sent", len(encoded))
        budget = min(wire.MAX_FRAME_BODY, self._max_datagram_bytes - wire.CONTROL_OVERHEAD - 16)
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

    def _up_page(self, size: int) -> list[Member]:
        up = self.members.up_members()
        if len(up) <= size:
            return up
        start = self._next_page % len(up)
        self._next_page = start + size
        return (up[start:] + up[:start])[:size]

    def _bucket_page(self, differ: list[int], size: int) -> list[Member]:
        """Whole differing buckets, from the one after the last page's, while they fit
        (at least one, truncated if it alone is larger than a page)."""
        start = self._next_page % DIGEST_BUCKETS
        ordered = sorted(differ, key=lambda b: (b - start) % DIGEST_BUCKETS)
        by_bucket = self.members.bucket_members_by_bucket(set(ordered))
        page: list[Member] = []
        for bucket in ordered:
            members = by_bucket.get(bucket, [])
            if page and len(page) + len(members) > size:
                break
            page.extend(members[: size - len(page)])
            self._next_page = bucket + 1
            if len(page) >= size:
                break
        return page

    def _queue_peers(self, peer_id: bytes, encoded: list[bytes]) -> None:
        body = _COUNT.pack(len(encoded)) + b"".join(encoded)
        self._queue_control(peer_id, FrameType.PEERS, body)
