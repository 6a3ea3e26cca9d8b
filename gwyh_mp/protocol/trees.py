"""Epidemic broadcast trees (lazy push) for application broadcasts.

After Plumtree (Leitao, Pereira, Rodrigues, SRDS 2007). With eager push every node
receives each message once from each of its N providers and drops N-1 copies. With
trees a node takes a message in full from one provider and only its id from the others:

- A copy that arrives as a duplicate from a provider other than the one we keep for its
  origin makes us send that provider PRUNE(origin): from then on it sends us the
  origin's messages as ids only (IHAVE, at most one batch per peer per IHAVE_INTERVAL_S).
- An announced id not received within the origin's graft timeout (GRAFT_TIMEOUT_S until
  the parent's copy-behind-announcement lag is known, then that lag plus four deviations)
  makes us send GRAFT(origin, id) to an announcer: it answers with the message from its
  recent-entry History (catch-up's, when that keeps one) and sends us the origin's
  messages in full again. The next announcer is tried after each timeout, so
  a silent eager provider, a lost IHAVE or a lost GRAFT cost one timeout each.
- The quickest-path optimisation: the first copy of a message decides which provider we
  keep (first arrival wins; the slower one is pruned by its duplicate), and an IHAVE
  that beats the copy from the provider we keep by more than that parent's usual lag
  plus max(SWAP_MARGIN_S, four lag deviations) swaps the
  two (GRAFT with no id to the announcer, PRUNE to the old one). Earlier, not fewer
  hops: with zones, the quickest path is often many cheap local hops, and a hop-count
  rule moved trees onto slower cross-zone links (measured: t99 1.8x eager push).

Eager sets are per origin, not per node. Subscriptions are directed (a provider feeds
its subscribers, not the other way round), so Plumtree's single spanning tree, which
serves every origin only because its links are symmetric, does not exist here: with one
eager provider per node the eager graph is a set of in-trees that reaches a node only
from its ancestors, and every other origin's messages would come by graft, then be
pruned by the next duplicate, over and over (the thrashing the paper's per-node eager
set shows under many senders). Per origin, the first-arrival rule builds each origin's
own shortest-delay tree. The cost is the first message of each origin (eager to
everyone, redundancy as in eager mode) and a small table per origin: a provider keeps
the set of subscribers that pruned each origin; a subscriber keeps, per origin, the
provider it takes it from and the ones it pruned (all bounded, oldest forgotten first;
forgetting only makes a link eager again, which costs duplicates, never a message).

Only APP entries take the lazy path. STATUS entries (membership) and control frames stay
on eager push: they are rare, and their loss costs more than their copies. FRAGMENT
entries of large messages also stay eager: their windows, NAKs and reassembly already
pace them per link, and a lazily announced fragment would stall a window for a timeout.

Every node answers PRUNE and GRAFT and announces to pruned subscribers, whatever its
setting; ``enabled`` (Config.dissemination == "trees") only decides whether this node
prunes its own providers. A cluster can therefore mix the two modes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.dissemination import SeenSet
from gwyh_mp.protocol.history import History
from gwyh_mp.protocol.links import LinkState
from gwyh_mp.protocol.stats import Stats
from gwyh_mp.protocol.wire import FrameType

IHAVE_INTERVAL_S = 0.01
"""At most one announcement batch per subscriber this often (many ids per datagram); an
id to a subscriber announced to less recently leaves at once, unless data queued to it
before the id still waits for the link's pacer (then when that data will have left)."""
GRAFT_TIMEOUT_S = 0.03
"""How long an announced id may stay missing before we graft while we know nothing of
the provider we keep (then the timeout follows that provider's measured lag, below)."""
GRAFT_TIMEOUT_MIN_S = GRAFT_TIMEOUT_S
GRAFT_TIMEOUT_MAX_S = 0.25
"""Bounds of the adaptive graft timeout: lag + 4 * lag deviation of the copies from the
provider we keep behind the first announcement of the same id (as TCP's RTO). It only ever
lengthens the fixed timeout: with a 15 ms floor an overloaded cluster grafted more (lazy
links carry no queue, so their announcements beat the parent's queued copies) and a 5 ms
floor cost redundancy and a 936 ms t99 outlier at 10 % loss in bench sim."""
PRUNE_RESEND_S = 0.5
"""A pruned provider still sending in full this long after our PRUNE gets another
(a PRUNE travels in an unacknowledged control frame and may be lost)."""
SWAP_MARGIN_S = 0.03
"""An announcement at least this much (or four lag deviations, if more) earlier than the
parent's copy usually trails it swaps the two providers."""
GRAFT_TRIES = 4
MAX_ANNOUNCERS = 4
MAX_ORIGINS = 16_384
MAX_PRUNED_PER_ORIGIN = 16
MAX_MISSING = 16_384
MAX_RECENT = 16_384
MAX_IHAVE_PER_PEER = 8_192
MAX_IHAVE_PEERS = 1_024
# Bounds of the GRAFT store when catch-up keeps no history (catch_up_window_s = 0):
# otherwise GRAFTs are answered from catch-up's history, which holds every entry.
CACHE_ENTRIES = 8_192
CACHE_BYTES = 8 << 20
CACHE_AGE_S = 30.0
# A frame carries at most this many ids, so its body stays far below MAX_FRAME_BODY and
# one IHAVE batch splits into datagram-sized frames (the control sealer packs them).
_IDS_PER_FRAME = 64

