"""Who is in the cluster, and which news about a member wins.

Every status carries the member's incarnation, a counter only the member itself
raises. The rules (SWIM's) make the outcome independent of arrival order:

- a newer incarnation always wins. "Newer" is serial-number order (RFC 1982) on the
  32-bit wire field, so the counter wraps: a forged DOWN at 0xFFFFFFFF is refuted
  with 0, and no incarnation is one a member cannot get past;
- at equal incarnation SUSPECT beats UP, DOWN beats both (suspicion sticks until
  refuted), and LEFT (the member's own goodbye) beats all;
- a node that hears itself declared DOWN at its current incarnation refutes by
  announcing UP with incarnation + 1, which beats that DOWN everywhere.

So an old DOWN can never override a newer UP (item 14 of docs/PROTOCOL.md §3.8).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib

from gwyh_mp.protocol.events import Member
from gwyh_mp.protocol.wire import ALIVE_STATES, MemberRecord, MemberState, Tags, encode_metadata


class Change(enum.Enum):
    NONE = "none"  # stale or identical news
    JOINED = "joined"  # a member we did not know, UP
    UP = "up"  # known member went DOWN -> UP
    SUSPECT = "suspect"  # UP -> SUSPECT (a probe failed somewhere)
    ALIVE = "alive"  # SUSPECT -> UP (it refuted)
    DOWN = "down"  # UP or SUSPECT -> DOWN
    LEFT = "left"  # UP or DOWN -> LEFT (it announced a graceful leave)
    REFRESHED = "refreshed"  # same state, newer incarnation or address
    UPDATED = "updated"  # same state and incarnation, new name or tags


# Anti-entropy digests: the member table is split into DIGEST_BUCKETS buckets by a hash
# of the node id, and each bucket keeps the sum (mod 2**64) of a hash of every UP
# member's (id, incarnation). Two nodes that agree on who is UP have equal digests; a
# peer-list exchange then only carries the buckets that differ (O(changes), not
# O(members)). A member's name and tags count too (only when it has some, so a cluster
# without them has the digests it always had). DOWN and LEFT members are left out: which
# DOWNs a node remembers depends on when it joined and what it trimmed, and that must
# not keep two views "different" for ever. A missed DOWN still shows: the lagging node
# counts the member as UP, the other does not.
DIGEST_BUCKETS = 64
_MASK64 = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15  # odd: multiplication by it is a bijection mod 2**64


@functools.lru_cache(maxsize=1 << 15)
def id_hash(node_id: bytes) -> int:
    """A well-spread 64-bit hash of a node id, the same in every process (unlike hash()).
    Cached: every node of a simulated cluster hashes the same ids."""
    x = int.from_bytes(node_id[:8], "big") ^ (int.from_bytes(node_id[8:16], "big") * _MIX)
    x &= _MASK64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    return x ^ (x >> 29)


@functools.lru_cache(maxsize=1 << 12)
def metadata_hash(name: str, tags: Tags) -> int:
    """0 without metadata; else a 64-bit hash of the name and tags, for the digests."""
    if not name and not tags:
        return 0
    block = encode_metadata(name, tuple(sorted(tags)))
    return int.from_bytes(hashlib.blake2b(block, digest_size=8).digest(), "big")


def digest_term(idh: int, incarnation: int, state: MemberState, meta: int = 0) -> int:
    """One member's contribution to its bucket's digest."""
    x = (idh + (incarnation << 1 | (state == MemberState.DOWN)) * _MIX + meta) & _MASK64
    x ^= x >> 32
    return (x * 0xD6E8FEB86659FD93) & _MASK64


def bucket_of(idh: int) -> int:
    return idh >> 58  # top 6 bits: 64 buckets


def _add_term(
    digests: list[int], node_id: bytes, incarnation: int, sign: int, meta: int = 0
) -> None:
    """Add (sign 1) or remove (sign -1) an UP member's term in its bucket's digest."""
    idh = id_hash(node_id)
    bucket = bucket_of(idh)
    digests[bucket] = (
        digests[bucket] + sign * digest_term(idh, incarnation, MemberState.UP, meta)
    ) & _MASK64


def record_of(member: Member, state: MemberState | None = None) -> MemberRecord:
    """A member as the wire record that announces it (in ``state``, if given)."""
    return MemberRecord(
        node_id=member.node_id,
        incarnation=member.incarnation,
        state=member.state if state is None else state,
        host=member.host,
        port=member.port,
        zone=member.zone,
        name=member.name,
        tags=member.tags,
    )


INCARNATION_MODULUS = 1 << 32  # the wire field is 32 bits
_HALF = INCARNATION_MODULUS // 2


def newer_incarnation(a: int, b: int) -> bool:
    """Is incarnation ``a`` newer than ``b``? Serial-number arithmetic: ``a`` is newer
    when it is at most 2**31 - 1 steps ahead of ``b``, counting around the wrap. Two
    values exactly 2**31 apart are unordered: neither replaces the other."""
    return a != b and (a - b) % INCARNATION_MODULUS < _HALF


def next_incarnation(incarnation: int) -> int:
    return (incarnation + 1) % INCARNATION_MODULUS


# At equal incarnation: UP < SUSPECT < DOWN < LEFT.
_RANK = {MemberState.UP: 0, MemberState.SUSPECT: 1, MemberState.DOWN: 2, MemberState.LEFT: 3}


def supersedes(new_state: MemberState, new_inc: int, old_state: MemberState, old_inc: int) -> bool:
    if new_inc != old_inc:
        return newer_incarnation(new_inc, old_inc)
    return _RANK[new_state] > _RANK[old_state]


class MemberTable:
    """All members except ourselves. Bounded: DOWN and LEFT members beyond ``max_down``
    are forgotten oldest first, so churn cannot grow memory without limit; members not yet
    known are refused once ``max_up`` entries are neither DOWN nor LEFT (``full``).

    Counts are kept incrementally, so nothing that runs per membership change scans the
    whole table: ``up_count``, ``up_zones`` (UP members per zone) and the per-bucket
    ``digests`` used by anti-entropy. No per-member index beyond the one dict: a
    10,000-node simulation holds 10^8 members in one process."""

    def __init__(self, max_down: int = 10_000, max_up: int | None = None) -> None:
        self.members: dict[bytes, Member] = {}
        self._down_order: dict[bytes, None] = {}
        self.max_down = max_down
        # Members that may join the table (Config.max_members): beyond it, news of a
        # member we do not know is refused, so an insider cannot grow it without limit.
        self.max_up = max_up
        self.up_count = 0
        self.up_zones: dict[str | None, int] = {}
        self.digests: list[int] = [0] * DIGEST_BUCKETS

    def get(self, node_id: bytes) -> Member | None:
        return self.members.get(node_id)

    def __len__(self) -> int:
        return len(self.members)

    def up_members(self) -> list[Member]:
        """Members alive as far as we know: UP or SUSPECT."""
        return [m for m in self.members.values() if m.state in ALIVE_STATES]

    def bucket_members(self, buckets: set[int]) -> list[Member]:
        """Every member (UP and DOWN) whose digest bucket is in ``buckets``."""
        return [m for m in self.members.values() if bucket_of(id_hash(m.node_id)) in buckets]

    def bucket_members_by_bucket(self, buckets: set[int]) -> dict[int, list[Member]]:
        """Every member (UP and DOWN) whose digest bucket is in ``buckets``, by bucket."""
        out: dict[int, list[Member]] = {}
        for m in self.members.values():
            bucket = bucket_of(id_hash(m.node_id))
            if bucket in buckets:
                out.setdefault(bucket, []).append(m)
        return out

    def apply(self, record: MemberRecord, *, keep_address: bool = False) -> Change:
        """Merge news about a member. ``keep_address``: we hold a live session with it,
        and the address that session uses is better than hearsay."""
        current = self.members.get(record.node_id)
        has_metadata = record.has_metadata
        if current is None:
            if record.state != MemberState.UP:
                return Change.NONE  # nothing to forget; do not grow the table
            if self.full:
                return Change.NONE
            self.members[record.node_id] = Member(
                node_id=record.node_id,
                host=record.host,
                port=record.port,
                zone=record.zone,
                state=record.state,
                incarnation=record.incarnation,
                name=record.name,
                tags=record.tags,
            )
            self.up_count += 1
            self.up_zones[record.zone] = self.up_zones.get(record.zone, 0) + 1
            self._digest_add(record.node_id, record.incarnation, 1, _meta(record))
            return Change.JOINED
        if not supersedes(record.state, record.incarnation, current.state, current.incarnation):
            if (
                has_metadata
                and record.state == current.state
                and record.incarnation == current.incarnation
                and (record.name, record.tags) != (current.name, current.tags)
            ):
                return self._set_metadata(current, record)
            return Change.NONE
        old_state = current.state
        was_alive = old_state in ALIVE_STATES
        alive = record.state in ALIVE_STATES
        # Handshakes carry no metadata: a record without any keeps what we knew.
        name, tags = (record.name, record.tags) if has_metadata else (current.name, current.tags)
        if was_alive:
            self._digest_add(record.node_id, current.incarnation, -1, _meta(current))
            self._left_up(current.zone)
        if alive:
            self._digest_add(record.node_id, record.incarnation, 1, metadata_hash(name, tags))
        # Members are immutable snapshots (the same objects events and member_list()
        # hand out): news replaces the entry, in place in the dict's order.
        self.members[record.node_id] = Member(
            node_id=record.node_id,
            host=current.host if keep_address else record.host,
            port=current.port if keep_address else record.port,
            zone=record.zone,
            state=record.state,
            incarnation=record.incarnation,
            name=name,
            tags=tags,
        )
        if not alive:
            self._down_order[record.node_id] = None
            self._trim_down()
        else:
            self.up_count += 1
            self.up_zones[record.zone] = self.up_zones.get(record.zone, 0) + 1
            self._down_order.pop(record.node_id, None)
        if old_state == record.state:
            return Change.REFRESHED
        if record.state == MemberState.UP and old_state == MemberState.SUSPECT:
            return Change.ALIVE
        if record.state == MemberState.SUSPECT and not was_alive:
            return Change.UP  # back from DOWN or LEFT, suspected meanwhile
        return {
            MemberState.SUSPECT: Change.SUSPECT,
            MemberState.UP: Change.UP,
            MemberState.DOWN: Change.DOWN,
            MemberState.LEFT: Change.LEFT,
        }[record.state]

    def _set_metadata(self, current: Member, record: MemberRecord) -> Change:
        """Same state and incarnation, but the record says who the member is (its name
        and tags), which a handshake-learned entry does not know."""
        if current.state in ALIVE_STATES:
            self._digest_add(current.node_id, current.incarnation, -1, _meta(current))
            self._digest_add(current.node_id, current.incarnation, 1, _meta(record))
        self.members[current.node_id] = dataclasses.replace(
            current, name=record.name, tags=record.tags
        )
        return Change.UPDATED

    @property
    def full(self) -> bool:
        """No room for a member we do not know yet (entries not DOWN >= max_up)."""
        max_up = self.max_up
        return max_up is not None and len(self.members) - len(self._down_order) >= max_up

    def forget(self, node_id: bytes) -> None:
        """Drop a member outright (to make room for one we hold a session with)."""
        member = self.members.pop(node_id, None)
        if member is None:
            return
        if member.state in ALIVE_STATES:
            self._digest_add(node_id, member.incarnation, -1, _meta(member))
            self._left_up(member.zone)
        self._down_order.pop(node_id, None)

    def digests_with(self, node_id: bytes, incarnation: int, meta: int = 0) -> list[int]:
        """The bucket digests as if ``node_id`` were also UP at ``incarnation`` with
        metadata hash ``meta`` (a node adds itself this way: its table holds everyone
        but itself)."""
        digests = list(self.digests)
        _add_term(digests, node_id, incarnation, 1, meta)
        return digests

    def _digest_add(self, node_id: bytes, incarnation: int, sign: int, meta: int = 0) -> None:
        _add_term(self.digests, node_id, incarnation, sign, meta)

    def _left_up(self, zone: str | None) -> None:
        self.up_count -= 1
        left = self.up_zones[zone] - 1
        if left:
            self.up_zones[zone] = left
        else:
            del self.up_zones[zone]

    def _trim_down(self) -> None:
        while len(self._down_order) > self.max_down:
            oldest = next(iter(self._down_order))
            del self._down_order[oldest]
            self.members.pop(oldest, None)  # DOWN or LEFT: not in any digest


def _meta(member: Member | MemberRecord) -> int:
    return metadata_hash(member.name, member.tags)
