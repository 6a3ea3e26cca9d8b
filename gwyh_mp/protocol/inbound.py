"""The checks an inbound BROADCAST or CONTROL datagram passes before it is trusted.

Why it exists: the core (single process) and the multiprocess runtime's receivers
make the same decisions on the same bytes, so they share one copy of them. Each
function is pure over its arguments and costs no more than the inline code it
replaced: duplicates are found before any decryption, the replay window is checked
before decrypting and marked only once the datagram authenticated.
"""

from __future__ import annotations

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.crypto import AntiReplayWindow, ids_digest, nonce, open_sealed

BROADCAST_HEADER = wire.BROADCAST_HEADER
CONTROL_HEADER = wire.CONTROL_HEADER
MALFORMED = -1
DUPLICATE = 0
_IDS_START = BROADCAST_HEADER.size
_MIN_TAIL = wire.TAG_BYTES


def broadcast_ids_end(data: bytes, count: int, seen: set[bytes]) -> int:
    """Where the clear id list of a BROADCAST datagram carrying ``count`` ids ends, if
    one of them is not in ``seen``; DUPLICATE if every one is; MALFORMED if the ids
    or the tag are cut short."""
    ids_end = _IDS_START + 16 * count
    if count == 0 or len(data) < ids_end + _MIN_TAIL:
        return MALFORMED
    if count == 1:
        return DUPLICATE if data[_IDS_START:ids_end] in seen else ids_end
    for i in range(_IDS_START, ids_end, 16):
        if data[i : i + 16] not in seen:
            return ids_end
    return DUPLICATE


def open_broadcast(
    key: bytes, window: AntiReplayWindow, chan_seq: int, ids: bytes, sealed: bytes
) -> bytes | None:
    """The plaintext of a BROADCAST datagram (``sealed``: what follows its ``ids``)
    under its sender's channel key; None for a replay. Raises DecryptError if it does
    not authenticate."""
    if not window.check(chan_seq):
        return None
    plaintext = open_sealed(key, nonce(chan_seq, ids_digest(ids)), sealed)
    window.mark(chan_seq)
    return plaintext


def open_control(key: bytes, window: AntiReplayWindow, seq: int, data: bytes) -> bytes | None:
    """The plaintext of a CONTROL datagram under its session's receive key; None for a
    replay. Raises DecryptError if it does not authenticate."""
    if not window.check(seq):
        return None
    plaintext = open_sealed(key, nonce(seq), data[CONTROL_HEADER.size :])
    window.mark(seq)
    return plaintext
