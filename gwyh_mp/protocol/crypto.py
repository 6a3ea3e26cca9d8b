"""Keys, MACs, sealing and anti-replay.

- PSKs never touch the wire: each is hashed once into a 32-byte MAC key.
- MACs are keyed BLAKE2b-256 with a role label, so a Hello MAC can never pass as an
  Ohai MAC (the original gwyh's reflection attack, item 4 of docs/PROTOCOL.md §3.8).
- Sessions: X25519 between ephemeral keys, then BLAKE2b over (PSK key, shared secret,
  transcript hash) gives one XSalsa20-Poly1305 key per direction plus a confirmation
  key. Per-direction keys let both sides count nonces from 1 without ever colliding.
- Nonces are counters (8 bytes) + 16 bytes bound to the clear header, so tampering
  with the header fails authentication and no random nonce is ever needed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence

from nacl.bindings import (
    crypto_scalarmult,
    crypto_scalarmult_base,
    crypto_secretbox_easy,
    crypto_secretbox_open_easy,
)
from nacl.exceptions import CryptoError

KEY_BYTES = 32
MAC_BYTES = 32
RandomBytes = Callable[[int], bytes]

LABEL_HELLO = b"gwyh-mp/1 hello"
LABEL_OHAI = b"gwyh-mp/1 ohai"
LABEL_SESSION = b"gwyh-mp/1 session"
LABEL_OKBOSS = b"gwyh-mp/1 okboss"
LABEL_GOTEAM = b"gwyh-mp/1 goteam"

_NONCE_PREFIX = struct.Struct("!Q")
_ZERO16 = bytes(16)


class DecryptError(Exception):
    """Authentication failed: wrong key, tampered header or ciphertext."""


def psk_to_key(psk: bytes) -> bytes:
    """Stretch-free on purpose: PSKs are meant to be random (``gwyh-node keygen``)."""
    if not psk:
        raise ValueError("a pre-shared key must not be empty")
    return hashlib.blake2b(psk, digest_size=KEY_BYTES, person=b"gwyh-mp-psk").digest()


def mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(label + data, key=key, digest_size=MAC_BYTES).digest()


class PskKeyring:
    """Every configured PSK is accepted; all are offered, so old and new keys overlap
    during a rotation."""

    def __init__(self, psks: Sequence[bytes]) -> None:
        if not psks:
            raise ValueError("at least one pre-shared key is required")
        self.keys: tuple[bytes, ...] = tuple(psk_to_key(p) for p in psks)

    def macs(self, label: bytes, data: bytes) -> list[bytes]:
        return [mac(k, label, data) for k in self.keys]

    def verify_any(self, label: bytes, data: bytes, macs: Sequence[bytes]) -> bytes | None:
        """Return the key that authenticates ``data`` under any offered MAC, or None."""
        for key in self.keys:
            expected = mac(key, label, data)
            for candidate in macs:
                if hmac.compare_digest(expected, candidate):
                    return key
        return None


def x25519_keypair(random_bytes: RandomBytes = os.urandom) -> tuple[bytes, bytes]:
    secret = random_bytes(32)
    return secret, crypto_scalarmult_base(secret)


def x25519(secret: bytes, peer_public: bytes) -> bytes:
    try:
        shared = crypto_scalarmult(secret, peer_public)
    except Exception as exc:  # low-order point: libsodium refuses, so do we
        raise DecryptError("invalid peer public key") from exc
    return shared


def transcript_hash(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"gwyh-mp-th")
    for part in parts:
        h.update(struct.pack("!I", len(part)))
        h.update(part)
    return h.digest()


class SessionKeys:
    """What a completed handshake leaves behind for one peer."""

    __slots__ = ("confirm", "initiator_to_responder", "responder_to_initiator")

    def __init__(self, psk_key: bytes, shared: bytes, th: bytes) -> None:
        prk = hashlib.blake2b(LABEL_SESSION + shared + th, key=psk_key, digest_size=64).digest()
        self.initiator_to_responder = hashlib.blake2b(b"i2r", key=prk, digest_size=32).digest()
        self.responder_to_initiator = hashlib.blake2b(b"r2i", key=prk, digest_size=32).digest()
        self.confirm = hashlib.blake2b(b"confirm", key=prk, digest_size=32).digest()


def nonce(counter: int, tail16: bytes = _ZERO16) -> bytes:
    return _NONCE_PREFIX.pack(counter) + tail16


def seal(key: bytes, nonce24: bytes, plaintext: bytes) -> bytes:
    """XSalsa20-Poly1305; returns tag || ciphertext (libsodium's easy layout)."""
    return crypto_secretbox_easy(plaintext, nonce24, key)


def open_sealed(key: bytes, nonce24: bytes, sealed: bytes) -> bytes:
    try:
        return crypto_secretbox_open_easy(sealed, nonce24, key)
    except CryptoError as exc:
        raise DecryptError("authentication failed") from exc


def ids_digest(ids: bytes) -> bytes:
    """Nonce tail of a BROADCAST packet: the id itself for one entry, else a digest of
    all ids, so that the clear id list is authenticated by the AEAD."""
    if len(ids) == 16:
        return ids
    return hashlib.blake2b(ids, digest_size=16).digest()


class AntiReplayWindow:
    """Sliding window over 64-bit counters (RFC 4303 style).

    ``check`` is called before decrypting (cheap reject of replays and very old
    packets); ``mark`` only after authentication succeeded, so forged packets can
    never move the window.
    """

    __slots__ = ("_mask", "bitmap", "highest", "size")

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self.highest = 0
        self.bitmap = 0  # bit i set = (highest - i) was seen

    def check(self, counter: int) -> bool:
        if counter <= 0:  # counters start at 1
            return False
        if counter > self.highest:
            return True
        offset = self.highest - counter
        if offset >= self.size:
            return False
        return not (self.bitmap >> offset) & 1

    def mark(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            # A jump past the window clears it; never shift by a huge amount.
            self.bitmap = 1 if shift >= self.size else ((self.bitmap << shift) | 1) & self._mask
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)


class SealJob:
    """Encryption work described instead of done: the multiprocess runtime ships it to a
    receiver process, which seals it once however many datagrams share it. Sealing is
    deterministic (same key, nonce and plaintext give the same bytes), so a job may be
    sealed again for a retransmission without reusing a nonce on different data."""

    __slots__ = ("key", "nonce", "plaintext")

    def __init__(self, key: bytes, nonce24: bytes, plaintext: bytes) -> None:
        self.key = key
        self.nonce = nonce24
        self.plaintext = plaintext

    def seal(self) -> bytes:
        return seal(self.key, self.nonce, self.plaintext)


class DeferredDatagram:
    """``prefix + job.seal()``, to be materialised by whoever sends it."""

    __slots__ = ("job", "prefix", "size")

    def __init__(self, prefix: bytes, job: SealJob) -> None:
        self.prefix = prefix
        self.job = job
        self.size = len(prefix) + TAG_BYTES + len(job.plaintext)

    def __len__(self) -> int:
        return self.size

    def materialize(self) -> bytes:
        return self.prefix + self.job.seal()


TAG_BYTES = 16
