"""The typed offload seam: what the core reports for the multiprocess runtime's receivers,
and how those reports reach a receiver's tables as ring records."""

from __future__ import annotations

import marshal

from gwyh_mp.config import Config
from gwyh_mp.protocol.dissemination import SeenSet
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.offload import (
    ChannelKeySet,
    IdsSeen,
    SessionKeyInstalled,
    SessionKeyRetired,
)
from gwyh_mp.runtime.coordinator import ring_record
from gwyh_mp.runtime.receiver import ChannelEntry, Receiver, SessionEntry
from gwyh_mp.simulation import WALL_EPOCH_S
from tests.helpers_core import PSK, addr, seeded_random

PEER = b"p" * 16


def _receiver(seen_set_size: int = 100) -> Receiver:
    """A receiver's tables without its socket and rings (only apply() is exercised)."""
    r = object.__new__(Receiver)
    r.sessions, r.channels, r.stats = {}, {}, {}
    r.seen = SeenSet(seen_set_size)
    r.running = True
    return r


def _apply(r: Receiver, *updates: object) -> None:
    for update in updates:
        r.apply(marshal.loads(ring_record(update)))  # type: ignore[arg-type]


def test_updates_reach_the_receiver_tables() -> None:
    r = _receiver()
    key, chan = bytes(range(32)), bytes(32)
    _apply(r, SessionKeyInstalled(7, PEER, key, ("10.0.0.2", 7000)), ChannelKeySet(PEER, chan))
    session = r.sessions[7]
    assert isinstance(session, SessionEntry)
    assert (session.peer_id, session.recv_key, session.addr) == (PEER, key, ("10.0.0.2", 7000))
    assert isinstance(r.channels[PEER], ChannelEntry) and r.channels[PEER].key == chan
    # The peer moved: same session (and replay window), new address.
    window = session.replay
    _apply(r, SessionKeyInstalled(7, PEER, key, ("10.0.0.3", 7001)))
    assert r.sessions[7].addr == ("10.0.0.3", 7001) and r.sessions[7].replay is window
    _apply(r, IdsSeen(b"a" * 16 + b"b" * 16), ChannelKeySet(PEER, None), SessionKeyRetired(7))
    assert b"a" * 16 in r.seen and b"b" * 16 in r.seen
    assert r.sessions == {} and r.channels == {}


def test_receiver_seen_set_is_config_sized() -> None:
    r = _receiver(seen_set_size=2)
    _apply(r, IdsSeen(b"a" * 16 + b"b" * 16 + b"c" * 16))
    assert len(r.seen) == 2 and b"a" * 16 not in r.seen


def test_core_reports_only_with_deferred_sealing() -> None:
    def core(defer: bool) -> NodeCore:
        c = NodeCore(
            Config.local(bind=addr(0), psks=[PSK]),
            0.0,
            wall_offset_s=WALL_EPOCH_S,
            random_bytes=seeded_random("offload"),
            defer_sealing=defer,
        )
        c.start(0.0)
        c.broadcast(b"hello", 0.0)
        return c

    assert core(False).offload_updates() == []
    deferred = core(True)
    (seen,) = deferred.offload_updates()
    assert isinstance(seen, IdsSeen) and len(seen.ids) == 16
    assert deferred.offload_updates() == []  # drained
