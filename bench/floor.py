"""The reference measurements other benches compare against: raw loopback UDP send
and pair rates, and the *naive floor* (one recv + one decrypt + one encryption and one
send per subscriber, in one process).

`bench ceiling` reports them on their own; `bench cluster`, `ingest` and `large` measure
them in the same run as the system under test, because the 2-core VM this project targets
drifts by 15-30 % between runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from nacl import bindings as nb

from bench.common import set_big_buffers

LOOPBACK = "127.0.0.1"
NONCE_BYTES = 24
MAC_BYTES = 16
# Wire overhead of every encrypted datagram in the floor: nonce prefix + Poly1305 tag.
WIRE_OVERHEAD = NONCE_BYTES + MAC_BYTES
MAX_PAYLOAD = 65507 - WIRE_OVERHEAD  # largest IPv4 UDP payload

# Hard caps so that every loop stops by count even if the clock misbehaves.
MAX_OPS = 50_000_000
MAX_ROUNDS = 100_000

FLOOR_MESSAGE = (
    "One floor message, all in ONE Python process with plain non-blocking sockets "
    "(no event loop): 1 sock.recv(65536) of a (payload+40) B datagram already queued on "
    "a 127.0.0.1 UDP socket; 1 nacl.bindings.crypto_box_open_easy_afternm of the "
    "(payload+16) B ciphertext with a precomputed key; then, for each of `fanout` "
    "subscribers: a 24 B counter nonce (16 B prefix + struct-packed counter), 1 "
    "crypto_box_easy_afternm with that subscriber's own precomputed key, nonce+ciphertext "
    "concatenation, and 1 unconnected sock.sendto() of the (payload+40) B datagram to "
    "that subscriber's own 127.0.0.1 sink socket. No parsing, dedupe, delivery or logging. "
    "CPU counted: user+sys of that one process (getrusage RUSAGE_SELF) during the "
    "processing phases only. This includes the kernel loopback delivery of the fanout "
    "sends into the sinks' queues (charged to the sender on loopback) but excludes the "
    "untimed phases that refill the input socket and drain the sinks (in a cluster the "
    "inbound datagram's kernel delivery is charged to the peer that sent it)."
)


def timed_calls(body: Callable[[int], int], seconds: float, batch: int) -> tuple[int, float]:
    """Call body(batch) until `seconds` pass (or MAX_OPS); body returns how many succeeded.

    Checking the clock once per batch keeps timing overhead out of the loop.
    """
    done = calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    now = t0
    while calls * batch < MAX_OPS:
        done += body(batch)
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return done, now - t0


def _udp_socket(bind: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind:
        sock.bind((LOOPBACK, 0))
    return sock


def measure_udp_send(payload_size: int, seconds: float, connected: bool) -> dict:
    """Sender-side cost: a sendto (or connected send) loop to a sink nobody reads.

    The sink's default-size queue fills within milliseconds, after which the kernel
    drops at the socket: this is the per-send syscall + loopback cost, not a
    delivery rate.
    """
    payload = os.urandom(payload_size)
    with _udp_socket() as sink, _udp_socket() as tx:
        set_big_buffers(tx)
        addr = sink.getsockname()
        errors = 0

        if connected:
            tx.connect(addr)
            send = tx.send

            def body(n: int) -> int:
                nonlocal errors
                for _ in range(n):
                    try:
                        send(payload)
                    except OSError:  # ENOBUFS/ECONNREFUSED are possible, never fatal
                        errors += 1
                return n

        else:
            sendto = tx.sendto

            def body(n: int) -> int:
                nonlocal errors
                for _ in range(n):
                    try:
                        sendto(payload, addr)
                    except OSError:
                        errors += 1
                return n

        calls, elapsed = timed_calls(body, seconds, batch=512)
    sent = calls - errors
    return {
        "sent": sent,
        "errors": errors,
        "elapsed_s": elapsed,
        "sent_pps": sent / elapsed if elapsed > 0 else 0.0,
    }


def _pair_receiver(conn: Connection, max_seconds: float) -> None:
    """Child process: drain a big-buffer socket with recv_into until an empty datagram,
    0.3 s of silence after data, or `max_seconds`."""
    with _udp_socket() as sock:
        rcvbuf, _ = set_big_buffers(sock)
        # Kernel-side timeout (SO_RCVTIMEO) instead of settimeout(): CPython would
        # poll() before every recv with a Python-level timeout, doubling syscalls.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 300_000))
        conn.send((sock.getsockname()[1], rcvbuf))
        buf = bytearray(65536)
        recv_into = sock.recv_into
        count = 0
        deadline = time.monotonic() + max_seconds
        while count < MAX_OPS:
            try:
                n = recv_into(buf)
            except OSError:  # EAGAIN from SO_RCVTIMEO
                if count or time.monotonic() > deadline:
                    break
                continue
            if n == 0:  # end marker from the sender
                break
            count += 1
            if not count & 4095 and time.monotonic() > deadline:
                break
        conn.send(count)
        conn.close()


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork starts in milliseconds and needs no importable __main__ (pytest, -c).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def measure_udp_pair(payload_size: int, seconds: float) -> dict:
    """Connected send() loop in this process -> recv_into loop in a child process.

    Both sockets ask for 8 MiB buffers. On 2 cores the two processes compete with
    each other and with the loopback softirq (charged to the sender).
    recv_pps = received / sender's send window, so backlog drained after the
    sender stopped still counts as received.
    """
    ctx = _mp_context()
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_pair_receiver, args=(child_conn, seconds + 10.0), daemon=True)
    proc.start()
    child_conn.close()
    payload = os.urandom(payload_size)
    try:
        if not parent_conn.poll(15.0):
            raise RuntimeError("pair receiver did not start")
        port, rcvbuf = parent_conn.recv()
        with _udp_socket(bind=False) as tx:
            _, sndbuf = set_big_buffers(tx)
            tx.connect((LOOPBACK, port))
            send = tx.send
            errors = 0

            def body(n: int) -> int:
                nonlocal errors
                for _ in range(n):
                    try:
                        send(payload)
                    except OSError:
                        errors += 1
                return n

            calls, elapsed = timed_calls(body, seconds, batch=512)
            # Several end markers: one may be dropped if the receiver's queue is full.
            for _ in range(20):
                with contextlib.suppress(OSError):
                    send(b"")
                if parent_conn.poll(0.005):
                    break
        received = parent_conn.recv() if parent_conn.poll(seconds + 15.0) else 0
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        parent_conn.close()
    sent = calls - errors
    return {
        "sender": "connected send() loop",
        "receiver": "recv_into loop, separate process",
        "rcvbuf_effective_bytes": rcvbuf,
        "sndbuf_effective_bytes": sndbuf,
        "sent": sent,
        "received": received,
        "elapsed_s": elapsed,
        "sent_pps": sent / elapsed if elapsed > 0 else 0.0,
        "recv_pps": received / elapsed if elapsed > 0 else 0.0,
        "drop_pct": 100.0 * (sent - received) / sent if sent else 0.0,
    }


def _drain(sock: socket.socket, buf: bytearray, limit: int) -> int:
    """Read up to `limit` queued datagrams without blocking; return how many."""
    got = 0
    while got < limit:
        try:
            sock.recv_into(buf)
        except BlockingIOError:
            break
        got += 1
    return got


def measure_naive_floor(
    payload_size: int, fanout: int, seconds: float, *, max_round: int = 256, receives: int = 1
) -> dict:
    """Messages/s and CPU us per message of the simplest possible relay loop.

    See FLOOR_MESSAGE (also returned as "definition") for exactly what one message
    costs. ``receives`` > 1: each message arrives that many times (one copy per
    provider, as in a full mesh) and the loop receives every copy but decrypts one.
    The run alternates untimed refill phases (this process sends a round of
    pre-encrypted datagrams into its own input socket) and timed processing phases
    (recv, decrypt, `fanout` x encrypt+sendto), then drains the sinks untimed so the
    next round's sends are enqueued rather than dropped. `seconds` is the total
    processing time wanted; wall time is capped at 3*seconds + 2 s. `max_round` bounds
    the datagrams queued per round (the backlog the loop works through).
    """
    if fanout < 1 or receives < 1:
        raise ValueError("fanout and receives must be >= 1")
    payload = os.urandom(payload_size)
    prefix = os.urandom(NONCE_BYTES - 8)
    pack = struct.Struct("<Q").pack
    pk_self, sk_self = nb.crypto_box_keypair()
    pk_src, sk_src = nb.crypto_box_keypair()
    k_in = nb.crypto_box_beforenm(pk_src, sk_self)
    k_feed = nb.crypto_box_beforenm(pk_self, sk_src)  # == k_in, computed the sender's way
    box_enc, box_open = nb.crypto_box_easy_afternm, nb.crypto_box_open_easy_afternm
    datagram = payload_size + WIRE_OVERHEAD

    with contextlib.ExitStack() as stack:
        rx = stack.enter_context(_udp_socket())
        feeder = stack.enter_context(_udp_socket())
        tx = stack.enter_context(_udp_socket())
        sinks = [stack.enter_context(_udp_socket()) for _ in range(fanout)]
        rcvbuf, _ = set_big_buffers(rx)
        set_big_buffers(feeder)
        set_big_buffers(tx)
        for s in sinks:
            set_big_buffers(s)
            s.setblocking(False)
        rx.setblocking(False)
        feeder.connect(rx.getsockname())
        targets = []
        for s in sinks:
            pk_sub, _ = nb.crypto_box_keypair()
            targets.append((nb.crypto_box_beforenm(pk_sub, sk_self), s.getsockname()))

        # Round size: at most max_round, because a deep backlog spills the datagrams out
        # of the CPU caches (2048 x 8 KiB rounds measured ~15 % slower than 256), and a
        # live node's queues are normally short. Also what fits in the queues, guessing
        # ~2x datagram + 1 KiB of kernel truesize per skb; shrunk below if that was wrong.
        round_size = max(4, min(max_round, rcvbuf // (2 * datagram + 1024) // receives))
        pool = []
        for i in range(round_size):
            nonce = prefix + pack(i)
            pool.append(nonce + box_enc(payload, nonce, k_feed))
        sink_buf = bytearray(65536)

        recv, sendto = rx.recv, tx.sendto
        counter = 1 << 32  # outbound nonces never collide with the pool's
        messages = rounds = fill_shortfall = sink_received = 0
        busy_s = user_s = sys_s = 0.0
        wall_deadline = time.perf_counter() + 3 * seconds + 2.0
        while busy_s < seconds and rounds < MAX_ROUNDS and time.perf_counter() < wall_deadline:
            rounds += 1
            for pkt in pool[:round_size]:  # untimed refill
                for _ in range(receives):
                    feeder.send(pkt)

            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            n = 0
            while n < round_size:
                try:
                    data = recv(65536)
                except BlockingIOError:
                    break
                for _ in range(receives - 1):  # the other providers' copies
                    try:
                        recv(65536)
                    except BlockingIOError:
                        break
                plain = box_open(data[NONCE_BYTES:], data[:NONCE_BYTES], k_in)
                for key, addr in targets:
                    counter += 1
                    nonce = prefix + pack(counter)
                    sendto(nonce + box_enc(plain, nonce, key), addr)
                n += 1
            t1 = time.perf_counter()
            r1 = resource.getrusage(resource.RUSAGE_SELF)

            busy_s += t1 - t0
            user_s += r1.ru_utime - r0.ru_utime
            sys_s += r1.ru_stime - r0.ru_stime
            messages += n
            if n < round_size:  # input queue overflowed: use smaller rounds
                fill_shortfall += round_size - n
                round_size = max(4, n * 3 // 4)
            for s in sinks:  # untimed drain; each sink got n datagrams this round
                sink_received += _drain(s, sink_buf, n + 64)
        # Anything left unread in rx would only be a straggler; nothing to clean up.

    packets_out = messages * fanout
    cpu_s = user_s + sys_s
    per_msg = 1e6 / messages if messages else 0.0
    return {
        "payload_size": payload_size,
        "fanout": fanout,
        "receives": receives,
        "datagram_bytes": datagram,
        "messages": messages,
        "packets_out": packets_out,
        "rounds": rounds,
        "max_round": max_round,
        "final_round_size": round_size,
        "input_rcvbuf_effective_bytes": rcvbuf,
        "fill_shortfall": fill_shortfall,
        "sink_received": sink_received,
        "sink_dropped": max(0, packets_out - sink_received),
        "elapsed_s": busy_s,
        "msgs_per_s": messages / busy_s if busy_s > 0 else 0.0,
        "out_pps": packets_out / busy_s if busy_s > 0 else 0.0,
        "cpu_user_us_per_msg": user_s * per_msg,
        "cpu_sys_us_per_msg": sys_s * per_msg,
        "cpu_us_per_msg": cpu_s * per_msg,
        "cpu_utilization": cpu_s / busy_s if busy_s > 0 else 0.0,
        "cpu_counted": "this process only (getrusage RUSAGE_SELF), processing phases only",
        "definition": FLOOR_MESSAGE
        if receives == 1
        else FLOOR_MESSAGE.replace("1 sock.recv(65536)", f"{receives} sock.recv(65536)")
        + f" Each message is queued {receives} times (one copy per provider); one is decrypted.",
    }
