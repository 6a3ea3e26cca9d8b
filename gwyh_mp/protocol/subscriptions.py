"""Subscriptions: which peers we take broadcasts from, and who takes them from us.

Why it exists: every node subscribes to a few providers, chosen by the configured
strategy over the members it knows, and forwards to whoever subscribes to it. After a
membership change selection runs again after a short random delay (so a burst of
changes costs one reselection); a newcomer gets its fair share of subscribers through
a swap-in, or nodes joining a settled cluster would reach nobody.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.dissemination import FanoutTarget
from gwyh_mp.protocol.events import Event, Member, ProviderChanged
from gwyh_mp.protocol.membership import MemberTable, record_of
from gwyh_mp.protocol.peers import PeerLink, Peers
from gwyh_mp.protocol.selection import Candidate, Strategy, select_providers
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import ALIVE_STATES, FrameType, MemberState

Addr = tuple[str, int]
SUBSCRIBE_NEED_KEY = 0x01
# UNSUBSCRIBE with this body, from a provider: "I take no subscribers now" (the node's
# application stopped reading). The subscriber drops it and chooses another; an empty
# UNSUBSCRIBE keeps its old meaning, "remove me from your subscribers".
UNSUBSCRIBE_REFUSED = b"\x01"
# A node whose socket reading has been paused (backpressure) this many heartbeats sheds
# its subscribers rather than heartbeat them while it loses what they would get from it.
SATURATED_AFTER_HEARTBEATS = 2
# How long a subscriber keeps a provider that refused it out of its selection, in
# watchdog periods.
REFUSED_FOR_WATCHDOGS = 4


def _node_id_of(member: Member) -> bytes:
    return member.node_id


@dataclass(slots=True)
class ProviderState:
    since: float
    last_heard: float
    confirmed: bool = False


class Subscriptions:
    def __init__(
        self,
        config: Config,
        zone: str | None,
        members: MemberTable,
        peers: Peers,
        rng: random.Random,
        stats: Stats,
        *,
        channel_key: bytes,
        watchdog_s: float,
        queue_control: Callable[..., None],
        emit: Callable[[Event], None],
        initiate: Callable[[Addr, float], None],
        bootstrap: Callable[[float], None],
        request_peers: Callable[[bytes], None],
    ) -> None:
        self.config = config
        self.zone = zone
        self.members = members
        self.peers = peers
        self._rng = rng  # the node's: one stream of draws keeps a simulation reproducible
        self.stats = stats
        self._channel_key = channel_key
        self._watchdog_s = watchdog_s
        self._queue_control = queue_control
        self._emit = emit
        self._initiate = initiate
        self._bootstrap = bootstrap  # (re)join through the seeds
        self._request_peers = request_peers
        self.providers: dict[bytes, ProviderState] = {}
        self.subscribers: dict[bytes, float] = {}  # node id -> expiry time
        self.reassign_at: float | None = None
        self.refused: dict[bytes, float] = {}  # provider that refused us -> until
        self.reading_paused_since: float | None = None  # set by the runtime (backpressure)
        self.saturated = False
        self.pending_swaps: list[tuple[bytes, bytes]] = []  # (provider out, newcomer in)
        # A provider (re)accepted us: it forwards to us from now on (catch-up pulls
        # what it got before, if we may have missed it).
        self.on_accepted: Callable[[bytes, float], None] | None = None

    # ------------------------------------------------------------------ selection

    def schedule_reassign(self, now: float) -> None:
        low, high = self.config.reassign_delay_s
        due = now + self._rng.uniform(low, high)
        if self.reassign_at is None or due < self.reassign_at:
            self.reassign_at = due

    def next_timer(self) -> float | None:
        return self.reassign_at

    def handle_timer(self, now: float) -> None:
        if self.reassign_at is not None and now >= self.reassign_at:
            self.reassign_at = None
            self.reassign(now)

    def selection_settled(self) -> bool:
        """Would provider selection return exactly the providers we have? Selection is a
        fixed point on its own result (see selection.py), so it is when every provider
        is still UP, no swap is pending and the count per zone is what the strategy
        asks for. Checked in O(providers + zones) from the table's incremental counts,
        instead of a selection over every member after every membership change."""
        if self.pending_swaps:
            return False
        members = self.members
        zones: dict[str | None, int] = {}
        for provider_id in self.providers:
            member = members.get(provider_id)
            if member is None or member.state not in ALIVE_STATES:
                return False
            zones[member.zone] = zones.get(member.zone, 0) + 1
        n = self.config.subscriptions
        if self.config.strategy is not Strategy.HUB_AND_SPOKE:
            return len(self.providers) == min(n, members.up_count)
        # One provider per remote zone, then the local share of what is left.
        up_zones = members.up_zones
        remote = [zone for zone in up_zones if zone != self.zone]
        local_target = min(max(0, n - len(remote)), up_zones.get(self.zone, 0))
        if zones.pop(self.zone, 0) != local_target:
            return False
        return len(zones) == len(remote) and all(zones.get(zone) == 1 for zone in remote)

    def reassign(self, now: float) -> None:
        if self.selection_settled():
            return
        up = self.members.up_members()
        if self.refused:
            for node_id, until in list(self.refused.items()):
                if now >= until:
                    del self.refused[node_id]
            up = [m for m in up if m.node_id not in self.refused]
        # A SUSPECT keeps its place if it is ours already, but is not newly chosen.
        up = [m for m in up if m.state is MemberState.UP or m.node_id in self.providers]
        up.sort(key=_node_id_of)
        candidates = [Candidate(m.node_id, m.zone) for m in up]
        keep = set(self.providers)
        for victim, newcomer in self.pending_swaps:
            if victim in keep:
                keep.discard(victim)
                keep.add(newcomer)
        self.pending_swaps.clear()
        desired = set(
            select_providers(
                own_zone=self.zone,
                candidates=candidates,
                current=keep,
                n=self.config.subscriptions,
                strategy=self.config.strategy,
                rng=self._rng,
            )
        )
        current = set(self.providers)
        if desired == current:
            return
        for node_id in sorted(current - desired):
            del self.providers[node_id]
            self._queue_control(node_id, FrameType.UNSUBSCRIBE)
        for node_id in sorted(desired - current):
            self.providers[node_id] = ProviderState(since=now, last_heard=now)
            self.subscribe(node_id, now)
        self.stats.bump("reassignments")
        self.providers_changed()

    def unsubscribe_all(self) -> None:
        """A graceful leave: end every subscription of ours."""
        for provider_id in list(self.providers):
            self._queue_control(provider_id, FrameType.UNSUBSCRIBE)
        self.providers.clear()

    def start_over(self, now: float) -> None:
        """Every provider fell silent at once (we are likelier the one cut off): drop
        them all and rejoin through the seeds."""
        self.providers.clear()
        self.providers_changed()
        self._bootstrap(now)
        self.schedule_reassign(now)

    def lost_provider(self, now: float) -> None:
        """A provider failed its probe (already DOWN in our table): choose again."""
        self.providers_changed()
        self.schedule_reassign(now)

    def providers_changed(self) -> None:
        self._emit(ProviderChanged(tuple(sorted(self.providers))))

    def maybe_swap_in(self, newcomer: bytes) -> None:
        """Give a newcomer its fair share of subscribers: with probability N / members,
        trade one of our providers for it. Without this, nodes that join a settled
        cluster (where everyone already has N providers) would have no subscribers
        and their broadcasts would reach nobody."""
        n = self.config.subscriptions
        if len(self.providers) < n or newcomer in self.providers:
            return
        if self._rng.random() < n / max(self.members.up_count, 1):
            victim = self._rng.choice(sorted(self.providers))
            self.pending_swaps.append((victim, newcomer))

    # ------------------------------------------------------------------ as a subscriber

    def subscribe(self, node_id: bytes, now: float) -> None:
        link = self.peers.links.get(node_id)
        if link is not None and link.session is not None:
            need_key = link.channel_key is None or not self.providers[node_id].confirmed
            self._queue_control(
                node_id, FrameType.SUBSCRIBE, bytes((SUBSCRIBE_NEED_KEY if need_key else 0,))
            )
            return
        member = self.members.get(node_id)
        if member is not None:
            self._initiate((member.host, member.port), now)

    def refresh(self, now: float) -> None:
        """Heartbeat: renew every subscription (and ask again for a missing key)."""
        for provider_id, state in self.providers.items():
            link = self.peers.links.get(provider_id)
            if link is not None and link.session is not None:
                flag = (
                    0 if (state.confirmed and link.channel_key is not None) else SUBSCRIBE_NEED_KEY
                )
                self._queue_control(provider_id, FrameType.SUBSCRIBE, bytes((flag,)))
            else:
                self.subscribe(provider_id, now)

    def on_established(self, peer_id: bytes) -> None:
        provider = self.providers.get(peer_id)
        if provider is not None and not provider.confirmed:
            self._queue_control(peer_id, FrameType.SUBSCRIBE, bytes((SUBSCRIBE_NEED_KEY,)))

    def on_subscribed(self, peer_id: bytes, link: PeerLink, body: bytes, now: float) -> None:
        self.peers.set_channel_key(peer_id, link, body)
        provider = self.providers.get(peer_id)
        if provider is None:
            self._queue_control(peer_id, FrameType.UNSUBSCRIBE)
            return
        if self.on_accepted is not None:
            self.on_accepted(peer_id, now)
        if not provider.confirmed:
            provider.confirmed = True
            provider.last_heard = now
            # Members that joined while we had no providers were announced to
            # nobody we listen to: one peer list from each new provider closes that gap.
            self._request_peers(peer_id)

    # ------------------------------------------------------------------ as a provider

    def on_unsubscribe(self, peer_id: bytes, body: bytes, now: float) -> None:
        self.subscribers.pop(peer_id, None)
        if body == UNSUBSCRIBE_REFUSED and self.providers.pop(peer_id, None) is not None:
            # Our provider cannot take subscribers (its application stopped reading):
            # choose another rather than count on it, and leave it out for a while.
            self.stats.bump("providers_refused")
            self.refused[peer_id] = now + REFUSED_FOR_WATCHDOGS * self._watchdog_s
            self.providers_changed()
            self.schedule_reassign(now)

    def set_reading_paused(self, paused: bool, now: float) -> None:
        """The runtime stopped (or resumed) reading the socket because the application
        is not consuming deliveries; paused past SATURATED_AFTER_HEARTBEATS, this node
        refuses subscribers (check_saturation) instead of relaying nothing."""
        if not paused:
            self.reading_paused_since = None
            self.saturated = False
        elif self.reading_paused_since is None:
            self.reading_paused_since = now

    def check_saturation(self, now: float) -> str | None:
        """Heartbeat: has reading been paused (the application is not keeping up) for
        SATURATED_AFTER_HEARTBEATS? Then we would be a black hole for our subscribers:
        we keep heartbeating but relay nothing. Degrade visibly instead: tell each
        subscriber we refuse it, and refuse new SUBSCRIBEs, until reading resumes.
        Returns a warning the first time."""
        since = self.reading_paused_since
        if since is None:
            self.saturated = False
            return None
        limit = SATURATED_AFTER_HEARTBEATS * self.config.heartbeat_interval_s
        if now - since < limit:
            return None
        warning = None
        if not self.saturated:
            self.saturated = True
            self.stats.bump("saturated")
            warning = (
                f"the application has not read its messages for {now - since:.1f} s: "
                f"this node refuses subscribers until it does ({len(self.subscribers)} shed)"
            )
        for subscriber_id in self.subscribers:
            self.stats.bump("subscribers_shed")
            self._queue_control(subscriber_id, FrameType.UNSUBSCRIBE, UNSUBSCRIBE_REFUSED)
        self.subscribers.clear()
        return warning

    def on_subscribe(self, peer_id: bytes, body: bytes, now: float) -> None:
        if self.saturated:
            self.stats.bump("subscribes_refused")
            self._queue_control(peer_id, FrameType.UNSUBSCRIBE, UNSUBSCRIBE_REFUSED)
            return
        member = self.members.get(peer_id)
        if member is None or member.state not in ALIVE_STATES:
            # We believe it is DOWN: tell it, so it refutes with a higher incarnation.
            if member is not None:
                self._queue_control(
                    peer_id, FrameType.PEERS, wire.encode_members([record_of(member)])
                )
            return
        is_new = peer_id not in self.subscribers
        self.subscribers[peer_id] = now + self._watchdog_s
        need_key = bool(body) and body[0] & SUBSCRIBE_NEED_KEY
        if is_new or need_key:
            self._queue_control(peer_id, FrameType.SUBSCRIBED, self._channel_key)
        if is_new:
            self.stats.bump("subscribers_added")

    def fanout_targets(self) -> list[FanoutTarget]:
        # Nobody subscribes to us (a late joiner the swap-in passed over): push to our
        # providers instead, who hold our channel key, so our broadcasts still get out.
        # They drop what they already have before decrypting it.
        peers = self.subscribers or {p: 0.0 for p, st in self.providers.items() if st.confirmed}
        fanout_target = self.peers.fanout_target
        targets = []
        for peer_id in peers:
            target = fanout_target(peer_id)
            if target is not None:
                targets.append(target)
        return targets
