"""Hello / Ohai / OkBoss / GoTeam: the pre-shared-key handshake.

    initiator                                   responder
    Hello  (eph pk, sid, time, zone; a MAC per PSK)  ->   checks time +/- window, a MAC
           <-  Ohai (eph pk, sid, challenge; MAC over Hello+Ohai)
    OkBoss (confirmation MAC under the session key) ->   session ready
           <-  GoTeam (confirmation MAC)                 session ready

What it fixes from the original gwyh (items 1-4 of docs/PROTOCOL.md §3.8): the time
lock is +/- window_s seconds, not 60 ms; every MAC carries a role label and covers
both node ids, both ephemeral keys and both session ids, so nothing can be reflected
or swapped; GoTeam is authenticated; nothing unauthenticated can cancel or change a
handshake (there is no "Dead" on the wire); half-open states expire; and the Hello is
padded so no reply is ever larger than the packet that provoked it.
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import (
    LABEL_GOTEAM,
    LABEL_HELLO,
    LABEL_OHAI,
    LABEL_OKBOSS,
    DecryptError,
    PskKeyring,
    RandomBytes,
    SessionKeys,
    mac,
    transcript_hash,
    x25519,
    x25519_keypair,
)
from gwyh_mp.protocol.events import EXPIRED, WRONG_KEY, RejectedHandshakes

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Established:
    """A session both sides have confirmed."""

    peer_id: bytes
    peer_zone: str | None
    peer_incarnation: int
    addr: Addr
    local_session_id: int  # the peer puts this in packets to us
    remote_session_id: int  # we put this in packets to the peer
    send_key: bytes
    recv_key: bytes
    initiator: bool


@dataclass(slots=True)
class _Initiating:
    addr: Addr
    hs_id: bytes
    secret: bytes
    public_key: bytes
    session_id: int
    hello: bytes
    hello_signed: bytes
    started: float
    next_retry: float
    okboss: bytes | None = None  # set once the Ohai checked out
    goteam_expected: bytes = b""
    result: Established | None = None


@dataclass(slots=True)
class _Responding:
    addr: Addr
    ohai: bytes
    session_id: int
    okboss_expected: bytes
    goteam: bytes
    pending: Established
    expires: float
    done: bool = False


class HandshakeStats(dict[str, int]):
    def bump(self, key: str) -> None:
        self[key] = self.get(key, 0) + 1


MAX_REJECT_SOURCES = 64


class RejectLog:
    """Handshakes refused for a wrong key or an expired timestamp, counted by (reason,
    source address) until the operator-facing side drains them. Bounded whatever
    arrives: beyond MAX_REJECT_SOURCES sources between two drains, a rejection is only
    counted, under the source None."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, Addr | None], int] = {}

    def add(self, reason: str, addr: Addr) -> None:
        key: tuple[str, Addr | None] = (reason, addr)
        if key not in self._counts and len(self._counts) >= MAX_REJECT_SOURCES:
            key = (reason, None)
        self._counts[key] = self._counts.get(key, 0) + 1

    def drain(self) -> list[RejectedHandshakes]:
        out = [RejectedHandshakes(reason, addr, n) for (reason, addr), n in self._counts.items()]
        self._counts.clear()
        return out


