"""`python -m bench ceiling`: this machine's raw loopback UDP and PyNaCl limits,
plus the *naive floor* that node benchmarks compare themselves against (the
measurements live in bench/floor.py, which those benchmarks share).

Output: a short table on stdout; the full result with --json FILE ('-': stdout).

Durations: each send-only UDP loop runs --seconds/2, the cross-process pair and
the naive floor run --seconds, each crypto micro-benchmark runs --seconds/4.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import struct
import sys
import time
from collections.abc import Callable

from nacl import bindings as nb

from bench.common import machine_description, write_json
from bench.floor import (
    FLOOR_MESSAGE,
    MAX_PAYLOAD,
    NONCE_BYTES,
    WIRE_OVERHEAD,
    measure_naive_floor,
    measure_udp_pair,
    measure_udp_send,
    timed_calls,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        default="64,512,1200,8192",
        help="comma-separated plaintext payload sizes in bytes",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="duration unit per measurement in seconds",
    )
    parser.add_argument(
        "--fanout",
        type=int,
        default=5,
        help="subscribers per message in the naive floor",
    )


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        print(f"bad --sizes {args.sizes!r}: expected e.g. 64,512,1200", file=sys.stderr)
        return 2
    if not sizes or any(not 1 <= s <= MAX_PAYLOAD for s in sizes):
        print(f"--sizes must be 1..{MAX_PAYLOAD} bytes each", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 600:
        print("--seconds must be in (0, 600]", file=sys.stderr)
        return 2
    if not 1 <= args.fanout <= 64:
        print("--fanout must be in 1..64", file=sys.stderr)
        return 2
    result = measure_ceiling(sizes, args.seconds, args.fanout, progress=not args.quiet)
    print_table(result)
    write_json(args.json, result)
    return 0


def measure_ceiling(sizes: list[int], seconds: float, fanout: int, progress: bool = False) -> dict:
    """Run every ceiling measurement; return the JSON-ready result."""
    started = time.perf_counter()
    machine = machine_description()
    micro_s = seconds / 4
    results = []
    for size in sizes:
        if progress:
            print(f"ceiling: payload {size} B ...", file=sys.stderr, flush=True)
        results.append(
            {
                "payload_size": size,
                "udp": {
                    "sendto_unread_sink": measure_udp_send(size, seconds / 2, connected=False),
                    "send_connected_unread_sink": measure_udp_send(
                        size, seconds / 2, connected=True
                    ),
                    "pair": measure_udp_pair(size, seconds),
                },
                "crypto": measure_crypto(size, micro_s),
                "naive_floor": measure_naive_floor(size, fanout, seconds),
            }
        )
    return {
        "bench": "ceiling",
        "machine": machine,
        "params": {
            "sizes": sizes,
            "seconds": seconds,
            "fanout": fanout,
            "udp_send_seconds": seconds / 2,
            "udp_pair_seconds": seconds,
            "crypto_seconds": micro_s,
            "floor_seconds": seconds,
            "wire_overhead_bytes": WIRE_OVERHEAD,
        },
        "x25519": measure_x25519(micro_s),
        "results": results,
        "floor_definition": FLOOR_MESSAGE,
        "units": {
            "*_pps": "datagrams per second",
            "*_ops_s": "operations per second, one thread",
            "msgs_per_s": "floor messages per second of processing wall time",
            "cpu_*_us_per_msg": "CPU microseconds per floor message",
            "drop_pct": "percent of sent datagrams not received",
        },
        "elapsed_s": time.perf_counter() - started,
    }


def _rate(body: Callable[[int], int], seconds: float, batch: int = 256) -> float:
    done, elapsed = timed_calls(body, seconds, batch)
    return done / elapsed if elapsed > 0 else 0.0


def measure_crypto(payload_size: int, seconds: float) -> dict:
    """Single-thread ops/s of the primitives a node uses per datagram.

    Encrypts build a fresh counter nonce per call (part of the real cost);
    opens decrypt one fixed valid ciphertext. Box keys are precomputed
    (crypto_box_beforenm), so these are XSalsa20-Poly1305 costs only.
    """
    msg = os.urandom(payload_size)
    key = os.urandom(32)
    prefix = os.urandom(NONCE_BYTES - 8)
    pack = struct.Struct("<Q").pack
    counter = itertools.count()
    _, sk_a = nb.crypto_box_keypair()
    pk_b, _ = nb.crypto_box_keypair()
    shared = nb.crypto_box_beforenm(pk_b, sk_a)
    nonce = prefix + pack(0)
    sb_ct = nb.crypto_secretbox_easy(msg, nonce, key)
    box_ct = nb.crypto_box_easy_afternm(msg, nonce, shared)
    sb_enc, sb_open = nb.crypto_secretbox_easy, nb.crypto_secretbox_open_easy
    box_enc, box_open = nb.crypto_box_easy_afternm, nb.crypto_box_open_easy_afternm
    blake2b = hashlib.blake2b

    def secretbox_encrypt(n: int) -> int:
        for _ in range(n):
            sb_enc(msg, prefix + pack(next(counter)), key)
        return n

    def secretbox_open(n: int) -> int:
        for _ in range(n):
            sb_open(sb_ct, nonce, key)
        return n

    def box_encrypt(n: int) -> int:
        for _ in range(n):
            box_enc(msg, prefix + pack(next(counter)), shared)
        return n

    def box_open_(n: int) -> int:
        for _ in range(n):
            box_open(box_ct, nonce, shared)
        return n

    def blake2b_keyed(n: int) -> int:
        for _ in range(n):
            blake2b(msg, key=key, digest_size=16).digest()
        return n

    return {
        "secretbox_easy_encrypt_ops_s": _rate(secretbox_encrypt, seconds),
        "secretbox_open_easy_ops_s": _rate(secretbox_open, seconds),
        "box_easy_afternm_ops_s": _rate(box_encrypt, seconds),
        "box_open_easy_afternm_ops_s": _rate(box_open_, seconds),
        "blake2b_keyed_ops_s": _rate(blake2b_keyed, seconds),
        "blake2b_note": "hashlib.blake2b(payload, key=32 B, digest_size=16).digest()",
    }


def measure_x25519(seconds: float) -> dict:
    """X25519 scalar multiplication (the cost of one key agreement / handshake)."""
    _, sk = nb.crypto_box_keypair()
    pk, _ = nb.crypto_box_keypair()
    scalarmult = nb.crypto_scalarmult

    def body(n: int) -> int:
        for _ in range(n):
            scalarmult(sk, pk)
        return n

    return {"scalarmult_ops_s": _rate(body, seconds, batch=16)}


def _k(x: float) -> str:
    return f"{x / 1000:.0f}" if x >= 10_000 else f"{x / 1000:.1f}"


def print_table(result: dict) -> None:
    """Short human summary on stdout: rates in thousands per second (k/s)."""
    out = sys.stdout
    for row in (
        ("payload", "sendto", "send", "UDP pair", "UDP pair", "UDP pair", "secretbox",
         "secretbox", "box", "box", "blake2b", "floor", "floor"),
        ("bytes", "k/s", "k/s", "sent k/s", "recv k/s", "drop %", "seal k/s", "open k/s",
         "seal k/s", "open k/s", "k/s", "msg k/s", "CPU us/msg"),
    ):  # fmt: skip
        print(" ".join(f"{h:>{10 if i else 7}}" for i, h in enumerate(row)), file=out)
    for r in result["results"]:
        udp, c, f = r["udp"], r["crypto"], r["naive_floor"]
        cells = (
            _k(udp["sendto_unread_sink"]["sent_pps"]),
            _k(udp["send_connected_unread_sink"]["sent_pps"]),
            _k(udp["pair"]["sent_pps"]),
            _k(udp["pair"]["recv_pps"]),
            f"{udp['pair']['drop_pct']:.1f}",
            _k(c["secretbox_easy_encrypt_ops_s"]),
            _k(c["secretbox_open_easy_ops_s"]),
            _k(c["box_easy_afternm_ops_s"]),
            _k(c["box_open_easy_afternm_ops_s"]),
            _k(c["blake2b_keyed_ops_s"]),
            _k(f["msgs_per_s"]),
            f"{f['cpu_us_per_msg']:.1f}",
        )
        print(f"{r['payload_size']:>7} " + " ".join(f"{x:>10}" for x in cells), file=out)
    p = result["params"]
    print(
        f"x25519 scalarmult: {_k(result['x25519']['scalarmult_ops_s'])} k/s;"
        f" floor = recv + decrypt + {p['fanout']} x (encrypt + sendto), one process;"
        f" total {result['elapsed_s']:.1f} s",
        file=out,
    )
