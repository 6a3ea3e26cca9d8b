"""Large-message framing: split, reassembly, and the fragments kept for NAK answers.

A broadcast larger than one datagram travels as ``count`` fragments. Every
fragment carries (msg_id, index, count, total_len); all fragments except the last
have the same size ``F`` and the last one holds the remaining
``total_len - (count - 1) * F`` bytes (1..F). ``F`` is not in the header: any single
fragment determines it (a non-last one by its length, the last one because
``(total_len - len(last)) / (count - 1)`` must be an integer >= len(last)), so every
fragment can be validated on arrival whatever the arrival order. The empty message
is one empty fragment (count 1, total_len 0).

Reliability is NAK-only: the receiver reports missing indexes of messages that have
stalled and the sender (or any hop still holding the fragments) retransmits them.

The send window and the NAK traffic are large_messages.py's. Sans-IO: no sockets, no
clocks. Time comes in as ``now`` (seconds, monotonic) and every method is
deterministic. Encryption and the wire header live elsewhere.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

U32_MAX: Final = 0xFFFF_FFFF
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
# Bounds one NAK report and, on the sender side, the retransmissions one NAK can trigger
# (so a forged NAK cannot ask for a whole 16 MiB message at once).
MAX_NAK_INDEXES: Final = 256
MAX_MSG_ID_BYTES: Final = 64
# Approximate CPython bookkeeping cost of one in-progress message (object, dict slots),
# charged to the budget so that many tiny partial messages cannot dodge the memory bound.
MESSAGE_OVERHEAD_BYTES: Final = 512
# Smallest regular (non-last) fragment accepted. The node's own fragments are never
# smaller than 474 bytes (576-byte datagrams, the configured minimum, less headers), so
# honest traffic always passes; the floor caps ``count`` at ``total_len / 256 + 1`` and so
# the per-fragment work a header can demand (issue 11 item 2: 1-byte fragments).
DEFAULT_MIN_FRAGMENT_BYTES: Final = 256

Fragment = bytes | bytearray | memoryview

# Rejection reasons (also the suffix of the ``rejected:<reason>`` stats keys).
REJECT_BAD_HEADER: Final = "bad_header"
REJECT_INDEX_OUT_OF_RANGE: Final = "index_out_of_range"
REJECT_TOO_LARGE: Final = "too_large"
REJECT_INCONSISTENT: Final = "inconsistent"
REJECT_BAD_FRAGMENT_SIZE: Final = "bad_fragment_size"
REJECT_OVER_BUDGET: Final = "over_budget"


@dataclass(frozen=True, slots=True)
class FragmentHeader:
    """The framing fields of one fragment; the wire encoding lives elsewhere."""

    INDEX_MAX: ClassVar[int] = U32_MAX - 1  # index < count <= COUNT_MAX
    COUNT_MAX: ClassVar[int] = U32_MAX
    TOTAL_LEN_MAX: ClassVar[int] = U32_MAX

    msg_id: bytes
    index: int
    count: int
    total_len: int

    def error(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> str | None:
        """Rejection reason for a header that no valid message can have, else None."""
        return _header_error(self.msg_id, self.index, self.count, self.total_len, max_message_bytes)


def _header_error(
    msg_id: bytes, index: int, count: int, total_len: int, max_message_bytes: int
) -> str | None:
    if not 1 <= len(msg_id) <= MAX_MSG_ID_BYTES:
        return REJECT_BAD_HEADER
    if not 1 <= count <= FragmentHeader.COUNT_MAX:
        return REJECT_BAD_HEADER
    if not 0 <= total_len <= FragmentHeader.TOTAL_LEN_MAX:
        return REJECT_BAD_HEADER
    if not 0 <= index < count:
        return REJECT_INDEX_OUT_OF_RANGE
    if total_len > max_message_bytes:
        return REJECT_TOO_LARGE
    if count > max(total_len, 1):  # every fragment of a non-empty message has >= 1 byte
        return REJECT_BAD_HEADER
    return None


def split_message(data: Fragment, fragment_size: int) -> list[memoryview]:
    """Zero-copy split into fragments of ``fragment_size`` bytes (the last may be shorter).

    The empty message is a single empty fragment so that it still travels (and
    completes) like any other. The views pin ``data``: do not mutate it while they live.
    """
    if fragment_size < 1:
        raise ValueError(f"fragment_size must be >= 1, got {fragment_size}")
    view = memoryview(data).cast("B")
    total_len = view.nbytes
    if total_len > FragmentHeader.TOTAL_LEN_MAX:
        raise ValueError(f"message of {total_len} bytes does not fit a u32 total length")
    count = max(1, -(-total_len // fragment_size))
    if count > FragmentHeader.COUNT_MAX:  # unreachable while total_len fits a u32; kept as a guard
        raise ValueError(f"{count} fragments do not fit a u32 count")
    return [view[off : off + fragment_size] for off in range(0, max(total_len, 1), fragment_size)]


def _infer_fragment_size(index: int, count: int, total_len: int, size: int) -> int | None:
    """The message's regular fragment size implied by one fragment, or None if impossible."""
    if count == 1:
        return size if size == total_len else None
    if index < count - 1:
        if size >= 1 and (count - 1) * size < total_len <= count * size:
            return size
        return None
    rest = total_len - size
    if size >= 1 and rest > 0 and rest % (count - 1) == 0 and rest // (count - 1) >= size:
        return rest // (count - 1)
    return None


