"""Shared helpers for the sans-IO core tests (wire, crypto, handshake, membership, cluster).

Everything here is deterministic: randomness comes from seeded ``random.Random`` objects
and time from the simulation's fake clock. Kept out of ``conftest.py`` on purpose so that
other test modules can import exactly what they need.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import PskKeyring
from gwyh_mp.protocol.events import Event, Member, MemberDown, MemberUp, Message
from gwyh_mp.protocol.handshake import Established, Handshaker
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import MemberState
from gwyh_mp.simulation import WALL_EPOCH_S, LinkModel, SimNetwork, SimNode

Addr = tuple[str, int]

PSK = b"cluster-psk-0123456789abcdef0123"
PSK_OLD = b"old-psk-0123456789abcdef01234567"
PSK_NEW = b"new-psk-0123456789abcdef01234567"
PSK_WRONG = b"wrong-psk-0123456789abcdef012345"

WALL_NS = int(WALL_EPOCH_S * 1e9)  # the simulated wall clock at t=0, in nanoseconds
SECOND_NS = 1_000_000_000


def addr(i: int, port: int = 7000) -> Addr:
    """A distinct, valid IPv4 address per index (i >= 0)."""
    return f"10.0.{i // 250}.{i % 250 + 1}", port


def seeded_random(seed: int | str) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def lone_core(
    label: str, *, settle: bool = True, skew_s: float = 0.0, **overrides: object
) -> NodeCore:
    """A started NodeCore at ``addr(0)`` with PSK and no peers, at t=0 on the simulated
    clock (wall clock off by ``skew_s``). ``settle``: run its first tick and discard what
    it sent, so a test starts from a quiet core."""
    core = NodeCore(
        Config.local(bind=addr(0), psks=[PSK], **overrides),  # type: ignore[arg-type]
        0.0,
        wall_offset_s=WALL_EPOCH_S + skew_s,
        random_bytes=seeded_random(label),
    )
    core.start(0.0)
    if settle:
        core.handle_timer(0.0)
        core.datagrams_to_send(0.0)
    return core


def node_id(i: int) -> bytes:
    return i.to_bytes(wire.NODE_ID_BYTES, "big")


# ---------------------------------------------------------------------------- handshakes


@dataclass
class SidPool:
    """Session-id allocator that records what the handshaker gave back."""

    next_sid: int = 1
    live: set[int] = field(default_factory=set)
    released: list[int] = field(default_factory=list)

    def allocate(self) -> int:
        sid = self.next_sid
        self.next_sid += 1
        self.live.add(sid)
        return sid

    def release(self, sid: int) -> None:
        self.live.discard(sid)
        self.released.append(sid)


@dataclass
class Party:
    """One side of a hand-driven handshake."""

    hs: Handshaker
    addr: Addr
    sids: SidPool

    @property
    def node_id(self) -> bytes:
        return self.hs.node_id


def make_party(
    index: int,
    psks: Sequence[bytes] = (PSK,),
    *,
    zone: str | None = None,
    seed: int | str | None = None,
    **kwargs: float | int,
) -> Party:
    sids = SidPool()
    hs = Handshaker(
        node_id(index),
        zone,
        PskKeyring(list(psks)),
        allocate_session_id=sids.allocate,
        release_session_id=sids.release,
        random_bytes=seeded_random(f"party/{index}/{seed}"),
        **kwargs,  # type: ignore[arg-type]
    )
    return Party(hs, addr(index), sids)


@dataclass
class Transcript:
    hello: bytes
    ohai: bytes | None = None
    okboss: bytes | None = None
    goteam: bytes | None = None
    initiator: Established | None = None
    responder: Established | None = None


def run_handshake(
    a: Party,
    b: Party,
    *,
    now: float = 0.0,
    wall_ns: int = WALL_NS,
    incarnation_a: int = 0,
    incarnation_b: int = 0,
) -> Transcript:
    """A initiates to B; every packet is delivered once, stopping at the first refusal."""
    t = Transcript(a.hs.initiate(b.addr, now, wall_ns, incarnation_a))
    t.ohai, none = b.hs.handle(wire.PacketType.HELLO, t.hello, a.addr, now, wall_ns, incarnation_b)
    assert none is None
    if t.ohai is None:
        return t
    t.okboss, none = a.hs.handle(wire.PacketType.OHAI, t.ohai, b.addr, now, wall_ns)
    assert none is None
    if t.okboss is None:
        return t
    t.goteam, t.responder = b.hs.handle(wire.PacketType.OKBOSS, t.okboss, a.addr, now, wall_ns)
    if t.goteam is None:
        return t
    reply, t.initiator = a.hs.handle(wire.PacketType.GOTEAM, t.goteam, b.addr, now, wall_ns)
    assert reply is None
    return t


# ---------------------------------------------------------------------------- simulation


class TimerLivelock(AssertionError):
    """A core left a due timer behind: the simulation would spin at one instant forever."""


def guard_timer(core: NodeCore) -> None:
    """Make ``core.handle_timer`` fail fast if it leaves a deadline at or before ``now``.

    SimNetwork re-queues such a deadline at the same instant and would loop forever (a
    real runtime would busy-spin until its clock moves on); a test should fail instead.
    """
    inner = core.handle_timer

    def handle_timer(now: float) -> None:
        inner(now)
        nxt = core.get_timer()
        if nxt is not None and nxt <= now:
            raise TimerLivelock(
                f"after handle_timer({now!r}) the core's next deadline is still {nxt!r}"
            )

    core.handle_timer = handle_timer  # type: ignore[method-assign]


class CheckedSimNetwork(SimNetwork):
    """SimNetwork whose cores fail fast instead of livelocking on a stuck timer."""

    def add_node(self, config: Config, *, start: bool = True) -> SimNode:
        node = super().add_node(config, start=False)
        guard_timer(node.core)
        if start:
            node.core.start(self.now)
            self.pump(node)
        return node

    def pump(self, node: SimNode) -> None:
        """Send what the core produced after a call made from outside the network."""
        self._after_activity(node)

    def leave(self, address: Addr) -> None:
        node = self.nodes[address]
        node.core.leave(self.now)
        self.pump(node)


def make_cluster(
    n: int,
    *,
    seed: int = 1,
    link: LinkModel | None = None,
    zones: Sequence[str | None] | None = None,
    settle_s: float = 5.0,
    psks: Sequence[bytes] = (PSK,),
    **overrides: object,
) -> tuple[CheckedSimNetwork, list[Addr]]:
    """``n`` nodes (Config.local) that all bootstrap from the first one."""
    net = CheckedSimNetwork(seed=seed, link=link)
    addrs = [addr(i) for i in range(n)]
    for i, a in enumerate(addrs):
        net.add_node(
            Config.local(
                bind=a,
                psks=list(psks),
                bootstrap=[addrs[0]] if i else [],
                zone=zones[i] if zones is not None else None,
                **overrides,
            )
        )
    if settle_s:
        net.run_for(settle_s)
    return net, addrs


def messages(node: SimNode) -> list[Message]:
    return [e for _, e in node.events if isinstance(e, Message)]


def delivery_counts(net: SimNetwork, msg_id: bytes) -> dict[Addr, int]:
    return {a: sum(1 for m in messages(node) if m.id == msg_id) for a, node in net.nodes.items()}


def view_of(core: NodeCore, subject: bytes) -> Member | None:
    for member in core.member_list():
        if member.node_id == subject:
            return member
    return None


def up_ids(core: NodeCore) -> set[bytes]:
    return {m.node_id for m in core.member_list() if m.state == MemberState.UP}


def down_events(node: SimNode, subject: bytes | None = None) -> list[tuple[float, Member]]:
    return [
        (t, e.member)
        for t, e in node.events
        if isinstance(e, MemberDown) and (subject is None or e.member.node_id == subject)
    ]


def up_events(node: SimNode, subject: bytes | None = None) -> list[tuple[float, Member]]:
    return [
        (t, e.member)
        for t, e in node.events
        if isinstance(e, MemberUp) and (subject is None or e.member.node_id == subject)
    ]


def live_nodes(net: SimNetwork, exclude: Iterable[Addr] = ()) -> list[SimNode]:
    skip = set(exclude)
    return [n for a, n in net.nodes.items() if n.alive and a not in skip]


def event_trace(net: SimNetwork) -> list[tuple[str, float, str, bytes]]:
    """Every event of every node, in a comparable form."""
    out: list[tuple[str, float, str, bytes]] = []
    for a, node in sorted(net.nodes.items()):
        for t, e in node.events:
            out.append((f"{a[0]}:{a[1]}", t, type(e).__name__, _event_key(e)))
    return out


def _event_key(event: Event) -> bytes:
    if isinstance(event, Message):
        return event.id + event.data
    if isinstance(event, MemberUp | MemberDown):
        m = event.member
        return m.node_id + bytes((m.state,)) + m.incarnation.to_bytes(4, "big")
    return repr(event).encode()


def packet_types(datagrams: Iterable[bytes]) -> Counter[int]:
    return Counter(d[1] for d in datagrams if len(d) >= 2)
