"""De-duplication and fanout of broadcasts.

A broadcast is forwarded at once to every subscriber except the peer it came from.
Two ideas keep that cheap (see docs/PROTOCOL.md, "Broadcast channel"):

- Message ids travel in clear, so a copy we have already seen is dropped with one
  set lookup, before any decryption.
- A provider encrypts a datagram once under its *channel key* (handed to each
  subscriber over the pairwise session) and sends the same ciphertext to all
  subscribers; only the small clear header differs. Entries produced in the same
  processing round are coalesced into as few datagrams as fit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import DeferredDatagram, SealJob, ids_digest, nonce, seal

Addr = tuple[str, int]
Datagram = bytes | DeferredDatagram
Outgoing = tuple[Datagram, Addr, bytes]  # datagram, destination, destination node id


class SeenSet:
    """A bounded set of recent message ids; the oldest is forgotten first.

    ``ids`` is exposed for the hot path (``msg_id in seen.ids``)."""

    __slots__ = ("_order", "capacity", "ids", "journal")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids: set[bytes] = set()
        self._order: deque[bytes] = deque()
        # When set, every added id is also appended here (the multiprocess runtime
        # copies new ids to its receivers, so they drop duplicates before decrypting).
        self.journal: list[bytes] | None = None

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, msg_id: bytes) -> bool:
        """Add an id; returns False if it was already there."""
        if msg_id in self.ids:
            return False
        self.ids.add(msg_id)
        self._order.append(msg_id)
        if self.journal is not None:
            self.journal.append(msg_id)
        if len(self._order) > self.capacity:
            self.ids.discard(self._order.popleft())
        return True


@dataclass(slots=True)
class FanoutTarget:
    """One subscriber as the fanout sees it."""

    node_id: bytes
    addr: Addr
    remote_session_id: int
    next_link_seq: Callable[[], int]


@dataclass(slots=True)
class BroadcastChannel:
    """This node's provider channel: one key, one nonce counter, many subscribers."""

    key: bytes
    seq: int = 0
    datagrams: int = 0
    encryptions: int = 0


@dataclass(slots=True)
class PendingEntry:
    msg_id: bytes
    entry: bytes  # ENTRY_HEADER + body
    exclude: bytes | None  # the peer it came from: it already has it
    lazy: set[bytes] | None = None  # subscribers that take it as an announcement only


@dataclass(slots=True)
class Fanout:
    """Entries waiting for the end of the current processing round."""

    channel: BroadcastChannel
    max_datagram_bytes: int
    pending: list[PendingEntry] = field(default_factory=list)
    max_pending_entries: int = 10_000
    shed: int = 0
    defer_sealing: bool = False
    # (subscriber, id, entry) for an entry a lazy subscriber gets announced instead
    # (broadcast trees, protocol/trees.py).
    on_lazy: Callable[[bytes, bytes, bytes], None] | None = None

    @property
    def max_entry_bytes(self) -> int:
        return self.max_datagram_bytes - wire.BROADCAST_OVERHEAD - wire.MESSAGE_ID_BYTES

    def add(
        self, msg_id: bytes, entry: bytes, exclude: bytes | None, lazy: set[bytes] | None = None
    ) -> None:
        self.pending.append(PendingEntry(msg_id, entry, exclude, lazy))

    def flush(self, targets: list[FanoutTarget], out: list[Outgoing]) -> None:
        """Encrypt pending entries once per distinct recipient set and append one
        (datagram, address, node id) per subscriber to ``out``."""
        if not targets:
            # Nobody to send to yet (no subscribers): keep the entries for when someone
            # subscribes, within a bound; what is shed is counted, never silent.
            overflow = len(self.pending) - self.max_pending_entries
            if overflow > 0:
                del self.pending[:overflow]
                self.shed += overflow
            return
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.on_lazy is not None and any(p.lazy for p in pending):
            self._flush_per_target(pending, targets, out)
            return
        target_ids = {t.node_id for t in targets}
        excluded = {p.exclude for p in pending if p.exclude in target_ids}
        if not excluded:
            self._send_group(pending, targets, out)
            return
        # Subscribers that sent us none of these entries get all of them; each one
        # that did gets everything but its own. One encryption per group.
        everyone = [t for t in targets if t.node_id not in excluded]
        if everyone:
            self._send_group(pending, everyone, out)
        for target in targets:
            if target.node_id in excluded:
                group = [p for p in pending if p.exclude != target.node_id]
                if group:
                    self._send_group(group, [target], out)

    def _flush_per_target(
        self, pending: list[PendingEntry], targets: list[FanoutTarget], out: list[Outgoing]
    ) -> None:
        """Some entries go lazily to some subscribers: each subscriber gets what is
        neither its own nor announced to it, and subscribers due the same entries share
        one encryption."""
        on_lazy = self.on_lazy
        assert on_lazy is not None
        groups: dict[tuple[int, ...], list[FanoutTarget]] = {}
        for target in targets:
            peer = target.node_id
            chosen = []
            for i, p in enumerate(pending):
                if p.exclude == peer:
                    continue
                if p.lazy is not None and peer in p.lazy:
                    on_lazy(peer, p.msg_id, p.entry)
                    continue
                chosen.append(i)
            if chosen:
                groups.setdefault(tuple(chosen), []).append(target)
        for chosen_ids, group_targets in groups.items():
            self._send_group([pending[i] for i in chosen_ids], group_targets, out)

    def send_to(
        self,
        entries: list[tuple[bytes, bytes]],
        target: FanoutTarget,
        out: list[Outgoing],
    ) -> None:
        """Send (id, entry) pairs to one peer only (answers to fragment NAKs)."""
        self._send_group([PendingEntry(i, e, None) for i, e in entries], [target], out)

    def _send_group(
        self,
        entries: list[PendingEntry],
        targets: list[FanoutTarget],
        out: list[Outgoing],
    ) -> None:
        budget = self.max_datagram_bytes - wire.BROADCAST_OVERHEAD
        chunk: list[PendingEntry] = []
        size = 0
        for item in entries:
            cost = wire.MESSAGE_ID_BYTES + len(item.entry)
            if chunk and (size + cost > budget or len(chunk) == wire.MAX_ENTRIES_PER_DATAGRAM):
                self._seal_and_send(chunk, targets, out)
                chunk, size = [], 0
            chunk.append(item)
            size += cost
        if chunk:
            self._seal_and_send(chunk, targets, out)

    def _seal_and_send(
        self,
        chunk: list[PendingEntry],
        targets: list[FanoutTarget],
        out: list[Outgoing],
    ) -> None:
        channel = self.channel
        channel.seq += 1
        seq = channel.seq
        ids = b"".join([p.msg_id for p in chunk])
        nonce24 = nonce(seq, ids_digest(ids))
        plaintext = b"".join([p.entry for p in chunk])
        count = len(chunk)
        pack = wire.BROADCAST_HEADER.pack
        version, ptype = wire.VERSION, wire.PacketType.BROADCAST
        if self.defer_sealing:
            # One job shared by every copy: a receiver process seals it once.
            job = SealJob(channel.key, nonce24, plaintext)
            for t in targets:
                header = pack(version, ptype, count, 0, t.remote_session_id, t.next_link_seq(), seq)
                out.append((DeferredDatagram(header + ids, job), t.addr, t.node_id))
            return
        body = ids + seal(channel.key, nonce24, plaintext)
        channel.encryptions += 1
        for t in targets:
            header = pack(version, ptype, count, 0, t.remote_session_id, t.next_link_seq(), seq)
            out.append((header + body, t.addr, t.node_id))
        channel.datagrams += len(targets)
