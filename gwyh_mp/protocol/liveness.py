"""Liveness: heartbeats, isolation, pauses, refutation.

Why it exists: a node must notice when *it* is the one cut off, and must contradict
news of its own failure. Accusing a silent peer is failure_detector.py's job (SWIM
probes, suspicion); this module keeps the rules that are about ourselves. If every
provider falls silent at once we are far likelier the one cut off, so nobody is accused
and we rejoin through the seeds and by re-handshaking the members we know (a seed node
has no seeds; our old sessions may be freed at the other end). A timer that fires far
too late means this process was stopped: the same rejoin, at once. A node suspected or
accused while alive refutes with a higher incarnation, which only it may raise.
"""

from __future__ import annotations

from collections.abc import Callable

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.membership import newer_incarnation, next_incarnation
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.subscriptions import ProviderState
from gwyh_mp.protocol.wire import FrameType, MemberRecord, MemberState


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
        isolated: Callable[[float], None],
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
        self._isolated = isolated  # every provider fell silent: start over from the seeds
        self._self_record = self_record
        self._announce = announce
        self._rejoin = rejoin  # isolated: re-handshake the members we know, in batches
        self._rejoined = rejoined
        self.on_refuted: Callable[[], None] = lambda: None  # we were suspected alive
        self.incarnation = 0
        self.isolated_since: float | None = None
        # The runtime is not reading the socket (backpressure): silence is our own
        # doing, so nobody is suspected and we do not count as isolated meanwhile.
        self.deaf = False
        self._last_timer: float | None = None
        self._reannounce_after = float("-inf")

    # ------------------------------------------------------------------ timers

    def next_timer(self) -> float | None:
        """When every provider will have been silent a whole watchdog period (the
        isolation rule); single silent providers are the failure detector's."""
        if self.deaf or len(self.providers) < 2:
            return None
        return max(st.last_heard for st in self.providers.values()) + self.watchdog_s

    def handle_timer(self, now: float) -> None:
        # While running, the heartbeat alone brings us here every interval: a longer
        # gap means this process was stopped (SIGSTOP, a VM freeze, a stalled loop).
        last, self._last_timer = self._last_timer, now
        if last is not None and now - last > self.watchdog_s:
            self._woke(now)
        if self.deaf:
            return
        self._check_providers(now)

    def heartbeat(self, now: float) -> None:
        """Heartbeat our subscribers; one that stopped refreshing is dropped (it moved on,
        or died: the failure detector, which probed it meanwhile, decides which)."""
        for subscriber_id, expires in list(self.subscribers.items()):
            if now >= expires:
                del self.subscribers[subscriber_id]
                self.stats.bump("subscribers_expired")
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
        self.deaf = deaf

    def heard_from_a_provider(self, now: float) -> bool:
        """Are we connected? Only a confirmed provider that is still talking counts: a
        freshly chosen one proves nothing about our own reachability."""
        return any(
            st.confirmed and now < st.last_heard + self.watchdog_s for st in self.providers.values()
        )

    def _check_providers(self, now: float) -> None:
        if len(self.providers) < 2:
            return
        if all(now >= st.last_heard + self.watchdog_s for st in self.providers.values()):
            # Every provider went quiet at once: far likelier that *we* are cut off
            # than that they all died. Do not accuse them; start over from the seeds.
            self.stats.bump("isolated")
            self._isolated(now)

    # ------------------------------------------------------------------ refutation

    def about_us(self, record: MemberRecord, source: bytes | None, now: float) -> None:
        """A record about this node arrived (we are running): refute a SUSPECT or a DOWN
        (or a LEFT from before a restart)."""
        if record.state == MemberState.UP:
            return
        ours = self.incarnation
        if record.incarnation == ours or newer_incarnation(record.incarnation, ours):
            # Refute: only we may raise our incarnation, and UP(n+1) beats DOWN(n),
            # whatever n is (the counter wraps; membership.newer_incarnation).
            self.incarnation = next_incarnation(record.incarnation)
            self.stats.bump("refutations")
            self.on_refuted()  # Lifeguard: being suspected alive hints we are slow
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
        elif newer_incarnation(ours, record.incarnation) and now >= self._reannounce_after:
            # A stale accusation is still flooding: our refutation did not reach
            # everyone (a lossy moment, or no subscriber to carry it). Flood it again,
            # at most once per heartbeat interval.
            self._reannounce_after = now + self.heartbeat_interval_s
            self.stats.bump("refutations_repeated")
            self._announce(self._self_record(MemberState.UP), now)
