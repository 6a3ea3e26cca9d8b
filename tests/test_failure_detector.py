"""The failure detector (protocol/failure_detector.py) on the fake clock.

Unit tests drive one FailureDetector with hand-held callbacks (who we watch, who has a
session, when each peer was last heard) and read what it queued; cluster tests run
NodeCores in the simulated network (tests/helpers_core.py). No real time anywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.cli import CliError, build_run_parser, config_from_args
from gwyh_mp.config import Config, ConfigError
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import MemberDown, MemberSuspect, MemberUp
from gwyh_mp.protocol.failure_detector import (
    EXPECTED_CONFIRMATIONS,
    MAX_HEALTH,
    MAX_RELAYS,
    DetectorSettings,
    FailureDetector,
    decode_ping_ack,
    decode_ping_req,
    encode_ping_ack,
    encode_ping_req,
    suspicion_timeout,
)
from gwyh_mp.protocol.membership import record_of
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType, MemberState
from tests.helpers_core import PSK, down_events, live_nodes, make_cluster, view_of
from tests.procs import write_key

SETTINGS = DetectorSettings(
    probe_interval_s=0.5,
    probe_timeout_s=0.1,
    probe_attempts=4,
    indirect_probes=2,
    suspicion_min_s=1.0,
    suspicion_max_s=6.0,
)
WINDOW_S = SETTINGS.probe_timeout_s * SETTINGS.probe_attempts


def pid(i: int) -> bytes:
    return bytes([i]) * 16


@dataclass
class Harness:
    """A FailureDetector and the world it sees: peers 1..n watched, all with sessions."""

    n: int = 4
    sessions: set[bytes] = field(default_factory=set)
    heard: dict[bytes, float] = field(default_factory=dict)
    sent: list[tuple[float, bytes, FrameType, bytes]] = field(default_factory=list)
    suspected: list[tuple[float, bytes]] = field(default_factory=list)
    downs: list[tuple[float, bytes, int]] = field(default_factory=list)
    told: list[bytes] = field(default_factory=list)
    lost: list[bytes] = field(default_factory=list)
    alive_in_table: set[bytes] = field(default_factory=set)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.peers = [pid(i) for i in range(1, self.n + 1)]
        self.sessions |= set(self.peers)
        self.alive_in_table |= set(self.peers)
        self.stats = Stats()
        self.fd = FailureDetector(
            SETTINGS,
            random.Random(1),
            self.stats,
            watched=lambda: list(self.peers),
            has_session=lambda p: p in self.sessions,
            last_heard=lambda p: self.heard.get(p, float("-inf")),
            queue_control=self._queue,
            suspect=self._suspect,
            declare_down=lambda p, inc, now: self.downs.append((now, p, inc)),
            tell_suspect=self.told.append,
            lost=lambda p, now: self.lost.append(p),
        )
        self.fd.start(0.0)

    def _queue(self, peer: bytes, ftype: FrameType, body: bytes = b"") -> None:
        # A PING can only go over a session: never to a peer whose handshake is pending.
        assert ftype != FrameType.PING or peer in self.sessions
        self.sent.append((self.now, peer, ftype, body))

    def _suspect(self, peer: bytes, now: float) -> int | None:
        if peer not in self.alive_in_table:
            return None
        self.suspected.append((now, peer))
        self.fd.on_suspected(peer, 7, now)  # what the membership change does
        return 7

    def hear(self, peer: bytes, at: float | None = None) -> None:
        t = self.now if at is None else at
        self.heard[peer] = t
        self.fd.heard(peer, t)

    def run_until(self, until: float, *, chatty: set[bytes] | None = None) -> None:
        """Advance the fake clock timer by timer; ``chatty`` peers answer every PING."""
        while True:
            due = self.fd.next_timer()
            if due is None or due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            before = len(self.sent)
            self.fd.handle_timer(self.now)
            for _, peer, ftype, _ in self.sent[before:]:
                if ftype == FrameType.PING and chatty and peer in chatty:
                    self.hear(peer)

    def frames(self, ftype: FrameType, peer: bytes | None = None) -> list[bytes]:
        return [b for _, p, f, b in self.sent if f == ftype and (peer is None or p == peer)]


# ----------------------------------------------------------------------------- probes


def test_a_silent_peer_that_answers_the_direct_probe_is_not_suspected() -> None:
    h = Harness()
    h.run_until(30.0, chatty=set(h.peers))
    assert h.stats["fd_probes"] >= 30  # one probe per period, every peer in turn
    assert h.stats["fd_probes_ok"] == h.stats["fd_probes"]
    assert not h.suspected and not h.downs and not h.frames(FrameType.PING_REQ)
    assert h.fd.health == 0


def test_a_peer_heard_within_the_period_is_not_probed() -> None:
    h = Harness(n=1)
    for k in range(60):  # traffic every 0.25 s is the ack: nothing to ask
        h.hear(h.peers[0], k * 0.25)
        h.run_until(k * 0.25 + 0.25)
    assert h.stats.get("fd_probes", 0) == 0
    assert not h.frames(FrameType.PING)


def test_the_indirect_probe_saves_a_member_whose_direct_path_is_lossy() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(SETTINGS.probe_timeout_s)  # the first PING went unanswered
    reqs = [(p, b) for _, p, f, b in h.sent if f == FrameType.PING_REQ]
    assert len(reqs) == SETTINGS.indirect_probes
    assert all(p != target for p, _ in reqs)
    helper, body = reqs[0]
    assert decode_ping_req(body)[0] == target
    # One helper reached it over its own session and relays the ack.
    _, nonce = decode_ping_req(body)
    h.fd.on_ping_ack(helper, encode_ping_ack(target, nonce, True), h.now)
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    assert h.stats["fd_indirect_acks"] == 1
    assert not h.suspected and not h.downs


def test_a_stale_or_foreign_ping_ack_changes_nothing() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(SETTINGS.probe_timeout_s)
    _, nonce = decode_ping_req(h.frames(FrameType.PING_REQ)[0])
    h.fd.on_ping_ack(h.peers[1], encode_ping_ack(target, nonce ^ 1, True), h.now)
    h.fd.on_ping_ack(h.peers[1], encode_ping_ack(pid(99), nonce, True), h.now)
    h.run_until(WINDOW_S + 0.01)
    assert [p for _, p in h.suspected] == [target]


def test_a_failed_probe_suspects_then_declares_down_after_the_maximum() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    # The others answer (we are connected); the target never does.
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    assert [p for _, p in h.suspected] == [target]
    assert len(h.frames(FrameType.PING, target)) == SETTINGS.probe_attempts
    t_suspect = h.suspected[0][0]
    h.run_until(t_suspect + SETTINGS.suspicion_max_s - 0.01, chatty=set(h.peers[1:]))
    assert not h.downs  # no confirmation: the whole maximum
    h.run_until(t_suspect + SETTINGS.suspicion_max_s + 0.01, chatty=set(h.peers[1:]))
    assert h.downs == [(pytest.approx(t_suspect + SETTINGS.suspicion_max_s), target, 7)]


def test_confirmations_shorten_the_suspicion_timeout() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    t_suspect = h.suspected[0][0]
    for k in range(EXPECTED_CONFIRMATIONS):  # other accusers' SUSPECT floods
        h.fd.on_suspect_status(target, 7, t_suspect + 0.1 * (k + 1))
    h.run_until(t_suspect + SETTINGS.suspicion_min_s + 0.01, chatty=set(h.peers[1:]))
    assert [p for _, p, _ in h.downs] == [target]
    assert h.downs[0][0] == pytest.approx(t_suspect + SETTINGS.suspicion_min_s)


def test_a_refuted_suspicion_is_never_declared_down() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    assert h.suspected
    h.fd.forget(target)  # it refuted: UP at a higher incarnation (membership rules)
    h.run_until(30.0, chatty=set(h.peers))  # and answers from now on
    assert not h.downs


def test_a_suspect_that_talks_to_us_is_told_so_that_it_refutes() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    h.hear(target)
    h.hear(target)  # rate-limited: once per probe timeout
    assert h.told == [target]


def test_a_watcher_that_hears_a_suspicion_probes_at_once_and_confirms() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.on_suspected(target, 7, 0.0)  # someone else's SUSPECT flood
    assert h.frames(FrameType.PING, target)  # checks for itself, now
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    assert [p for _, p in h.suspected] == [target]  # its own flood: a confirmation
    sus = h.fd.suspicions[target]
    assert sus.accuser
    assert sus.deadline == pytest.approx(SETTINGS.suspicion_max_s)  # from the first news


def test_only_accusers_declare_down_the_others_wait_for_the_flood() -> None:
    h = Harness()
    h.fd.on_suspected(pid(50), 3, 0.0)  # not a peer of ours: nothing to probe
    h.run_until(2 * SETTINGS.suspicion_max_s - 0.01, chatty=set(h.peers))
    assert not h.downs
    h.run_until(2 * SETTINGS.suspicion_max_s + 0.01, chatty=set(h.peers))
    assert h.downs == [(pytest.approx(2 * SETTINGS.suspicion_max_s), pid(50), 3)]  # backstop


def test_a_node_that_hears_nobody_accuses_nobody() -> None:
    h = Harness()
    target = h.peers[0]
    h.fd.start_probe(target, 0.0)
    h.run_until(60.0)  # nobody answers anything: we are the one cut off
    assert h.suspected  # suspicion is cheap and refutable...
    assert not h.downs  # ...but a DOWN needs evidence that our own network works


def test_a_failed_probe_of_a_member_not_up_here_drops_it_as_a_relation() -> None:
    h = Harness()
    target = h.peers[0]
    h.alive_in_table.discard(target)  # already DOWN in our table
    h.fd.start_probe(target, 0.0)
    h.run_until(WINDOW_S + 0.01, chatty=set(h.peers[1:]))
    assert h.lost == [target] and not h.suspected


# ----------------------------------------------------------------------------- sessions


def test_no_accusation_of_a_member_without_a_session() -> None:
    """A pending handshake is not silence: no PING could reach it, so none is sent."""
    h = Harness()
    pending = h.peers[0]
    h.sessions.discard(pending)
    h.run_until(60.0, chatty=set(h.peers[1:]))
    assert not h.frames(FrameType.PING, pending)
    assert not h.suspected and not h.downs
    h.fd.start_probe(pending, h.now)  # not even when asked directly
    assert not h.frames(FrameType.PING, pending)


def test_a_helper_without_a_session_to_the_target_nacks() -> None:
    h = Harness()
    h.fd.on_ping_req(h.peers[1], encode_ping_req(pid(77), 5), 0.0)
    (body,) = h.frames(FrameType.PING_ACK, h.peers[1])
    assert decode_ping_ack(body) == (pid(77), 5, False)


def test_a_helper_pings_the_target_and_relays_its_answer() -> None:
    h = Harness()
    target, requester = h.peers[0], h.peers[1]
    h.fd.on_ping_req(requester, encode_ping_req(target, 9), 0.0)
    assert h.frames(FrameType.PING, target)
    h.hear(target, 0.01)
    (body,) = h.frames(FrameType.PING_ACK, requester)
    assert decode_ping_ack(body) == (target, 9, True)


def test_a_helper_nacks_when_the_target_stays_silent() -> None:
    h = Harness()
    target, requester = h.peers[0], h.peers[1]
    h.fd.on_ping_req(requester, encode_ping_req(target, 9), 0.0)
    h.run_until(WINDOW_S, chatty=set(h.peers[1:]))
    (body,) = h.frames(FrameType.PING_ACK, requester)
    assert decode_ping_ack(body) == (target, 9, False)


def test_relays_are_bounded() -> None:
    h = Harness(n=2)
    for i in range(MAX_RELAYS + 10):
        h.sessions.add(pid(100 + i))
        h.fd.on_ping_req(h.peers[0], encode_ping_req(pid(100 + i), i), 0.0)
    assert len(h.fd.relays) == MAX_RELAYS
    assert h.stats["fd_relays_refused"] == 10


# ----------------------------------------------------------------------------- health


def test_a_paused_node_accuses_nobody_when_its_clock_jumps() -> None:
    """Our own clock jumps 30 s (SIGSTOP): every peer looks silent, and every probe in
    flight was cut short by our pause, not theirs."""
    h = Harness()
    h.run_until(5.0, chatty=set(h.peers))
    h.fd.start_probe(h.peers[0], h.now)
    h.now = 35.0
    h.fd.handle_timer(h.now)  # the first timer after the pause
    assert h.stats["fd_pauses"] == 1
    assert not h.fd.probes  # the probe in flight was void
    assert h.fd.health == MAX_HEALTH  # and everything is slower for a while
    h.run_until(60.0, chatty=set(h.peers))  # the peers answer again
    assert not h.suspected and not h.downs
    assert h.fd.health < MAX_HEALTH  # successful probes earn it back


def test_health_stretches_the_probe_period() -> None:
    h = Harness()
    h.fd.health = 3
    h.run_until(SETTINGS.probe_interval_s)  # the first period was armed at health 0
    assert h.stats["fd_probes"] == 1
    h.run_until(SETTINGS.probe_interval_s * 4.99)
    assert h.stats["fd_probes"] == 1  # the next period is (1 + 3) times as long
    h.run_until(SETTINGS.probe_interval_s * 5.01)
    assert h.stats["fd_probes"] == 2


def test_loop_lag_raises_health_at_most_once_per_period() -> None:
    h = Harness()
    for k in range(10):
        h.fd.report_lag(WINDOW_S, k * 0.01)
    assert h.fd.health == 1
    h.fd.report_lag(WINDOW_S / 2 - 0.01, 1.0)  # could not fail a probe by itself: fine
    assert h.fd.health == 1
    h.fd.report_lag(WINDOW_S, 1.0)
    assert h.fd.health == 2


def test_while_deaf_the_node_says_it_is_alive_and_probes_nobody() -> None:
    h = Harness()
    h.fd.set_deaf(True, 0.0)
    h.run_until(5.0)
    assert not h.frames(FrameType.PING) and not h.suspected
    assert {p for _, p, f, _ in h.sent if f == FrameType.HEARTBEAT} == set(h.peers)


# ----------------------------------------------------------------------------- codecs


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1), st.booleans())
def test_ping_req_and_ack_round_trip(target: bytes, nonce: int, ack: bool) -> None:
    assert decode_ping_req(encode_ping_req(target, nonce)) == (target, nonce)
    assert decode_ping_ack(encode_ping_ack(target, nonce, ack)) == (target, nonce, ack)


@given(st.binary(max_size=40))
def test_malformed_ping_req_and_ack_raise_wire_errors_only(body: bytes) -> None:
    for decode in (decode_ping_req, decode_ping_ack):
        try:
            decode(body)
        except wire.WireError:
            pass


def test_ping_ack_with_an_unknown_status_is_refused() -> None:
    with pytest.raises(wire.WireError):
        decode_ping_ack(pid(1) + b"\x00\x00\x00\x01\x02")


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.01, 10),
    st.floats(0, 50),
    st.integers(0, 20),
)
def test_suspicion_timeout_shrinks_with_confirmations_within_bounds(
    lo: float, extra: float, c: int
) -> None:
    hi = lo + extra
    t, t_next = suspicion_timeout(lo, hi, c), suspicion_timeout(lo, hi, c + 1)
    assert lo - 1e-9 <= t_next <= t <= hi + 1e-9
    assert suspicion_timeout(lo, hi, 0) == hi
    if c >= EXPECTED_CONFIRMATIONS:
        assert t == pytest.approx(lo)


def test_suspect_state_round_trips_in_a_member_record() -> None:
    record = wire.MemberRecord(pid(3), 9, MemberState.SUSPECT, "10.0.0.1", 7000, "z")
    decoded, end = wire.decode_member(record.encode())
    assert decoded == record and end == len(record.encode())


# ----------------------------------------------------------------------------- config


def test_the_handshake_retry_follows_the_heartbeat_unless_set() -> None:
    assert Config.lan(psks=[PSK]).validate().handshake_retry_s == 1.0
    assert Config.lan(psks=[PSK], heartbeat_interval_s=0.5).validate().handshake_retry_s == 0.25
    assert Config.local(psks=[PSK]).validate().handshake_retry_s == 0.25
    explicit = Config.lan(psks=[PSK], heartbeat_interval_s=0.5, handshake_retry_s=0.1)
    assert explicit.validate().handshake_retry_s == 0.1
    with pytest.raises(ConfigError, match="handshake_retry_s"):
        Config.lan(psks=[PSK], heartbeat_interval_s=0.5, handshake_retry_s=1.0).validate()


def test_probe_and_suspicion_settings_are_derived_and_checked_together() -> None:
    lan = Config.lan(psks=[PSK]).validate()
    assert (lan.probe_timeout_s, lan.suspicion_min_s, lan.suspicion_max_s) == (0.1, 1.0, 6.0)
    fast = Config.lan(psks=[PSK], probe_interval_s=0.2).validate()
    assert fast.probe_timeout_s == pytest.approx(0.04)
    assert fast.suspicion_max_s == pytest.approx(2.4)
    for bad in (
        {"probe_timeout_s": 1.0},  # longer than the period
        {"suspicion_min_s": 0.05},  # shorter than one PING's wait
        {"suspicion_min_s": 5.0, "suspicion_max_s": 2.0},
        {"probe_attempts": 0},
        {"indirect_probes": -1},
    ):
        with pytest.raises(ConfigError):
            Config.lan(psks=[PSK], **bad).validate()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- clusters

N = 10


def test_a_crashed_node_is_suspected_then_down_everywhere_with_no_other_accusation() -> None:
    net, addrs = make_cluster(N, seed=31, settle_s=5.0)
    dead = addrs[4]
    dead_id = net.nodes[dead].core.node_id
    net.kill(dead)
    t0 = net.now
    assert net.run_until_true(
        lambda: all(down_events(n) for n in live_nodes(net, (dead,))), 10.0, 0.01
    )
    for n in live_nodes(net, (dead,)):
        assert [m.node_id for _, m in down_events(n)] == [dead_id], n.addr
        assert any(isinstance(e, MemberSuspect) for t, e in n.events if t >= t0), n.addr
    # Local preset: within probe window + suspicion maximum + a flood, whoever saw it.
    config = Config.local(psks=[PSK]).validate()
    assert config.suspicion_max_s is not None
    assert net.now - t0 <= 2 * config.suspicion_max_s


def test_an_injected_suspicion_is_refuted_everywhere_without_a_down() -> None:
    net, addrs = make_cluster(N, seed=32, settle_s=5.0)
    subject = net.nodes[addrs[2]]
    liar = net.nodes[addrs[7]]
    inc = subject.core.incarnation
    lie = record_of(subject.core.local_member(), MemberState.SUSPECT)
    liar.core.membership.apply(lie, net.now, announce=True)
    net.pump(liar)
    net.run_for(3.0)
    assert subject.core.incarnation == inc + 1
    for n in live_nodes(net, (addrs[2],)):
        m = view_of(n.core, subject.core.node_id)
        assert m is not None and m.state is MemberState.UP and m.incarnation == inc + 1
        assert down_events(n) == [], n.addr


def test_a_node_paused_for_30_s_accuses_nobody_and_refutes_on_waking() -> None:
    """SIGSTOP for 30 s: the others declare it DOWN meanwhile (30 s is past the local
    suspicion window); on waking, its own clock jumps 30 s, it accuses none of them,
    and it is UP again everywhere within a heartbeat or two."""
    net, addrs = make_cluster(N, seed=33, settle_s=5.0)
    sleeper = net.nodes[addrs[3]]
    sid = sleeper.core.node_id
    net.pause(addrs[3])
    net.run_for(30.0)
    for n in live_nodes(net, (addrs[3],)):
        m = view_of(n.core, sid)
        assert m is not None and m.state is MemberState.DOWN, n.addr
    t_wake = net.now
    net.resume(addrs[3])
    assert net.run_until_true(
        lambda: all(
            (m := view_of(n.core, sid)) is not None and m.is_up
            for n in live_nodes(net, (addrs[3],))
        ),
        5.0,
        0.01,
    )
    assert net.now - t_wake <= 2 * Config.local().heartbeat_interval_s
    net.run_for(5.0)
    assert not [e for t, e in sleeper.events if t >= t_wake and isinstance(e, MemberDown)]
    assert not [e for t, e in sleeper.events if t >= t_wake and isinstance(e, MemberSuspect)]
    assert sleeper.core.stats["fd_pauses"] >= 1
    for n in live_nodes(net, (addrs[3],)):
        ups = [e for t, e in n.events if t >= t_wake and isinstance(e, MemberUp)]
        assert any(e.member.node_id == sid for e in ups), n.addr


# ----------------------------------------------------------------------------- CLI


def _cli_config(tmp_path: Path, *flags: str) -> Config:
    key = write_key(tmp_path, "k", PSK)
    args = build_run_parser().parse_args(["--psk-file", key, *flags])
    return config_from_args(args)


def test_the_heartbeat_flag_keeps_the_handshake_retry_consistent(tmp_path: Path) -> None:
    assert _cli_config(tmp_path).handshake_retry_s == 1.0
    assert _cli_config(tmp_path, "--heartbeat-interval", "0.5").handshake_retry_s == 0.25
    both = _cli_config(tmp_path, "--heartbeat-interval", "0.5", "--handshake-retry", "0.1")
    assert both.handshake_retry_s == 0.1
    with pytest.raises(CliError, match="--handshake-retry"):
        _cli_config(tmp_path, "--heartbeat-interval", "0.5", "--handshake-retry", "2")


def test_the_probe_interval_flag_carries_the_probe_timeout_and_suspicion(tmp_path: Path) -> None:
    config = _cli_config(tmp_path, "--probe-interval", "0.1")
    assert config.probe_timeout_s == pytest.approx(0.02)
    assert (config.suspicion_min_s, config.suspicion_max_s) == (
        pytest.approx(0.2),
        pytest.approx(1.2),
    )
    assert _cli_config(tmp_path, "--suspicion-max", "30").suspicion_max_s == 30.0
    with pytest.raises(CliError, match="suspicion"):
        _cli_config(tmp_path, "--probe-interval", "1", "--suspicion-max", "1")


def test_a_refutation_told_directly_is_flooded_on_by_its_receiver() -> None:
    """A node nobody subscribes to floods to nobody: the peers it tells directly flood its
    refutation for it (bench sim at 1,000 nodes found one stuck at 7 nodes)."""
    net, addrs = make_cluster(N, seed=34, settle_s=5.0)
    subject, holder = net.nodes[addrs[5]], net.nodes[addrs[8]]
    sid = subject.core.node_id
    suspect = record_of(subject.core.local_member(), MemberState.SUSPECT)
    holder.core.membership.apply(suspect, net.now, announce=False)
    refuted = wire.MemberRecord(sid, 1, MemberState.UP, suspect.host, suspect.port, None)
    before = holder.core.stats.get("status_announced", 0)
    holder.core.membership.apply(refuted, net.now, announce=False, source=sid)  # PEERS
    assert holder.core.stats["status_announced"] == before + 1
    # Hearsay (a PEERS frame from someone else) is not re-flooded.
    other = wire.MemberRecord(sid, 2, MemberState.UP, suspect.host, suspect.port, None)
    holder.core.membership.apply(other, net.now, announce=False, source=b"x" * 16)
    assert holder.core.stats["status_announced"] == before + 1


def test_a_stale_accusation_still_flooding_is_refuted_again() -> None:
    net, addrs = make_cluster(N, seed=35, settle_s=5.0)
    subject = net.nodes[addrs[2]]
    subject.core.incarnation = 3  # it refuted something earlier
    stale = record_of(subject.core.local_member(), MemberState.DOWN)
    stale = wire.MemberRecord(stale.node_id, 2, MemberState.DOWN, stale.host, stale.port, None)
    subject.core.membership.apply(stale, net.now, announce=False)  # as a STATUS entry
    assert subject.core.stats["refutations_repeated"] == 1
    subject.core.membership.apply(stale, net.now, announce=False)
    assert subject.core.stats["refutations_repeated"] == 1  # once per heartbeat interval


# ----------------------------------------------------------------------------- state machine

ACTIONS = st.one_of(
    st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
    st.tuples(st.just("hear"), st.integers(1, 5)),
    st.tuples(st.just("drop_session"), st.integers(1, 5)),
    st.tuples(st.just("lag"), st.floats(0.0, 1.0)),
    st.tuples(st.just("others_suspect"), st.integers(1, 6)),
    st.tuples(st.just("refuted"), st.integers(1, 6)),
    st.tuples(st.just("ping_req"), st.integers(1, 6)),
    st.tuples(st.just("pause"), st.floats(5.0, 40.0)),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(ACTIONS, max_size=40), st.sets(st.integers(1, 5)))
def test_random_histories_keep_the_detector_rules(
    actions: list[tuple[str, float | int]], dead: set[int]
) -> None:
    """Whatever happens: no PING to a peer without a session (asserted as it is queued),
    DOWN only for a member suspected first (by us or in a flood), the timer never in the
    past, health within bounds."""
    h = Harness(n=5)
    alive = {pid(i) for i in range(1, 6)} - {pid(i) for i in dead}
    flooded: set[bytes] = set()
    for action, arg in actions:
        if action == "advance":
            h.run_until(h.now + float(arg), chatty=alive & h.sessions)
        elif action == "hear":
            h.hear(pid(int(arg)))
        elif action == "drop_session":
            h.sessions.discard(pid(int(arg)))
        elif action == "lag":
            h.fd.report_lag(float(arg), h.now)
        elif action == "others_suspect":
            flooded.add(pid(int(arg)))
            h.fd.on_suspected(pid(int(arg)), 7, h.now)
            h.fd.on_suspect_status(pid(int(arg)), 7, h.now + 0.001)
        elif action == "refuted":
            h.fd.forget(pid(int(arg)))
        elif action == "ping_req":
            h.fd.on_ping_req(pid(1), encode_ping_req(pid(int(arg)), 1), h.now)
        elif action == "pause":
            h.now += float(arg)
            h.fd.handle_timer(h.now)
        if action in ("advance", "pause"):
            due = h.fd.next_timer()
            assert due is None or due > h.now - 1e-9
        assert 0 <= h.fd.health <= MAX_HEALTH
    suspected = {p for _, p in h.suspected} | flooded
    for _, peer, _ in h.downs:
        assert peer in suspected