class Handshaker:
    def __init__(
        self,
        node_id: bytes,
        zone: str | None,
        keyring: PskKeyring,
        *,
        allocate_session_id: Callable[[], int],
        release_session_id: Callable[[int], None],
        window_s: float = 60.0,
        timeout_s: float = 10.0,
        retry_s: float = 1.0,
        max_half_open: int = 1024,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.node_id = node_id
        self.zone = zone
        self.keyring = keyring
        self._allocate_sid = allocate_session_id
        self._release_sid = release_session_id
        self.window_ns = int(window_s * 1e9)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_half_open = max_half_open
        self._random = random_bytes
        self._initiating: dict[bytes, _Initiating] = {}
        self._initiating_by_addr: dict[Addr, bytes] = {}
        self._responding: dict[bytes, _Responding] = {}
        # Earliest retry or expiry, never later than the true one (removals leave it early:
        # one spare wakeup). get_timer asks after every datagram, and a node serving
        # thousands of peers keeps thousands of finished responder states until they expire.
        self._next_due: float | None = None
        # Hello ids already answered, kept for the whole time-lock window so a
        # captured Hello replayed later gets nothing (hs_id -> forget-after time).
        self._seen_hellos: OrderedDict[bytes, float] = OrderedDict()
        self.stats = HandshakeStats()
        self.rejected = RejectLog()

    # -- initiator ---------------------------------------------------------

    def is_initiating(self, addr: Addr) -> bool:
        return addr in self._initiating_by_addr

    def initiate(self, addr: Addr, now: float, wall_ns: int, incarnation: int = 0) -> bytes:
        """Start a handshake with ``addr``; returns the Hello to send. One at a time
        per address: a second call returns the pending Hello again."""
        pending = self._initiating_by_addr.get(addr)
        if pending is not None:
            return self._initiating[pending].hello
        hs_id = self._random(16)
        secret, public = x25519_keypair(self._random)
        sid = self._allocate_sid()
        signed = wire.encode_hello_signed(
            hs_id, self.node_id, public, sid, incarnation, wall_ns, self.zone
        )
        hello = wire.finish_hello(signed, self.keyring.macs(LABEL_HELLO, signed))
        self._initiating[hs_id] = _Initiating(
            addr, hs_id, secret, public, sid, hello, signed, now, now + self.retry_s
        )
        self._initiating_by_addr[addr] = hs_id
        self._due_at(now + self.retry_s)
        self.stats.bump("initiated")
        return hello

    # -- dispatch ----------------------------------------------------------

    def handle(
        self, ptype: int, data: bytes, addr: Addr, now: float, wall_ns: int, incarnation: int = 0
    ) -> tuple[bytes | None, Established | None]:
        """Feed one handshake datagram. Returns (reply to send to addr, new session).
        Raises wire.WireError for malformed input; anything that merely fails a
        check returns (None, None) and is counted in ``stats``."""
        if ptype == wire.PacketType.HELLO:
            hello = wire.decode_hello(data)
            return self._on_hello(hello, addr, now, wall_ns, incarnation), None
        if ptype == wire.PacketType.OHAI:
            return self._on_ohai(wire.decode_ohai(data), addr), None
        if ptype == wire.PacketType.OKBOSS:
            return self._on_okboss(wire.decode_confirm(data), addr)
        if ptype == wire.PacketType.GOTEAM:
            return None, self._on_goteam(wire.decode_confirm(data), addr)
        raise wire.WireError("not a handshake packet")

    # -- responder ---------------------------------------------------------

    def _on_hello(
        self, hello: wire.Hello, addr: Addr, now: float, wall_ns: int, incarnation: int
    ) -> bytes | None:
        existing = self._responding.get(hello.hs_id)
        if existing is not None:
            # A retransmitted Hello: repeat our Ohai (same size or smaller), nothing new.
            if existing.addr == addr and not existing.done:
                self.stats.bump("hello_retransmit")
                return existing.ohai
            self.stats.bump("hello_duplicate")
            return None
        if hello.hs_id in self._seen_hellos:
            self.stats.bump("hello_replay")
            return None
        if abs(wall_ns - hello.timestamp_ns) > self.window_ns:
            self.stats.bump("hello_stale")
            self.rejected.add(EXPIRED, addr)
            return None
        psk_key = self.keyring.verify_any(LABEL_HELLO, hello.signed, hello.macs)
        if psk_key is None:
            self.stats.bump("hello_bad_mac")
            self.rejected.add(WRONG_KEY, addr)
            return None
        if hello.node_id == self.node_id:
            self.stats.bump("hello_self")
            return None
        if len(self._responding) >= self.max_half_open:
            self.stats.bump("hello_overload")
            return None
        secret, public = x25519_keypair(self._random)
        try:
            shared = x25519(secret, hello.public_key)
        except DecryptError:
            self.stats.bump("hello_bad_key")
            return None
        sid = self._allocate_sid()
        challenge = self._random(wire.CHALLENGE_BYTES)
        ohai_signed = wire.encode_ohai_signed(
            hello.hs_id, self.node_id, public, sid, incarnation, challenge, self.zone
        )
        ohai = ohai_signed + mac(psk_key, LABEL_OHAI, hello.signed + ohai_signed)
        th = transcript_hash(hello.signed, ohai_signed)
        keys = SessionKeys(psk_key, shared, th)
        self._responding[hello.hs_id] = _Responding(
            addr=addr,
            ohai=ohai,
            session_id=sid,
            okboss_expected=mac(keys.confirm, LABEL_OKBOSS, th),
            goteam=wire.encode_confirm(
                wire.PacketType.GOTEAM, hello.hs_id, mac(keys.confirm, LABEL_GOTEAM, th)
            ),
            pending=Established(
                peer_id=hello.node_id,
                peer_zone=hello.zone,
                peer_incarnation=hello.incarnation,
                addr=addr,
                local_session_id=sid,
                remote_session_id=hello.session_id,
                send_key=keys.responder_to_initiator,
                recv_key=keys.initiator_to_responder,
                initiator=False,
            ),
            expires=now + self.timeout_s,
        )
        self._due_at(now + self.timeout_s)
        self._remember_hello(hello.hs_id, now)
        self.stats.bump("ohai_sent")
        return ohai

    def _remember_hello(self, hs_id: bytes, now: float) -> None:
        # Hellos older than the window are refused by the time check anyway, so
        # remembering ids for 2 x window covers every replayable Hello.
        forget_at = now + 2 * self.window_ns / 1e9
        self._seen_hellos[hs_id] = forget_at
        while len(self._seen_hellos) > 65_536:
            self._seen_hellos.popitem(last=False)

    def _on_okboss(
        self, confirm: wire.Confirm, addr: Addr
    ) -> tuple[bytes | None, Established | None]:
        state = self._responding.get(confirm.hs_id)
        if state is None or state.addr != addr:
            self.stats.bump("okboss_unknown")
            return None, None
        if not hmac.compare_digest(state.okboss_expected, confirm.mac):
            self.stats.bump("okboss_bad_mac")
            self.rejected.add(WRONG_KEY, addr)
            return None, None
        if state.done:  # our GoTeam was lost: repeat it, the session already exists
            self.stats.bump("okboss_retransmit")
            return state.goteam, None
        state.done = True
        self.stats.bump("established_responder")
        return state.goteam, state.pending

    # -- initiator, continued ----------------------------------------------

    def _on_ohai(self, ohai: wire.Ohai, addr: Addr) -> bytes | None:
        state = self._initiating.get(ohai.hs_id)
        if state is None or state.addr != addr:
            self.stats.bump("ohai_unknown")
            return None
        if state.okboss is not None:  # duplicate Ohai: repeat OkBoss
            return state.okboss
        psk_key = self.keyring.verify_any(LABEL_OHAI, state.hello_signed + ohai.signed, [ohai.mac])
        if psk_key is None:
            self.stats.bump("ohai_bad_mac")
            self.rejected.add(WRONG_KEY, addr)
            return None
        if ohai.node_id == self.node_id:
            self.stats.bump("ohai_self")
            self._abort(state)
            return None
        try:
            shared = x25519(state.secret, ohai.public_key)
        except DecryptError:
            self.stats.bump("ohai_bad_key")
            return None
        th = transcript_hash(state.hello_signed, ohai.signed)
        keys = SessionKeys(psk_key, shared, th)
        state.okboss = wire.encode_confirm(
            wire.PacketType.OKBOSS, ohai.hs_id, mac(keys.confirm, LABEL_OKBOSS, th)
        )
        state.result = Established(
            peer_id=ohai.node_id,
            peer_zone=ohai.zone,
            peer_incarnation=ohai.incarnation,
            addr=addr,
            local_session_id=state.session_id,
            remote_session_id=ohai.session_id,
            send_key=keys.initiator_to_responder,
            recv_key=keys.responder_to_initiator,
            initiator=True,
        )
        state.goteam_expected = mac(keys.confirm, LABEL_GOTEAM, th)
        return state.okboss

    def _on_goteam(self, confirm: wire.Confirm, addr: Addr) -> Established | None:
        state = self._initiating.get(confirm.hs_id)
        if state is None or state.addr != addr or state.result is None:
            self.stats.bump("goteam_unknown")
            return None
        if not hmac.compare_digest(state.goteam_expected, confirm.mac):
            self.stats.bump("goteam_bad_mac")
            self.rejected.add(WRONG_KEY, addr)
            return None
        result = state.result
        self._forget_initiating(state)
        self.stats.bump("established_initiator")
        return result

    # -- timers --------------------------------------------------------------

    def next_timer(self) -> float | None:
        return self._next_due

    def _due_at(self, t: float) -> None:
        if self._next_due is None or t < self._next_due:
            self._next_due = t

    def _recompute_due(self) -> None:
        t: float | None = None
        for state in self._initiating.values():
            if t is None or state.next_retry < t:
                t = state.next_retry
        for resp in self._responding.values():
            if t is None or resp.expires < t:
                t = resp.expires
        self._next_due = t

    def handle_timer(self, now: float) -> tuple[list[tuple[bytes, Addr]], list[Addr]]:
        """Retransmit and expire. Returns (datagrams to send, addresses whose
        handshake gave up)."""
        out: list[tuple[bytes, Addr]] = []
        failed: list[Addr] = []
        for state in list(self._initiating.values()):
            if now - state.started >= self.timeout_s:
                failed.append(state.addr)
                self.stats.bump("initiator_timeout")
                self._abort(state)
            elif now >= state.next_retry:
                state.next_retry = now + self.retry_s
                out.append((state.okboss or state.hello, state.addr))
                self.stats.bump("retransmit")
        for hs_id, resp in list(self._responding.items()):
            if now >= resp.expires:
                if not resp.done:
                    self._release_sid(resp.session_id)
                    self.stats.bump("responder_timeout")
                del self._responding[hs_id]
        while self._seen_hellos:
            hs_id, forget_at = next(iter(self._seen_hellos.items()))
            if forget_at > now:
                break
            del self._seen_hellos[hs_id]
        self._recompute_due()
        return out, failed

    def _abort(self, state: _Initiating) -> None:
        self._release_sid(state.session_id)
        self._forget_initiating(state)

    def _forget_initiating(self, state: _Initiating) -> None:
        self._initiating.pop(state.hs_id, None)
        if self._initiating_by_addr.get(state.addr) == state.hs_id:
            del self._initiating_by_addr[state.addr]
        if not self._initiating and not self._responding:
            self._next_due = None

    @property
    def half_open(self) -> int:
        return len(self._initiating) + sum(1 for r in self._responding.values() if not r.done)
