"""Fuzz targets: one function per attack surface of the sans-IO core, each asserting what
the node relies on, not merely "does not crash".

bench/fuzz.py imports this module inside ``atheris.instrument_imports`` so that the
gwyh_mp code it reaches is coverage-instrumented; tests/test_fuzz_regressions.py calls the
same functions directly. Every target takes the raw fuzzer input and is deterministic
(seeded randomness, a fake clock), so a crash input replays exactly. The structured
targets read their input as a program of small operations (``Program``) so that libFuzzer's
byte-level mutations turn into small changes of what is done, in which order.

Invariant failures raise ``InvariantError``; any other exception escaping a target is a
crash too: the only exception the decoders may raise is ``wire.WireError``.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

from gwyh_mp.config import Config
from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import PskKeyring
from gwyh_mp.protocol.framing import (
    MAX_NAK_INDEXES,
    AddKind,
    Reassembler,
    split_message,
)
from gwyh_mp.protocol.handshake import Established, Handshaker
from gwyh_mp.protocol.node import NodeCore

Addr = tuple[str, int]

PSK = b"fuzz-psk-0123456789abcdef0123456"
WALL_EPOCH_NS = 1_800_000_000 * 1_000_000_000
ADDRS: tuple[Addr, ...] = (("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000))


class InvariantError(AssertionError):
    """A property the node relies on does not hold for this input."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise InvariantError(what)


