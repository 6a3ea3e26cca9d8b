"""Loss detection, NAK aggregation and AIMD pacing (congestion.py), and the per-peer link
queues that drive them (links.py).

Everything runs on a fake clock; randomness is seeded.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.congestion import (
    SEQ32_MASK,
    AimdPacer,
    LinkLossDetector,
    NakReport,
    PacingConfig,
    seq32_diff,
)
from gwyh_mp.protocol.links import (
    TAIL_PROBE_S,
    TAIL_PROBE_STEPS,
    LinkQueues,
    LinkState,
)
from gwyh_mp.protocol.stats import Stats

CFG = PacingConfig()
PKT = 1200  # bytes per simulated data datagram
WRAP_START = 2**32 - 5
PEER = b"p" * 16
ADDR = ("10.0.0.2", 7000)


def lost_seqs(reports: Iterable[NakReport]) -> list[int]:
    """Expand report ranges into the list of seq32 values they name."""
    return [
        (start + i) & SEQ32_MASK for r in reports for start, count in r.ranges for i in range(count)
    ]


def feed(
    det: LinkLossDetector, seqs: Iterable[int], t0: float = 0.0, dt: float = 0.001
) -> tuple[list[NakReport], float]:
    """Deliver ``seqs`` one per ``dt``, polling for NAKs after each, as a runtime would.

    Then lets 1 s pass (polling at each timer) so every pending gap gets its verdict.
    """
    reports: list[NakReport] = []
    now = t0
    for s in seqs:
        det.on_packet(s & SEQ32_MASK, now)
        if (r := det.poll_nak(now)) is not None:
            reports.append(r)
        now += dt
    end = now + 1.0
    while (t := det.next_timer(now)) is not None and t <= end:
        now = max(now, t)
        if (r := det.poll_nak(now)) is not None:
            reports.append(r)
    return reports, now


# --------------------------------------------------------------------------------------------------
# Serial arithmetic
# --------------------------------------------------------------------------------------------------


@settings(derandomize=True)
@given(st.integers(0, SEQ32_MASK), st.integers(-(2**31) + 1, 2**31 - 1))
def test_seq32_diff_inverts_wrapping_add(a: int, d: int) -> None:
    assert seq32_diff((a + d) & SEQ32_MASK, a) == d


def test_link_sequence_wraps() -> None:
    link = LinkState(PEER, link_seq_out=SEQ32_MASK - 2)
    assert [link.next_link_seq() for _ in range(4)] == [SEQ32_MASK - 1, SEQ32_MASK, 0, 1]


# --------------------------------------------------------------------------------------------------
# Loss detection
# --------------------------------------------------------------------------------------------------


def test_in_order_stream_never_reports() -> None:
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, range(5000))
    assert reports == []
    assert det.next_timer(100.0) is None
    assert det.stats().received == 5000
    assert det.stats().lost == 0


def test_random_loss_reported_exactly() -> None:
    rng = random.Random(1234)
    n = 20_000
    dropped = {s for s in range(n) if rng.random() < 0.10}
    delivered = [s for s in range(n) if s not in dropped]
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, delivered)
    # Only losses below the last delivered packet are detectable.
    expected = sorted(s for s in dropped if s < delivered[-1])
    assert abs(len(expected) - 0.10 * n) < 0.01 * n  # sanity: the seeded link really lost ~10%
    assert lost_seqs(reports) == expected
    assert sum(r.lost for r in reports) == len(expected)
    assert sum(r.received for r in reports) <= len(delivered)
    # Aggregated, not per packet: 20 s of traffic, 50 ms interval.
    assert len(reports) <= 20.0 / CFG.nak_interval_s + 2
    for r in reports:
        assert 0.0 < r.loss_fraction < 0.5


def test_adjacent_swaps_are_not_loss() -> None:
    seqs = [0] + [1 + (s ^ 1) for s in range(2000)]  # 0, 2, 1, 4, 3, ...: every pair swapped
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, seqs)
    assert reports == []
    assert det.stats().reordered == 1000
    assert det.stats().received == 2001


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reordering_within_thresholds_is_not_loss(seed: int) -> None:
    # Each packet is delayed by a random fraction of reorder_packets slots, so at most
    # reorder_packets - 1 newer packets overtake any one of them (and only by a few ms).
    rng = random.Random(seed)
    k = CFG.reorder_packets
    seqs = sorted(range(3000), key=lambda i: i + rng.random() * k)
    assert sum(a > b for a, b in itertools.pairwise(seqs)) > 500  # heavily reordered
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, seqs)
    assert reports == []
    stats = det.stats()
    assert stats.lost == 0
    assert stats.reordered > 500
    # Packets older than the very first one seen anchor nothing and count as duplicates.
    assert stats.received + stats.duplicates == 3000
    assert stats.duplicates < k


def test_reorder_by_time_within_window_is_not_loss() -> None:
    # One packet held back 15 ms (< reorder_window_s) while only 2 newer ones pass it.
    det = LinkLossDetector(CFG)
    det.on_packet(0, 0.000)
    det.on_packet(2, 0.001)
    det.on_packet(3, 0.010)
    assert det.poll_nak(0.012) is None
    det.on_packet(1, 0.015)
    assert det.poll_nak(0.100) is None
    assert det.next_timer(0.100) is None
    assert det.stats().reordered == 1


def test_gap_declared_lost_after_packet_threshold() -> None:
    det = LinkLossDetector(CFG)
    for s in [0, 2, 3]:
        det.on_packet(s, 0.0)
    assert det.poll_nak(0.0) is None  # two newer packets: still possibly reordered
    det.on_packet(4, 0.0)  # third newer packet
    report = det.poll_nak(0.0)
    assert report is not None
    assert report.ranges == ((1, 1),)
    det.on_packet(1, 0.001)  # the straggler is now just a late duplicate
    assert det.stats().duplicates == 1


def test_gap_declared_lost_after_time_window() -> None:
    det = LinkLossDetector(CFG)
    det.on_packet(10, 1.0)
    det.on_packet(13, 1.001)  # 11 and 12 missing, no more traffic
    assert det.poll_nak(1.001) is None
    deadline = det.next_timer(1.001)
    assert deadline == pytest.approx(1.001 + CFG.reorder_window_s)
    assert det.poll_nak(deadline - 1e-4) is None
    report = det.poll_nak(deadline)
    assert report is not None
    assert report.ranges == ((11, 2),)
    assert (report.lost, report.received) == (2, 2)
    assert det.next_timer(deadline) is None


def test_partial_late_arrival_splits_gap() -> None:
    det = LinkLossDetector(CFG)
    det.on_packet(0, 0.0)
    det.on_packet(6, 0.001)  # 1..5 missing
    det.on_packet(3, 0.002)  # late middle arrival
    det.on_packet(1, 0.003)  # late edge arrival
    report = det.poll_nak(0.030)
    assert report is not None
    assert report.ranges == ((2, 1), (4, 2))
    assert report.lost == 3


def test_wraparound_without_loss() -> None:
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, range(WRAP_START, WRAP_START + 100))
    assert reports == []
    assert det.stats().received == 100


def test_wraparound_with_loss_and_reorder() -> None:
    seqs = [s & SEQ32_MASK for s in range(WRAP_START, WRAP_START + 40)]
    # Lose a run spanning the wrap (0xFFFFFFFF, 0, 1) and one isolated seq after it.
    lost = {SEQ32_MASK, 0, 1, 7}
    delivered = [s for s in seqs if s not in lost]
    # Swap the two packets on either side of the lost run: reorder across the wrap point.
    i = delivered.index(SEQ32_MASK - 1)
    delivered[i], delivered[i + 1] = delivered[i + 1], delivered[i]
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, delivered)
    assert [rng for r in reports for rng in r.ranges] == [(SEQ32_MASK, 3), (7, 1)]
    assert lost_seqs(reports) == [SEQ32_MASK, 0, 1, 7]


def test_duplicates_are_ignored() -> None:
    rng = random.Random(7)
    seqs: list[int] = []
    for s in range(WRAP_START, WRAP_START + 2000):
        seqs.append(s)
        if rng.random() < 0.2:
            seqs.append(s)  # immediate duplicate
        if rng.random() < 0.05 and s - 50 >= WRAP_START:
            seqs.append(s - 50)  # stale duplicate from well behind
    det = LinkLossDetector(CFG)
    reports, _ = feed(det, seqs)
    assert reports == []
    stats = det.stats()
    assert stats.received == 2000
    assert stats.duplicates == len(seqs) - 2000
    assert stats.resets == 0


def test_nak_reports_are_rate_limited_under_heavy_loss() -> None:
    rng = random.Random(99)
    n = 50_000
    dt = 0.0001  # 10k pkt/s for 5 s
    delivered = [s for s in range(n) if rng.random() >= 0.3]
    det = LinkLossDetector(CFG)
    times: list[float] = []
    reports: list[NakReport] = []
    now = 0.0
    for s in delivered:
        det.on_packet(s, now)
        if (r := det.poll_nak(now)) is not None:
            reports.append(r)
            times.append(now)
        now += dt / 0.7
    assert len(reports) > 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= CFG.nak_interval_s - 1e-9
    assert len(reports) <= now / CFG.nak_interval_s + 1
    for r in reports:
        assert len(r.ranges) <= CFG.max_nak_ranges
    # Each report covers one interval (~350 packets), so its fraction is the link's loss rate.
    # (The first one fires at the very first loss and covers only a handful of packets.)
    for r in reports[1:]:
        assert 0.2 < r.loss_fraction < 0.4


def test_range_list_truncated_but_lost_count_kept() -> None:
    cfg = PacingConfig(max_nak_ranges=8)
    det = LinkLossDetector(cfg)
    # Every other seq lost, all within one NAK interval: 100 isolated losses.
    for k, s in enumerate(range(0, 202, 2)):
        det.on_packet(s, k * 1e-5)
    report = det.poll_nak(0.5)
    assert report is not None
    assert len(report.ranges) == 8
    assert report.ranges[0] == (1, 1)
    assert report.lost == 100
    assert det.stats().lost == 100


def test_huge_forward_jump_resets_without_huge_report() -> None:
    det = LinkLossDetector(CFG)
    reports, now = feed(det, range(100))
    det.on_packet(100 + CFG.max_gap_packets + 1000, now)  # e.g. sender restarted
    later, now = feed(
        det, range(100 + CFG.max_gap_packets + 1001, 100 + CFG.max_gap_packets + 1100), now
    )
    assert reports == [] and later == []
    assert det.stats().resets == 1
    assert det.stats().lost == 0


def test_huge_backward_jump_resets_and_bounded_gap_is_reported() -> None:
    det = LinkLossDetector(CFG)
    _, now = feed(det, range(1_000_000, 1_000_100))
    reports, now = feed(det, range(10, 60), now)  # far behind: a fresh sequence
    assert reports == []
    assert det.stats().resets == 1
    # A gap of exactly max_gap_packets is still tracked and reported.
    det.on_packet(59 + CFG.max_gap_packets + 1, now)
    det.on_packet(59 + CFG.max_gap_packets + 2, now)
    det.on_packet(59 + CFG.max_gap_packets + 3, now)
    report = det.poll_nak(now + 1)
    assert report is not None
    assert report.lost == CFG.max_gap_packets
    assert report.ranges == ((60, CFG.max_gap_packets),)


def test_report_fraction_is_a_loss_rate_since_last_report() -> None:
    det = LinkLossDetector(CFG)
    # An isolated loss after 10 s of clean traffic: a negligible fraction, no reason to slow down.
    reports, now = feed(det, [s for s in range(10_000) if s != 9_000])
    assert len(reports) == 1
    assert reports[0].lost == 1
    assert reports[0].loss_fraction < CFG.loss_threshold
    # A congestion episode right after: reports every interval, each showing the real rate.
    episode = [s for s in range(10_000, 11_000) if s % 4]
    reports, _ = feed(det, episode, now)
    assert len(reports) >= 10
    for r in reports[1:]:
        assert 0.2 < r.loss_fraction < 0.3


@st.composite
def lossy_reordered_streams(draw: st.DrawFn, max_delay_slots: float) -> list[int]:
    """Seqs 0..n-1 with random loss, each delayed by < ``max_delay_slots`` positions, plus dups."""
    n = draw(st.integers(1, 300))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    jitter = draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=n, max_size=n))
    seqs = sorted((i for i in range(n) if keep[i]), key=lambda i: i + jitter[i] * max_delay_slots)
    seqs = seqs or [0]
    # Duplicates arrive after every original: inserted in the middle they would push a
    # reordered packet past the reorder *time* window (each arrival advances the clock),
    # and the property below would no longer hold by construction.
    for _ in range(draw(st.integers(0, 10))):
        seqs.append(seqs[draw(st.integers(0, len(seqs) - 1))])
    return seqs


# Room for every range a 300-packet stream can produce; truncation has its own test.
PROPERTY_CFG = PacingConfig(max_nak_ranges=300)


def run_stream(seqs: list[int], base: int, dt: float) -> tuple[set[int], list[int], set[int]]:
    """Feed ``seqs`` (offset by ``base``, wrapped) and return (received, reported, never)."""
    det = LinkLossDetector(PROPERTY_CFG)
    received: set[int] = set()
    reported: list[int] = []

    def poll(t: float) -> None:
        if (r := det.poll_nak(t)) is not None:
            assert r.lost == sum(count for _, count in r.ranges)  # never truncated here
            reported.extend(lost_seqs([r]))

    now = 0.0
    for s in seqs:
        seq32 = (base + s) & SEQ32_MASK
        det.on_packet(seq32, now)
        received.add(seq32)
        poll(now)
        now += dt
    poll(now + 1.0)
    assert det.stats().resets == 0
    assert len(reported) == len(set(reported))  # nothing reported twice
    delivered = set(seqs)
    # Losses are detectable between the first packet seen (the anchor) and the highest one.
    never = {(base + s) & SEQ32_MASK for s in range(seqs[0] + 1, max(seqs)) if s not in delivered}
    return received, reported, never


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    lossy_reordered_streams(CFG.reorder_packets),
    st.integers(0, SEQ32_MASK),
    st.sampled_from([0.0001, 0.001, 0.005]),
)
def test_property_nak_exact_within_reorder_allowance(seqs: list[int], base: int, dt: float) -> None:
    # Delays stay under reorder_packets positions and under reorder_window_s: the NAKs name
    # exactly the seqs that never arrived.
    received, reported, never = run_stream(seqs, base, dt)
    assert set(reported) == never
    assert not set(reported) & received


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    lossy_reordered_streams(3 * CFG.reorder_packets),
    st.integers(0, SEQ32_MASK),
    st.sampled_from([0.0001, 0.001, 0.01]),
)
def test_property_nak_complete_beyond_reorder_allowance(
    seqs: list[int], base: int, dt: float
) -> None:
    # Larger delays may turn stragglers into (reported) losses, but never hide a real loss.
    _, reported, never = run_stream(seqs, base, dt)
    assert never <= set(reported)
    lo, hi = seqs[0], max(seqs)
    assert all(0 < seq32_diff(x, (base + lo) & SEQ32_MASK) < hi - lo for x in reported)


# --------------------------------------------------------------------------------------------------
# Pacer
# --------------------------------------------------------------------------------------------------


def test_token_bucket_paces_at_rate() -> None:
    cfg = PacingConfig(initial_rate_bytes_per_s=100_000, burst_bytes=10_000)
    p = AimdPacer(cfg, now=0.0)
    sent = 0
    while p.can_send(PKT, 0.0):  # initial burst
        p.consume(PKT, 0.0)
        sent += PKT
    assert sent == 8 * PKT
    t = p.next_send_time(PKT, 0.0)
    assert t == pytest.approx((PKT - (10_000 - 8 * PKT)) / 100_000)
    assert not p.can_send(PKT, t - 1e-4)
    assert p.can_send(PKT, t)
    # Over 10 s of saturated sending the average rate is the configured one.
    now = t
    total = 0
    while now < 10.0:
        now = p.next_send_time(PKT, now)
        assert p.can_send(PKT, now)
        p.consume(PKT, now)
        total += PKT
    assert total / 10.0 == pytest.approx(100_000, rel=0.02)
    assert p.stats().sent_bytes == total + sent


def test_oversized_datagram_needs_full_bucket() -> None:
    cfg = PacingConfig(initial_rate_bytes_per_s=1000, min_rate_bytes_per_s=1000, burst_bytes=2000)
    p = AimdPacer(cfg, now=0.0)
    p.consume(1000, 0.0)
    assert not p.can_send(5000, 0.0)
    assert p.next_send_time(5000, 0.0) == pytest.approx(1.0)
    assert p.can_send(5000, 1.0)
    p.consume(5000, 1.0)
    assert p.tokens(1.0) == -2000  # debt bounded at -burst_bytes


def test_decrease_on_loss_above_threshold_only() -> None:
    p = AimdPacer(CFG, now=0.0)
    r0 = p.rate_bytes_per_s
    assert not p.on_nak(1, 1000, 0.1)  # 0.1% < 1%: noise
    assert p.rate_bytes_per_s == r0
    assert p.on_nak(5, 95, 0.2)  # 5%
    assert p.rate_bytes_per_s == pytest.approx(r0 * CFG.decrease_factor)
    assert p.stats().decreases == 1


def test_small_reports_are_pooled_into_a_loss_sample() -> None:
    p = AimdPacer(CFG, now=0.0)  # loss_threshold 1%, loss_sample_packets 200
    assert not p.on_nak(1, 49, 0.1)  # 2% of 50 packets: one random loss, too small to judge
    assert not p.on_nak(1, 49, 0.2)  # 2 lost in 100: still <= 1% of a full sample
    assert p.on_nak(1, 49, 0.3)  # 3 lost: above 1% of 200 whatever follows -> congestion
    assert p.decreases == 1
    # A full sample at or below the threshold is forgiven and starts a fresh sample.
    q = AimdPacer(CFG, now=0.0)
    assert not q.on_nak(2, 300, 0.1)
    assert not q.on_nak(2, 10, 0.2)
    assert q.decreases == 0
    # loss_sample_packets=1 judges each report alone.
    r = AimdPacer(PacingConfig(loss_sample_packets=1), now=0.0)
    assert r.on_nak(1, 49, 0.1)
    with pytest.raises(ValueError):
        r.on_nak(-1, 10, 0.2)


def test_one_decrease_per_holdoff() -> None:
    p = AimdPacer(CFG, now=0.0)
    r0 = p.rate_bytes_per_s
    t = 1.0
    # One loss event: a burst of NAK reports every nak_interval within the holdoff.
    decreased = []
    while t < 1.0 + CFG.decrease_holdoff_s - 1e-9:
        decreased.append(p.on_nak(30, 70, t))
        t += CFG.nak_interval_s
    assert decreased[0] and not any(decreased[1:])
    assert p.rate_bytes_per_s == pytest.approx(r0 * CFG.decrease_factor)
    assert p.on_nak(30, 70, 1.0 + CFG.decrease_holdoff_s)  # persistent loss: next cut allowed
    assert p.decreases == 2


def test_rate_floors_at_minimum() -> None:
    p = AimdPacer(CFG, now=0.0)
    for k in range(200):
        p.on_nak(50, 50, k * CFG.decrease_holdoff_s)
    assert p.rate_bytes_per_s == CFG.min_rate_bytes_per_s


def test_additive_increase_when_loss_free() -> None:
    p = AimdPacer(CFG, now=0.0)
    r0 = p.rate_bytes_per_s
    now = 0.0
    for _ in range(50):
        now = p.next_timer(now)
        assert p.on_tick(now)
    assert p.rate_bytes_per_s == pytest.approx(r0 + 50 * CFG.increase_bytes_per_s)
    assert p.increases == 50
    # A tick before the interval is up does nothing; a very late tick raises once, not 100 times.
    assert not p.on_tick(now + CFG.increase_interval_s / 2)
    assert p.on_tick(now + 100 * CFG.increase_interval_s)
    assert p.increases == 51


def test_no_increase_in_lossy_interval_or_holdoff() -> None:
    p = AimdPacer(CFG, now=0.0)  # holdoff 0.2 s, increase interval 0.1 s
    r0 = p.rate_bytes_per_s
    assert p.on_nak(5, 95, 0.05)  # decrease; holdoff until 0.25
    r1 = p.rate_bytes_per_s
    assert r1 < r0
    assert p.next_timer(0.05) == pytest.approx(0.15)
    assert not p.on_tick(0.15)  # within the holdoff: the cut has not taken effect yet
    assert not p.on_nak(5, 95, 0.20)  # loss within the holdoff: no second cut...
    assert not p.on_tick(0.25)  # ...but that interval was lossy: no increase either
    assert p.rate_bytes_per_s == r1
    assert p.on_tick(0.35)  # a clean interval past the holdoff: probe upward again
    assert p.rate_bytes_per_s == pytest.approx(r1 + CFG.increase_bytes_per_s)


def test_increase_capped_at_maximum() -> None:
    cfg = PacingConfig(initial_rate_bytes_per_s=1_000_000, max_rate_bytes_per_s=1_010_000)
    p = AimdPacer(cfg, now=0.0)
    p.on_tick(1.0)
    assert p.rate_bytes_per_s == 1_010_000
    assert not p.on_tick(2.0)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["send", "force", "nak", "tick"]),
        st.floats(0, 0.5),  # time advance, s
        st.integers(1, 70_000),  # bytes
        st.integers(0, 200),  # lost
        st.integers(0, 200),  # received
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_OPS, st.booleans())
def test_property_rate_within_bounds_and_tokens_never_negative(
    ops: list[tuple[str, float, int, int, int]], allow_forced: bool
) -> None:
    cfg = PacingConfig(
        initial_rate_bytes_per_s=50_000, min_rate_bytes_per_s=10_000, burst_bytes=80_000
    )
    p = AimdPacer(cfg, now=0.0)
    now = 0.0
    for op, adv, nbytes, lost, recv in ops:
        now += adv
        if op == "send" and p.can_send(nbytes, now):
            p.consume(nbytes, now)
        elif op == "force" and allow_forced:
            p.consume(nbytes, now)  # ungated (control) traffic
        elif op == "nak":
            p.on_nak(lost, recv, now)
        elif op == "tick":
            p.on_tick(now)
        assert cfg.min_rate_bytes_per_s <= p.rate_bytes_per_s <= cfg.max_rate_bytes_per_s
        level = p.tokens(now)
        assert level <= cfg.burst_bytes
        assert level >= (-cfg.burst_bytes if allow_forced else 0.0)
        assert p.next_send_time(nbytes, now) >= now


# --------------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------------


def _data(seq: int, size: int = PKT) -> bytes:
    """A stand-in data datagram: the link sequence sits at bytes 8-12, as in BROADCAST."""
    return bytes(8) + seq.to_bytes(4, "big") + bytes(size - 12)


def _link_queues(cfg: PacingConfig) -> tuple[LinkQueues, LinkState, list[tuple[bytes, bytes]]]:
    links = {PEER: LinkState(PEER)}
    control: list[tuple[bytes, bytes]] = []
    queues = LinkQueues(
        links,  # type: ignore[arg-type]
        links.__getitem__,
        cfg,
        Stats(),
        lambda peer, ftype, body=b"": control.append((peer, bytes([ftype]) + body)),
        lambda: 0.0,
    )
    return queues, links[PEER], control


def test_full_link_queue_sheds_oldest_and_drains_in_order_at_the_paced_rate() -> None:
    cfg = PacingConfig(
        initial_rate_bytes_per_s=100_000, burst_bytes=PKT, max_queued_data_bytes=20 * PKT
    )
    queues, link, _ = _link_queues(cfg)
    for i in range(1, 101):
        queues.enqueue(PEER, _data(i), ADDR)
    assert queues.stats["shed_datagrams"] == 80
    assert queues.backlog_bytes == link.queue_bytes == 20 * PKT
    out: list[tuple[bytes, tuple[str, int]]] = []
    now = 0.0
    for _ in range(1000):  # bounded: fails rather than spins
        queues.drain(now, out)
        t = queues.next_timer(now)
        if not queues.backlogged or t is None:
            break
        now = max(now, t)
    assert [int.from_bytes(d[8:12], "big") for d, _ in out] == list(range(81, 101))
    assert queues.backlog_bytes == 0
    # Paced: one burst at once, the rest at the initial rate or faster as AIMD raises it.
    assert 0.5 * 19 * PKT / 100_000 < now <= 19 * PKT / 100_000 + 1e-9


def test_nak_resends_what_was_sent_under_fresh_link_sequences() -> None:
    queues, link, _ = _link_queues(PacingConfig())
    for _ in range(5):
        queues.enqueue(PEER, _data(link.next_link_seq()), ADDR)
    out: list[tuple[bytes, tuple[str, int]]] = []
    queues.drain(0.0, out)
    assert len(out) == 5
    queues.on_nak(link, ADDR, wire.encode_nak(3, 2, [(2, 2)]), 0.01)
    assert queues.stats["retransmits"] == 2
    resent: list[tuple[bytes, tuple[str, int]]] = []
    queues.drain(0.01, resent)
    # The same datagrams (seq 2 and 3), restamped 6 and 7 at the back of the link.
    assert [d[12:] for d, _ in resent] == [out[1][0][12:], out[2][0][12:]]
    assert [int.from_bytes(d[8:12], "big") for d, _ in resent] == [6, 7]


def test_tail_probe_follows_the_last_data_datagram() -> None:
    queues, link, control = _link_queues(PacingConfig())
    queues.enqueue(PEER, _data(link.next_link_seq()), ADDR)
    queues.drain(0.0, [])
    due = queues.next_timer(0.0)
    assert due is not None and due > 0.0
    queues.handle_timer(due)
    assert control == [(PEER, bytes([wire.FrameType.TAIL]) + (1).to_bytes(4, "big"))]


def _tail_seqs(control: list[tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
    return [
        (peer, int.from_bytes(frame[1:], "big"))
        for peer, frame in control
        if frame[0] == wire.FrameType.TAIL
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 39), st.floats(0.0, 0.35), st.integers(1, 3)),
        min_size=1,
        max_size=120,
    )
)
def test_tail_timer_is_exact_and_every_probe_leaves_when_due(
    sends: list[tuple[int, float, int]],
) -> None:
    """Links armed at random times and paces: the timer is always the earliest armed
    deadline (never late, never early), each TAIL leaves at its deadline with the newest
    link sequence, and the deadline is 1..TAIL_PROBE_STEPS probe times after the last
    data. Time advances in steps to the timer or to the next send, as the runtime does."""
    peers = [bytes([i]) * 16 for i in range(40)]
    links = {p: LinkState(p) for p in peers}
    control: list[tuple[bytes, bytes]] = []
    queues = LinkQueues(
        links,  # type: ignore[arg-type]
        links.__getitem__,
        PacingConfig(initial_rate_bytes_per_s=1e9, max_rate_bytes_per_s=1e9),
        Stats(),
        lambda peer, ftype, body=b"": control.append((peer, bytes([ftype]) + body)),
        lambda: 0.0,
    )
    now = 0.0
    expected: list[tuple[bytes, int]] = []

    def run_timers_until(until: float) -> float:
        t = now
        for _ in range(10_000):  # bounded
            armed = [link.tail_due for link in links.values() if link.tail_due is not None]
            due = queues.next_timer(t)
            if not armed:
                assert due is None
                return until
            assert due == min(armed)  # the earliest deadline exactly
            if due > until:
                return until
            t = max(t, due)
            before = len(control)
            fired = [
                p for p, link in links.items() if link.tail_due is not None and link.tail_due <= t
            ]
            queues.handle_timer(t)
            sent = sorted(_tail_seqs(control[before:]))
            assert sent == sorted((p, links[p].last_sent_seq) for p in fired)
            assert all(links[p].tail_due is None for p in fired)
            expected.extend(sent)
        raise AssertionError("timer loop did not settle")

    for index, advance, count in sends:
        now = run_timers_until(now + advance)
        peer = peers[index]
        link = links[peer]
        for _ in range(count):
            queues.enqueue(peer, _data(link.next_link_seq()), ADDR)
        queues.drain(now, [])
        assert link.tail_due is not None
        assert (
            now + TAIL_PROBE_S - 1e-9
            <= link.tail_due
            <= now + TAIL_PROBE_S * TAIL_PROBE_STEPS + 1e-9
        )
    run_timers_until(now + 10.0)
    assert len(_tail_seqs(control)) == len(expected)
    assert queues.stats["tail_probes_sent"] == len(expected)
    assert all(link.tail_due is None for link in links.values())
    # Every link that sent data got a TAIL after its last datagram, with that datagram's seq.
    last = {p: seq for p, seq in expected}
    assert last == {p: links[p].last_sent_seq for p, link in links.items() if link.link_seq_out}


def _steady_stream(
    interval: float, messages: int, pattern: tuple[float, ...] = ()
) -> tuple[list[tuple[float, int]], float]:
    """One link sending a datagram every ``interval`` s (or at intervals cycling through
    ``pattern``); TAILs seen as (time, seq)."""
    queues, link, control = _link_queues(PacingConfig())
    tails: list[tuple[float, int]] = []
    now = 0.0
    send_at = 0.0
    for k in range(messages):
        if k:
            send_at += pattern[k % len(pattern)] if pattern else interval
        for _ in range(100):  # timers up to the next send
            due = queues.next_timer(now)
            if due is None or due > send_at:
                break
            now = max(now, due)
            before = len(control)
            queues.handle_timer(now)
            tails += [(now, seq) for _, seq in _tail_seqs(control[before:])]
        now = send_at
        queues.enqueue(PEER, _data(link.next_link_seq()), ADDR)
        queues.drain(now, [])
    last_send = now
    due = queues.next_timer(now)
    assert due is not None
    queues.handle_timer(due)
    tails += [(due, seq) for _, seq in _tail_seqs(control)[len(tails) :]]
    return tails, last_send


@pytest.mark.parametrize("interval", [0.1, 0.15, 0.2, 0.25])
def test_a_steady_slow_stream_gets_one_tail_probe_when_it_stops(interval: float) -> None:
    """At 4-10 datagrams/s the next datagram reveals a loss as soon as a probe would:
    no TAIL while the stream flows, one after it stops (with the last link sequence,
    at most TAIL_PROBE_STEPS probe times later)."""
    tails, last_send = _steady_stream(interval, 40)
    assert [seq for _, seq in tails[-1:]] == [40]
    assert len(tails) <= 3  # the first few, before the pace is learnt
    assert all(t < 0.5 for t, _ in tails[:-1])
    assert last_send + TAIL_PROBE_S <= tails[-1][0] <= last_send + TAIL_PROBE_S * TAIL_PROBE_STEPS


def test_an_irregular_stream_is_judged_by_its_long_gaps() -> None:
    """Three senders' merged ticks: 5, 5 and 280 ms apart (10 msg/s on average). Its long
    gaps set the probe delay (0.3 s), so again no TAIL while it flows."""
    tails, _ = _steady_stream(0.0, 60, pattern=(0.005, 0.005, 0.28))
    assert len(tails) <= 3 and tails[-1][1] == 60
    assert all(t < 0.8 for t, _ in tails[:-1])


def test_a_burst_and_a_slow_stream_are_probed_after_the_short_quiet_time() -> None:
    """A burst (1 ms apart) that ends, or a stream slower than the longest probe delay:
    a TAIL TAIL_PROBE_S after each last datagram, as before."""
    tails, last_send = _steady_stream(0.001, 20)
    assert tails == [(pytest.approx(last_send + TAIL_PROBE_S), 20)]
    tails, _ = _steady_stream(1.0, 5)
    assert [(round(t, 6), seq) for t, seq in tails] == [
        (round(k + TAIL_PROBE_S, 6), k + 1) for k in range(5)
    ]


# --------------------------------------------------------------------------------------------------
# Closed loop: pacer + bottleneck + loss detector + NAKs
# --------------------------------------------------------------------------------------------------


@dataclass
class SimResult:
    capacity: float
    sent_rate_tail: float  # data bytes/s offered by the sender over the last third
    delivered_rate_tail: float
    loss_fraction_tail: float  # bottleneck drops / data sent, over the last third
    min_rate_after_warmup: float
    decrease_times: list[float]
    held_back: int  # send rounds where the full queue held the source back


def simulate_link(
    cfg: PacingConfig,
    *,
    capacity_bytes_per_s: float = 1_000_000,
    queue_bytes: int = 64_000,
    one_way_delay_s: float = 0.010,
    duration_s: float = 30.0,
    warmup_s: float = 10.0,
    seq_start: int = 0,
    random_loss: float = 0.0,
) -> SimResult:
    """A saturated sender -> drop-tail bottleneck -> receiver, NAKs back over an idle reverse path.

    The sender is the node's real link queue (links.py) kept full. ``random_loss`` drops that
    fraction of datagrams on the wire (seeded), independently of congestion.
    """
    rng = random.Random(42)
    queues, link, _ = _link_queues(cfg)
    link.link_seq_out = (seq_start - 1) & SEQ32_MASK
    pacer = queues.pacer(link)
    det = LinkLossDetector(cfg)
    events: list[tuple[float, int, str, object]] = []
    counter = 0

    def at(t: float, kind: str, data: object = None) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, data))

    link_free_s = 0.0
    sent: list[tuple[float, int]] = []
    delivered: list[tuple[float, int]] = []
    dropped: list[float] = []
    decrease_times: list[float] = []
    min_rate = float("inf")
    held_back = 0
    rx_timer_s: float | None = None
    sender_wake_s: float | None = None

    def wake_sender(now: float) -> None:
        nonlocal sender_wake_s
        t = queues.next_timer(now)
        if t is not None and (sender_wake_s is None or sender_wake_s <= now or t < sender_wake_s):
            sender_wake_s = max(t, now)
            at(sender_wake_s, "send")

    def wake_receiver(now: float) -> None:
        nonlocal rx_timer_s
        t = det.next_timer(now)
        if t is not None and (rx_timer_s is None or rx_timer_s <= now or t < rx_timer_s):
            rx_timer_s = max(t, now)
            at(rx_timer_s, "rx_timer")

    at(0.0, "send")
    at(0.0, "tick")
    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > duration_s:
            break
        if kind == "send":
            # A saturated source, held back (as the node's send_queue_bytes does) while the
            # link's queue is full.
            while link.queue_bytes + PKT <= cfg.max_queued_data_bytes:
                queues.enqueue(PEER, _data(link.next_link_seq()), ADDR)
            held_back += 1
            out: list[tuple[bytes, tuple[str, int]]] = []
            queues.drain(now, out)
            for datagram, _ in out:
                s = int.from_bytes(datagram[8:12], "big")
                sent.append((now, PKT))
                backlog = max(0.0, link_free_s - now) * capacity_bytes_per_s
                if backlog + PKT > queue_bytes:
                    dropped.append(now)
                    continue
                link_free_s = max(link_free_s, now) + PKT / capacity_bytes_per_s
                if random_loss and rng.random() < random_loss:
                    continue  # lost on the wire after the bottleneck: not congestion
                at(link_free_s + one_way_delay_s, "arrive", s)
            wake_sender(now)
        elif kind == "arrive":
            assert isinstance(data, int)
            delivered.append((now, PKT))
            det.on_packet(data, now)
            if (r := det.poll_nak(now)) is not None:
                at(now + one_way_delay_s, "nak", r)
            wake_receiver(now)
        elif kind == "rx_timer":
            if (r := det.poll_nak(now)) is not None:
                at(now + one_way_delay_s, "nak", r)
            wake_receiver(now)
        elif kind == "nak":
            assert isinstance(data, NakReport)
            if pacer.on_nak(data.lost, data.received, now):
                decrease_times.append(now)
        elif kind == "tick":
            pacer.on_tick(now)
            if now >= warmup_s:
                min_rate = min(min_rate, pacer.rate_bytes_per_s)
            at(max(pacer.next_timer(now), now + 1e-6), "tick")
            wake_sender(now)

    tail_start = duration_s * 2 / 3
    tail = duration_s - tail_start
    return SimResult(
        capacity=capacity_bytes_per_s,
        sent_rate_tail=sum(b for t, b in sent if t >= tail_start) / tail,
        delivered_rate_tail=sum(b for t, b in delivered if t >= tail_start) / tail,
        loss_fraction_tail=sum(t >= tail_start for t in dropped)
        / max(1, sum(t >= tail_start for t, _ in sent)),
        min_rate_after_warmup=min_rate,
        decrease_times=decrease_times,
        held_back=held_back,
    )


@pytest.mark.parametrize(
    ("initial_rate", "seq_start"),
    [(200_000, 0), (1_048_576, WRAP_START - 10_000), (8_000_000, 12345)],
)
def test_aimd_converges_on_bottleneck(initial_rate: float, seq_start: int) -> None:
    cfg = PacingConfig(initial_rate_bytes_per_s=initial_rate)
    res = simulate_link(cfg, seq_start=seq_start)
    cap = res.capacity
    print(
        f"initial={initial_rate:.0f} sent_tail={res.sent_rate_tail / cap:.3f}C "
        f"delivered_tail={res.delivered_rate_tail / cap:.3f}C "
        f"loss_tail={res.loss_fraction_tail:.2%} "
        f"decreases={len(res.decrease_times)} min_rate_after_warmup="
        f"{res.min_rate_after_warmup / cap:.3f}C"
    )
    assert 0.5 * cap <= res.sent_rate_tail <= 1.3 * cap
    assert res.delivered_rate_tail >= 0.5 * cap
    # Never collapses: after warm-up the rate stays well above the floor.
    assert res.min_rate_after_warmup > 0.4 * cap
    assert res.min_rate_after_warmup > 10 * cfg.min_rate_bytes_per_s
    assert res.loss_fraction_tail < 0.05
    # AIMD is actually probing (losses happen) but cuts at most once per holdoff.
    assert len(res.decrease_times) >= 5
    gaps = [b - a for a, b in itertools.pairwise(res.decrease_times)]
    assert min(gaps) >= cfg.decrease_holdoff_s - 1e-9
    # The saturated source really was held back by the link's queue.
    assert res.held_back > 0


def test_aimd_tolerates_random_loss_below_threshold() -> None:
    # 0.2% non-congestion loss on an uncongested link: isolated losses, judged over pooled
    # samples of loss_sample_packets, rarely look like congestion, so the rate keeps its ceiling.
    # (Judging each report alone, loss_sample_packets=1, this run sees 12 cuts and ~54%.)
    cfg = PacingConfig(initial_rate_bytes_per_s=1_000_000, max_rate_bytes_per_s=2_000_000)
    res = simulate_link(
        cfg, capacity_bytes_per_s=10_000_000, queue_bytes=1_000_000, random_loss=0.002
    )
    assert len(res.decrease_times) <= 2
    assert res.sent_rate_tail >= 0.9 * 2_000_000


def test_aimd_loss_free_link_ramps_up_to_max() -> None:
    cfg = PacingConfig(initial_rate_bytes_per_s=100_000, max_rate_bytes_per_s=500_000)
    res = simulate_link(
        cfg, capacity_bytes_per_s=10_000_000, queue_bytes=1_000_000, duration_s=10.0
    )
    assert res.decrease_times == []
    assert res.sent_rate_tail == pytest.approx(500_000, rel=0.05)


# --------------------------------------------------------------------------------------------------
# The node's rules for fast links: slow start, heavy-loss cut, pacing tick (links.pacing_config)
# --------------------------------------------------------------------------------------------------

FAST = PacingConfig(
    initial_rate_bytes_per_s=1_000_000,
    max_rate_bytes_per_s=64_000_000,
    increase_interval_s=0.05,
    slow_start_factor=2.0,
    heavy_loss_decrease=True,
    tick_s=0.001,
)


def _starve(p: AimdPacer, now: float) -> None:
    """Data waits for the pacer: send until it refuses."""
    for _ in range(100_000):
        if not p.can_send(PKT, now):
            return
        p.consume(PKT, now)
    raise AssertionError("the pacer never refused")


def test_slow_start_doubles_only_while_data_waits() -> None:
    p = AimdPacer(FAST, now=0.0)
    assert p.in_slow_start
    r0 = p.rate_bytes_per_s
    # An idle interval: nothing waited, so no growth (an unused rate is not evidence).
    assert not p.on_tick(0.05)
    assert p.rate_bytes_per_s == r0
    for k in range(1, 5):
        _starve(p, 0.05 * k + 0.01)
        assert p.on_tick(0.05 * (k + 1))
        assert p.rate_bytes_per_s == r0 * 2**k
    # Capped at the maximum.
    for k in range(5, 12):
        _starve(p, 0.05 * k + 0.01)
        p.on_tick(0.05 * (k + 1))
    assert p.rate_bytes_per_s == FAST.max_rate_bytes_per_s


def test_slow_start_ends_at_first_decrease_then_additive() -> None:
    p = AimdPacer(FAST, now=0.0)
    _starve(p, 0.01)
    assert p.on_tick(0.05)
    assert p.on_nak(20, 180, 0.06)  # 10 % loss: a plain decrease_factor cut
    assert not p.in_slow_start
    r1 = p.rate_bytes_per_s
    assert r1 == pytest.approx(2_000_000 * FAST.decrease_factor)
    t = 0.06 + FAST.decrease_holdoff_s
    _starve(p, t)
    assert p.on_tick(t + FAST.increase_interval_s)
    assert p.rate_bytes_per_s == pytest.approx(r1 + FAST.increase_bytes_per_s)


@pytest.mark.parametrize(
    ("lost", "received", "factor"),
    [
        (20, 180, 0.7),
        (60, 140, 0.7),
        (120, 80, 0.4),
        (190, 10, 0.25),
        (3, 2, 0.7),  # heavy, but too small a sample to say what the link carries
    ],
)
def test_heavy_loss_cuts_to_the_delivered_fraction(lost: int, received: int, factor: float) -> None:
    p = AimdPacer(FAST, now=0.0)
    r0 = p.rate_bytes_per_s
    assert p.on_nak(lost, received, 0.01)
    assert p.rate_bytes_per_s == pytest.approx(r0 * factor)
    # Without the rule every loss event cuts by decrease_factor alone.
    q = AimdPacer(PacingConfig(initial_rate_bytes_per_s=r0), now=0.0)
    assert q.on_nak(lost, received, 0.01)
    assert q.rate_bytes_per_s == pytest.approx(r0 * 0.7)


def test_tick_sends_a_batch_per_wakeup_even_when_the_timer_fires_early() -> None:
    rate = 10_000_000  # one 1 ms tick = 10,000 B, about 8 datagrams
    cfg = PacingConfig(initial_rate_bytes_per_s=rate, burst_bytes=20_000, tick_s=0.001)
    p = AimdPacer(cfg, now=0.0)
    now = 0.0
    while p.can_send(PKT, now):
        p.consume(PKT, now)
    # The bucket went into debt by at most one tick of rate plus a datagram.
    assert -10_000 - PKT <= p.tokens(now) < 0
    due = p.next_send_time(PKT, now)  # still waits for a whole datagram of tokens
    assert p.tokens(due) >= PKT - 1e-6
    # A timer firing 0.5 ms early (uvloop rounds to the millisecond) still sends...
    assert p.can_send(PKT, due - 0.0005)
    # ...and each wakeup at next_send_time sends about a tick of data, not one datagram.
    sent = wakeups = 0
    now = due
    while now < 2.0:
        wakeups += 1
        while p.can_send(PKT, now):
            p.consume(PKT, now)
            sent += PKT
        now = p.next_send_time(PKT, now)
    assert sent / 2.0 == pytest.approx(rate, rel=0.02)  # the rate is unchanged
    assert sent / PKT / wakeups >= 5  # datagram by datagram would be 1
    # Without a tick, a timer that fires early finds the bucket short and sends nothing.
    q = AimdPacer(PacingConfig(initial_rate_bytes_per_s=rate, burst_bytes=20_000), 0.0)
    q.consume(20_000, 0.0)
    assert not q.can_send(PKT, q.next_send_time(PKT, 0.0) - 0.0005)


def test_fast_rules_ramp_a_clean_link_within_a_second() -> None:
    res = simulate_link(
        FAST,
        capacity_bytes_per_s=100_000_000,
        queue_bytes=4_000_000,
        duration_s=1.5,
    )
    assert res.decrease_times == []
    # Additive steps alone would take minutes to climb from 1 MB/s to 64 MB/s.
    assert res.sent_rate_tail == pytest.approx(64_000_000, rel=0.1)


@pytest.mark.parametrize("capacity", [1_000_000, 5_000_000])
def test_fast_rules_still_converge_on_a_bottleneck(capacity: float) -> None:
    cfg = PacingConfig(
        initial_rate_bytes_per_s=FAST.initial_rate_bytes_per_s,
        max_rate_bytes_per_s=FAST.max_rate_bytes_per_s,
        increase_interval_s=FAST.increase_interval_s,
        slow_start_factor=FAST.slow_start_factor,
        heavy_loss_decrease=FAST.heavy_loss_decrease,
        tick_s=FAST.tick_s,
        max_queued_data_bytes=4_000_000,
    )
    res = simulate_link(
        cfg, capacity_bytes_per_s=capacity, queue_bytes=max(64_000, capacity // 20), duration_s=20
    )
    cap = res.capacity
    assert 0.5 * cap <= res.sent_rate_tail <= 1.3 * cap
    assert res.delivered_rate_tail >= 0.5 * cap
    assert res.loss_fraction_tail < 0.05
    assert res.min_rate_after_warmup > 0.3 * cap


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_default_config_is_valid() -> None:
    assert PacingConfig().nak_interval_s == 0.050


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reorder_window_s": 0},
        {"nak_interval_s": -1},
        {"nak_interval_s": float("nan")},
        {"reorder_packets": 0},
        {"loss_sample_packets": 0},
        {"max_gap_packets": 2**31},
        {"max_nak_ranges": 0},
        {"min_rate_bytes_per_s": 0},
        {"initial_rate_bytes_per_s": 1.0},
        {"initial_rate_bytes_per_s": 1e12},
        {"max_rate_bytes_per_s": float("inf")},
        {"burst_bytes": 0},
        {"decrease_factor": 1.0},
        {"decrease_factor": 0.0},
        {"loss_threshold": 1.0},
        {"decrease_holdoff_s": -0.1},
        {"increase_bytes_per_s": 0},
        {"max_queued_data_bytes": 0},
    ],
)
def test_invalid_config_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid PacingConfig"):
        PacingConfig(**kwargs)  # type: ignore[arg-type]