class AddKind(enum.Enum):
    NEW_FRAGMENT = "new_fragment"  # first sighting: the caller may cut-through forward it
    DUPLICATE = "duplicate"
    COMPLETE = "complete"  # also a first sighting of the completing fragment
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class AddResult:
    kind: AddKind
    # COMPLETE only: the whole message (joined once; the caller keeps it as is).
    data: bytes | bytearray | None = None
    # REJECTED only: one of the REJECT_* constants.
    reason: str | None = None

    @property
    def is_new(self) -> bool:
        """True when the fragment was seen for the first time (forward it downstream)."""
        return self.kind is AddKind.NEW_FRAGMENT or self.kind is AddKind.COMPLETE


_NEW: Final = AddResult(AddKind.NEW_FRAGMENT)
_DUPLICATE: Final = AddResult(AddKind.DUPLICATE)
_REJECTED: Final = {
    reason: AddResult(AddKind.REJECTED, reason=reason)
    for reason in (
        REJECT_BAD_HEADER,
        REJECT_INDEX_OUT_OF_RANGE,
        REJECT_TOO_LARGE,
        REJECT_INCONSISTENT,
        REJECT_BAD_FRAGMENT_SIZE,
        REJECT_OVER_BUDGET,
    )
}


def _clean_indexes(indexes: Iterable[int], count: int) -> list[int]:
    """In-range, de-duplicated indexes, at most MAX_NAK_INDEXES of them (anti-amplification)."""
    seen: set[int] = set()
    out: list[int] = []
    for i in indexes:
        if 0 <= i < count and i not in seen:
            seen.add(i)
            out.append(i)
            if len(out) >= MAX_NAK_INDEXES:
                break
    return out


