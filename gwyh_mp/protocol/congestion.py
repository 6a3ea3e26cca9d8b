"""Congestion control: NAK-based loss detection and AIMD pacing.

Why this exists: the original gwyh NAKed after every packet (NAKs for NAKs included), underflowed on
reordered packets, ignored sequence wrap-around, never updated its rate controller, and never paced
the data path (items 7-8 of docs/PROTOCOL.md §3.8; the mechanism is its §7). This module replaces
that with two sans-IO state machines, driven with monotonic ``now`` timestamps in seconds by
links.py (the per-peer queues):

* ``LinkLossDetector`` (receiver, one per peer): watches the 32-bit link sequence numbers carried by
  bulk-data datagrams, tolerates reordering, and emits at most one aggregated ``NakReport`` per
  ``nak_interval_s``. Control packets carry no link sequence number, so a NAK is never NAKed.
* ``AimdPacer`` (sender, one per link): token bucket in bytes/s whose rate is cut multiplicatively
  on reported loss (once per loss event) and raised additively while the link is loss-free;
  optionally doubled per interval until the first loss (slow start), cut to the delivered
  fraction on heavy loss, and released in ticks rather than datagram by datagram.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SEQ32_MODULUS = 1 << 32
SEQ32_MASK = SEQ32_MODULUS - 1
_SEQ32_HALF = 1 << 31
# heavy_loss_decrease never cuts deeper than this in one step: a loss sample is a
# snapshot, and a burst of loss right after a pause can look worse than the link is.
HEAVY_LOSS_MIN_FACTOR = 0.25


def seq32_diff(a: int, b: int) -> int:
    """Signed serial-number distance ``a - b`` (RFC 1982) in ``[-2**31, 2**31)``.

    Positive means ``a`` is newer than ``b``. Exactly half the space apart is ambiguous in RFC 1982;
    it is reported as ``-2**31`` (older), which every caller treats as a far jump anyway.
    """
    d = (a - b) & SEQ32_MASK
    return d - SEQ32_MODULUS if d >= _SEQ32_HALF else d


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """Every congestion-control knob, with defaults for a LAN gossip node.

    Loss detection (receiver):
      reorder_window_s: a missing sequence number is declared lost this long after the gap was seen,
        unless it arrives first. Longer tolerates more jitter but reacts later.
      reorder_packets: ...or once this many newer data packets arrived (QUIC's packet threshold);
        the packet that reveals the gap counts as the first. A packet displaced by fewer positions
        than this is never reported.
      max_gap_packets: a jump skipping more than this many sequence numbers, or going back more
        than this many, is treated as a sender restart (or garbage) and resets the detector instead
        of reporting a huge loss. Also bounds memory.
      nak_interval_s: at most one NAK report per this interval, whatever the loss pattern.
      max_nak_ranges: at most this many (start, count) ranges in one report; further losses are
        still counted in ``NakReport.lost`` so the sender's loss fraction stays right.

    Pacing and AIMD (sender):
      initial_rate_bytes_per_s / min_rate_bytes_per_s / max_rate_bytes_per_s: data pacing rate at
        start and its bounds. The minimum keeps a loss storm from stalling a link for good.
      burst_bytes: token-bucket depth, i.e. the most data sent back to back after an idle period.
        The default fits any UDP datagram (65,507 B), so a single datagram never needs debt.
      decrease_factor: multiplicative decrease applied on a loss event (rate *= factor).
      loss_threshold: a loss fraction lost / (lost + received) above this counts as congestion;
        below it, loss is treated as noise (e.g. a corrupted frame) and does not cut the rate.
      loss_sample_packets: the fraction is judged over at least this many packets, pooling
        consecutive NAK reports, so a single random loss in a small report is not mistaken for
        congestion. Losses above loss_threshold * loss_sample_packets are congestion at once.
        1 judges every report on its own.
      decrease_holdoff_s: at most one decrease per this period, so the several NAK reports produced
        by one queue overflow cut the rate once, not into collapse. Should exceed
        RTT + reorder_window_s + nak_interval_s.
      increase_bytes_per_s / increase_interval_s: additive increase applied each loss-free interval
        (none within decrease_holdoff_s of a decrease). Keep one step to a few percent of the
        slowest expected link: NAK feedback lags, and bigger steps overshoot into heavy loss.
        The defaults (+160 KiB/s per second) hold a 0.5-3 MB/s bottleneck at 90-100 % of its
        capacity with ~1 % loss in simulation; on a 200 KB/s one they overshoot (~8 % loss),
        and they take about a minute to climb from 1 MiB/s to 10 MB/s.
      slow_start_factor: until the link's first rate decrease, each loss-free increase interval
        in which data waited for the pacer multiplies the rate by this instead (TCP's slow
        start, on a rate): a clean fast link reaches its capacity in a few intervals instead of
        minutes of additive steps. An interval without waiting data does not grow the rate, so
        an idle link never claims a rate it has not used. 1 disables it.
      heavy_loss_decrease: when a full loss sample (>= loss_sample_packets) shows more loss than
        1 - decrease_factor, cut the
        rate to the fraction that got through (rate *= 1 - loss, at least x
        HEAVY_LOSS_MIN_FACTOR) instead of by decrease_factor: a sender several times too fast
        (a slow start's overshoot, or an initial rate far above a slow link) comes back to the
        delivered rate in one step, not one holdoff per 30 % cut.
      tick_s: pacing granularity. A datagram may leave while the bucket is short of it by at
        most tick_s of rate (the bucket goes into that much debt), and ``next_send_time`` still
        waits for the full amount: so one wakeup sends about a tick of data in one batch, and
        an event loop whose timers fire early (uvloop rounds them to the millisecond) sends
        instead of spinning on a bucket a few bytes short. The average rate is unchanged.
        0 paces datagram by datagram.

    Queueing (sender, links.py):
      max_queued_data_bytes: bound of one link's data queue; beyond it the oldest queued data is
        shed (counted). Control is never queued: it leaves at once and is only charged to the pacer.
    """

    reorder_window_s: float = 0.020
    reorder_packets: int = 3
    max_gap_packets: int = 4096
    nak_interval_s: float = 0.050
    max_nak_ranges: int = 64

    initial_rate_bytes_per_s: float = 1_048_576.0
    min_rate_bytes_per_s: float = 16_384.0
    max_rate_bytes_per_s: float = 67_108_864.0
    burst_bytes: int = 65_536
    decrease_factor: float = 0.7
    loss_threshold: float = 0.01
    loss_sample_packets: int = 200
    decrease_holdoff_s: float = 0.2
    increase_bytes_per_s: float = 16_384.0
    increase_interval_s: float = 0.1
    slow_start_factor: float = 1.0
    heavy_loss_decrease: bool = False
    tick_s: float = 0.0

    max_queued_data_bytes: int = 1_048_576

    def __post_init__(self) -> None:
        errors: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        for name in (
            "reorder_window_s",
            "nak_interval_s",
            "increase_interval_s",
            "min_rate_bytes_per_s",
            "increase_bytes_per_s",
        ):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, f"{name} must be finite and > 0, got {value}")
        need(
            math.isfinite(self.decrease_holdoff_s) and self.decrease_holdoff_s >= 0,
            f"decrease_holdoff_s must be finite and >= 0, got {self.decrease_holdoff_s}",
        )
        need(self.reorder_packets >= 1, "reorder_packets must be >= 1")
        need(self.loss_sample_packets >= 1, "loss_sample_packets must be >= 1")
        need(
            1 <= self.max_gap_packets < _SEQ32_HALF - 1,
            "max_gap_packets must be in [1, 2**31 - 1) so serial arithmetic stays unambiguous",
        )
        need(self.max_nak_ranges >= 1, "max_nak_ranges must be >= 1")
        need(
            math.isfinite(self.max_rate_bytes_per_s)
            and self.min_rate_bytes_per_s
            <= self.initial_rate_bytes_per_s
            <= self.max_rate_bytes_per_s,
            "need min_rate_bytes_per_s <= initial_rate_bytes_per_s <= max_rate_bytes_per_s, finite",
        )
        need(self.burst_bytes >= 1, "burst_bytes must be >= 1")
        need(
            math.isfinite(self.slow_start_factor) and self.slow_start_factor >= 1,
            "slow_start_factor must be finite and >= 1",
        )
        need(
            math.isfinite(self.tick_s) and 0 <= self.tick_s <= 1,
            "tick_s must be in [0, 1] seconds",
        )
        need(0 < self.decrease_factor < 1, "decrease_factor must be in (0, 1)")
        need(0 <= self.loss_threshold < 1, "loss_threshold must be in [0, 1)")
        need(self.max_queued_data_bytes >= 1, "max_queued_data_bytes must be >= 1")
        if errors:
            raise ValueError("invalid PacingConfig: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------
# Receiver: loss detection and NAK aggregation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NakReport:
    """One aggregated NAK, covering everything since the previous report.

    ranges: ``(start_seq32, count)`` runs of lost sequence numbers, oldest first, merged. A run may
      cross the wrap (start 0xFFFFFFFE, count 4 covers ...FE, ...FF, 0, 1).
    lost: total lost sequence numbers in the window; >= the sum of the range counts when the range
      list was truncated to ``max_nak_ranges``.
    received: distinct data packets received since the previous report. Counting the whole span
      makes ``loss_fraction`` a true loss rate: an isolated random loss after a quiet stretch
      gives a tiny fraction (no rate cut), while a congestion episode, whose reports follow each
      other every ``nak_interval_s``, shows its real fraction from the second report on.
    """

    ranges: tuple[tuple[int, int], ...]
    lost: int
    received: int

    @property
    def loss_fraction(self) -> float:
        total = self.lost + self.received
        return self.lost / total if total else 0.0


@dataclass(frozen=True, slots=True)
class LossStats:
    received: int
    duplicates: int
    lost: int
    reordered: int
    resets: int
    reports: int


class _Gap:
    """A run of missing logical sequence numbers [start, end) awaiting its reorder verdict."""

    __slots__ = ("arrivals_at_open", "deadline_s", "end", "start")

    def __init__(self, start: int, end: int, deadline_s: float, arrivals_at_open: int) -> None:
        self.start = start
        self.end = end
        self.deadline_s = deadline_s  # declared lost at this time unless filled first
        self.arrivals_at_open = arrivals_at_open


class LinkLossDetector:
    """Receiver side of one directed link: turns link sequence numbers into rare, aggregated NAKs.

    Sequence numbers are unwrapped into an unbounded logical sequence relative to the highest one
    seen, so wrap-around is invisible past ``on_packet``. Usage by the runtime: call ``on_packet``
    for every data datagram that passed header checks, ``poll_nak`` after each receive batch and
    whenever ``next_timer`` comes due, and send whatever report it returns. Feed it only
    datagrams that authenticated: a spoofed sequence number could otherwise reset the detector
    (hiding real loss) or open fake gaps (NAKs that slow the peer down).

    The first packet seen anchors the sequence: anything older that arrives later (reordered
    around the start, or an old duplicate) is counted as a duplicate, never as loss.
    """

    __slots__ = (
        "_arrivals",
        "_cfg",
        "_highest",
        "_lost",
        "_lost_ranges",
        "_next_report_s",
        "_pending",
        "_received",
        "duplicates",
        "lost_total",
        "received_total",
        "reordered",
        "reports",
        "resets",
    )

    def __init__(self, config: PacingConfig | None = None) -> None:
        self._cfg = config or PacingConfig()
        self._highest: int | None = None  # logical sequence number of the newest packet
        self._arrivals = 0  # count of packets that advanced _highest; the packet-threshold clock
        self._pending: deque[_Gap] = deque()  # ordered by start == by opening order
        self._lost_ranges: list[list[int]] = []  # [logical_start, count], awaiting report
        self._lost = 0  # lost seqs awaiting report, including those beyond max_nak_ranges
        self._received = 0  # distinct packets since the last report
        # Deadlines are stored, not recomputed, so next_timer() and poll_nak() agree to the bit.
        self._next_report_s = -math.inf
        self.received_total = 0
        self.duplicates = 0  # duplicates, and stragglers arriving after being declared lost
        self.lost_total = 0
        self.reordered = 0  # late arrivals that filled a pending gap
        self.resets = 0
        self.reports = 0

    # Hot path: called per received data datagram.
    def on_packet(self, seq32: int, now: float) -> None:
        """Record one received data datagram carrying link sequence number ``seq32``."""
        highest = self._highest
        if highest is None:
            self._highest = seq32
            self._arrivals += 1
            self._count_received()
            return

        delta = seq32_diff(seq32, highest & SEQ32_MASK)
        if delta == 1 and not self._pending:  # in order, nothing outstanding: the common case
            self._highest = highest + 1
            self._arrivals += 1
            self._received += 1
            self.received_total += 1
            return
        max_gap = self._cfg.max_gap_packets
        if delta > max_gap + 1 or delta < -max_gap:
            self._reset(highest + delta)
            return
        if delta > 0:
            self._arrivals += 1
            if delta > 1:
                deadline_s = now + self._cfg.reorder_window_s
                self._pending.append(_Gap(highest + 1, highest + delta, deadline_s, self._arrivals))
            self._highest = highest + delta
            self._count_received()
            self._expire(now)
            return
        if delta < 0 and self._fill(highest + delta):
            self.reordered += 1
            self._count_received()
        else:
            self.duplicates += 1
        self._expire(now)

    def on_tail(self, seq32: int, now: float) -> None:
        """The sender says ``seq32`` is the newest datagram it sent us (a tail probe,
        sent once the link goes quiet). Anything between our newest and it is lost now:
        no later data packet will ever reveal that gap."""
        highest = self._highest
        if highest is None:
            return
        delta = seq32_diff(seq32, highest & SEQ32_MASK)
        if delta <= 0 or delta > self._cfg.max_gap_packets:
            return
        self._pending.append(_Gap(highest + 1, highest + delta + 1, now, self._arrivals))
        self._highest = highest + delta
        self._expire(now)

    def poll_nak(self, now: float) -> NakReport | None:
        """The aggregated NAK if one is due, else None; at most one per ``nak_interval_s``."""
        self._expire(now)
        if not self._lost:
            return None
        if now < self._next_report_s:
            return None
        report = NakReport(
            ranges=tuple((start & SEQ32_MASK, count) for start, count in self._lost_ranges),
            lost=self._lost,
            received=self._received,
        )
        self._lost_ranges = []
        self._lost = 0
        self._received = 0
        self._next_report_s = now + self._cfg.nak_interval_s
        self.reports += 1
        return report

    @property
    def owes_poll(self) -> bool:
        """Is a gap waiting for its verdict, or a loss waiting to be reported? (When not,
        ``poll_nak`` has nothing to do and ``next_timer`` is None.)"""
        return bool(self._pending) or bool(self._lost)

    def next_timer(self, now: float) -> float | None:
        """When ``poll_nak`` should next be called, or None if nothing is pending.

        Count-based expiry happens inside ``on_packet``, so only the time-based deadlines matter.
        The value may be <= ``now``, meaning "call it now".
        """
        deadlines: list[float] = []
        if self._pending:
            deadlines.append(self._pending[0].deadline_s)
        if self._lost:
            deadlines.append(max(self._next_report_s, now))
        return min(deadlines) if deadlines else None

    def stats(self) -> LossStats:
        return LossStats(
            received=self.received_total,
            duplicates=self.duplicates,
            lost=self.lost_total,
            reordered=self.reordered,
            resets=self.resets,
            reports=self.reports,
        )

    def _count_received(self) -> None:
        self._received += 1
        self.received_total += 1

    def _reset(self, logical: int) -> None:
        # A jump this large is a restarted sender or junk, not loss: forget pending gaps rather
        # than report thousands of phantom losses. Confirmed losses still get reported.
        self._pending.clear()
        self._highest = logical
        self._arrivals += 1
        self.resets += 1
        self._count_received()

    def _fill(self, logical: int) -> bool:
        """Remove ``logical`` from a pending gap if it is there; True if it was."""
        for i, gap in enumerate(self._pending):
            if logical < gap.start:
                return False
            if logical < gap.end:
                if gap.end - gap.start == 1:
                    del self._pending[i]
                elif logical == gap.start:
                    gap.start += 1
                elif logical == gap.end - 1:
                    gap.end -= 1
                else:  # split; both halves keep the original deadline
                    tail = _Gap(logical + 1, gap.end, gap.deadline_s, gap.arrivals_at_open)
                    gap.end = logical
                    self._pending.insert(i + 1, tail)
                return True
        return False

    def _expire(self, now: float) -> None:
        """Move gaps whose reorder allowance is used up (by time or by packet count) to lost."""
        pending = self._pending
        if not pending:
            return
        # The revealing packet is arrival number ``arrivals_at_open``; it counts as the first.
        last_ok_open = self._arrivals - self._cfg.reorder_packets + 1
        while pending:
            gap = pending[0]
            if now < gap.deadline_s and gap.arrivals_at_open > last_ok_open:
                break
            pending.popleft()
            self._record_lost(gap.start, gap.end - gap.start)

    def _record_lost(self, start: int, count: int) -> None:
        self._lost += count
        self.lost_total += count
        ranges = self._lost_ranges
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += count
        elif len(ranges) < self._cfg.max_nak_ranges:
            ranges.append([start, count])
        # else: listed ranges are full; the loss still counts in ``lost``.


# --------------------------------------------------------------------------------------------------
# Sender: AIMD token-bucket pacer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PacerStats:
    rate_bytes_per_s: float
    sent_bytes: int
    decreases: int
    increases: int


class AimdPacer:
    """Token bucket whose fill rate follows AIMD on the receiver's NAK reports.

    Tokens are bytes. Data goes out only when ``can_send`` says so, which keeps the bucket >= 0.
    ``consume`` is also used for traffic that is not gated (control), so the pacer still accounts
    for it: that may push the bucket into debt, bounded at ``-burst_bytes`` so a control storm
    delays data by at most one burst's worth of time after it ends.
    """

    __slots__ = (
        "_cfg",
        "_holdoff_until_s",
        "_last_refill_s",
        "_loss_in_interval",
        "_next_increase_s",
        "_rate",
        "_sample_lost",
        "_sample_total",
        "_slow_start",
        "_tokens",
        "_waited",
        "decreases",
        "increases",
        "sent_bytes",
    )

    def __init__(self, config: PacingConfig | None = None, now: float = 0.0) -> None:
        self._cfg = config or PacingConfig()
        self._rate = float(self._cfg.initial_rate_bytes_per_s)
        self._tokens = float(self._cfg.burst_bytes)
        self._last_refill_s = now
        # Deadlines are stored, not recomputed, so next_timer() and on_tick() agree to the bit.
        self._next_increase_s = now + self._cfg.increase_interval_s
        self._holdoff_until_s = now  # no decrease yet: the first loss event may cut at once
        self._loss_in_interval = False
        # Packets (lost, lost + received) of the loss sample still being judged; see on_nak.
        self._sample_lost = 0
        self._sample_total = 0
        self._slow_start = self._cfg.slow_start_factor > 1  # until the first decrease
        self._waited = False  # data waited for tokens during this increase interval
        self.sent_bytes = 0
        self.decreases = 0
        self.increases = 0

    @property
    def config(self) -> PacingConfig:
        return self._cfg

    @property
    def rate_bytes_per_s(self) -> float:
        return self._rate

    def tokens(self, now: float) -> float:
        """Bucket level in bytes at ``now`` (negative only after ungated ``consume``)."""
        self._refill(now)
        return self._tokens

    def send_allowance(self, now: float) -> float:
        """Bytes that may leave now, datagram size permitting: the bucket plus one tick of
        debt (see ``tick_s``). For a caller that spends it locally in one turn, as
        ``can_send`` would datagram by datagram, then calls ``consume`` once."""
        self._refill(now)
        cfg = self._cfg
        if cfg.tick_s:
            return self._tokens + min(self._rate * cfg.tick_s, cfg.burst_bytes)
        return self._tokens

    def note_waited(self) -> None:
        """Data waited for the bucket (what a refused ``can_send`` records)."""
        self._waited = True

    def can_send(self, nbytes: int, now: float) -> bool:
        """True if a datagram of ``nbytes`` may go out now.

        A datagram larger than the bucket needs a full bucket (it could never fit otherwise).
        With ``tick_s`` the bucket may be short of it by up to one tick of rate (see
        PacingConfig). A refusal marks the interval as rate-limited (slow start grows then).
        """
        self._refill(now)
        cfg = self._cfg
        need = min(nbytes, cfg.burst_bytes)
        if cfg.tick_s:
            need -= min(self._rate * cfg.tick_s, cfg.burst_bytes)
        if self._tokens >= need:
            return True
        self._waited = True
        return False

    def consume(self, nbytes: int, now: float) -> None:
        """Account for ``nbytes`` just sent on this link."""
        self._refill(now)
        self._tokens = max(self._tokens - nbytes, -float(self._cfg.burst_bytes))
        self.sent_bytes += nbytes

    def next_send_time(self, nbytes: int, now: float) -> float:
        """Earliest time at which ``can_send(nbytes, t)`` will hold at the current rate."""
        self._refill(now)
        need = min(nbytes, self._cfg.burst_bytes)
        tokens, rate = self._tokens, self._rate
        if tokens >= need:
            return now
        base = self._last_refill_s  # == now, unless the caller's clock stepped back
        t = base + (need - tokens) / rate
        # Float rounding can leave the bucket a few ULPs short at t, and a timer that fires
        # without effect would spin. Step to the first instant that suffices, evaluated exactly
        # as _refill will evaluate it.
        while tokens + (t - base) * rate < need:
            t = math.nextafter(t, math.inf)
        return max(t, now)

    def on_nak(self, report_lost: int, report_received: int, now: float) -> bool:
        """Feed one NAK report; returns True if it caused a multiplicative decrease.

        Congestion means lost / (lost + received) > ``loss_threshold`` over a sample of at least
        ``loss_sample_packets``. A report is often smaller than that (it covers only the packets
        since the previous report), and one random loss in 50 packets is not a 2 % loss rate;
        so small reports are pooled until the sample is full, but judged at once as congestion
        when their losses alone already exceed the threshold for a full sample.
        """
        if report_lost < 0 or report_received < 0:
            raise ValueError("NAK report counts must be >= 0")
        cfg = self._cfg
        self._sample_lost += report_lost
        self._sample_total += report_lost + report_received
        lost, total = self._sample_lost, self._sample_total
        if lost <= cfg.loss_threshold * max(total, cfg.loss_sample_packets):
            if total >= cfg.loss_sample_packets:  # a full sample at or below the threshold
                self._sample_lost = self._sample_total = 0
            return False
        self._sample_lost = self._sample_total = 0
        self._loss_in_interval = True  # blocks the additive increase of the current interval
        if now < self._holdoff_until_s:
            return False  # same loss event: its first report already cut the rate
        self._refill(now)  # tokens earned so far accrue at the old rate
        factor = cfg.decrease_factor
        # Cut to what got through when that is deeper, judged only on a full sample: three
        # losses among five packets say little about the link's capacity.
        if cfg.heavy_loss_decrease and total >= cfg.loss_sample_packets:
            factor = min(factor, max(1 - lost / total, HEAVY_LOSS_MIN_FACTOR))
        self._rate = max(self._rate * factor, cfg.min_rate_bytes_per_s)
        self._holdoff_until_s = now + cfg.decrease_holdoff_s
        self._slow_start = False
        self.decreases += 1
        # The increase clock restarts: probing resumes only after a full loss-free interval.
        self._next_increase_s = now + cfg.increase_interval_s
        self._loss_in_interval = False
        return True

    def on_tick(self, now: float) -> bool:
        """Advance the additive-increase clock; returns True if the rate was raised.

        Call at least every ``increase_interval_s`` (see ``next_timer``). A late tick raises the
        rate once, not once per missed interval, so a stalled loop does not spike the rate.
        """
        cfg = self._cfg
        if now < self._next_increase_s:
            return False
        self._next_increase_s = now + cfg.increase_interval_s
        lossy, waited = self._loss_in_interval, self._waited
        self._loss_in_interval = self._waited = False
        # Within the holdoff the link has not yet shown the effect of the last decrease (NAKs
        # lag by reorder window + NAK interval + RTT), so probing upward then only overshoots.
        if lossy or now < self._holdoff_until_s:
            return False
        if self._rate >= cfg.max_rate_bytes_per_s:
            return False
        if self._slow_start:
            if not waited:  # the rate did not hold anything back: no evidence it is too low
                return False
            rate = self._rate * cfg.slow_start_factor
        else:
            rate = self._rate + cfg.increase_bytes_per_s
        self._refill(now)
        self._rate = min(rate, cfg.max_rate_bytes_per_s)
        self.increases += 1
        return True

    @property
    def in_slow_start(self) -> bool:
        return self._slow_start

    def next_timer(self, now: float) -> float:
        """When ``on_tick`` next has work to do."""
        return self._next_increase_s

    def stats(self) -> PacerStats:
        return PacerStats(
            rate_bytes_per_s=self._rate,
            sent_bytes=self.sent_bytes,
            decreases=self.decreases,
            increases=self.increases,
        )

    def _refill(self, now: float) -> None:
        elapsed = now - self._last_refill_s
        if elapsed <= 0:  # same instant, or a caller's clock stepped back: earn nothing
            return
        self._last_refill_s = now
        self._tokens = min(self._tokens + elapsed * self._rate, float(self._cfg.burst_bytes))


# --------------------------------------------------------------------------------------------------
# Sender: control-first scheduler in front of the pacer
# --------------------------------------------------------------------------------------------------
