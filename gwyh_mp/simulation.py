"""A deterministic discrete-event network that drives real :class:`NodeCore` objects.

No sockets and no clocks: datagrams become events on a heap, ordered by simulated
time. Tests use it to check protocol rules across whole clusters in milliseconds;
``bench sim`` uses it to run thousands of nodes. Same seed, same run, byte for byte,
in any process: the datagrams a core emits in one round are queued in destination
order, so set iteration order (PYTHONHASHSEED) inside the core cannot leak into the run.

Hooks (all optional, all called synchronously):

- ``on_datagram(src, dst, data)``: every datagram a node sends, before the link decides
  whether it is lost (so it sees lost ones too);
- ``on_receive(src, dst, data)``: every datagram handed to a live destination, just
  before its core processes it;
- ``on_event(node, event)``: every event a core emits.

``warm_start`` builds a converged cluster without the O(N^2) join traffic; see there.
"""

from __future__ import annotations

import gc
import heapq
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Event
from gwyh_mp.protocol.membership import record_of
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import MemberRecord, MemberState

Addr = tuple[str, int]
WALL_EPOCH_S = 1_800_000_000.0  # simulated wall clock at t=0, for the handshake time lock

# (source, destination, rng) -> one-way delay in seconds, or None to drop the datagram
LinkModel = Callable[[Addr, Addr, random.Random], float | None]
_destination = operator.itemgetter(1)


def constant_link(delay_s: float = 0.001, loss: float = 0.0) -> LinkModel:
    def model(src: Addr, dst: Addr, rng: random.Random) -> float | None:
        if loss and rng.random() < loss:
            return None
        return delay_s

    return model


@dataclass(slots=True)
class SimNode:
    core: NodeCore
    addr: Addr
    events: list[tuple[float, Event]] = field(default_factory=list)
    alive: bool = True
    timer_at: float | None = None


class WarmStartError(RuntimeError):
    """``warm_start`` got duplicate node ids, or the cluster did not form in time."""