_ENTRY_HEADER = wire.ENTRY_HEADER
TREE_FRAMES = frozenset({FrameType.IHAVE, FrameType.GRAFT, FrameType.PRUNE})


@dataclass(slots=True)
class OriginPath:
    """A subscriber's view of one origin: who we take it from, and whom we pruned."""

    parent: bytes | None = None
    hops: int = 255
    pruned: dict[bytes, float] = field(default_factory=dict)  # provider -> PRUNE sent at
    # How much later than the first announcement of an id its first copy comes (an
    # RTT-style estimator, per origin): a parent whose copies wait in a backlogged queue
    # is slow, not silent, and is given that long before we graft or swap it out.
    lag: float = 0.0
    lag_dev: float = GRAFT_TIMEOUT_S / 4

    def graft_timeout(self) -> float:
        timeout = self.lag + 4 * self.lag_dev
        return min(max(timeout, GRAFT_TIMEOUT_MIN_S), GRAFT_TIMEOUT_MAX_S)

    def note_lag(self, sample: float) -> None:
        self.lag_dev += (abs(sample - self.lag) - self.lag_dev) / 4
        self.lag += (sample - self.lag) / 8


@dataclass(slots=True)
class Missing:
    """An id announced to us that we have not received."""

    origin: bytes
    hops: int
    since: float  # first announced at
    due: float
    announcers: list[bytes]
    tries: int = 0