class _Partial:
    """One message being reassembled.

    Fragments are kept as received (index -> bytes) and joined on completion, so what a
    message holds grows with the bytes that arrived, never with what its header claims.
    """

    __slots__ = (
        "cost_bytes",
        "count",
        "first_missing",
        "frag_size",
        "held_bytes",
        "last_peer",
        "last_progress",
        "msg_id",
        "nak_base",
        "owner",
        "parts",
        "total_len",
    )

    def __init__(
        self,
        owner: Hashable,
        msg_id: bytes,
        count: int,
        total_len: int,
        frag_size: int,
        cost_bytes: int,
        now: float,
    ) -> None:
        self.owner = owner  # the peer whose budget pays for this message
        self.msg_id = msg_id
        self.count = count
        self.total_len = total_len
        self.frag_size = frag_size
        self.cost_bytes = cost_bytes
        self.parts: dict[int, bytes] = {}
        self.held_bytes = 0  # fragment bytes in parts
        self.first_missing = 0
        self.last_progress = now
        self.nak_base = now  # max(last progress, last NAK): next NAK is due nak_delay_s later
        self.last_peer = owner  # where NAKs go: the most recent peer that delivered data

    def missing(self, limit: int) -> list[int]:
        # Steps over at most len(parts) received indexes: work bounded by what arrived.
        out: list[int] = []
        parts = self.parts
        for pos in range(self.first_missing, self.count):
            if pos not in parts:
                out.append(pos)
                if len(out) >= limit:
                    break
        return out

    def store(self, index: int, data: Fragment) -> None:
        self.parts[index] = bytes(data)
        self.held_bytes += len(data)
        if index == self.first_missing:
            pos = index + 1
            while pos in self.parts:
                pos += 1
            self.first_missing = pos

    def joined(self) -> bytes:
        parts = self.parts
        return b"".join([parts[i] for i in range(self.count)])