class SimNetwork:
    def __init__(
        self, *, seed: int = 1, link: LinkModel | None = None, keep_events: bool = True
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.link = link or constant_link()
        self.nodes: dict[Addr, SimNode] = {}
        # (when, seq, destination, datagram or None for a timer, source or None).
        # Flat tuples: one allocation per entry; seq keeps ties in push order.
        self._heap: list[tuple[float, int, Addr, bytes | None, Addr | None]] = []
        self._counter = 0
        self.datagrams_sent = 0
        self.datagrams_dropped = 0
        self.datagrams_delivered = 0
        self.timers_fired = 0
        self.bytes_sent = 0
        self._seed = seed
        # Events are also appended to SimNode.events unless keep_events is False: a
        # 10,000-node run does not need millions of MemberUp snapshots kept around.
        self.keep_events = keep_events
        self.on_event: Callable[[SimNode, Event], None] | None = None
        self.on_datagram: Callable[[Addr, Addr, bytes], None] | None = None
        self.on_receive: Callable[[Addr, Addr, bytes], None] | None = None

    def add_node(self, config: Config, *, start: bool = True) -> SimNode:
        addr = config.bind
        node_rng = random.Random(f"{self._seed}/{addr[0]}:{addr[1]}/{len(self.nodes)}")
        core = NodeCore(
            config, self.now, wall_offset_s=WALL_EPOCH_S, random_bytes=node_rng.randbytes
        )
        node = SimNode(core, addr)
        self.nodes[addr] = node
        if start:
            core.start(self.now)
            self._after_activity(node)
        return node

    def kill(self, addr: Addr) -> None:
        """Crash a node: it stops sending and receiving, and says nothing."""
        self.nodes[addr].alive = False

    def pause(self, addr: Addr) -> None:
        """Freeze a node as SIGSTOP would: its timers stop and what is sent to it is lost."""
        self.nodes[addr].alive = False

    def resume(self, addr: Addr) -> None:
        """Wake a paused node: its overdue timer fires at once, after the time jump."""
        node = self.nodes[addr]
        node.alive = True
        node.timer_at = None
        self._after_activity(node)

    def broadcast(self, addr: Addr, data: bytes) -> bytes:
        node = self.nodes[addr]
        msg_id = node.core.broadcast(data, self.now)
        self._after_activity(node)
        return msg_id

    def pump(self, node: SimNode) -> None:
        """Send what ``node.core`` produced after a call made from outside the network
        (e.g. ``core.broadcast`` when the caller must learn the message id first)."""
        self._after_activity(node)

    def pending(self) -> int:
        """Heap entries waiting (datagrams in flight and timers, stale ones included)."""
        return len(self._heap)

    def _push(self, when: float, dst: Addr, data: bytes | None, src: Addr | None) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (when, self._counter, dst, data, src))

    def _after_activity(self, node: SimNode) -> None:
        """Collect what a core produced: datagrams onto the heap, events, its timer."""
        core = node.core
        now = self.now
        out = core.datagrams_to_send(now)
        if out:
            if len(out) > 1:
                # Canonical order (stable, by destination): the core may emit one round's
                # datagrams in set-iteration order, which varies with PYTHONHASHSEED; all
                # leave at the same instant, and per-destination order is kept.
                out.sort(key=_destination)
            src = node.addr
            link, rng, hook = self.link, self.rng, self.on_datagram
            heap, push = self._heap, heapq.heappush
            counter = self._counter
            nbytes = dropped = 0
            for data, dst in out:
                nbytes += len(data)
                if hook is not None:
                    hook(src, dst, data)
                delay = link(src, dst, rng)
                if delay is None:
                    dropped += 1
                    continue
                counter += 1
                push(heap, (now + delay, counter, dst, data, src))
            self._counter = counter
            self.datagrams_sent += len(out)
            self.datagrams_dropped += dropped
            self.bytes_sent += nbytes
        event = core.next_event()
        if event is not None:
            keep, hook_event = self.keep_events, self.on_event
            while event is not None:
                if keep:
                    node.events.append((now, event))
                if hook_event is not None:
                    hook_event(node, event)
                event = core.next_event()
        timer = core.get_timer()
        if timer is not None and (node.timer_at is None or timer < node.timer_at):
            node.timer_at = timer
            self._push(timer if timer > now else now, node.addr, None, None)

    def run_until(self, until: float) -> None:
        heap, nodes = self._heap, self.nodes
        pop, after = heapq.heappop, self._after_activity
        while heap and heap[0][0] <= until:
            when, _, dst, data, src = pop(heap)
            node = nodes.get(dst)
            if node is None or not node.alive:
                continue
            if data is not None:
                self.now = when
                self.datagrams_delivered += 1
                if self.on_receive is not None:
                    self.on_receive(src, dst, data)  # type: ignore[arg-type]
                node.core.receive_datagram(data, src, when)  # type: ignore[arg-type]
            else:
                timer_at = node.timer_at
                if timer_at is None or timer_at > when:
                    continue  # stale timer: a newer, later one is queued
                self.now = when
                self.timers_fired += 1
                node.timer_at = None
                node.core.handle_timer(when)
            after(node)
        if until > self.now:
            self.now = until

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until_true(
        self, predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05
    ) -> bool:
        deadline = self.now + timeout_s
        while self.now < deadline:
            if predicate():
                return True
            self.run_for(step_s)
        return predicate()

    # ------------------------------------------------------------------ warm start

    def warm_start(
        self,
        configs: Sequence[Config],
        *,
        spread_s: float,
        timeout_s: float = 60.0,
    ) -> list[SimNode]:
        """Add ``configs`` as an already-converged cluster: every node knows every other,
        and each subscribes to the providers its own selection picks from the whole
        membership.

        Joining N nodes one by one costs O(N^2) datagrams (every join is flooded, every
        new provider answers with its member list) and, at 10,000 nodes, hours. This
        shortcut keeps the parts a measurement depends on real, and uses only the core's
        public API:

        1. every member table is filled with everyone (``NodeCore.learn_members``: no
           events, no announcements), the record strings shared so 10,000 nodes fit in
           ~12 GB;
        2. each node is started at a random instant in ``[now, now + spread_s)`` (so
           heartbeats are not synchronised);
        3. once all are running, each node picks its providers at a random instant of a
           second such spread (``NodeCore.reselect_providers``: the real selection, with
           the node's own seeded RNG, over the full membership);
        4. handshakes, SUBSCRIBE/SUBSCRIBED and the anti-entropy pulls then run over this
           network until every provider is confirmed. The pulls carry bucket digests and
           every view already agrees, so each answer is one record.

        What differs from a real join: no MemberUp events for the members filled in, and
        the provider graph is drawn at once from the full membership instead of grown join
        by join (so no newcomer swap-ins). Give the configs no ``bootstrap``: a bootstrap
        handshake asks for a full peer list, the O(N^2) this avoids.
        """
        if not configs:
            return []
        was_enabled = gc.isenabled()
        gc.disable()  # millions of long-lived objects: generational GC would rescan them all
        try:
            nodes = [self.add_node(c, start=False) for c in configs]
            records = [_record_of(n) for n in nodes]
            if len({r.node_id for r in records}) != len(nodes):
                raise WarmStartError("duplicate node ids")
            for i, node in enumerate(nodes):
                node.core.learn_members(records[:i] + records[i + 1 :])
            order_rng = random.Random(f"{self._seed}/warm-start")
            for phase in ("start", "select"):
                begin = self.now
                order = list(range(len(nodes)))
                order_rng.shuffle(order)
                instants = sorted(begin + order_rng.random() * spread_s for _ in order)
                for i, when in zip(order, instants, strict=True):
                    self.run_until(when)
                    core = nodes[i].core
                    if phase == "start":
                        core.start(self.now)
                    else:
                        core.reselect_providers(self.now)
                    self._after_activity(nodes[i])
                self.run_until(begin + spread_s)
            wanted = [(n, max(1, len(n.core.providers))) for n in nodes]
            ok = self.run_until_true(
                lambda: all(_wired(n, k) for n, k in wanted), timeout_s=timeout_s, step_s=0.25
            )
            if not ok:
                missing = sum(1 for n, k in wanted if not _wired(n, k))
                raise WarmStartError(f"{missing} nodes did not confirm their providers")
            return nodes
        finally:
            if was_enabled:
                gc.enable()


def _record_of(node: SimNode) -> MemberRecord:
    """The node's record as UP, whether or not it has started yet."""
    return record_of(node.core.local_member(), MemberState.UP)


def _wired(node: SimNode, wanted: int) -> bool:
    providers = node.core.providers
    return len(providers) >= wanted and all(st.confirmed for st in providers.values())
