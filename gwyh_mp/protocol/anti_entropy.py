"""Anti-entropy: the slow peer-list sync that repairs what a lost STATUS flood missed.

Why it exists: membership news floods like any broadcast, and a flood can miss a node.
Now and then a node asks one provider for its peer list, sending per-bucket digests of
its own view; the answer carries only the buckets where the two views differ (every
member of them, UP and DOWN, so a missed DOWN or refutation is repaired too).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.membership import DIGEST_BUCKETS, MemberTable, metadata_hash, record_of
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState

_DIGESTS = struct.Struct(f"!{DIGEST_BUCKETS}Q")  # PEERS_REQUEST body: bucket digests
_COUNT = struct.Struct("!H")


class AntiEntropy:
    def __init__(
        self,
        node_id: bytes,
        members: MemberTable,
        interval_s: float,
        max_datagram_bytes: int,
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
        self._rng = rng  # the node's: one stream of draws keeps a simulation reproducible
        self.stats = stats
        self._incarnation = incarnation
        self._self_record = self_record
        self._queue_control = queue_control
        self.next_sync = now + interval_s

    def sync_due(self, now: float) -> bool:
        return now >= self.next_sync

    def sync(self, now: float, providers: dict[bytes, object]) -> None:
        """Pull from one provider at random (checked on the heartbeat tick)."""
        self.next_sync = now + self.interval_s
        provider_id = self._rng.choice(sorted(providers))
        self.request_peers(provider_id)

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
        self._queue_control(peer_id, FrameType.PEERS_REQUEST, body)

    def send_peer_list(self, peer_id: bytes, request: bytes = b"") -> None:
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
            ours = self.member_digests()
            differ = {b for b in range(DIGEST_BUCKETS) if theirs[b] != ours[b]}
            members = self.members.bucket_members(differ) if differ else []
            self.stats.bump("peer_syncs_answered")
        encoded.extend(record_of(m).encode() for m in members if m.node_id != peer_id)
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

    def _queue_peers(self, peer_id: bytes, encoded: list[bytes]) -> None:
        body = _COUNT.pack(len(encoded)) + b"".join(encoded)
        self._queue_control(peer_id, FrameType.PEERS, body)
