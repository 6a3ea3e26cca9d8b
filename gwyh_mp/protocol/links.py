"""Per-peer links: send queues, pacing, retransmission, tail probes and NAK polling.

Why it exists: one slow or lossy peer must cost only its own link. Its data waits in its
own queue for its own AIMD pacer, what it did not receive is NAKed and resent link by
link, and a tail probe after the last data datagram lets it notice a lost tail. This is
the only queue and pacing implementation; congestion.py provides the pacer and the
loss detector it drives.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.congestion import AimdPacer, LinkLossDetector, PacingConfig
from gwyh_mp.protocol.crypto import DeferredDatagram
from gwyh_mp.protocol.dissemination import Datagram
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType

Addr = tuple[str, int]
QueueControl = Callable[..., None]  # (peer_id, frame_type, body=b"")

RETAIN_BYTES_PER_LINK = 4 << 20  # sent data datagrams kept per peer to answer NAKs (at most)
RETAIN_MIN_BYTES_PER_LINK = 16 << 10  # ... and at least, however many links share the budget
RETAIN_DATAGRAMS_PER_LINK = 8192
MAX_RETRANSMITS_PER_NAK = 256
TAIL_PROBE_S = 0.1  # quiet time after the last data datagram before a tail probe
# ... or a longer one, TAIL_PROBE_S times 1..TAIL_PROBE_STEPS, for a link whose data comes at
# a slower pace: TAIL_GAP_FACTOR times its recent longest interval between data sends (a
# decaying maximum, so an irregular stream such as 3 senders' merged ticks, 5, 5 and 290 ms
# apart, counts by its long gaps, not its average), rounded up. The next data datagram
# reveals a lost one about one interval later anyway, so a probe sooner than that repairs
# nothing faster and only doubles the datagrams of a slow stream (one TAIL per message at
# 10 msg/s, 5,000 per message at 5,000 subscribers); a burst (short intervals) that ends
# in a quiet gap is still probed after TAIL_PROBE_S.
TAIL_PROBE_STEPS = 3
TAIL_GAP_FACTOR = 1.5
_GAP_DECAY = 0.75  # LinkState.data_gap: max(newest interval, previous value x this)
_TAIL = struct.Struct("!I")


def pacing_config(config: Config) -> PacingConfig:
    """The congestion-control knobs for one node's links."""
    return PacingConfig(
        initial_rate_bytes_per_s=float(config.send_rate_initial_bytes_per_s),
        min_rate_bytes_per_s=float(config.send_rate_min_bytes_per_s),
        max_rate_bytes_per_s=float(config.send_rate_max_bytes_per_s),
        increase_bytes_per_s=float(config.send_rate_increase_bytes_per_s),
        increase_interval_s=0.05,
        # Large messages on a clean fast link reach its capacity in a few intervals, an
        # overshoot comes back in one cut, and the pacer sends 1 ms batches (congestion.py).
        slow_start_factor=2.0,
        heavy_loss_decrease=True,
        tick_s=0.001,
        # As many loss ranges as one NAK frame can carry within a datagram.
        max_nak_ranges=max(
            1,
            min(
                wire.MAX_NAK_RANGES,
                (config.max_datagram_bytes - wire.CONTROL_OVERHEAD - 13) // 6,
            ),
        ),
        burst_bytes=max(256 << 10, 4 * config.max_datagram_bytes),
        max_queued_data_bytes=config.link_queue_bytes,
    )


def retain_bytes_per_link(budget_bytes: int, links: int) -> int:
    """What one link may keep for NAK answers: an equal share of the node-wide
    Config.retransmit_buffer_bytes, within [RETAIN_MIN_BYTES_PER_LINK,
    RETAIN_BYTES_PER_LINK]. A node with 5,000 subscribers would otherwise hold up to
    4 MiB for each (20 GB); a NAK asks for what was sent a few round trips ago, and a
    share of the budget still holds seconds of traffic at any sane rate."""
    share = budget_bytes // max(1, links)
    return max(RETAIN_MIN_BYTES_PER_LINK, min(RETAIN_BYTES_PER_LINK, share))


def head(datagram: Datagram) -> bytes:
    """The clear leading bytes of a datagram, sealed or not."""
    return datagram.prefix if isinstance(datagram, DeferredDatagram) else datagram