class Reassembler:
    """Reassembles fragmented messages under hard memory bounds.

    State is keyed by msg_id alone, not (peer, msg_id): in gossip the same message
    arrives from several neighbours at once, and merging them means each fragment is
    NEW (forwarded) exactly once and the message COMPLETEs exactly once. The peer
    that first introduced a message owns it and its budget pays for the buffer.

    Memory: a message's first fragment books ``total_len + count + MESSAGE_OVERHEAD_BYTES``
    against the budgets (what completing it would need), but only the fragments that
    arrive are stored, so memory and work follow the bytes received, not the header's
    claim. Regular fragments under min_fragment_bytes are rejected, which bounds ``count``
    for any claimed length and the per-fragment bookkeeping (~100 B of CPython objects,
    not charged) to under 40 % of the bytes held. Over the per-peer
    budget, the owner loses its own least recently progressed message; over the total
    budget, the heaviest peer does (the requester counts with its new reservation and
    wins ties), so a flooder, capped by its per-peer budget, can only push out peers
    that hold even more. Size max_bytes_per_peer >= max_message_bytes plus overhead
    or the largest messages are always rejected.
    """

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        # Two max-size messages in flight from one peer fit the default.
        max_bytes_per_peer: int = 2 * DEFAULT_MAX_MESSAGE_BYTES + 64 * 1024,
        max_total_bytes: int = 8 * DEFAULT_MAX_MESSAGE_BYTES,
        incomplete_timeout_s: float = 30.0,
        nak_delay_s: float = 0.2,
        max_completed_ids: int = 16_384,
        min_fragment_bytes: int = DEFAULT_MIN_FRAGMENT_BYTES,
    ) -> None:
        if not 0 <= max_message_bytes <= FragmentHeader.TOTAL_LEN_MAX:
            raise ValueError("max_message_bytes must fit a u32")
        if not 0 < max_bytes_per_peer <= max_total_bytes:
            raise ValueError("need 0 < max_bytes_per_peer <= max_total_bytes")
        if incomplete_timeout_s <= 0 or nak_delay_s <= 0 or max_completed_ids < 1:
            raise ValueError("timeouts and max_completed_ids must be positive")
        if min_fragment_bytes < 1:
            raise ValueError("min_fragment_bytes must be >= 1")
        self.min_fragment_bytes = min_fragment_bytes
        self.max_message_bytes = max_message_bytes
        self.max_bytes_per_peer = max_bytes_per_peer
        self.max_total_bytes = max_total_bytes
        self.incomplete_timeout_s = incomplete_timeout_s
        self.nak_delay_s = nak_delay_s
        self.max_completed_ids = max_completed_ids
        # Counters: new_fragments, duplicates, late_duplicates, completed, expired,
        # naks, evicted:peer_budget, evicted:total_budget, rejected:<reason>.
        self.stats: Counter[str] = Counter()
        self._partials: OrderedDict[bytes, _Partial] = OrderedDict()  # by last progress
        self._nak_order: OrderedDict[bytes, _Partial] = OrderedDict()  # by nak_base
        self._peer_msgs: dict[Hashable, OrderedDict[bytes, _Partial]] = {}  # by last progress
        self._peer_bytes: dict[Hashable, int] = {}
        self._total_bytes = 0
        # Recently completed ids, FIFO-bounded: late duplicates must not re-grow state.
        self._completed: OrderedDict[bytes, None] = OrderedDict()

    # -- introspection -------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes currently reserved by incomplete messages (<= max_total_bytes)."""
        return self._total_bytes

    @property
    def held_bytes(self) -> int:
        """Fragment bytes actually stored (<= bytes received; O(messages) to compute)."""
        return sum(m.held_bytes for m in self._partials.values())

    def peer_bytes(self, peer: Hashable) -> int:
        return self._peer_bytes.get(peer, 0)

    def __len__(self) -> int:
        """Number of incomplete messages held."""
        return len(self._partials)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._partials

    def is_completed(self, msg_id: bytes) -> bool:
        return msg_id in self._completed

    # -- receive path --------------------------------------------------------------

    def add(
        self,
        peer: Hashable,
        msg_id: bytes,
        index: int,
        count: int,
        total_len: int,
        data: Fragment,
        now: float,
    ) -> AddResult:
        """Feed one fragment received from ``peer``; see AddKind for the outcomes."""
        size = len(data)
        m = self._partials.get(msg_id)
        if m is not None and count == m.count and total_len == m.total_len:
            # Per fragment of a message in progress (the hot path): the shape was checked
            # when its first fragment was admitted, so only the index is left to check.
            if not 0 <= index < count:
                return self._reject(REJECT_INDEX_OUT_OF_RANGE)
        else:
            reason = _header_error(msg_id, index, count, total_len, self.max_message_bytes)
            if reason is not None:
                return self._reject(reason)
        if m is None and msg_id in self._completed:
            self.stats["late_duplicates"] += 1
            return _DUPLICATE
        if m is None:
            frag_size = _infer_fragment_size(index, count, total_len, size)
            if frag_size is None or (count > 1 and frag_size < self.min_fragment_bytes):
                return self._reject(REJECT_BAD_FRAGMENT_SIZE)
            if count == 1:  # nothing to buffer
                self._mark_completed(msg_id)
                return AddResult(AddKind.COMPLETE, data=bytes(data))
            m = self._admit(peer, msg_id, count, total_len, frag_size, now)
            if m is None:
                return self._reject(REJECT_OVER_BUDGET)
        else:
            if count != m.count or total_len != m.total_len:
                return self._reject(REJECT_INCONSISTENT)
            expected = m.frag_size if index < count - 1 else total_len - (count - 1) * m.frag_size
            if size != expected:
                return self._reject(REJECT_BAD_FRAGMENT_SIZE)
            if index in m.parts:
                self.stats["duplicates"] += 1
                return _DUPLICATE

        m.store(index, data)
        if len(m.parts) == m.count:
            self._drop(m)
            self._mark_completed(msg_id)
            return AddResult(AddKind.COMPLETE, data=m.joined())

        self.stats["new_fragments"] += 1
        m.last_progress = now
        m.nak_base = max(m.nak_base, now)
        m.last_peer = peer
        self._partials.move_to_end(msg_id)
        self._nak_order.move_to_end(msg_id)
        self._peer_msgs[m.owner].move_to_end(msg_id)
        return _NEW

    def fragments_for_nak(self, msg_id: bytes, indexes: Iterable[int]) -> list[tuple[int, bytes]]:
        """Fragments of a still-incomplete message that this hop already holds.

        Lets a cut-through relay answer NAKs from downstream before it has the whole
        message. The stored fragments are immutable, so no copy is made.
        """
        m = self._partials.get(msg_id)
        if m is None:
            return []
        parts = m.parts
        return [(i, parts[i]) for i in _clean_indexes(indexes, m.count) if i in parts]

    # -- timers --------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Drop messages without progress for incomplete_timeout_s; returns how many."""
        dropped = 0
        while self._partials:
            m = next(iter(self._partials.values()))
            # The very expression next_timer() reports: with a different rounding the
            # deadline could be due yet never served (a busy loop).
            if m.last_progress + self.incomplete_timeout_s > now:
                break
            self._drop(m)
            dropped += 1
        self.stats["expired"] += dropped
        return dropped

    def pending_naks(self, now: float) -> list[tuple[Hashable, bytes, list[int]]]:
        """(peer, msg_id, missing indexes) for every message stalled for nak_delay_s.

        A message is NAKed at most once per nak_delay_s and a report lists at most
        MAX_NAK_INDEXES of its lowest missing indexes (including a missing tail: after
        a stall, "not arrived yet" and "lost" are the same). Expires first so that
        abandoned messages are not NAKed; nak_delay_s should exceed the sender's gap
        between windows or paced senders get NAKed for fragments not yet sent.
        """
        self.expire(now)
        out: list[tuple[Hashable, bytes, list[int]]] = []
        for _ in range(len(self._nak_order)):  # each message at most once per call
            m = next(iter(self._nak_order.values()))
            if m.nak_base + self.nak_delay_s > now:
                break
            m.nak_base = now
            self._nak_order.move_to_end(m.msg_id)
            out.append((m.last_peer, m.msg_id, m.missing(MAX_NAK_INDEXES)))
        self.stats["naks"] += len(out)
        return out

    def next_timer(self, now: float) -> float | None:
        """Deadline (same clock as ``now``) when expire()/pending_naks() have work, or None.

        May be <= now when work is overdue. Both queues are ordered, so this is O(1).
        """
        if not self._partials:
            return None
        oldest = next(iter(self._partials.values()))
        first_nak = next(iter(self._nak_order.values()))
        return min(
            oldest.last_progress + self.incomplete_timeout_s,
            first_nak.nak_base + self.nak_delay_s,
        )

    # -- internals -----------------------------------------------------------------

    def _reject(self, reason: str) -> AddResult:
        self.stats["rejected:" + reason] += 1
        return _REJECTED[reason]

    def mark_completed(self, msg_id: bytes) -> None:
        """Treat msg_id as already delivered (e.g. our own broadcast)."""
        self._mark_completed(msg_id)

    def _mark_completed(self, msg_id: bytes) -> None:
        self.stats["completed"] += 1
        self._completed[msg_id] = None
        if len(self._completed) > self.max_completed_ids:
            self._completed.popitem(last=False)

    def _admit(
        self, peer: Hashable, msg_id: bytes, count: int, total_len: int, frag_size: int, now: float
    ) -> _Partial | None:
        """Reserve budget for a new message (evicting as the policy says) and allocate it."""
        cost = total_len + count + MESSAGE_OVERHEAD_BYTES
        if cost > self.max_bytes_per_peer:
            return None
        while self._peer_bytes.get(peer, 0) + cost > self.max_bytes_per_peer:
            self._evict_oldest(peer, "evicted:peer_budget")
        while self._total_bytes + cost > self.max_total_bytes:
            victim, heaviest = peer, self._peer_bytes.get(peer, 0) + cost
            for other, used in self._peer_bytes.items():
                if used > heaviest:
                    victim, heaviest = other, used
            if victim == peer and peer not in self._peer_msgs:
                return None  # the requester would be the heaviest and has nothing to give up
            self._evict_oldest(victim, "evicted:total_budget")

        m = _Partial(peer, msg_id, count, total_len, frag_size, cost, now)
        self._partials[msg_id] = m
        self._nak_order[msg_id] = m
        self._peer_msgs.setdefault(peer, OrderedDict())[msg_id] = m
        self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + cost
        self._total_bytes += cost
        return m

    def _evict_oldest(self, peer: Hashable, stat: str) -> None:
        # A peer with bytes reserved always has a message: reservations are per message.
        self._drop(next(iter(self._peer_msgs[peer].values())))
        self.stats[stat] += 1

    def _drop(self, m: _Partial) -> None:
        del self._partials[m.msg_id]
        del self._nak_order[m.msg_id]
        own = self._peer_msgs[m.owner]
        del own[m.msg_id]
        self._total_bytes -= m.cost_bytes
        if own:
            self._peer_bytes[m.owner] -= m.cost_bytes
        else:  # forget idle peers so peer churn cannot grow these dicts
            del self._peer_msgs[m.owner]
            del self._peer_bytes[m.owner]


