"""Failure detection: SWIM probing with Lifeguard's refinements, over gwyh's sessions.

Why it exists: the heartbeat watchdog alone needs several missed heartbeats plus a PING
round (~20 s on a LAN) and, under loss, accuses live members. SWIM (Das, Gupta,
Motivala 2002) detects in O(1) messages per node per period; Lifeguard (Dadgar et al.
2018) keeps it quiet when the *detecting* node is the slow one. Adapted to gwyh:

- **Who is probed.** Only the members this node holds a session with and a relation to
  (its providers and subscribers: each watches the other). A member we have no session
  with yet (a pending handshake) is never probed, so never accused: PINGs to it would
  be dropped unsent, and that is not silence.
- **Direct probe.** Every ``probe_interval_s`` (x health) one watched peer that has not
  been heard from for that long is PINGed, round robin. Any authenticated packet from it
  is the ack. It is rePINGed every ``probe_timeout_s`` (x health) for
  ``probe_attempts`` attempts: at 20 % loss one PING round trip fails 36 % of the time,
  eight in a row 0.03 %.
- **Indirect probe.** After the first unanswered PING, ``indirect_probes`` other watched
  peers get a PING_REQ: each PINGs the target over its own session and relays the
  answer (PING_ACK, ack) or says it cannot (PING_ACK, nack: no session, or no answer).
- **Suspicion.** A failed probe makes the member SUSPECT (a STATUS flood, refutable by
  the member with a higher incarnation, liveness.about_us). A node that watches the
  suspect and hears the suspicion probes it at once: if that fails too, its own SUSPECT
  flood is an independent confirmation; if it succeeds, it tells the suspect directly,
  which refutes. The accusers' suspicion timeout starts at ``suspicion_max_s`` and
  shrinks towards ``suspicion_min_s`` with log(confirmations + 1) / log(K + 1)
  (Lifeguard). Only accusers declare DOWN, so a crash costs a handful of floods, not
  one per member; the others hold the SUSPECT until the DOWN (or a refutation) arrives,
  with a backstop of twice the maximum in case every accuser died too.
- **Local health** (Lifeguard's LHM, 0..MAX_HEALTH): +1 per failed probe, per missing
  nack, per event-loop lag report longer than a probe timeout and per refutation of a
  suspicion about ourselves; -1 per successful probe. Probe interval and timeout are
  stretched by (1 + health): a node that is itself slow or cut off accuses nobody fast.
- **Pauses.** A timer firing far later than asked means this process was stopped: the
  probes in flight are void (their silence was ours), every watched peer gets a fresh
  period, health goes to its maximum, and our suspicions' deadlines move out by a full
  window so the refutations we have not yet read can arrive.

No clock here: times come in as ``now``; lag is reported by the runtime (report_lag).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType

# Lifeguard's K: confirmations after which the suspicion timeout is at its minimum.
EXPECTED_CONFIRMATIONS = 3
# Lifeguard's S: the most the health score stretches our timeouts (x (1 + S)).
MAX_HEALTH = 8
# Relays a helper runs at once (PING_REQs it is serving): bounds what a peer can make
# us hold and send.
MAX_RELAYS = 64

PING_REQ = struct.Struct(f"!{wire.NODE_ID_BYTES}sI")  # target, nonce
PING_ACK = struct.Struct(f"!{wire.NODE_ID_BYTES}sIB")  # target, nonce, 1 ack / 0 nack


def encode_ping_req(target: bytes, nonce: int) -> bytes:
    return PING_REQ.pack(target, nonce)


def decode_ping_req(body: bytes) -> tuple[bytes, int]:
    if len(body) != PING_REQ.size:
        raise wire.WireError("bad PING_REQ length")
    target, nonce = PING_REQ.unpack(body)
    return target, nonce


def encode_ping_ack(target: bytes, nonce: int, ack: bool) -> bytes:
    return PING_ACK.pack(target, nonce, 1 if ack else 0)


def decode_ping_ack(body: bytes) -> tuple[bytes, int, bool]:
    if len(body) != PING_ACK.size:
        raise wire.WireError("bad PING_ACK length")
    target, nonce, status = PING_ACK.unpack(body)
    if status > 1:
        raise wire.WireError("bad PING_ACK status")
    return target, nonce, status == 1


def suspicion_timeout(min_s: float, max_s: float, confirmations: int) -> float:
    """Lifeguard: max at no confirmation, min at EXPECTED_CONFIRMATIONS, log in between."""
    if confirmations <= 0:
        return max_s
    frac = math.log(confirmations + 1) / math.log(EXPECTED_CONFIRMATIONS + 1)
    return max(min_s, max_s - (max_s - min_s) * frac)


@dataclass(slots=True)
class Probe:
    started: float
    nonce: int
    next_ping: float
    attempts_left: int
    indirect_sent: bool = False
    nacks_wanted: int = 0
    nacks: int = 0


@dataclass(slots=True)
class Suspicion:
    incarnation: int
    started: float
    accuser: bool  # our own probe failed: we declare DOWN at the deadline
    confirmations: int = 0
    deadline: float = 0.0
    told: float = float("-inf")  # when we last told the suspect directly


@dataclass(slots=True)
class Relay:
    requesters: list[tuple[bytes, int]] = field(default_factory=list)
    started: float = 0.0
    deadline: float = 0.0


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    probe_interval_s: float
    probe_timeout_s: float
    probe_attempts: int
    indirect_probes: int
    suspicion_min_s: float
    suspicion_max_s: float


def detector_settings(config: Config) -> DetectorSettings:
    return DetectorSettings(
        config.probe_interval_s,
        config.probe_timeout_s,
        config.probe_attempts,
        config.indirect_probes,
        config.suspicion_min_s,
        config.suspicion_max_s,
    )


class FailureDetector:
    def __init__(
        self,
        settings: DetectorSettings,
        rng: random.Random,
        stats: Stats,
        *,
        watched: Callable[[], Iterable[bytes]],
        has_session: Callable[[bytes], bool],
        last_heard: Callable[[bytes], float],
        queue_control: Callable[..., None],
        suspect: Callable[[bytes, float], int | None],
        declare_down: Callable[[bytes, int, float], None],
        tell_suspect: Callable[[bytes], None],
        lost: Callable[[bytes, float], None],
    ) -> None:
        self.s = settings
        self._rng = rng
        self.stats = stats
        self._watched = watched  # providers and subscribers
        self._has_session = has_session
        self._last_heard = last_heard
        self._queue_control = queue_control
        self._suspect = suspect  # mark SUSPECT and flood it; the incarnation, or None
        self._declare_down = declare_down  # DOWN if still SUSPECT at that incarnation
        self._tell_suspect = tell_suspect  # send the suspect its SUSPECT record directly
        self._lost = lost  # failed its probe but not UP here: stop relying on it
        self.health = 0
        self.probes: dict[bytes, Probe] = {}
        self.suspicions: dict[bytes, Suspicion] = {}
        self.relays: dict[bytes, Relay] = {}
        self._rotation: list[bytes] = []
        self._next_probe: float | None = None
        self._last_tick: float | None = None
        self._nonce = rng.getrandbits(32)
        self._due: float | None = None
        self._dirty = True
        # The runtime is not reading the socket (backpressure): silence is our doing.
        self.deaf = False
        self._lag_quiet_until = float("-inf")
        self._accusing: bytes | None = None

    # ------------------------------------------------------------------ timers

    @property
    def stretch(self) -> float:
        return 1.0 + self.health

    def next_timer(self) -> float | None:
        if self._dirty:
            self._due = self._compute_due()
            self._dirty = False
        return self._due

    def _compute_due(self) -> float | None:
        t = self._next_probe
        for probe in self.probes.values():
            if t is None or probe.next_ping < t:
                t = probe.next_ping
        for sus in self.suspicions.values():
            if t is None or sus.deadline < t:
                t = sus.deadline
        for relay in self.relays.values():
            if t is None or relay.deadline < t:
                t = relay.deadline
        return t

    def start(self, now: float) -> None:
        self._next_probe = now + self.s.probe_interval_s
        self._last_tick = now
        self._dirty = True

    def handle_timer(self, now: float) -> None:
        last, self._last_tick = self._last_tick, now
        # We ask to be woken at least every probe interval (x health); far later means
        # this process was stopped or starved.
        if last is not None and now - last > self._pause_threshold():
            self.woke(now)
        due = self.next_timer()
        if due is None or now < due:
            return  # another mechanism's timer: nothing of ours is due (the common case)
        self._check_relays(now)
        self._check_probes(now)
        self._check_suspicions(now)
        if self.deaf:
            # We read nothing, so answer nothing: say we are alive instead, or every
            # watcher's probe of us would fail (the application is slow, not dead).
            self._next_probe = now + self.s.probe_interval_s
            for peer_id in self._watched():
                if self._has_session(peer_id):
                    self._queue_control(peer_id, FrameType.HEARTBEAT)
        elif self._next_probe is not None and now >= self._next_probe:
            self._next_probe = now + self.s.probe_interval_s * self.stretch
            self._probe_next(now)
        self._dirty = True

    def _pause_threshold(self) -> float:
        return max(4 * self.s.probe_interval_s * self.stretch, 1.0)

    # ------------------------------------------------------------------ inputs

    def heard(self, peer_id: bytes, now: float) -> None:
        """Any authenticated CONTROL from the peer: it is alive."""
        if self.probes.pop(peer_id, None) is not None:
            self._probe_ok()
        relay = self.relays.pop(peer_id, None)
        if relay is not None:
            for requester, nonce in relay.requesters:
                self._queue_control(
                    requester, FrameType.PING_ACK, encode_ping_ack(peer_id, nonce, True)
                )
            self._dirty = True
        sus = self.suspicions.get(peer_id)
        if sus is not None and now - sus.told >= self.s.probe_timeout_s:
            # It talks to us while suspected: make sure it knows, so it refutes.
            sus.told = now
            self._tell_suspect(peer_id)

    def set_deaf(self, deaf: bool, now: float) -> None:
        """While we do not read, every probe would fail for our own reason."""
        if deaf:
            self.probes.clear()
            self.relays.clear()
            self._dirty = True
        elif self.deaf:
            self.woke(now)
        self.deaf = deaf

    def report_lag(self, lag_s: float, now: float) -> None:
        """The runtime's event loop ran this late: our own slowness, not the peers'.
        It counts once it could fail a probe by itself: longer than half a probe's
        window of PINGs. At most one bump per probe interval, as a probe's success
        takes one back."""
        window = self.s.probe_timeout_s * self.s.probe_attempts
        if lag_s > window / 2 and now >= self._lag_quiet_until:
            self._lag_quiet_until = now + self.s.probe_interval_s
            self._bump_health(1)
            self.stats.bump("fd_lag_reports")
            self._dirty = True

    def refuted_us(self) -> None:
        """We were suspected while alive: likely our own slowness (Lifeguard)."""
        self._bump_health(1)

    def woke(self, now: float) -> None:
        self.stats.bump("fd_pauses")
        self.probes.clear()
        self.relays.clear()
        self.health = MAX_HEALTH
        for sus in self.suspicions.values():
            sus.deadline = max(sus.deadline, now + self.s.suspicion_max_s)
        self._next_probe = now + self.s.probe_interval_s * self.stretch
        self._dirty = True

    def _bump_health(self, delta: int) -> None:
        self.health = min(MAX_HEALTH, max(0, self.health + delta))

    def _probe_ok(self) -> None:
        self._bump_health(-1)
        self.stats.bump("fd_probes_ok")
        self._dirty = True

    # ------------------------------------------------------------------ probing

    def _probe_next(self, now: float) -> None:
        """Start one probe: the next watched peer, round robin, silent for a period."""
        quiet_since = now - self.s.probe_interval_s * self.stretch
        for _ in range(2):
            while self._rotation:
                peer_id = self._rotation.pop()
                if peer_id in self.probes or peer_id in self.suspicions:
                    continue
                if not self._has_session(peer_id):
                    continue  # a pending handshake is not silence
                if self._last_heard(peer_id) > quiet_since:
                    continue  # traffic is an ack: nothing to ask
                self.start_probe(peer_id, now)
                return
            # A new round in a new random order (SWIM: bounded time to first probe).
            self._rotation = list(self._watched())
            self._rng.shuffle(self._rotation)

    def start_probe(self, peer_id: bytes, now: float) -> None:
        if peer_id in self.probes or not self._has_session(peer_id):
            return
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        probe = Probe(now, self._nonce, now, self.s.probe_attempts)
        self.probes[peer_id] = probe
        self.stats.bump("fd_probes")
        self._ping(peer_id, probe, now)
        self._dirty = True

    def _ping(self, peer_id: bytes, probe: Probe, now: float) -> None:
        self._queue_control(peer_id, FrameType.PING)
        probe.attempts_left -= 1
        probe.next_ping = now + self.s.probe_timeout_s * self.stretch

    def _check_probes(self, now: float) -> None:
        for peer_id, probe in list(self.probes.items()):
            if now < probe.next_ping:
                continue
            if self._last_heard(peer_id) >= probe.started:
                del self.probes[peer_id]  # heard on the data path meanwhile
                self._probe_ok()
                continue
            if not probe.indirect_sent:
                probe.indirect_sent = True
                self._ask_helpers(peer_id, probe)
            if probe.attempts_left > 0:
                self._ping(peer_id, probe, now)
                continue
            del self.probes[peer_id]
            self.stats.bump("fd_probes_failed")
            self._bump_health(1)
            if probe.nacks < probe.nacks_wanted:
                self._bump_health(1)  # helpers did not answer either: maybe it is us
            self._accuse(peer_id, now)

    def _ask_helpers(self, target: bytes, probe: Probe) -> None:
        helpers = [
            p
            for p in self._watched()
            if p != target and self._has_session(p) and p not in self.probes
        ]
        k = min(self.s.indirect_probes, len(helpers))
        if not k:
            return
        body = encode_ping_req(target, probe.nonce)
        for helper in self._rng.sample(helpers, k):
            self._queue_control(helper, FrameType.PING_REQ, body)
        probe.nacks_wanted = k
        self.stats.bump("fd_ping_reqs", k)

    def on_ping_req(self, requester: bytes, body: bytes, now: float) -> None:
        """A peer asks us to PING ``target`` for it."""
        target, nonce = decode_ping_req(body)
        if not self._has_session(target) or target == requester:
            self._queue_control(
                requester, FrameType.PING_ACK, encode_ping_ack(target, nonce, False)
            )
            return
        relay = self.relays.get(target)
        if relay is None:
            if len(self.relays) >= MAX_RELAYS:
                self.stats.bump("fd_relays_refused")
                return
            # Lifeguard: nack a little before the requester's own timeout would.
            wait = self.s.probe_timeout_s * self.s.probe_attempts * 0.8
            relay = self.relays[target] = Relay(started=now, deadline=now + wait)
            self._queue_control(target, FrameType.PING)
        if len(relay.requesters) < MAX_RELAYS:
            relay.requesters.append((requester, nonce))
        self._dirty = True

    def on_ping_ack(self, helper: bytes, body: bytes, now: float) -> None:
        target, nonce, ack = decode_ping_ack(body)
        probe = self.probes.get(target)
        if probe is None or probe.nonce != nonce:
            return
        if ack:
            del self.probes[target]
            self.stats.bump("fd_indirect_acks")
            self._probe_ok()
        else:
            probe.nacks += 1

    def _check_relays(self, now: float) -> None:
        for target, relay in list(self.relays.items()):
            if now >= relay.deadline:
                del self.relays[target]
                for requester, nonce in relay.requesters:
                    self._queue_control(
                        requester, FrameType.PING_ACK, encode_ping_ack(target, nonce, False)
                    )

    # ------------------------------------------------------------------ suspicion

    def _accuse(self, peer_id: bytes, now: float) -> None:
        sus = self.suspicions.get(peer_id)
        if sus is not None:
            if not sus.accuser:
                # We heard the suspicion and our own probe failed as well: we are now
                # an accuser, and our flood is a confirmation for the others.
                sus.accuser = True
                self._suspect(peer_id, now)
                self._set_deadline(sus)
            return
        self._accusing = peer_id  # on_suspected, called back from _suspect: no re-probe
        try:
            incarnation = self._suspect(peer_id, now)
        finally:
            self._accusing = None
        if incarnation is None:
            # Not alive in our table (already DOWN, LEFT or unknown), so nothing to
            # accuse; but it must stop being our provider or subscriber.
            self._lost(peer_id, now)
            return
        self.stats.bump("fd_suspected")
        sus = self.suspicions.get(peer_id)
        if sus is None:  # the table change did not reach on_suspected (defensive)
            sus = self.suspicions[peer_id] = Suspicion(incarnation, now, True)
        sus.accuser = True
        self._set_deadline(sus)

    def on_suspected(self, node_id: bytes, incarnation: int, now: float) -> None:
        """A member became SUSPECT in our table (our probe or a STATUS flood)."""
        sus = self.suspicions.get(node_id)
        if sus is None or sus.incarnation != incarnation:
            sus = self.suspicions[node_id] = Suspicion(incarnation, now, False)
            self._set_deadline(sus)
            if (
                node_id != self._accusing
                and node_id not in self.probes
                and node_id in self._watched()
            ):
                # We watch it: check for ourselves at once (a confirmation or a rescue).
                self.start_probe(node_id, now)

    def on_suspect_status(self, node_id: bytes, incarnation: int, now: float) -> None:
        """A STATUS SUSPECT flood arrived; each is one accuser's (message ids differ)."""
        sus = self.suspicions.get(node_id)
        if sus is None or sus.incarnation != incarnation:
            return
        if now > sus.started:  # the first flood is the suspicion itself
            sus.confirmations += 1
            self._set_deadline(sus)

    def forget(self, node_id: bytes) -> None:
        """The member is no longer SUSPECT (refuted, DOWN or LEFT)."""
        if self.suspicions.pop(node_id, None) is not None:
            self._dirty = True
        if self.probes.pop(node_id, None) is not None:
            self._dirty = True

    def _set_deadline(self, sus: Suspicion) -> None:
        if sus.accuser:
            wait = suspicion_timeout(
                self.s.suspicion_min_s, self.s.suspicion_max_s, sus.confirmations
            )
        else:
            wait = 2 * self.s.suspicion_max_s  # backstop: the accusers decide
        sus.deadline = sus.started + wait
        self._dirty = True

    def _hear_others(self, suspect: bytes, since: float) -> bool:
        """Has any other watched peer spoken since ``since``? Silent peers are PINGed
        every period, so a node that hears nobody is the one cut off, not its peers."""
        last_heard = self._last_heard
        watched = self._watched()
        others = [p for p in watched if p != suspect]
        if not others:
            # Our only peer (a two-node cluster) may be accused; nobody at all to hear
            # from means we are the one alone.
            return suspect in watched
        return any(last_heard(p) >= since for p in others)

    def _check_suspicions(self, now: float) -> None:
        for node_id, sus in list(self.suspicions.items()):
            if now < sus.deadline:
                continue
            if self.deaf or not self._hear_others(node_id, sus.started):
                # We are likelier the one cut off, and our evidence with us: accuse
                # nobody; probe again from scratch (an answer tells it to refute).
                sus.started = now
                sus.deadline = now + self.s.suspicion_max_s
                if sus.accuser:
                    self.probes.pop(node_id, None)
                    self.start_probe(node_id, now)
                self._dirty = True
                continue
            del self.suspicions[node_id]
            self.stats.bump("fd_declared_down")
            self._declare_down(node_id, sus.incarnation, now)