def restamp(datagram: Datagram, link_seq: int) -> Datagram:
    """The same BROADCAST datagram under a new link sequence (bytes 8-12 of the header,
    outside the AEAD), for a retransmission."""
    seq = link_seq.to_bytes(4, "big")
    if isinstance(datagram, DeferredDatagram):
        prefix = datagram.prefix
        return DeferredDatagram(prefix[:8] + seq + prefix[12:], datagram.job)
    return b"".join((datagram[:8], seq, datagram[12:]))


@dataclass(slots=True)
class LinkState:
    """The data path of one link. Receiving: loss detection on the peer's link sequence.
    Sending: the pacer, the queue waiting for it, and what was sent (for NAKs)."""

    node_id: bytes
    link_seq_out: int = 0
    loss: LinkLossDetector | None = None
    pacer: AimdPacer | None = None
    queue: deque[tuple[Datagram, Addr]] = field(default_factory=deque)
    queue_bytes: int = 0
    sent: OrderedDict[int, Datagram] = field(default_factory=OrderedDict)
    sent_bytes: int = 0
    tail_due: float | None = None
    tail_step: int = 0  # index of the tail-probe delay it is armed under (LinkQueues)
    last_sent_seq: int = 0  # newest link sequence actually handed to the socket
    last_data_at: float = float("-inf")  # when data last left for the peer
    data_gap: float = 0.0  # recent longest interval between data sends (0 after a pause)

    def next_link_seq(self) -> int:
        self.link_seq_out = (self.link_seq_out + 1) & 0xFFFFFFFF
        return self.link_seq_out

    def remember(
        self, datagram: Datagram, seq: int | None = None, max_bytes: int = RETAIN_BYTES_PER_LINK
    ) -> None:
        """Keep a sent data datagram, keyed by its link sequence (read from its header
        unless given), until NAKs for it are no longer plausible (bounded by bytes,
        ``max_bytes``, and count)."""
        if seq is None:
            seq = int.from_bytes(head(datagram)[8:12], "big")
        sent = self.sent
        sent[seq] = datagram
        self.sent_bytes += len(datagram)
        if self.sent_bytes > max_bytes or len(sent) > RETAIN_DATAGRAMS_PER_LINK:
            self._trim(max_bytes)

    def _trim(self, max_bytes: int) -> None:
        sent = self.sent
        while self.sent_bytes > max_bytes or len(sent) > RETAIN_DATAGRAMS_PER_LINK:
            _, old = sent.popitem(last=False)
            self.sent_bytes -= len(old)