# -- send side ---------------------------------------------------------------------


class _Outgoing:
    __slots__ = ("added_at", "fragments", "nbytes", "total_len")

    def __init__(self, fragments: list[Fragment], now: float) -> None:
        self.fragments = fragments
        self.total_len = sum(len(f) for f in fragments)
        # What retaining it costs: the bytes, plus bookkeeping for many tiny fragments.
        self.nbytes = self.total_len + MESSAGE_OVERHEAD_BYTES
        self.added_at = now


class OutgoingWindow:
    """Recently sent messages kept for NAK retransmission.

    Holds references (memoryviews from split_message are zero-copy), oldest dropped
    first once over max_window_bytes, and anything older than retain_s. retain_s
    should cover the time to pace a whole message out plus a few NAK round trips.
    A relay may also add messages it forwarded once they COMPLETE.
    """

    def __init__(self, max_window_bytes: int, retain_s: float) -> None:
        if max_window_bytes < 1 or retain_s <= 0:
            raise ValueError("max_window_bytes and retain_s must be positive")
        self.max_window_bytes = max_window_bytes
        self.retain_s = retain_s
        self.stats: Counter[str] = Counter()  # retained, too_large, evicted, expired, retransmits
        self._msgs: OrderedDict[bytes, _Outgoing] = OrderedDict()  # by add time
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._msgs)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._msgs

    def add_message(self, msg_id: bytes, fragments: Sequence[Fragment], now: float) -> bool:
        """Retain a message's fragments; False if it alone exceeds the window (not kept)."""
        self._discard(msg_id)
        entry = _Outgoing(list(fragments), now)
        if entry.nbytes > self.max_window_bytes:
            self.stats["too_large"] += 1
            return False
        self._msgs[msg_id] = entry
        self._total_bytes += entry.nbytes
        self.stats["retained"] += 1
        while self._total_bytes > self.max_window_bytes:
            self._discard(next(iter(self._msgs)))
            self.stats["evicted"] += 1
        return True

    def message_shape(self, msg_id: bytes) -> tuple[int, int] | None:
        """(count, total_len) of a retained message, to rebuild retransmit headers."""
        entry = self._msgs.get(msg_id)
        return None if entry is None else (len(entry.fragments), entry.total_len)

    def fragments_for_nak(
        self, msg_id: bytes, indexes: Iterable[int]
    ) -> list[tuple[int, Fragment]]:
        """(index, fragment) for the NAKed indexes still retained.

        Unknown ids and out-of-range indexes are ignored; duplicates are collapsed and
        at most MAX_NAK_INDEXES are answered so one NAK cannot trigger a flood.
        """
        entry = self._msgs.get(msg_id)
        if entry is None:
            return []
        out = [(i, entry.fragments[i]) for i in _clean_indexes(indexes, len(entry.fragments))]
        self.stats["retransmits"] += len(out)
        return out

    def expire(self, now: float) -> int:
        """Drop messages retained for retain_s or longer; returns how many."""
        dropped = 0
        while self._msgs:
            msg_id, entry = next(iter(self._msgs.items()))
            if entry.added_at + self.retain_s > now:  # same expression as next_timer()
                break
            self._discard(msg_id)
            dropped += 1
        self.stats["expired"] += dropped
        return dropped

    def next_timer(self, now: float) -> float | None:
        """Deadline (same clock as ``now``) when expire() has work, or None if empty."""
        if not self._msgs:
            return None
        return next(iter(self._msgs.values())).added_at + self.retain_s

    def _discard(self, msg_id: bytes) -> None:
        entry = self._msgs.pop(msg_id, None)
        if entry is not None:
            self._total_bytes -= entry.nbytes
