"""What the core tells a runtime that does the per-packet work in other processes.

Why it exists: the multiprocess runtime's receivers decrypt and drop duplicates before
the core sees a datagram, so they need copies of the core's key tables and of its
seen-set. The core reports every change as one of these typed updates, drained through
``NodeCore.offload_updates()``; how they travel (ring records) is the runtime's business.
"""

from __future__ import annotations

from dataclasses import dataclass

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SessionKeyInstalled:
    """A session was established, or its peer's address moved (same sid, new addr)."""

    sid: int
    peer_id: bytes
    recv_key: bytes
    addr: Addr


@dataclass(frozen=True, slots=True)
class SessionKeyRetired:
    sid: int


@dataclass(frozen=True, slots=True)
class ChannelKeySet:
    """A peer's provider channel key learned, or forgotten (``key`` None)."""

    peer_id: bytes
    key: bytes | None


@dataclass(frozen=True, slots=True)
class IdsSeen:
    ids: bytes  # 16-byte message ids, concatenated


OffloadUpdate = SessionKeyInstalled | SessionKeyRetired | ChannelKeySet | IdsSeen