class Program:
    """Reads fuzzer bytes as operation arguments; past the end everything reads as 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "big")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)


# -- the datagram decoder (wire.py) ---------------------------------------------------


def datagram(data: bytes) -> None:
    """Any datagram, decoded as the node would; what decodes must re-encode to itself.

    CONTROL and BROADCAST bodies are decoded as if already decrypted: an insider (a key
    holder) reaches the frame and record decoders with bytes of its choosing."""
    try:
        _decode_datagram(data)
    except wire.WireError:
        pass


def _decode_datagram(data: bytes) -> None:
    if len(data) < wire.PREFIX.size or data[0] != wire.VERSION:
        raise wire.WireError("short datagram or another version")  # as the node checks
    ptype = data[1]
    if ptype == wire.PacketType.HELLO:
        h = wire.decode_hello(data)
        signed = wire.encode_hello_signed(
            h.hs_id, h.node_id, h.public_key, h.session_id, h.incarnation, h.timestamp_ns, h.zone
        )
        check(signed == h.signed, "hello fields do not re-encode to the signed bytes")
        end = len(h.signed) + 1 + wire.MAC_BYTES * len(h.macs)
        rebuilt = wire.finish_hello(h.signed, list(h.macs))
        check(rebuilt[:end] == data[:end], "hello does not re-encode to itself")
    elif ptype == wire.PacketType.OHAI:
        o = wire.decode_ohai(data)
        signed = wire.encode_ohai_signed(
            o.hs_id, o.node_id, o.public_key, o.session_id, o.incarnation, o.challenge, o.zone
        )
        check(signed + o.mac == data, "ohai does not re-encode to itself")
    elif ptype in (wire.PacketType.OKBOSS, wire.PacketType.GOTEAM):
        c = wire.decode_confirm(data)
        check(wire.encode_confirm(c.packet_type, c.hs_id, c.mac) == data, "confirm round trip")
    elif ptype == wire.PacketType.CONTROL:
        if len(data) < wire.CONTROL_HEADER.size:
            raise wire.WireError("short control")
        wire.CONTROL_HEADER.unpack_from(data)
        _decode_control_plaintext(data[wire.CONTROL_HEADER.size :])
    elif ptype == wire.PacketType.BROADCAST:
        if len(data) < wire.BROADCAST_HEADER.size:
            raise wire.WireError("short broadcast")
        count = wire.BROADCAST_HEADER.unpack_from(data)[2]
        body = data[wire.BROADCAST_HEADER.size + count * wire.MESSAGE_ID_BYTES :]
        record, used = wire.decode_member(body)  # a STATUS entry's body
        check(record.encode() == body[:used], "member record round trip")
    else:
        raise wire.WireError("unknown type")


def _decode_control_plaintext(plaintext: bytes) -> None:
    frames = wire.iter_frames(plaintext)
    rebuilt = b"".join(wire.FRAME_HEADER.pack(t, len(b)) + b for t, b in frames)
    check(rebuilt == plaintext, "frames do not re-encode to the plaintext")
    for ftype, body in frames:
        try:
            if ftype == wire.FrameType.NAK:
                received, lost, ranges = wire.decode_nak(body)
                check(len(ranges) <= wire.MAX_NAK_RANGES, "nak over MAX_NAK_RANGES")
                check(wire.encode_nak(received, lost, ranges) == body, "nak round trip")
            elif ftype == wire.FrameType.FRAGMENT_NAK:
                msg_id, indexes = wire.decode_fragment_nak(body)
                check(len(indexes) <= wire.MAX_FRAGMENT_NAK_INDEXES, "fragment nak too long")
                check(wire.encode_fragment_nak(msg_id, indexes) == body, "fragment nak trip")
            elif ftype == wire.FrameType.PEERS:
                member_list(body)
        except wire.WireError:
            continue  # one bad frame: the node drops the packet, the fuzzer goes on


# -- the member-record codec (wire.py) --------------------------------------------------


def member(data: bytes) -> None:
    """A PEERS body and a STATUS body: decode, re-encode to the same bytes, and every
    decoded address is one the socket layer takes (issue 11 item 4: a host that fails
    IDNA encoding, or port 0, crashed the send path)."""
    try:
        member_list(data)
    except wire.WireError:
        pass
    try:
        record, used = wire.decode_member(data)
    except wire.WireError:
        return
    check(record.encode() == data[:used], "member record round trip")
    _check_sendable(record)


def member_list(body: bytes) -> None:
    records = wire.decode_members(body)
    check(wire.encode_members(records) == body, "member list round trip")
    for record in records:
        _check_sendable(record)


def _check_sendable(record: wire.MemberRecord) -> None:
    check(1 <= record.port <= 0xFFFF, f"unusable port {record.port}")
    try:
        record.host.encode("idna")  # what socket.sendto does with a str host
    except UnicodeError:
        raise InvariantError(f"host {record.host!r} cannot be sent to") from None


# -- the handshake (handshake.py) -------------------------------------------------------


@dataclass
class _Side:
    """One Handshaker plus an audit of the session ids it took and gave back."""

    hs: Handshaker
    allocated: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    established: list[Established] = field(default_factory=list)


def _side(node_id: bytes, rng: random.Random, sids: list[int]) -> _Side:
    side: _Side

    def allocate() -> int:
        sids[0] += 1
        side.allocated.add(sids[0])
        return sids[0]

    def release(sid: int) -> None:
        check(sid in side.allocated and sid not in side.released, f"bad release of sid {sid}")
        side.released.add(sid)

    side = _Side(
        Handshaker(
            node_id,
            None,
            PskKeyring([PSK]),
            allocate_session_id=allocate,
            release_session_id=release,
            timeout_s=10.0,
            retry_s=1.0,
            max_half_open=4,
            random_bytes=rng.randbytes,
        )
    )
    return side


def handshake(data: bytes) -> None:
    """An initiator (at ADDRS[0]) and a responder (at ADDRS[1]) fed genuine, replayed,
    mutated and arbitrary Hello/Ohai/OkBoss/GoTeam bytes from any of three addresses,
    with time and wall-clock skew moving under them.

    Invariants: only WireError escapes; no reply is larger than the packet that caused
    it (no amplification); a session is only ever established with the genuine peer
    (nothing without the PSK gets one); half-open state stays bounded; once everything
    has timed out, every session id taken was either handed to a session or given back.
    """
    prog = Program(data)
    rng = random.Random(0)
    sids = [0]
    sides = (_side(b"I" * 16, rng, sids), _side(b"R" * 16, rng, sids))
    genuine: list[bytes] = []
    now = 0.0
    wall_ns = WALL_EPOCH_NS

    def deliver(side: _Side, packet: bytes, source: Addr) -> None:
        if len(packet) < 2:
            return
        try:
            reply, est = side.hs.handle(packet[1], packet, source, now, wall_ns)
        except wire.WireError:
            return
        if reply is not None:
            check(len(reply) <= len(packet), f"{len(reply)}-byte reply to {len(packet)} bytes")
            genuine.append(reply)
        if est is not None:
            peers = {s.hs.node_id for s in sides} - {side.hs.node_id}
            check(est.peer_id in peers, "session established with a forged identity")
            check(est.addr == source, "session established for another address")
            side.established.append(est)
        # at most one initiator handshake per address, and max_half_open responder states
        check(side.hs.half_open <= side.hs.max_half_open + len(ADDRS), "half-open state grows")

    def timers() -> None:
        for side in sides:
            out, _failed = side.hs.handle_timer(now)
            genuine.extend(packet for packet, _ in out)

    genuine.append(sides[0].hs.initiate(ADDRS[1], now, wall_ns))
    steps = 0
    while not prog.done and steps < 200:
        steps += 1
        op = prog.u8() % 6
        if op == 0 and genuine:  # a genuine packet, maybe replayed, maybe from elsewhere
            packet = bytearray(genuine[prog.u8() % len(genuine)])
            flip = prog.u16()
            packet[flip % len(packet)] ^= prog.u8()
            deliver(sides[prog.u8() & 1], bytes(packet), ADDRS[prog.u8() % len(ADDRS)])
        elif op == 1:  # arbitrary bytes of a chosen handshake type
            ptype = wire.PacketType.HELLO + prog.u8() % 4
            body = prog.take(prog.u16() % 300)
            packet = bytes((wire.VERSION, ptype)) + body
            deliver(sides[prog.u8() & 1], packet, ADDRS[prog.u8() % len(ADDRS)])
        elif op == 2:
            now += prog.u8() / 8
            wall_ns += int(prog.u8() / 8 * 1e9)
            timers()
        elif op == 3:
            wall_ns += (prog.u16() - 0x8000) * 10_000_000  # skew of up to +/- 328 s
        elif op == 4:
            initiator = sides[prog.u8() & 1]
            genuine.append(initiator.hs.initiate(ADDRS[prog.u8() % len(ADDRS)], now, wall_ns))
        else:
            genuine[:] = genuine[-32:]
    # Let every half-open handshake and every remembered Hello time out.
    for _ in range(3):
        now += 200.0
        timers()
    for side in sides:
        check(side.hs.half_open == 0, "half-open handshakes survive their timeout")
        kept = {est.local_session_id for est in side.established}
        leaked = side.allocated - side.released - kept
        check(not leaked, f"session ids neither used nor released: {sorted(leaked)}")


# -- the fragment reassembler (framing.py) ---------------------------------------------

_GENUINE_SHAPES = ((5_000, 1_000), (70_000, 1_350), (300, 256), (1, 1))  # (length, fragment)
_GENUINE = {
    b"G%d" % k: random.Random(k).randbytes(length) for k, (length, _) in enumerate(_GENUINE_SHAPES)
}
_GENUINE_FRAGMENTS = {
    msg_id: split_message(payload, _GENUINE_SHAPES[k][1])
    for k, (msg_id, payload) in enumerate(_GENUINE.items())
}
_IDS = (*_GENUINE, b"X0", b"X1", b"X2", b"X3")
# Allocation allowed per add() beyond twice the bytes it carries: bookkeeping only.
_ADD_SLACK_BYTES = 64 * 1024


def reassembler(data: bytes) -> None:
    """Genuine fragments (any order, duplicated, from several peers) mixed with arbitrary
    headers and bodies under the same and other message ids, with time passing.

    Invariants: add() never raises; budgets hold (per peer and total); what is stored
    never exceeds the bytes received, and no single add() allocates more than its own
    bytes (or, on completion, the message) plus bookkeeping, whatever its header claims;
    a message completed only from genuine fragments is the genuine message; NAK reports
    stay bounded and in range."""
    prog = Program(data)
    r = Reassembler(max_bytes_per_peer=4 << 20, max_total_bytes=6 << 20)
    tainted: set[bytes] = set()  # ids that accepted a fragment that was not genuine
    counts: dict[bytes, int] = {}  # fragment count of each message in progress
    fed = 0
    now = 0.0
    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        steps = 0
        while not prog.done and steps < 200:
            steps += 1
            op = prog.u8() % 4
            peer = prog.u8() % 3
            if op == 0:
                msg_id = _IDS[prog.u8() % len(_GENUINE)]
                frags = _GENUINE_FRAGMENTS[msg_id]
                index = prog.u16() % len(frags)
                args = (index, len(frags), len(_GENUINE[msg_id]), bytes(frags[index]))
                genuine = True
            elif op == 1:
                msg_id = _IDS[prog.u8() % len(_IDS)]
                args = (prog.u32(), prog.u32(), prog.u32(), prog.take(prog.u16() % 2048))
                genuine = False
            elif op == 2:
                now += prog.u8() / 16
                for _, nak_id, missing in r.pending_naks(now):
                    count = counts[nak_id]
                    check(len(missing) <= MAX_NAK_INDEXES, "NAK report too long")
                    check(missing == sorted(set(missing)), "NAK indexes not ascending")
                    check(all(0 <= i < count for i in missing), "NAK index out of range")
                deadline = r.next_timer(now)
                check(deadline is None or deadline >= 0.0, "next_timer before the start")
                continue
            else:
                msg_id = _IDS[prog.u8() % len(_IDS)]
                indexes = [prog.u32() for _ in range(prog.u8() % 8)]
                for i, frag in r.fragments_for_nak(msg_id, indexes):
                    if msg_id in _GENUINE and msg_id not in tainted:
                        check(frag == bytes(_GENUINE_FRAGMENTS[msg_id][i]), "NAK answer altered")
                continue
            index, count, total_len, body = args
            fed += len(body)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            started = msg_id not in r
            result = r.add(peer, msg_id, index, count, total_len, body, now)
            allocated = tracemalloc.get_traced_memory()[1] - base
            allowed = 2 * len(body) + _ADD_SLACK_BYTES
            if result.kind is AddKind.COMPLETE:
                allowed += 2 * total_len
            check(allocated <= allowed, f"add() allocated {allocated} B for {len(body)} B")
            if result.is_new and not genuine:
                tainted.add(msg_id)
            if started and result.kind is AddKind.NEW_FRAGMENT:
                counts[msg_id] = count
            if result.kind is AddKind.COMPLETE:
                check(result.data is not None and len(result.data) == total_len, "bad length")
                if msg_id in _GENUINE and msg_id not in tainted:
                    check(result.data == _GENUINE[msg_id], "genuine message altered")
                tainted.discard(msg_id)
            check(r.total_bytes <= r.max_total_bytes, "total budget exceeded")
            check(
                all(r.peer_bytes(p) <= r.max_bytes_per_peer for p in range(3)),
                "peer budget exceeded",
            )
            check(r.held_bytes <= fed, "stored more than was received")
    finally:
        if tracing:
            tracemalloc.stop()


# -- the whole node, from outside -------------------------------------------------------

_node: NodeCore | None = None


def node(data: bytes) -> None:
    """One datagram from an outsider (no PSK) into a started node with no peers:
    receive_datagram never raises and nothing is sent back (no reply, no amplification)."""
    global _node
    if _node is None:  # built once per process: a NodeCore costs milliseconds
        _node = NodeCore(
            Config.local(bind=ADDRS[1], psks=[PSK]),
            0.0,
            wall_offset_s=WALL_EPOCH_NS / 1e9,
            random_bytes=random.Random(0).randbytes,
        )
        _node.start(0.0)
        _node.handle_timer(0.0)
        _node.datagrams_to_send(0.0)
    _node.receive_datagram(data, ADDRS[0], 1.0)
    sent = _node.datagrams_to_send(1.0)
    check(not sent, f"replied {len(sent)} datagram(s) to an outsider")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "datagram": datagram,
    "handshake": handshake,
    "reassembler": reassembler,
    "member": member,
    "node": node,
}


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start the fuzzer from, so it mutates real structure."""
    record = wire.MemberRecord(b"n" * 16, 7, wire.MemberState.UP, "10.0.0.9", 7000, "eu-1")
    peers = wire.encode_members([record, record])
    control = (
        bytes(wire.CONTROL_HEADER.size)
        + wire.encode_frame(wire.FrameType.NAK, wire.encode_nak(10, 2, [(5, 2)]))
        + wire.encode_frame(wire.FrameType.FRAGMENT_NAK, wire.encode_fragment_nak(b"m" * 16, [1]))
        + wire.encode_frame(wire.FrameType.PEERS, peers)
    )
    control = bytes((wire.VERSION, wire.PacketType.CONTROL)) + control[2:]
    hs = Handshaker(
        b"I" * 16,
        "z",
        # The node target stands for an outsider: its Hellos carry a MAC under another key.
        PskKeyring([b"not-" + PSK if target == "node" else PSK]),
        allocate_session_id=lambda: 1,
        release_session_id=lambda sid: None,
        random_bytes=random.Random(0).randbytes,
    )
    hello = hs.initiate(ADDRS[1], 0.0, WALL_EPOCH_NS)
    confirm = wire.encode_confirm(wire.PacketType.OKBOSS, b"h" * 16, b"m" * 32)
    if target in ("datagram", "node"):
        return [hello, confirm, control]
    if target == "member":
        return [peers, record.encode()]
    if target == "handshake":
        # deliver the Hello, the Ohai, the OkBoss, the GoTeam in turn; then let time pass
        steps = (
            (0, 0, 0, 0, 0, 1, 0),  # op 0: genuine[0] (Hello), no flip, to R, from ADDRS[0]
            (0, 1, 0, 0, 0, 0, 1),  # the Ohai to I from ADDRS[1]
            (0, 2, 0, 0, 0, 1, 0),  # the OkBoss to R
            (0, 3, 0, 0, 0, 0, 1),  # the GoTeam to I
            (2, 20, 20),  # 2.5 s pass
        )
        walk = b"".join(bytes(step) for step in steps)
        return [walk, walk * 3]
    # reassembler: every fragment of G0 in order from peer 0, then of G2 out of order
    feed = b"".join(bytes([0, 0, 0, 0, i]) for i in range(5))
    feed += bytes([0, 1, 2, 0, 1, 0, 1, 2, 0, 0, 2, 0, 40])
    return [feed]
