"""Pre-shared key files as an operator handles them: reading, judging, naming.

A key file holds one key as text (what ``gwyh-node keygen`` prints). Keys travel
nowhere: the CLI, the control socket and the logs show only their fingerprints.

How strength is judged (``key_bits``): a key is rated by its length and the smallest
alphabet that spells it: hex digits carry 4 bits a character, base64/base64url
characters 6, printable ASCII 6.5, anything else 8 bits a byte; a key written with
fewer than 8 distinct characters is rated 0 (``aaaa…``, ``abab…``). At least 128 bits
are required. ``keygen`` prints 32 random bytes in base64url (43 characters, 258 bits),
so its output always passes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import stat
import string

from gwyh_mp.protocol.crypto import psk_to_key

log = logging.getLogger("gwyh_mp.keys")

MIN_KEY_BITS = 128
MIN_DISTINCT_CHARS = 8
MAX_KEY_FILE_BYTES = 4096
_HEX = frozenset(string.hexdigits.encode())
_BASE64 = frozenset((string.ascii_letters + string.digits + "+/-_=").encode())
_PRINTABLE = frozenset(bytes(range(0x20, 0x7F)))


class KeyFileError(ValueError):
    """A key file cannot be used; the message names the file and says why."""


def generate() -> str:
    """A fresh key as ``keygen`` prints it: 32 random bytes, base64url, no padding."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def key_bits(key: bytes) -> float:
    """Estimated strength of ``key`` in bits (see the module doc)."""
    if len(set(key)) < MIN_DISTINCT_CHARS:
        return 0.0
    chars = set(key)
    if chars <= _HEX:
        per_char = 4.0
    elif chars <= _BASE64:
        per_char = 6.0
    elif chars <= _PRINTABLE:
        per_char = math.log2(len(_PRINTABLE))
    else:
        per_char = 8.0
    return len(key) * per_char


def fingerprint(key: bytes) -> str:
    """A short public name for a key: 16 hex digits of a hash of its derived key.
    Reveals nothing useful about the key, and is the same on every node."""
    return hashlib.blake2b(psk_to_key(key), digest_size=8, person=b"gwyh-fingerprint").hexdigest()


def check_key(key: bytes, source: str) -> bytes:
    if not key:
        raise KeyFileError(f"key {source} is empty (generate one: gwyh-node keygen > FILE)")
    bits = key_bits(key)
    if bits < MIN_KEY_BITS:
        raise KeyFileError(
            f"key {source} is too weak (about {bits:.0f} bits, at least {MIN_KEY_BITS} needed); "
            "use gwyh-node keygen"
        )
    return key


def read_key_file(path: str) -> bytes:
    """The key in ``path``, stripped of surrounding whitespace and checked; warns once
    when the file is readable by its group or others."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            os.set_blocking(fd, True)
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "key file %s is readable by %s (mode %04o); chmod 600 %s",
            path,
            "others" if mode & stat.S_IROTH else "its group",
            stat.S_IMODE(mode),
            path,
        )
    return check_key(raw.strip(), f"in {path}")
