"""Liveness: heartbeats, the provider watchdog, probes, isolation, refutation.

Why it exists: a member is declared DOWN only on evidence that survives loss. A
provider that falls silent is first PINGed a few times; only a failed probe accuses it.
If every provider falls silent at once we are far likelier the one cut off, so nobody
is accused and we rejoin through the seeds and by re-handshaking the members we know
(a seed node has no seeds; our old sessions may be freed at the other end). A timer
that fires far too late means this process was stopped: the same rejoin, at once. A
node accused while alive refutes with a higher incarnation, which only it may raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.membership import newer_incarnation, next_incarnation
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.subscriptions import ProviderState
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState

# A silent peer is PINGed this many times, evenly over one heartbeat interval, before it
# is accused: at 20 % loss one PING/PONG round trip fails 36 % of the time, three 5 %.
PROBE_PINGS = 3


@dataclass(slots=True)
class Probe:
    """A silent peer being PINGed before it is accused (any authenticated CONTROL from
    it ends the probe)."""

    give_up: float
    next_ping: float | None
    pings_left: int

    @property
    def due(self) -> float:
        return self.give_up if self.next_ping is None else self.next_ping


class Liveness:
    def __init__(
        self,
        heartbeat_interval_s: float,
        missed_heartbeats: int,
        providers: dict[bytes, ProviderState],
        subscribers: dict[bytes, float],
        stats: Stats,
        *,
        queue_control: Callable[..., None],
        declare_down: Callable[[bytes, float], None],
        isolated: Callable[[float], None],
        lost_provider: Callable[[float], None],
        self_record: Callable[[MemberState], MemberRecord],
        announce: Callable[[MemberRecord, float], None],
        rejoin: Callable[[float], None],
        rejoined: Callable[[], None],
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        # N missed heartbeats: the N-th is due N intervals after the last one heard;
        # half an interval more absorbs latency and jitter before we call it missed.
        self.watchdog_s = heartbeat_interval_s * (missed_heartbeats + 0.5)
        self.providers = providers
        self.subscribers = subscribers
        self.stats = stats
        self._queue_control = queue_control
        self._declare_down = declare_down
        self._isolated = isolated  # every provider fell silent: start over from the seeds
        self._lost_provider = lost_provider  # a provider failed its probe
        self._self_record = self_record
        self._announce = announce
        self._rejoin = rejoin  # isolated: re-handshake the members we know, in batches
        self._rejoined = rejoined
        self.incarnation = 0
        self.isolated_since: float | None = None
        # The runtime is not reading the socket (backpressure): silence is our own
        # doing, so nobody is suspected and we do not count as isolated meanwhile.
        self.deaf = False
        self._last_timer: float | None = None
        self.probing: dict[bytes, Probe] = {}  # silent provider or subscriber

    # ------------------------------------------------------------------ timers

    def next_timer(self) -> float | None:
        if self.deaf:
            return None
        t: float | None = None
        probing = self.probing
        watchdog = self.watchdog_s
        for provider_id, state in self.providers.items():
            due = state.last_heard + watchdog
            if (t is None or due < t) and provider_id not in probing:
                t = due
        for probe in probing.values():
            due = probe.due
            if t is None or due < t:
                t = due
        return t

    def handle_timer(self, now: float) -> None:
        # While running, the heartbeat alone brings us here every interval: a longer
        # gap means this process was stopped (SIGSTOP, a VM freeze, a stalled loop).
        last, self._last_timer = self._last_timer, now
        if last is not None and now - last > self.watchdog_s:
            self._woke(now)
        if self.deaf:
            return
        self._check_providers(now)
        self._check_probes(now)

    def heartbeat(self, now: float) -> None:
        """Heartbeat our subscribers; one that stopped refreshing is dropped and probed."""
        for subscriber_id, expires in list(self.subscribers.items()):
            if now >= expires:
                # It stopped refreshing: maybe it just moved on, maybe it died. Drop it,
                # and only accuse it if it does not answer a direct PING either (and we
                # are not the one cut off).
                del self.subscribers[subscriber_id]
                self.stats.bump("subscribers_expired")
                if self.heard_from_a_provider(now) and subscriber_id not in self.probing:
                    self._start_probe(subscriber_id, now)
            else:
                self._queue_control(subscriber_id, FrameType.HEARTBEAT)

    def _woke(self, now: float) -> None:
        """We were stopped long enough to be declared DOWN, and perhaps long enough for
        our peers to free our sessions: trust none of them, re-handshake at once
        (providers first) rather than wait for the isolation rule to notice."""
        self.stats.bump("pauses_detected")
        self.isolated_since = now - self.watchdog_s
        self._rejoin(now)

    def check_isolation(self, now: float) -> None:
        """Heartbeat: isolated for a whole watchdog period (no confirmed provider
        talking; a node still forming its first subscriptions gets that long), re-handshake
        the members we know; connected, stop."""
        if self.deaf:
            return
        if self.heard_from_a_provider(now):
            if self.isolated_since is not None:
                self.isolated_since = None
                self._rejoined()
            return
        if self.isolated_since is None:
            self.isolated_since = now
        if now - self.isolated_since >= self.watchdog_s:
            self._rejoin(now)

    def set_deaf(self, deaf: bool, now: float) -> None:
        if self.deaf and not deaf:
            # Listening again: every provider gets a full watchdog period to be heard.
            for state in self.providers.values():
                state.last_heard = max(state.last_heard, now)
            self.probing.clear()
        self.deaf = deaf

    def heard_from_a_provider(self, now: float) -> bool:
        """Are we connected? Only a confirmed provider that is still talking counts: a
        freshly chosen one proves nothing about our own reachability."""
        return any(
            st.confirmed and now < st.last_heard + self.watchdog_s for st in self.providers.values()
        )

    def _check_providers(self, now: float) -> None:
        if not self.providers:
            return
        silent = [
            pid for pid, st in self.providers.items() if now >= st.last_heard + self.watchdog_s
        ]
        if not silent:
            return
        if len(silent) == len(self.providers) and len(self.providers) >= 2:
            # Every provider went quiet at once: far likelier that *we* are cut off
            # than that they all died. Do not accuse them; start over from the seeds.
            self.stats.bump("isolated")
            for provider_id in silent:
                self.probing.pop(provider_id, None)
            self._isolated(now)
            return
        for provider_id in silent:
            # Suspect, do not accuse yet: a few lost heartbeats are likelier than a death
            # under loss. It stays our provider while the PINGs run (_check_probes).
            if provider_id not in self.probing:
                self._start_probe(provider_id, now)

    def _start_probe(self, peer_id: bytes, now: float) -> None:
        self.stats.bump("probes")
        self.probing[peer_id] = Probe(now + self.heartbeat_interval_s, now, PROBE_PINGS)
        self._check_probe(peer_id, self.probing[peer_id], now)

    def _check_probe(self, peer_id: bytes, probe: Probe, now: float) -> None:
        if probe.next_ping is not None and now >= probe.next_ping:
            self._queue_control(peer_id, FrameType.PING)
            probe.pings_left -= 1
            if probe.pings_left > 0:
                spacing = self.heartbeat_interval_s / PROBE_PINGS
                probe.next_ping = max(now, probe.next_ping + spacing)
            else:
                probe.next_ping = None

    def _check_probes(self, now: float) -> None:
        if not self.probing:
            return
        for peer_id, probe in list(self.probing.items()):
            if now >= probe.give_up:
                del self.probing[peer_id]
                # A provider: the isolation rule in _check_providers already spared it if
                # all of them fell silent. A subscriber: accused only while we are
                # demonstrably connected.
                if peer_id in self.providers or self.heard_from_a_provider(now):
                    self.stats.bump("probes_failed")
                    self._declare_down(peer_id, now)
                    if self.providers.pop(peer_id, None) is not None:
                        # Already DOWN in our table, so nothing above replaced it.
                        self._lost_provider(now)
            else:
                self._check_probe(peer_id, probe, now)

    # ------------------------------------------------------------------ refutation

    def about_us(self, record: MemberRecord, source: bytes | None, now: float) -> None:
        """A record about this node arrived (we are running): refute a DOWN (or a LEFT
        from before a restart)."""
        if record.state == MemberState.UP:
            return
        ours = self.incarnation
        if record.incarnation == ours or newer_incarnation(record.incarnation, ours):
            # Refute: only we may raise our incarnation, and UP(n+1) beats DOWN(n),
            # whatever n is (the counter wraps; membership.newer_incarnation).
            self.incarnation = next_incarnation(record.incarnation)
            self.stats.bump("refutations")
            own = self._self_record(MemberState.UP)
            self._announce(own, now)
            # Also tell our direct peers: the flood may reach nobody if the
            # accusation already cost us our subscribers.
            notice = wire.encode_members([own])
            told = {*self.providers, *self.subscribers}
            if source is not None:
                told.add(source)
            for peer_id in told:
                self._queue_control(peer_id, FrameType.PEERS, notice)
        elif source is not None and newer_incarnation(ours, record.incarnation):
            # The sender still holds an old DOWN for us: correct it directly.
            notice = wire.encode_members([self._self_record(MemberState.UP)])
            self._queue_control(source, FrameType.PEERS, notice)