class Trees:
    def __init__(
        self,
        node_id: bytes,
        enabled: bool,
        seen: SeenSet,
        stats: Stats,
        *,
        queue_control: Callable[[bytes, FrameType, bytes], None],
        clock: Callable[[], float],
        history: History | None = None,
        links: dict[bytes, LinkState] | None = None,
    ) -> None:
        """``history``: catch-up's store of recent entries (GRAFTs are answered from it;
        one of our own bounds if it keeps nothing). ``links``: the peers' link table, to
        hold announcements behind the data queued before them."""
        self.node_id = node_id
        self.enabled = enabled
        self._seen = seen
        self.stats = stats
        self._queue_control = queue_control
        # provider side
        self._pruned_by: dict[bytes, set[bytes]] = {}  # origin -> subscribers that pruned it
        # peer -> [(origin, hops, id)], and when that batch may leave
        self._ihave: dict[bytes, list[tuple[bytes, int, bytes]]] = {}
        self._ihave_at: dict[bytes, float] = {}
        self._ihave_due: float | None = None  # the earliest of _ihave_at
        self._ihave_sent: dict[bytes, float] = {}  # peer -> last batch sent at
        if history is None or history.max_age_s <= 0:
            history = History(CACHE_AGE_S, CACHE_BYTES, CACHE_ENTRIES)
        self.history = history
        self._links = links if links is not None else {}
        self._resends: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        # subscriber side
        self._origins: dict[bytes, OriginPath] = {}
        self._recent: dict[bytes, bytes] = {}  # id -> origin, for duplicates never decrypted
        self._missing: dict[bytes, Missing] = {}
        # (due, tiebreak, id): graft deadlines, per origin's timeout, so not in insertion
        # order; an entry whose id arrived meanwhile is skipped when it comes up.
        self._deadlines: list[tuple[float, int, bytes]] = []
        self._tiebreak = 0
        self._prunes: dict[bytes, set[bytes]] = {}  # provider -> origins to prune
        self._grafts: dict[bytes, dict[bytes, list[bytes]]] = {}  # provider -> origin -> ids
        self._clock = clock  # the core's latest ``now``

    # ------------------------------------------------------------------ provider side

    def lazy_for(self, origin: bytes) -> set[bytes] | None:
        """Subscribers that take ``origin`` as announcements only (None: nobody)."""
        return self._pruned_by.get(origin)

    def announce(self, peer_id: bytes, msg_id: bytes, entry: bytes) -> None:
        """``entry`` (ENTRY_HEADER + body, hops already counted) went lazily to
        ``peer_id``: queue its id for the next IHAVE and keep it for a GRAFT."""
        _, hops, origin, _ = _ENTRY_HEADER.unpack_from(entry)
        queue = self._ihave.get(peer_id)
        if queue is None:
            if len(self._ihave) >= MAX_IHAVE_PEERS:
                self.stats.bump("trees_ihave_shed")
                return
            queue = self._ihave[peer_id] = []
        if len(queue) >= MAX_IHAVE_PER_PEER:
            self.stats.bump("trees_ihave_shed")
            return
        if not queue:
            # The announcement must not overtake the data queued to that peer before it
            # (it would tell the peer of a path quicker than our link really is, and the
            # peer would graft or swap to it, then get both copies): it leaves once the
            # pacer has sent what is queued now. At most one batch per IHAVE_INTERVAL_S,
            # but the first after a quiet spell at once (repair under loss starts sooner).
            now = self._clock()
            last = self._ihave_sent.get(peer_id)
            at = now + self._queue_delay(peer_id)
            if last is not None and last + IHAVE_INTERVAL_S > at:
                at = last + IHAVE_INTERVAL_S
            self._ihave_at[peer_id] = at
            if self._ihave_due is None or at < self._ihave_due:
                self._ihave_due = at
        queue.append((origin, hops, msg_id))
        # Already there when catch-up records every forwarded entry (a no-op then).
        self.history.add(msg_id, entry, self._clock())

    def _queue_delay(self, peer_id: bytes) -> float:
        """How long the data queued to ``peer_id`` now will wait for its pacer."""
        link = self._links.get(peer_id)
        if link is None or not link.queue_bytes or link.pacer is None:
            return 0.0
        return link.queue_bytes / max(link.pacer.rate_bytes_per_s, 1.0)

    def on_prune(self, peer_id: bytes, body: bytes) -> None:
        pruned_by = self._pruned_by
        for origin in wire.decode_origins(body):
            subscribers = pruned_by.get(origin)
            if subscribers is None:
                if len(pruned_by) >= MAX_ORIGINS:
                    del pruned_by[next(iter(pruned_by))]  # that origin goes eager again
                subscribers = pruned_by[origin] = set()
            subscribers.add(peer_id)
        self.stats.bump("trees_prunes_in")

    def on_graft(self, peer_id: bytes, body: bytes) -> None:
        answer: list[tuple[bytes, bytes]] = []
        for origin, _, ids in wire.decode_id_groups(body):
            subscribers = self._pruned_by.get(origin)
            if subscribers is not None:
                subscribers.discard(peer_id)
            for msg_id in ids:
                entry = self.history.get(msg_id)
                if entry is not None:
                    answer.append((msg_id, entry))
                else:
                    self.stats.bump("trees_graft_miss")
        self.stats.bump("trees_grafts_in")
        if answer:
            self._resends.append((peer_id, answer))

    def take_resends(self) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
        """Messages grafted by a peer, to send to that peer alone."""
        out, self._resends = self._resends, []
        return out

    def on_frame(self, ftype: int, body: bytes, peer_id: bytes, now: float) -> None:
        """An IHAVE, GRAFT or PRUNE frame from ``peer_id`` (WireError if malformed)."""
        if ftype == FrameType.IHAVE:
            self.on_ihave(peer_id, body, now)
        elif ftype == FrameType.GRAFT:
            self.on_graft(peer_id, body)
        else:
            self.on_prune(peer_id, body)

    # ------------------------------------------------------------------ subscriber side

    def on_delivered(self, msg_id: bytes, origin: bytes, hops: int, source: bytes) -> None:
        """The first copy of an APP message arrived from ``source``."""
        if not self.enabled:
            return
        announced = self._missing.pop(msg_id, None)
        self._remember(msg_id, origin)
        path = self._path(origin)
        if source in path.pruned:
            # A copy that left before our PRUNE arrived, or the PRUNE was lost.
            self._reprune(path, origin, source)
            return
        path.parent = source  # first arrival wins: the quickest path is the one we keep
        path.hops = hops
        if announced is None:
            path.note_lag(0.0)  # the copy came before any announcement of it
            return
        now = self._clock()
        late = now - announced.since
        # Earlier than the usual lag by the margin and by more than the lag varies: a
        # quicker path, not a copy that waited behind a burst on the parent's link.
        margin = max(SWAP_MARGIN_S, 4 * path.lag_dev)
        swap = announced.tries == 0 and late - path.lag >= margin
        if announced.tries == 0 or source not in announced.announcers[: announced.tries]:
            # Not a copy we grafted (that took a timeout and a round trip: no lag of the
            # parent's); after a graft a copy from elsewhere was slow, not lost.
            path.note_lag(late)
        first = announced.announcers[0]
        if swap and first != source:
            self.stats.bump("trees_swaps")
            self._graft(first, origin, None)
            path.parent = first
            path.pruned.pop(first, None)
            path.pruned[source] = now
            self._queue_prune(source, origin)

    def on_duplicate(self, msg_id: bytes, origin: bytes | None, source: bytes) -> None:
        """A copy of a message we have; ``origin`` None when it was never decrypted."""
        if not self.enabled:
            return
        if origin is None:
            origin = self._recent.get(msg_id)
            if origin is None:
                return
        if origin == self.node_id:
            # Our own message coming back: we need none of them from anyone.
            self._queue_prune(source, origin)
            return
        path = self._origins.get(origin)
        if path is None or path.parent is None or source == path.parent:
            return  # never prune the provider we keep, nor before we keep one
        if source in path.pruned:
            self._reprune(path, origin, source)
            return
        if len(path.pruned) >= MAX_PRUNED_PER_ORIGIN:
            del path.pruned[next(iter(path.pruned))]
        path.pruned[source] = self._clock()
        self._queue_prune(source, origin)

    def note_own(self, msg_id: bytes) -> None:
        """We originated ``msg_id``: a copy of it coming back names its origin."""
        if self.enabled:
            self._remember(msg_id, self.node_id)

    def _remember(self, msg_id: bytes, origin: bytes) -> None:
        recent = self._recent
        recent[msg_id] = origin
        if len(recent) > MAX_RECENT:
            del recent[next(iter(recent))]

    def on_duplicate_ids(self, ids: bytes, source: bytes) -> None:
        """A datagram of duplicates dropped before decryption (origins from ``recent``)."""
        if not self.enabled:
            return
        done: set[bytes] = set()
        for i in range(0, len(ids), wire.MESSAGE_ID_BYTES):
            origin = self._recent.get(ids[i : i + wire.MESSAGE_ID_BYTES])
            if origin is not None and origin not in done:
                done.add(origin)
                self.on_duplicate(b"", origin, source)

    def on_ihave(self, peer_id: bytes, body: bytes, now: float) -> None:
        groups = wire.decode_id_groups(body)
        if not self.enabled:
            return  # announcements to a node that never pruned anyone: nothing to do
        seen = self._seen.ids
        missing = self._missing
        for origin, hops, ids in groups:
            for msg_id in ids:
                if msg_id in seen:
                    continue
                item = missing.get(msg_id)
                if item is None:
                    if len(missing) >= MAX_MISSING:
                        self.stats.bump("trees_missing_shed")
                        continue
                    path = self._origins.get(origin)
                    timeout = path.graft_timeout() if path is not None else GRAFT_TIMEOUT_S
                    item = missing[msg_id] = Missing(origin, hops, now, now, [peer_id])
                    self._arm(item, now + timeout, msg_id)
                elif peer_id not in item.announcers and len(item.announcers) < MAX_ANNOUNCERS:
                    item.announcers.append(peer_id)

    def _arm(self, item: Missing, due: float, msg_id: bytes) -> None:
        item.due = due
        self._tiebreak += 1
        deadlines = self._deadlines
        heapq.heappush(deadlines, (due, self._tiebreak, msg_id))
        if len(deadlines) > 2 * MAX_MISSING:
            # Mostly ids that arrived before their deadline: keep the live ones only.
            self._deadlines = [(m.due, i, k) for i, (k, m) in enumerate(self._missing.items())]
            heapq.heapify(self._deadlines)

    def _path(self, origin: bytes) -> OriginPath:
        origins = self._origins
        path = origins.get(origin)
        if path is None:
            if len(origins) >= MAX_ORIGINS:
                del origins[next(iter(origins))]  # forgotten: providers still prune-free
            path = origins[origin] = OriginPath()
        return path

    def _reprune(self, path: OriginPath, origin: bytes, source: bytes) -> None:
        if self._clock() - path.pruned[source] >= PRUNE_RESEND_S:
            path.pruned[source] = self._clock()
            self._queue_prune(source, origin)

    def _queue_prune(self, peer_id: bytes, origin: bytes) -> None:
        prunes = self._prunes.get(peer_id)
        if prunes is None:
            if len(self._prunes) >= MAX_IHAVE_PEERS:
                return
            prunes = self._prunes[peer_id] = set()
        if len(prunes) < MAX_ORIGINS:
            prunes.add(origin)

    def _graft(self, peer_id: bytes, origin: bytes, msg_id: bytes | None) -> None:
        by_origin = self._grafts.setdefault(peer_id, {})
        ids = by_origin.setdefault(origin, [])
        if msg_id is not None:
            ids.append(msg_id)

    # ------------------------------------------------------------------ timers

    def next_timer(self) -> float | None:
        if self._prunes or self._grafts:
            return self._clock()
        due = self._ihave_due
        if self._deadlines:
            first = self._deadlines[0][0]
            if due is None or first < due:
                due = first
        return due

    def handle_timer(self, now: float) -> None:
        if self._deadlines:
            self._check_missing(now)
        if self._ihave_due is not None and now >= self._ihave_due:
            self._flush_ihave(now)
        if self._prunes:
            prunes, self._prunes = self._prunes, {}
            for peer_id, origins in prunes.items():
                ordered = sorted(origins)  # deterministic bytes on the wire
                for start in range(0, len(ordered), _IDS_PER_FRAME):
                    body = wire.encode_origins(ordered[start : start + _IDS_PER_FRAME])
                    self._queue_control(peer_id, FrameType.PRUNE, body)
                self.stats.bump("trees_prunes_out", len(origins))
        if self._grafts:
            grafts, self._grafts = self._grafts, {}
            for peer_id, by_origin in grafts.items():
                groups = [(origin, 0, ids) for origin, ids in by_origin.items()]
                for body in _bodies(groups):
                    self._queue_control(peer_id, FrameType.GRAFT, body)
                self.stats.bump("trees_grafts_out")

    def _check_missing(self, now: float) -> None:
        missing = self._missing
        seen = self._seen.ids
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, msg_id = heapq.heappop(deadlines)
            item = missing.get(msg_id)
            if item is None:
                continue  # arrived meanwhile (or shed)
            if msg_id in seen or item.tries >= GRAFT_TRIES:
                del missing[msg_id]
                continue
            # Missing for longer than the parent's usual lag (silent eager provider, lost
            # copy or lost GRAFT): ask the next announcer, earliest first.
            peer_id = item.announcers[item.tries % len(item.announcers)]
            item.tries += 1
            self._graft(peer_id, item.origin, msg_id)
            path = self._path(item.origin)
            path.pruned.pop(peer_id, None)
            path.parent, path.hops = peer_id, item.hops
            self._arm(item, now + path.graft_timeout(), msg_id)

    def _flush_ihave(self, now: float) -> None:
        """Send the batches whose time has come; the others wait for theirs."""
        batches = self._ihave
        ready = [peer_id for peer_id, at in self._ihave_at.items() if at <= now]
        sent = self._ihave_sent
        if len(sent) + len(ready) > MAX_IHAVE_PEERS:
            horizon = now - IHAVE_INTERVAL_S
            self._ihave_sent = sent = {p: t for p, t in sent.items() if t > horizon}
        for peer_id in ready:
            del self._ihave_at[peer_id]
            sent[peer_id] = now
        self._ihave_due = min(self._ihave_at.values(), default=None)
        for peer_id in ready:
            queue = batches.pop(peer_id)
            groups: list[tuple[bytes, int, list[bytes]]] = []
            for origin, hops, msg_id in queue:
                if groups and groups[-1][0] == origin and groups[-1][1] == hops:
                    groups[-1][2].append(msg_id)
                else:
                    groups.append((origin, hops, [msg_id]))
            for body in _bodies(groups):
                self._queue_control(peer_id, FrameType.IHAVE, body)
            self.stats.bump("trees_ihave_ids", len(queue))


def _bodies(groups: list[tuple[bytes, int, list[bytes]]]) -> list[bytes]:
    """Split id groups into frame bodies of at most _IDS_PER_FRAME ids each."""
    bodies: list[bytes] = []
    current: list[tuple[bytes, int, list[bytes]]] = []
    count = 0
    for origin, hops, ids in groups:
        if not ids:
            current.append((origin, hops, ids))
            continue
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, _IDS_PER_FRAME - count)
            current.append((origin, hops, ids[start : start + take]))
            count += take
            start += take
            if count >= _IDS_PER_FRAME:
                bodies.append(wire.encode_id_groups(current))
                current, count = [], 0
    if current:
        bodies.append(wire.encode_id_groups(current))
    return bodies
