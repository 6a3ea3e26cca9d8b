"""A bounded store of recent broadcast entries: id -> (entry bytes, time).

Why it exists: a node that was away (paused, partitioned, declared DOWN) asks a peer
for what it missed (catch_up.py), and a lazy-push tree answers a GRAFT with an entry
it only announced; both need the entries this node forwarded recently. The store is
bounded by age (``max_age_s``), by bytes (``max_bytes``, payload plus a fixed per-entry
overhead) and optionally by count (``max_entries``), and always evicts the oldest first,
so it never holds more than the configured window and memory. Insert, lookup and
eviction are O(1) (amortised).

Entries are kept in insertion order with a sequence number each (consecutive, starting
at 1), so a reader can page through "everything after sequence s" without the store
keeping any per-reader state. What was evicted is remembered coarsely (a count per
time bucket, for ``EVICTED_MEMORY`` windows), so a peer asking about a time range the
store no longer covers can be told how many entries it will never get.
"""

from __future__ import annotations

import bisect
from collections import deque

# Per-entry bookkeeping counted against max_bytes besides the entry itself (the id, the
# dict slot, the list slots and the tuple: about this much in CPython).
ENTRY_OVERHEAD_BYTES = 120
# Evicted entries are counted per bucket of this many seconds...
EVICTED_BUCKET_S = 1.0
# ...for this many windows back (and at most EVICTED_MAX_BUCKETS buckets).
EVICTED_MEMORY = 10
EVICTED_MAX_BUCKETS = 4096


class History:
    """Recent entries by id, oldest evicted first (by age and by total bytes)."""

    __slots__ = (
        "_entries",
        "_evicted",
        "_head",
        "_ids",
        "_times",
        "bytes",
        "evicted",
        "first_seq",
        "max_age_s",
        "max_bytes",
        "max_entries",
    )

    def __init__(self, max_age_s: float, max_bytes: int, max_entries: int | None = None) -> None:
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.max_entries = max_entries if max_entries is not None else 1 << 62
        self._entries: dict[bytes, bytes] = {}  # id -> entry
        # Insertion order as two parallel lists with a moving head (compacted when the
        # dead prefix is half the list): O(1) eviction and random access for paging.
        self._ids: list[bytes] = []
        self._times: list[float] = []
        self._head = 0
        self.first_seq = 1  # sequence number of self._ids[self._head]
        self.bytes = 0
        self.evicted = 0  # entries evicted so far (age or bytes)
        self._evicted: deque[list[float]] = deque()  # [bucket start, count], oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self._entries

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest entry (first_seq - 1 when empty)."""
        return self.first_seq + len(self._ids) - self._head - 1

    def add(self, msg_id: bytes, entry: bytes, now: float) -> None:
        """Keep ``entry`` under ``msg_id`` (a second add of the same id is ignored)."""
        entries = self._entries
        if msg_id in entries or self.max_age_s <= 0:
            return
        size = len(entry) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        entries[msg_id] = entry
        self._ids.append(msg_id)
        times = self._times
        times.append(now)
        self.bytes += size
        # Hot path (every forwarded entry): evict only when a bound is crossed.
        if (
            self.bytes > self.max_bytes
            or len(entries) > self.max_entries
            or times[self._head] < now - self.max_age_s
        ):
            self._evict(now)

    def get(self, msg_id: bytes) -> bytes | None:
        return self._entries.get(msg_id)

    def _evict(self, now: float) -> None:
        oldest = now - self.max_age_s
        times = self._times
        entries = self._entries
        while self._head < len(times) and (
            self.bytes > self.max_bytes
            or len(entries) > self.max_entries
            or times[self._head] < oldest
        ):
            self._evict_head()
        if self._head > 64 and self._head * 2 > len(times):
            del self._ids[: self._head]
            del times[: self._head]
            self._head = 0

    def expire(self, now: float) -> None:
        """Evict what is older than max_age_s (or beyond max_bytes), oldest first, and
        forget eviction counts older than the eviction memory (called on timers)."""
        self._evict(now)
        memory = EVICTED_MEMORY * self.max_age_s
        evicted = self._evicted
        while evicted and (evicted[0][0] < now - memory or len(evicted) > EVICTED_MAX_BUCKETS):
            evicted.popleft()

    def _evict_head(self) -> None:
        msg_id = self._ids[self._head]
        t = self._times[self._head]
        self._head += 1
        self.first_seq += 1
        entry = self._entries.pop(msg_id)
        self.bytes -= len(entry) + ENTRY_OVERHEAD_BYTES
        self.evicted += 1
        bucket = t - t % EVICTED_BUCKET_S
        evicted = self._evicted
        if evicted and evicted[-1][0] >= bucket:
            evicted[-1][1] += 1
        else:
            evicted.append([bucket, 1.0])

    def evicted_since(self, since: float) -> int:
        """How many entries added at or after ``since`` were evicted (to the bucket:
        EVICTED_BUCKET_S), as far back as the eviction memory reaches."""
        total = 0.0
        for start, count in reversed(self._evicted):
            if start + EVICTED_BUCKET_S <= since:
                break
            total += count
        return int(total)

    def page(self, since: float, after_seq: int, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` ids added at or after ``since`` with a sequence number above
        ``after_seq``, oldest first, and the sequence number of the last one returned
        (``after_seq`` itself when none). O(log n + limit)."""
        times = self._times
        start = bisect.bisect_left(times, since, self._head)
        start = max(start, self._head + after_seq + 1 - self.first_seq)
        end = min(len(times), start + max(0, limit))
        if start >= end:
            return [], after_seq
        return self._ids[start:end], self.first_seq + end - 1 - self._head
