"""A deterministic discrete-event network that drives real :class:`NodeCore` objects.

No sockets and no clocks: datagrams become events on a heap, ordered by simulated
time. Tests use it to check protocol rules across whole clusters in milliseconds;
``bench sim`` uses it to run thousands of nodes. Same seed, same run, byte for byte.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Event
from gwyh_mp.protocol.node import NodeCore

Addr = tuple[str, int]
WALL_EPOCH_S = 1_800_000_000.0  # simulated wall clock at t=0, for the handshake time lock

# (source, destination, rng) -> one-way delay in seconds, or None to drop the datagram
LinkModel = Callable[[Addr, Addr, random.Random], float | None]


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


class SimNetwork:
    def __init__(self, *, seed: int = 1, link: LinkModel | None = None) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.link = link or constant_link()
        self.nodes: dict[Addr, SimNode] = {}
        self._heap: list[tuple[float, int, int, object]] = []
        self._counter = 0
        self.datagrams_sent = 0
        self.datagrams_dropped = 0
        self.bytes_sent = 0
        self._seed = seed
        self.on_event: Callable[[SimNode, Event], None] | None = None
        self.on_datagram: Callable[[Addr, Addr, bytes], None] | None = None

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

    def broadcast(self, addr: Addr, data: bytes) -> bytes:
        node = self.nodes[addr]
        msg_id = node.core.broadcast(data, self.now)
        self._after_activity(node)
        return msg_id

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (when, self._counter, kind, payload))

    def _after_activity(self, node: SimNode) -> None:
        core = node.core
        for data, dst in core.datagrams_to_send(self.now):
            self.datagrams_sent += 1
            self.bytes_sent += len(data)
            if self.on_datagram is not None:
                self.on_datagram(node.addr, dst, data)
            delay = self.link(node.addr, dst, self.rng)
            if delay is None:
                self.datagrams_dropped += 1
                continue
            self._push(self.now + delay, 0, (data, node.addr, dst))
        while (event := core.next_event()) is not None:
            node.events.append((self.now, event))
            if self.on_event is not None:
                self.on_event(node, event)
        timer = core.get_timer()
        if timer is not None and (node.timer_at is None or timer < node.timer_at):
            node.timer_at = timer
            self._push(max(timer, self.now), 1, node.addr)

    def run_until(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, kind, payload = heapq.heappop(heap)
            self.now = when
            if kind == 0:
                data, src, dst = payload  # type: ignore[misc]
                node = self.nodes.get(dst)
                if node is None or not node.alive:
                    continue
                node.core.receive_datagram(data, src, when)
                self._after_activity(node)
            else:
                node = self.nodes[payload]  # type: ignore[index]
                if not node.alive or node.timer_at is None or node.timer_at > when:
                    continue  # stale timer: a newer, later one is queued
                node.timer_at = None
                node.core.handle_timer(when)
                self._after_activity(node)
        self.now = max(self.now, until)

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
