"""Large messages: fragmentation, the sliding send window, relayed retention, fragment NAKs.

Why it exists: a message larger than one datagram travels as fragments that move on
hop by hop before the message is whole (cut-through). Its origin releases them one
window at a time, so a 16 MiB message never lands in the kernel's buffers at once;
every node that completed one keeps it briefly; and a node missing fragments asks its
last supplier, then the origin, with FRAGMENT_NAKs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.dissemination import Fanout, SeenSet
from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.framing import AddKind, OutgoingWindow, Reassembler, split_message
from gwyh_mp.protocol.peers import PeerLink
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType, fragment_id

FRAGMENT_RETAIN_S = 10.0  # own fragments kept for FRAGMENT_NAK answers
# Sliding window: fragment bytes allowed in the link queues per fanout target. Refilled
# on every flush (each pacer wakeup), so it only has to cover one pacer tick plus the
# time to the next flush: 512 KiB is 5 ms at 100 MiB/s.
FRAGMENT_WINDOW_BYTES = 512 * 1024
LARGE_INFO_ENTRIES = 4096
_FRAGMENT_HEADER = wire.FRAGMENT_HEADER
_ENTRY_HEADER = wire.ENTRY_HEADER

Forward = Callable[[bytes, int, int, bytes, bytes, bytes], None]


@dataclass(slots=True)
class LargeInfo:
    """What we know of a large message we saw: enough to answer NAKs for it and to ask
    its origin for what nobody else has."""

    count: int
    total: int
    origin: bytes
    hops: int
    fragment_size: int  # 0 until a fragment other than the last one arrived


def fragment_entry(
    hops: int,
    origin: bytes,
    msg_id: bytes,
    index: int,
    count: int,
    total: int,
    fragment: bytes | memoryview,
) -> bytes:
    body_len = _FRAGMENT_HEADER.size + len(fragment)
    return b"".join(
        (
            _ENTRY_HEADER.pack(wire.EntryKind.FRAGMENT, hops, origin, body_len),
            _FRAGMENT_HEADER.pack(msg_id, index, count, total),
            fragment,
        )
    )


class LargeMessages:
    def __init__(
        self,
        config: Config,
        node_id: bytes,
        links: dict[bytes, PeerLink],
        seen: SeenSet,
        fanout: Fanout,
        stats: Stats,
        *,
        forward: Forward,
        deliver: Callable[[Message], None],
        queue_control: Callable[[bytes, FrameType, bytes], None],
        target_count: Callable[[], int],
        link_backlog_bytes: Callable[[], int],
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.links = links
        self.seen = seen
        self.fanout = fanout
        self.stats = stats
        self._forward = forward
        self._deliver = deliver
        self._queue_control = queue_control
        self._target_count = target_count  # how many peers a broadcast goes to now
        self._link_backlog_bytes = link_backlog_bytes  # data waiting for the pacers
        self.reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes,
            max_bytes_per_peer=2 * config.max_message_bytes + 65_536,
            max_total_bytes=max(
                config.reassembly_memory_bytes, 2 * config.max_message_bytes + 65_536
            ),
            incomplete_timeout_s=config.reassembly_timeout_s,
        )
        self.own_fragments = OutgoingWindow(
            max_window_bytes=max(4 * config.max_message_bytes, 64 << 20), retain_s=FRAGMENT_RETAIN_S
        )
        # Large messages this node completed as a relay: kept briefly so it can answer
        # FRAGMENT_NAKs from peers downstream (its reassembly buffer is gone by then).
        self.relayed_fragments = OutgoingWindow(
            max_window_bytes=max(2 * config.max_message_bytes, 32 << 20), retain_s=FRAGMENT_RETAIN_S
        )
        # Fragments of large broadcasts wait here and leave one window per round, so a
        # 16 MiB message never lands in the kernel's buffers all at once.
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self.queued_bytes = 0
        self._next_release: float | None = None  # None: at the next flush
        self._window_bytes = FRAGMENT_WINDOW_BYTES  # per target, as of the last release
        self._info: OrderedDict[bytes, LargeInfo] = OrderedDict()
        self._resend_to: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        # Our own fragments as they leave, for catch-up's history (set by NodeCore): they
        # go through the window, not the flood, so the flood's hook never sees them.
        self.record: Callable[[bytes, bytes], None] | None = None

    # ------------------------------------------------------------------ sending

    def broadcast(self, msg_id: bytes, data: bytes, fragment_bytes: int, now: float) -> None:
        """Split our own large message and queue its fragments for the window."""
        size = len(data)
        fragments = split_message(data, fragment_bytes)
        self.own_fragments.add_message(msg_id, fragments, now)
        self.reassembler.mark_completed(msg_id)  # copies coming back are not ours to deliver
        count = len(fragments)
        for index, fragment in enumerate(fragments):
            frag_id = fragment_id(msg_id, index)
            self.seen.add(frag_id)
            entry = fragment_entry(1, self.node_id, msg_id, index, count, size, fragment)
            self._queue.append((frag_id, entry))
            self.queued_bytes += len(entry)
        self.stats.bump("fragments_sent", count)

    def release_due(self, now: float) -> bool:
        return bool(self._queue) and (self._next_release is None or now >= self._next_release)

    def release(self, now: float) -> None:
        """Top the link queues up to the window: called on every flush while fragments
        wait, so the pacers never starve for want of a timer (before: one 512 KiB round
        per 2 ms at best, and none while the backlog was above half a window)."""
        # None while nobody subscribes: the fragments wait here, under backpressure, rather
        # than overflow the fanout's no-subscriber buffer.
        targets = self._target_count()
        if not targets:
            self._next_release = now + self.config.heartbeat_interval_s / 10
            return
        self._next_release = None
        self._window_bytes = FRAGMENT_WINDOW_BYTES * targets
        room = self._window_bytes - self._link_backlog_bytes()
        if room <= 0:
            return  # the pacers' own timers bring the next flush, and with it this call
        budget = room // targets  # every entry goes to each target
        queue = self._queue
        while queue and budget > 0:
            frag_id, entry = queue.popleft()
            self.queued_bytes -= len(entry)
            budget -= len(entry)
            self.fanout.add(frag_id, entry, None)
            if self.record is not None:
                self.record(frag_id, entry)

    def take_resends(self) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
        """Fragments to resend, per peer that NAKed them."""
        resend, self._resend_to = self._resend_to, []
        return resend

    # ------------------------------------------------------------------ receiving

    def on_fragment(
        self, frag_id: bytes, hops: int, origin: bytes, body: bytes, source: bytes, now: float
    ) -> None:
        if len(body) < _FRAGMENT_HEADER.size:
            self.stats.bump("entries_bad_fragment")
            return
        msg_id, index, count, total = _FRAGMENT_HEADER.unpack_from(body)
        if frag_id != fragment_id(msg_id, index):
            self.stats.bump("entries_bad_fragment")
            return
        data = body[_FRAGMENT_HEADER.size :]
        result = self.reassembler.add(source, msg_id, index, count, total, data, now)
        if result.kind is AddKind.REJECTED:
            self.stats.bump("entries_bad_fragment")
            return
        info = self._info.get(msg_id)
        fragment_size = len(data) if index < count - 1 else 0
        if info is None:
            self._info[msg_id] = LargeInfo(count, total, origin, hops, fragment_size)
            if len(self._info) > LARGE_INFO_ENTRIES:
                self._info.popitem(last=False)
        elif not info.fragment_size and fragment_size:
            info.fragment_size = fragment_size
        self.seen.add(frag_id)
        if result.kind is AddKind.DUPLICATE:
            self.stats.bump("duplicate_entries")
            return
        # Cut-through: every new fragment moves on at once, before the message is whole.
        self._forward(frag_id, wire.EntryKind.FRAGMENT, hops, origin, body, source)
        self.stats.bump("fragments_received")
        if result.kind is AddKind.COMPLETE:
            assert result.data is not None
            whole = bytes(result.data)  # a no-op for the reassembler's own bytes
            self.stats.bump("delivered")
            self.stats.bump("delivered_large")
            self._deliver(Message(whole, msg_id, origin, hops))
            known = self._info.get(msg_id)
            size = known.fragment_size if known is not None else 0
            if size or count == 1:
                self.relayed_fragments.add_message(
                    msg_id, split_message(whole, size or total or 1), now
                )

    def on_fragment_nak(self, peer_id: bytes, body: bytes) -> None:
        msg_id, indexes = wire.decode_fragment_nak(body)
        shape = self.own_fragments.message_shape(msg_id)
        if shape is not None:
            count, total = shape
            found = self.own_fragments.fragments_for_nak(msg_id, indexes)
            origin, hops = self.node_id, 1
        else:
            info = self._info.get(msg_id)
            if info is None:
                return
            count, total, origin = info.count, info.total, info.origin
            hops = min(info.hops + 1, 255)
            if self.relayed_fragments.message_shape(msg_id) is not None:
                found = self.relayed_fragments.fragments_for_nak(msg_id, indexes)
            else:
                found = self.reassembler.fragments_for_nak(msg_id, indexes)
        link = self.links.get(peer_id)
        if not found or link is None or link.session is None:
            return
        entries = [
            (
                fragment_id(msg_id, index),
                fragment_entry(hops, origin, msg_id, index, count, total, data),
            )
            for index, data in found
        ]
        self._resend_to.append((peer_id, entries))
        self.stats.bump("fragments_resent", len(entries))

    # ------------------------------------------------------------------ timers

    def next_timer(self, now: float) -> float | None:
        """The next window release and the reassembler's next NAK or expiry. A window
        with room left is due now (the pacers sent all of it at once); a full one waits
        for the pacers' timers, which flush and so release."""
        t = self._next_release
        if t is None and self._queue and self._link_backlog_bytes() < self._window_bytes:
            t = now
        reassembly = self.reassembler.next_timer(now)
        if reassembly is not None and (t is None or reassembly < t):
            t = reassembly
        return t

    def handle_timer(self, now: float) -> None:
        self.own_fragments.expire(now)
        self.relayed_fragments.expire(now)
        self._fragment_naks(now)

    def _fragment_naks(self, now: float) -> None:
        for peer_id, msg_id, indexes in self.reassembler.pending_naks(now):
            # Fit one datagram whatever max_datagram_bytes is.
            room = (self.config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 24) // 4
            body = wire.encode_fragment_nak(msg_id, indexes[: max(1, room)])
            asked = set()
            if isinstance(peer_id, bytes) and peer_id in self.links:
                self._queue_control(peer_id, FrameType.FRAGMENT_NAK, body)
                asked.add(peer_id)
            # The last supplier may have lost the same fragments; the origin kept them all.
            info = self._info.get(msg_id)
            origin = info.origin if info is not None else None
            link = self.links.get(origin) if origin is not None else None
            if origin not in asked and link is not None and link.session is not None:
                self._queue_control(origin, FrameType.FRAGMENT_NAK, body)
                self.stats.bump("fragment_naks_sent")
