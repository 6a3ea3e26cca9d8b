"""The flood: broadcast entries in, forwards out, deliveries up.

Why it exists: every broadcast entry (an application message, a member STATUS, a
fragment of a large message) travels the same way. A new one is forwarded at once to
our fanout, before any local work on it, and is then delivered or handed to its
mechanism; one we have seen is dropped. Nothing malformed is ever passed on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.dissemination import Fanout, SeenSet
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.trees import Trees
from gwyh_mp.protocol.wire import MemberRecord

_ENTRY_HEADER = wire.ENTRY_HEADER
_APP = wire.EntryKind.APP
_STATUS = wire.EntryKind.STATUS
_FRAGMENT = wire.EntryKind.FRAGMENT


class Flood:
    def __init__(
        self,
        node_id: bytes,
        max_message_bytes: int,
        seen: SeenSet,
        fanout: Fanout,
        stats: Stats,
        *,
        deliver: Callable[[Message], None],
        on_status: Callable[[MemberRecord, float], None],
    ) -> None:
        self.node_id = node_id
        self._max_message_bytes = max_message_bytes
        self.seen = seen
        self.fanout = fanout
        self.stats = stats
        self._deliver = deliver
        self._on_status = on_status  # a member record arrived in a STATUS entry
        # Large messages forward through us, so their handler is set once they exist.
        self.on_fragment: Callable[[bytes, int, bytes, bytes, bytes, float], None] | None = None
        # Broadcast trees (protocol/trees.py), set once they exist; APP entries only.
        self.trees: Trees | None = None
        # Every entry we originate or forward, for the recent-entry history (catch-up).
        self.record: Callable[[bytes, bytes], None] | None = None

    def originate(self, msg_id: bytes, kind: int, body: bytes) -> None:
        """One of our own entries, into the next flush."""
        self.seen.add(msg_id)
        entry = _ENTRY_HEADER.pack(kind, 1, self.node_id, len(body)) + body
        lazy = None
        if kind == _APP and self.trees is not None:
            lazy = self.trees.lazy_for(self.node_id)
            self.trees.note_own(msg_id)
        self.fanout.add(msg_id, entry, None, lazy)
        if self.record is not None:
            self.record(msg_id, entry)

    def forward(
        self, msg_id: bytes, kind: int, hops: int, origin: bytes, body: bytes, source: bytes
    ) -> None:
        # Forward first, so the copy leaves before any local work on it.
        entry = _ENTRY_HEADER.pack(kind, min(hops + 1, 255), origin, len(body)) + body
        lazy = self.trees.lazy_for(origin) if kind == _APP and self.trees else None
        self.fanout.add(msg_id, entry, source, lazy)
        if self.record is not None:
            self.record(msg_id, entry)

    def on_entries(
        self, ids: bytes, count: int, plaintext: bytes, source: bytes, now: float
    ) -> None:
        """The entries of one authenticated BROADCAST datagram from ``source``."""
        offset = 0
        end = len(plaintext)
        seen = self.seen
        trees = self.trees if self.trees is not None and self.trees.enabled else None
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
                if kind == _APP and trees is not None:
                    trees.on_duplicate(msg_id, origin, source)
                continue
            body = plaintext[body_start:offset]
            # Check before forwarding: whatever we pass on must be well-formed.
            if kind == _APP:
                if length > self._max_message_bytes:
                    self.stats.bump("entries_too_large")
                    continue
                seen.add(msg_id)
                self.forward(msg_id, kind, hops, origin, body, source)
                if trees is not None:
                    trees.on_delivered(msg_id, origin, hops, source)
                self.stats.bump("delivered")
                self._deliver(Message(body, msg_id, origin, hops))
            elif kind == _STATUS:
                try:
                    record, used = wire.decode_member(body)
                    if used != length:
                        raise wire.WireError("trailing bytes in status")
                except (wire.WireError, struct.error):
                    self.stats.bump("entries_bad_status")
                    continue
                seen.add(msg_id)
                self.forward(msg_id, kind, hops, origin, body, source)
                self._on_status(record, now)
            elif kind == _FRAGMENT and self.on_fragment is not None:
                self.on_fragment(msg_id, hops, origin, body, source, now)
            else:
                self.stats.bump("entries_unknown_kind")  # not forwarded either
        if offset != end:
            raise wire.WireError("trailing bytes after entries")
