"""Catch-up: a node back from a pause or a partition gets the broadcasts it missed,
exactly once, within a bounded window; what lies beyond the window is counted and
reported, never silently lost.

Why it exists: the flood forwards a broadcast once, to whoever subscribes at that
moment. A node that was stopped (SIGSTOP, a VM freeze), cut off, or declared DOWN and
dropped by its providers receives nothing meanwhile, and nothing else repairs it: link
NAKs only repair gaps on a link that kept sending, and a provider stops sending to a
subscriber that stopped refreshing or went DOWN. Measured before this module: a node
paused 30 s during a 10 msg/s stream delivered 453 of 601 broadcasts.

Design (pull, by id digest). Every node keeps the entries it forwarded or originated
for ``Config.catch_up_window_s`` in a bounded ``History`` (history.py; also bounded by
``Config.catch_up_bytes``). A node that has reason to doubt it saw everything since time
T *pulls* from a peer:

    asker -> peer   CATCHUP_ASK(since_ms, cursor=0, wanted=[])
    peer -> asker   CATCHUP_OFFER(cursor, next, missed, ids it holds in that range)
    asker -> peer   CATCHUP_ASK(since_ms, next, wanted = offered ids it has not seen)
    peer -> asker   the wanted entries as BROADCAST datagrams (its channel key, paced
                    by the link queue, repaired by link NAKs), and the next offer page
    ...             until next == CATCHUP_NO_MORE; then one last ASK for what is wanted

The entries arrive through the flood like any broadcast: the seen-set makes delivery
exactly once, and the asker forwards them to its own subscribers, so after a partition
one node that pulls across the cut brings its whole side up to date. Ids are 16 bytes,
so the offer costs 16 B per broadcast in the range and only what is missing travels.

The alternative, keeping link state across a pause so sequence-gap NAKs recover the
rest, was rejected: it only covers a subscriber its provider kept sending to, not one
that expired or was declared DOWN (the common case beyond a few heartbeats), nor a
partition, nor a provider that changed; and it would hold per-link buffers for dead peers.

When a node doubts (it pulls from every provider it has, and from each provider that
(re)accepts it with SUBSCRIBED while the doubt lasts, one window):
- its own timers fired late (a pause: more than PAUSE_HEARTBEATS heartbeat intervals
  between two timer calls): doubt since the last call before the gap;
- it was disconnected (no confirmed provider talking) and is connected again: doubt
  since it last was, less the watchdog period;
- a member it held DOWN is UP again and it has a session with it (a partition healing,
  or a paused peer back): it pulls from that member since it went DOWN, less the
  watchdog period.

Bounds. A pull asks at most one page of ids at a time (a page fills half a datagram,
so wanted ids plus the offer always fit one frame); an asker holds at most MAX_PULLS
pulls and MAX_ASKED ids per pull. A peer answering spends from a token bucket per
asker: ``catch_up_bytes`` at most, refilled over one window, charged with every entry
and offer byte; an ASK that finds the bucket empty is ignored (``catch_up_refused``).
So no sequence of forged or repeated asks makes a node send more than its history's
size per window to one peer. Missed: the first offer page carries how many entries of
the asked range the peer no longer holds (evicted by age or bytes); ids still missing
after MAX_TRIES asks are missed too. Both are added to ``catch_up_missed`` (counted
once per window: several peers report the same gap) with a WARNING.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.events import Event, MemberDown, MemberLeft, MemberUp
from gwyh_mp.protocol.flood import Flood
from gwyh_mp.protocol.history import EVICTED_BUCKET_S, EVICTED_MEMORY, History
from gwyh_mp.protocol.peers import Peers
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.subscriptions import Subscriptions
from gwyh_mp.protocol.wire import CATCHUP_NO_MORE, FrameType

Addr = tuple[str, int]

# A gap this many heartbeat intervals between two timer calls means this process was
# stopped: the heartbeat alone brings the node's timer back every interval.
PAUSE_HEARTBEATS = 2.0
HISTORY_MARGIN_HEARTBEATS = 2
MAX_TRIES = 5  # unanswered ASKs (or wanted ids still missing) before a pull gives up
MAX_PULLS = 64
MAX_ASKED = 1 << 16  # ids one pull may have outstanding; beyond, counted as missed
ASKED_PATIENCE = 4  # retry intervals a wanted entry gets to arrive before it is asked again
MAX_WENT_DOWN = 4096  # members remembered as DOWN (to pull from them when they are back)
# Every this many heartbeats, handshake one member that went DOWN within the eviction
# memory (history.EVICTED_MEMORY windows), round-robin.
RECONNECT_HEARTBEATS = 4
_RECORDED = (wire.EntryKind.APP, wire.EntryKind.FRAGMENT)
CATCHUP_FRAMES = (FrameType.CATCHUP_ASK, FrameType.CATCHUP_OFFER)


@dataclass(slots=True)
class Pull:
    """Pulling what one peer holds since ``since`` (our clock)."""

    since: float
    cursor: int = 0  # the offer we wait for; CATCHUP_NO_MORE: only wanted entries left
    asked: dict[bytes, float] = field(default_factory=dict)  # wanted id -> ask again at
    due: float = 0.0
    tries: int = 0


def ids_per_frame(max_datagram_bytes: int) -> int:
    """Ids one catch-up frame may carry in a datagram of this size."""
    budget = (
        max_datagram_bytes
        - wire.CONTROL_OVERHEAD
        - wire.FRAME_HEADER.size
        - wire.CATCHUP_OFFER_HEADER.size
    )
    return max(2, min(wire.MAX_CATCHUP_IDS, budget // wire.MESSAGE_ID_BYTES))


class CatchUp:
    def __init__(
        self,
        config: Config,
        seen_ids: set[bytes],
        stats: Stats,
        peers: Peers,
        subscriptions: Subscriptions,
        flood: Flood,
        *,
        watchdog_s: float,
        clock: Callable[[], float],
        queue_control: Callable[..., None],
        connected: Callable[[float], bool],
        warn: Callable[[str], None],
    ) -> None:
        """``connected(now)``: a confirmed provider is talking to us (liveness). Hooks
        itself into the flood (records what is forwarded) and the subscriptions (a
        provider accepting us)."""
        self.window_s = config.catch_up_window_s
        self.max_bytes = config.catch_up_bytes
        self.heartbeat_s = config.heartbeat_interval_s
        self.retry_s = config.handshake_retry_s
        self.watchdog_s = watchdog_s
        self.frame_ids = ids_per_frame(config.max_datagram_bytes)
        self.page_ids = self.frame_ids // 2  # the other half: ids asked again
        # Also what a lazy-push GRAFT can be answered from (one store, one bound). Kept
        # HISTORY_MARGIN_HEARTBEATS longer than the window: an asker's range starts at
        # its last timer before the pause and adds one heartbeat of margin, so a pause
        # of exactly the window is covered in full.
        margin = HISTORY_MARGIN_HEARTBEATS * config.heartbeat_interval_s if self.enabled else 0
        # At most half the seen-set's ids: an asker must still remember every id it is
        # offered, or it would take back, and deliver twice, what it forgot.
        self.history = History(
            self.window_s + margin, config.catch_up_bytes, max(1, config.seen_set_size // 2)
        )
        flood.record = self.record
        self.seen = seen_ids
        self.stats = stats
        self._clock = clock  # the node's latest ``now`` (records carry no time)
        self._queue_control = queue_control
        self.peers = peers
        self.providers = subscriptions.providers
        subscriptions.on_accepted = self.on_subscribed
        self._connected = connected
        self._warn = warn
        self._resends: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        self.pulls: dict[bytes, Pull] = {}
        self.doubt_since: float | None = None
        self.doubt_until = float("-inf")
        self._last_tick: float | None = None
        self._last_connected: float | None = None
        self._cut_since: float | None = None
        self._went_down: dict[bytes, tuple[float, Addr]] = {}  # DOWN member -> when, where
        self._next_reconnect = float("-inf")
        self._back: dict[bytes, float] = {}  # UP again, no session yet -> when it went DOWN
        self._requested: dict[bytes, float] = {}  # id asked by some pull -> until
        self._buckets: dict[bytes, tuple[float, float]] = {}  # asker -> (tokens, at)
        self._episode_start = float("-inf")
        self._episode_missed = 0

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    # ------------------------------------------------------------------ recording

    def record(self, msg_id: bytes, entry: bytes) -> None:
        """An entry this node originated or forwarded (the flood calls this)."""
        if entry[0] in _RECORDED:
            self.history.add(msg_id, entry, self._clock())

    def take_resends(self) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
        """Entries asked for, per asker: sent to it alone, as BROADCAST datagrams."""
        resends, self._resends = self._resends, []
        return resends

    def watching(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """``emit`` for membership changes, with member events seen here first."""

        def watched(event: Event) -> None:
            emit(event)
            self.on_member_event(event, self._clock())

        return watched

    def on_frame(self, ftype: int, body: bytes, peer_id: bytes, now: float) -> None:
        if ftype == FrameType.CATCHUP_ASK:
            self.on_ask(peer_id, body, now)
        else:
            self.on_offer(peer_id, body, now)

    # ------------------------------------------------------------------ triggers

    def doubt(self, since: float, now: float) -> None:
        """We may have missed what was broadcast since ``since``: pull from every
        provider now, and from each that (re)accepts us during the next window."""
        if not self.enabled:
            return
        self.stats.bump("catch_up_doubts")
        if self.doubt_since is None or now >= self.doubt_until or since < self.doubt_since:
            self.doubt_since = since
        self.doubt_until = now + self.window_s
        for provider_id in [p for p, st in self.providers.items() if st.confirmed]:
            self.start(provider_id, self.doubt_since, now)

    def on_subscribed(self, provider_id: bytes, now: float) -> None:
        """A provider accepted us (again): from now on it forwards to us. What it got
        before, while we were away, we pull."""
        if self.doubt_since is not None and now < self.doubt_until:
            self.start(provider_id, self.doubt_since, now)

    def on_member_event(self, event: Event, now: float) -> None:
        if isinstance(event, MemberDown):
            went = self._went_down
            went[event.member.node_id] = (now, (event.member.host, event.member.port))
            if len(went) > MAX_WENT_DOWN:
                del went[next(iter(went))]
        elif isinstance(event, MemberUp):
            down = self._went_down.pop(event.member.node_id, None)
            if down is not None and self.enabled:
                since = down[0]
                if self.peers.has_session(event.member.node_id):
                    self.start(event.member.node_id, since - self.watchdog_s, now)
                else:
                    self._back[event.member.node_id] = since
                    if len(self._back) > MAX_WENT_DOWN:
                        del self._back[next(iter(self._back))]
        elif isinstance(event, MemberLeft):
            self._went_down.pop(event.member.node_id, None)
            self._back.pop(event.member.node_id, None)

    def _pull_from_the_back(self, now: float) -> None:
        """Members that came back from DOWN before we had a session with them: pull
        from each once we have one (a handshake follows a partition's healing)."""
        for peer_id, since in list(self._back.items()):
            if self.peers.has_session(peer_id):
                del self._back[peer_id]
                self.start(peer_id, since - self.watchdog_s, now)

    def start(self, peer_id: bytes, since: float, now: float) -> None:
        if not self.enabled or not self.peers.has_session(peer_id):
            return
        pull = self.pulls.get(peer_id)
        if pull is None:
            if len(self.pulls) >= MAX_PULLS:
                self.stats.bump("catch_up_pulls_refused")
                return
            pull = self.pulls[peer_id] = Pull(since)
        elif since >= pull.since and pull.cursor != CATCHUP_NO_MORE:
            # Still paging, and its pages run up to the newest entries the peer holds,
            # so whatever the peer got before it (re)accepted us will be offered.
            return
        # A wider range, or the pages are done: start over from the first page (what
        # we have is not asked again).
        pull.since = min(pull.since, since)
        pull.cursor = 0
        pull.tries = 0
        self.stats.bump("catch_up_pulls")
        self._ask(peer_id, pull, [], now)

    # ------------------------------------------------------------------ asking

    def _ask(self, peer_id: bytes, pull: Pull, wanted: list[bytes], now: float) -> None:
        # The range grows with the time the pull takes, so paging never outruns it; one
        # heartbeat more covers records stamped with a slightly stale ``now``.
        since_ms = int((now - pull.since + self.heartbeat_s) * 1000)
        body = wire.encode_catchup_ask(since_ms, pull.cursor, wanted)
        self._queue_control(peer_id, FrameType.CATCHUP_ASK, body)
        pull.due = now + self.retry_s

    def on_offer(self, peer_id: bytes, body: bytes, now: float) -> None:
        cursor, next_cursor, missed, ids = wire.decode_catchup_offer(body)
        pull = self.pulls.get(peer_id)
        if pull is None or cursor != pull.cursor or cursor == CATCHUP_NO_MORE:
            self.stats.bump("catch_up_stale_offers")
            return
        if missed and cursor == 0:
            why = f"older than what {peer_id.hex()[:8]} holds"
            self._missed(missed, why, now, overlapping=True)
        self._settle(pull)
        wanted = self._due_again(pull, now)
        seen = self.seen
        requested = self._requested
        until = now + ASKED_PATIENCE * self.retry_s
        for msg_id in ids:
            if msg_id in seen or requested.get(msg_id, 0.0) > now or msg_id in pull.asked:
                continue
            if len(pull.asked) >= MAX_ASKED or len(wanted) >= self.frame_ids:
                self._missed(1, "beyond what one pull may ask", now)
                continue
            wanted.append(msg_id)
            pull.asked[msg_id] = until
            requested[msg_id] = until
        self.stats.bump("catch_up_offered", len(ids))
        self.stats.bump("catch_up_asked", len(wanted))
        pull.cursor = next_cursor
        pull.tries = 0
        if next_cursor == CATCHUP_NO_MORE and not wanted:
            self._check_done(peer_id, pull, now)
            return
        self._ask(peer_id, pull, wanted, now)
        if next_cursor == CATCHUP_NO_MORE:
            pull.due = min(pull.asked.values(), default=now + self.retry_s)

    def _settle(self, pull: Pull) -> None:
        """Forget wanted ids that arrived."""
        seen = self.seen
        arrived = [msg_id for msg_id in pull.asked if msg_id in seen]
        for msg_id in arrived:
            del pull.asked[msg_id]
            self._requested.pop(msg_id, None)
        self.stats.bump("catch_up_recovered", len(arrived))

    def _due_again(self, pull: Pull, now: float) -> list[bytes]:
        """Wanted ids given their time to arrive that did not: ask again."""
        again = [msg_id for msg_id, until in pull.asked.items() if until <= now]
        again = again[: self.frame_ids - self.page_ids]
        until = now + ASKED_PATIENCE * self.retry_s
        for msg_id in again:
            pull.asked[msg_id] = until
            self._requested[msg_id] = until
        return again

    def _check_done(self, peer_id: bytes, pull: Pull, now: float) -> None:
        if not pull.asked:
            del self.pulls[peer_id]
            self.stats.bump("catch_up_done")
        else:
            pull.due = min(pull.asked.values())

    def _give_up(self, peer_id: bytes, pull: Pull, now: float) -> None:
        del self.pulls[peer_id]
        self.stats.bump("catch_up_failed")
        if pull.asked:
            for msg_id in pull.asked:
                self._requested.pop(msg_id, None)
            self._missed(len(pull.asked), f"asked of {peer_id.hex()[:8]} and never received", now)

    def _missed(self, count: int, why: str, now: float, *, overlapping: bool = False) -> None:
        """``count`` broadcasts we will not get. ``overlapping``: a peer's count of what it
        no longer holds; several peers report the same range, so within one window only
        the largest such report counts (ids given up are added as they are)."""
        if now - self._episode_start > self.window_s:
            self._episode_start = now
            self._episode_missed = 0
        if overlapping:
            if count <= self._episode_missed:
                return
            count, self._episode_missed = count - self._episode_missed, count
        self.stats.bump("catch_up_missed", count)
        self._warn(
            f"catch-up: missed {count} broadcasts for good ({why}; window "
            f"{self.window_s:g} s, {self.max_bytes} bytes)"
        )

    # ------------------------------------------------------------------ answering

    def on_ask(self, peer_id: bytes, body: bytes, now: float) -> None:
        since_ms, cursor, wanted = wire.decode_catchup_ask(body)
        tokens = self._tokens(peer_id, now)
        if tokens <= 0:
            self.stats.bump("catch_up_refused")
            return
        entries = []
        history = self.history
        for msg_id in dict.fromkeys(wanted[: self.frame_ids]):  # each id once
            entry = history.get(msg_id)
            if entry is not None:
                entries.append((msg_id, entry))
                tokens -= len(entry) + wire.MESSAGE_ID_BYTES
                if tokens <= 0:
                    break
        if entries:
            self._resends.append((peer_id, entries))
            self.stats.bump("catch_up_served", len(entries))
        if cursor != CATCHUP_NO_MORE and tokens > 0:
            start = now - since_ms / 1000
            ids, last = history.page(start, cursor, self.page_ids)
            next_cursor = last if len(ids) == self.page_ids else CATCHUP_NO_MORE
            # Counted conservatively: the range's first bucket and one heartbeat are left
            # out, since the asker widened its range by that much (and its start is only
            # known to within that), and it may well hold what we had there.
            missed = 0
            if cursor == 0:
                missed = history.evicted_since(start + EVICTED_BUCKET_S + self.heartbeat_s)
            offer = wire.encode_catchup_offer(cursor, next_cursor, missed, ids)
            self._queue_control(peer_id, FrameType.CATCHUP_OFFER, offer)
            tokens -= len(offer)
        self._buckets[peer_id] = (tokens, now)

    def _tokens(self, peer_id: bytes, now: float) -> float:
        """The asker's byte budget: catch_up_bytes at most, refilled over one window."""
        tokens, at = self._buckets.get(peer_id, (float(self.max_bytes), now))
        rate = self.max_bytes / max(self.window_s, 1.0)
        return min(float(self.max_bytes), tokens + (now - at) * rate)

    # ------------------------------------------------------------------ timers

    def next_timer(self) -> float | None:
        t: float | None = None
        for pull in self.pulls.values():
            if t is None or pull.due < t:
                t = pull.due
        return t

    def handle_timer(self, now: float) -> None:
        last, self._last_tick = self._last_tick, now
        if not self.enabled:
            return
        if last is not None and now - last > PAUSE_HEARTBEATS * self.heartbeat_s:
            self.stats.bump("catch_up_pauses")
            self.doubt(last, now)
        self._check_connected(now)
        if self._back:
            self._pull_from_the_back(now)
        for peer_id, pull in list(self.pulls.items()):
            if now >= pull.due:
                self._retry(peer_id, pull, now)
        self.history.expire(now)
        if self._requested and len(self._requested) > 4 * len(self.pulls) * self.frame_ids:
            self._requested = {i: t for i, t in self._requested.items() if t > now}
        if self._buckets:
            full = float(self.max_bytes)
            self._buckets = {p: b for p, b in self._buckets.items() if self._tokens(p, now) < full}
        if self._went_down and now >= self._next_reconnect:
            self._next_reconnect = now + RECONNECT_HEARTBEATS * self.heartbeat_s
            self._reconnect(now)

    def _reconnect(self, now: float) -> None:
        """Handshake the next member we hold DOWN (round-robin), while what it may have
        that we lack could still be pulled. After a partition heals nobody is isolated
        on either side, so nothing else reaches across (Serf's reconnect does this
        too). If it is alive, the handshake makes each side hold the other UP again
        (refuting the DOWN) and the MemberUp starts a pull both ways; if it is dead, the
        handshake times out: a few HELLOs per RECONNECT_HEARTBEATS."""
        went = self._went_down
        node_id = next(iter(went))
        when, address = went.pop(node_id)
        if when < now - EVICTED_MEMORY * self.window_s:
            return  # too long ago: its history is gone, forget it
        if any(
            link.session is not None and link.session.addr == address and peer_id != node_id
            for peer_id, link in self.peers.links.items()
        ):
            return  # another member lives there now (a restart under a new id)
        went[node_id] = (when, address)
        self.stats.bump("catch_up_reconnects")
        self.peers.initiate(address, now)

    def _check_connected(self, now: float) -> None:
        if self._connected(now):
            if self._cut_since is not None:
                since, self._cut_since = self._cut_since, None
                self.doubt(since, now)
            # When we last heard a provider that still had us: data flowed until then.
            self._last_connected = max(
                (st.last_heard for st in self.providers.values() if st.confirmed), default=now
            )
        elif self._cut_since is None and self._last_connected is not None:
            self._cut_since = self._last_connected

    def _retry(self, peer_id: bytes, pull: Pull, now: float) -> None:
        if not self.peers.has_session(peer_id):
            self._give_up(peer_id, pull, now)
            return
        self._settle(pull)
        if pull.cursor == CATCHUP_NO_MORE:
            if not pull.asked:
                self._check_done(peer_id, pull, now)
                return
            wanted = self._due_again(pull, now)
            if not wanted:
                pull.due = min(pull.asked.values())
                return
        else:
            wanted = self._due_again(pull, now)  # an offer is overdue: ask again
        pull.tries += 1
        if pull.tries > MAX_TRIES:
            self._give_up(peer_id, pull, now)
            return
        self._ask(peer_id, pull, wanted, now)