class LinkQueues:
    """Every link's queue, pacer and loss repair, over the peers' shared link table."""

    def __init__(
        self,
        links: dict[bytes, LinkState],
        link_for: Callable[[bytes], LinkState],
        pacing: PacingConfig,
        stats: Stats,
        queue_control: QueueControl,
        clock: Callable[[], float],
        retain_budget_bytes: int = 256 << 20,
    ) -> None:
        self.links = links
        self._link_for = link_for  # get or create a peer's link
        self.pacing = pacing
        self._link_queue_bytes = pacing.max_queued_data_bytes
        self.retain_budget_bytes = retain_budget_bytes  # Config.retransmit_buffer_bytes
        self.stats = stats
        self._queue_control = queue_control
        self._clock = clock  # the node's latest ``now``: a new pacer starts from it
        # Dicts used as ordered sets: iteration order must not depend on the hash seed,
        # or a simulation would not be reproducible across processes.
        self.backlogged: dict[bytes, None] = {}  # peers with data waiting for their pacer
        self.backlog_bytes = 0
        self._rx_links: dict[bytes, None] = {}  # peers whose loss detector may owe a NAK
        self._next_nak_poll: float | None = None
        # Peers owed a tail probe, one ordered set per delay (TAIL_PROBE_S x 1..STEPS).
        # Within a set every due is now + the same delay, so entries are in due order and
        # the earliest is the first one: the timer query is O(1) however many links there
        # are, and re-arming a link moves it to the end. _tail_tips keeps that order even
        # under a clock that steps back.
        self._tails: tuple[OrderedDict[bytes, None], ...] = tuple(
            OrderedDict() for _ in range(TAIL_PROBE_STEPS)
        )
        self._tail_tips = [float("-inf")] * TAIL_PROBE_STEPS

    def pacer(self, link: LinkState) -> AimdPacer:
        if link.pacer is None:
            link.pacer = AimdPacer(self.pacing, self._clock())
        return link.pacer

    # ------------------------------------------------------------------ sending

    def enqueue(self, peer_id: bytes, datagram: Datagram, addr: Addr) -> None:
        link = self._link_for(peer_id)
        size = len(datagram)
        # Forwarded traffic cannot be pushed back on the network (our own is held back by
        # send_queue_bytes before it gets here): a peer that drains too slowly loses its
        # oldest queued data, counted as shed (never silently).
        while link.queue and link.queue_bytes + size > self._link_queue_bytes:
            old, _ = link.queue.popleft()
            link.queue_bytes -= len(old)
            self.backlog_bytes -= len(old)
            self.stats.bump("shed_datagrams")
        link.queue.append((datagram, addr))
        link.queue_bytes += size
        self.backlog_bytes += size
        self.backlogged[peer_id] = None

    def drain(self, now: float, out: list[tuple[Datagram, Addr]]) -> None:
        """Hand the socket what each link's pacer allows now."""
        retain = retain_bytes_per_link(self.retain_budget_bytes, len(self.links))
        links, backlogged = self.links, self.backlogged
        append = out.append
        from_bytes = int.from_bytes
        for peer_id in list(backlogged):
            link = links.get(peer_id)
            if link is None:
                backlogged.pop(peer_id, None)
                continue
            pacer = self.pacer(link)
            pacer.on_tick(now)
            # One refill for the whole turn (``now`` does not move inside it), then the
            # bucket is spent locally and charged once: the same decisions as
            # can_send/consume per datagram, without two calls per datagram.
            tokens = pacer.send_allowance(now)
            burst = pacer.config.burst_bytes
            queue = link.queue
            sent_bytes = 0
            seq = -1
            remember = link.remember
            while queue:
                datagram, addr = queue[0]
                size = len(datagram)
                if tokens < (size if size < burst else burst):
                    pacer.note_waited()
                    break
                queue.popleft()
                tokens -= size
                sent_bytes += size
                append((datagram, addr))
                seq = from_bytes(
                    (datagram if type(datagram) is bytes else head(datagram))[8:12], "big"
                )
                remember(datagram, seq, retain)
            if sent_bytes:
                link.queue_bytes -= sent_bytes
                self.backlog_bytes -= sent_bytes
                pacer.consume(sent_bytes, now)
                link.last_sent_seq = seq
                self._arm_tail(peer_id, link, now)
            if not queue:
                backlogged.pop(peer_id, None)
        if not backlogged:
            # A fresh dict: one emptied by deletions still walks all its former slots when
            # iterated (next_timer, after every datagram: ~7 us at 5,000 links).
            self.backlogged = {}

    def _arm_tail(self, peer_id: bytes, link: LinkState, now: float) -> None:
        """Data just left for the peer: its tail probe is due after the quiet time its
        pace calls for (the module's TAIL_* constants)."""
        gap = now - link.last_data_at
        # A first send after a pause counts as a burst until its pace shows otherwise.
        data_gap = link.data_gap * _GAP_DECAY
        if gap >= TAIL_PROBE_S * TAIL_PROBE_STEPS:
            data_gap = 0.0
        elif gap > data_gap:
            data_gap = gap
        link.data_gap = data_gap
        link.last_data_at = now
        step = min(TAIL_PROBE_STEPS, max(1, math.ceil(TAIL_GAP_FACTOR * data_gap / TAIL_PROBE_S)))
        step -= 1
        due = now + TAIL_PROBE_S * (step + 1)
        tips = self._tail_tips
        if due < tips[step]:
            due = tips[step]
        tips[step] = due
        tails = self._tails[step]
        if link.tail_due is not None and link.tail_step != step:
            self._tails[link.tail_step].pop(peer_id, None)
        if peer_id in tails:
            tails.move_to_end(peer_id)
        else:
            tails[peer_id] = None
        link.tail_due = due
        link.tail_step = step

    def forget(self, peer_id: bytes, link: LinkState) -> None:
        """The link is gone: its queue and its pending timers go with it."""
        self.backlog_bytes -= link.queue_bytes
        self.backlogged.pop(peer_id, None)
        for tails in self._tails:
            tails.pop(peer_id, None)
        self._rx_links.pop(peer_id, None)

    # ------------------------------------------------------------------ receiving

    def on_packet(self, link: LinkState, link_seq: int, now: float) -> None:
        """A data datagram from the peer's real address, duplicates included (they are
        most of the traffic and prove delivery)."""
        loss = link.loss
        if loss is None:
            loss = link.loss = LinkLossDetector(self.pacing)
        loss.on_packet(link_seq, now)
        # In order with nothing outstanding (the common case): no NAK poll to arm.
        if link.node_id not in self._rx_links and loss.owes_poll:
            self._rx_links[link.node_id] = None
            if self._next_nak_poll is None:
                self._next_nak_poll = now + self.pacing.nak_interval_s

    def on_tail(self, peer_id: bytes, link: LinkState, body: bytes, now: float) -> None:
        if len(body) != _TAIL.size:
            raise wire.WireError("bad tail probe")
        if link.loss is None:
            return
        link.loss.on_tail(_TAIL.unpack(body)[0], now)
        if peer_id not in self._rx_links:
            self._rx_links[peer_id] = None
        if self._next_nak_poll is None or self._next_nak_poll > now:
            self._next_nak_poll = now

    def on_nak(self, link: LinkState, addr: Addr | None, body: bytes, now: float) -> None:
        """``addr``: the peer's session address, None without a session (nothing resent)."""
        received, lost, ranges = wire.decode_nak(body)
        self.stats.bump("naks_received")
        if self.pacer(link).on_nak(lost, received, now):
            self.stats.bump("rate_decreases")
        # Resend what we still hold. Each copy gets a fresh link sequence (a lost copy is a
        # new gap, NAKed again) and joins the back of the queue, so link sequences leave
        # in increasing order and nothing queued behind looks reordered or lost.
        if addr is None:
            return
        budget = MAX_RETRANSMITS_PER_NAK
        resent = 0
        for start, count in ranges:
            for k in range(min(count, budget - resent)):
                datagram = link.sent.pop((start + k) & 0xFFFFFFFF, None)
                if datagram is None:
                    continue
                link.sent_bytes -= len(datagram)
                copy = restamp(datagram, link.next_link_seq())
                link.queue.append((copy, addr))
                link.queue_bytes += len(copy)
                self.backlog_bytes += len(copy)
                resent += 1
            if resent >= budget:
                break
        if resent:
            self.stats.bump("retransmits", resent)
            self.backlogged[link.node_id] = None

    # ------------------------------------------------------------------ timers

    def next_timer(self, now: float) -> float | None:
        """NAK poll, tail probes, and the next send a pacer allows."""
        t = self._next_nak_poll
        links = self.links
        for tails in self._tails:
            if tails:
                link = links.get(next(iter(tails)))
                # A stale first entry (its link gone or disarmed): cleared by the next round.
                due = now if link is None or link.tail_due is None else link.tail_due
                if t is None or due < t:
                    t = due
        for peer_id in self.backlogged:
            link = links.get(peer_id)
            if link is not None and link.queue:
                due = self.pacer(link).next_send_time(len(link.queue[0][0]), now)
                if t is None or due < t:
                    t = due
        return t

    def handle_timer(self, now: float) -> None:
        if self._next_nak_poll is not None and now >= self._next_nak_poll:
            self._poll_naks(now)
        for tails in self._tails:
            if tails:
                self._send_tail_probes(tails, now)

    def _poll_naks(self, now: float) -> None:
        """Aggregated loss reports: at most one NAK per peer per nak_interval_s, and
        only when something was really lost (reordering inside the window is not)."""
        for peer_id in list(self._rx_links):
            link = self.links.get(peer_id)
            if link is None or link.loss is None:
                self._rx_links.pop(peer_id, None)
                continue
            report = link.loss.poll_nak(now)
            if report is not None:
                body = wire.encode_nak(report.received, report.lost, list(report.ranges))
                self._queue_control(peer_id, FrameType.NAK, body)
                self.stats.bump("naks_sent")
            if link.loss.next_timer(now) is None:
                self._rx_links.pop(peer_id, None)
        self._next_nak_poll = now + self.pacing.nak_interval_s if self._rx_links else None

    def _send_tail_probes(self, tails: OrderedDict[bytes, None], now: float) -> None:
        """TAIL to every link of one delay whose quiet time has come: the first entries."""
        links = self.links
        while tails:
            peer_id = next(iter(tails))
            link = links.get(peer_id)
            if link is not None and link.tail_due is not None:
                if now < link.tail_due:
                    return
                link.tail_due = None
                self._queue_control(peer_id, FrameType.TAIL, _TAIL.pack(link.last_sent_seq))
                self.stats.bump("tail_probes_sent")
            tails.popitem(last=False)
