"""BatchReceiver / BatchSender over loopback, on the recvmmsg/sendmmsg path and the fallback.

Loopback UDP delivery is synchronous (the datagram is queued on the receiver before
sendto returns), so these tests need no sleeps; reads are still bounded by count and
time so a misbehaving implementation fails instead of hanging.
"""

from __future__ import annotations

import ctypes
import errno
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gwyh_mp.runtime import mmsg
from gwyh_mp.runtime.mmsg import BatchReceiver, BatchSender

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"
MODES = [
    pytest.param(
        True,
        id="mmsg",
        marks=pytest.mark.skipif(not mmsg._LIBC_MMSG, reason="libc lacks recvmmsg/sendmmsg"),
    ),
    pytest.param(False, id="fallback"),
]


@pytest.fixture(params=MODES)
def use_mmsg(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def make_sock() -> Iterator[Callable[..., socket.socket]]:
    socks: list[socket.socket] = []

    def make(
        family: socket.AddressFamily = socket.AF_INET,
        host: str = LOCAL,
        cls: type[socket.socket] = socket.socket,
    ) -> socket.socket:
        sock = cls(family, socket.SOCK_DGRAM)
        socks.append(sock)
        # Room for every test's backlog (the kernel caps this at rmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, 0))
        return sock

    yield make
    for sock in socks:
        sock.close()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def drain(
    rx: BatchReceiver, sock: socket.socket, expected: int, timeout: float = 5.0
) -> list[tuple[bytes, tuple[str, int], bool, int]]:
    """Read exactly ``expected`` datagrams (bounded by time and call count)."""
    got: list[tuple[bytes, tuple[str, int], bool, int]] = []
    deadline = time.monotonic() + timeout
    for _ in range(expected + 1000):
        if len(got) >= expected or time.monotonic() > deadline:
            break
        n = rx.recv_batch()
        assert 0 <= n <= rx.batch
        if n == 0:
            select.select([sock], [], [], 0.05)
            continue
        for i in range(n):
            got.append((bytes(rx.packet(i)), rx.address(i), rx.truncated(i), rx.length(i)))
    assert len(got) == expected
    assert rx.recv_batch() == 0, "more datagrams than were sent"
    return got


def test_receive_varied_sizes(make_sock: Callable[..., socket.socket], use_mmsg: bool) -> None:
    rx_sock = make_sock()
    senders = [make_sock(), make_sock()]
    sizes = [0, 1, 2, 63, 64, 65, 584, 1472, 1500, 4096, 9000, 65000, 0, 17, 30000, 3, 584]
    expected = []
    for k, size in enumerate(sizes):
        data, src = payload(k, size), senders[k % 2]
        src.sendto(data, rx_sock.getsockname())
        expected.append((data, src.getsockname(), False, size))

    rx = BatchReceiver(rx_sock, batch=4, use_mmsg=use_mmsg)
    assert rx.using_mmsg is use_mmsg
    assert drain(rx, rx_sock, len(sizes)) == expected
    assert rx.count == 0


def test_iter_packets_and_accessors(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    rx_sock, tx_sock = make_sock(), make_sock()
    for k in range(3):
        tx_sock.sendto(payload(k, 100 + k), rx_sock.getsockname())
    rx = BatchReceiver(rx_sock, batch=8, bufsize=2048, use_mmsg=use_mmsg)
    assert rx.recv_batch() == 3
    pairs = [(bytes(view), addr) for view, addr in rx.iter_packets()]
    assert pairs == [(payload(k, 100 + k), tx_sock.getsockname()) for k in range(3)]
    assert isinstance(rx.packet(0), memoryview)
    assert rx.address(0) == rx.address(2)
    with pytest.raises(IndexError):
        rx.packet(3)
    with pytest.raises(IndexError):
        rx.address(-1)


def test_datagrams_copies_the_whole_batch_with_sources(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    """The runtimes' per-datagram loop: bytes copies (valid after the next batch) and
    sources, truncated ones included, as packet(i)/address(i) give them."""
    rx_sock, tx_a, tx_b = make_sock(), make_sock(), make_sock()
    sent = [(payload(k, 40 + 70 * k), (tx_a, tx_b)[k % 2]) for k in range(5)]
    for data, tx in sent:
        tx.sendto(data, rx_sock.getsockname())
    rx = BatchReceiver(rx_sock, batch=8, bufsize=256, use_mmsg=use_mmsg)
    assert rx.recv_batch() == 5
    got = rx.datagrams()
    assert got == [(bytes(rx.packet(i)), rx.address(i)) for i in range(5)]
    assert got == [(data[:256], tx.getsockname()) for data, tx in sent]
    assert all(type(data) is bytes for data, _ in got)
    tx_a.sendto(b"next batch", rx_sock.getsockname())
    assert rx.recv_batch() == 1
    assert got[0][0] == sent[0][0]  # copies survive the buffer's reuse
    assert rx.datagrams() == [(b"next batch", tx_a.getsockname())]
    assert rx.recv_batch() == 0
    assert rx.datagrams() == []


def test_empty_socket_returns_zero(make_sock: Callable[..., socket.socket], use_mmsg: bool) -> None:
    rx_sock = make_sock()
    rx = BatchReceiver(rx_sock, batch=16, use_mmsg=use_mmsg)
    assert rx.recv_batch() == 0
    assert rx.recv_batch() == 0
    assert list(rx.iter_packets()) == []
    with pytest.raises(IndexError):
        rx.packet(0)
    assert rx_sock.getblocking() is False


def test_truncated_datagram_detected(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    rx_sock, tx_sock = make_sock(), make_sock()
    big, exact, small = payload(1, 300), payload(2, 100), payload(3, 50)
    for data in (big, exact, small):
        tx_sock.sendto(data, rx_sock.getsockname())
    rx = BatchReceiver(rx_sock, batch=8, bufsize=100, use_mmsg=use_mmsg)
    assert rx.recv_batch() == 3
    assert [rx.truncated(i) for i in range(3)] == [True, False, False]
    assert [rx.length(i) for i in range(3)] == [100, 100, 50]
    assert bytes(rx.packet(0)) == big[:100]
    assert [bytes(view) for view, _ in rx.iter_packets()] == [exact, small]


def test_sender_several_destinations(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    tx_sock = make_sock()
    dests = [make_sock() for _ in range(3)]
    for dest in dests:
        dest.settimeout(2.0)
    writable = bytearray(payload(99, 40))
    bodies: list[bytes | bytearray | memoryview] = [
        payload(k, size) for k, size in enumerate([0, 1, 584, 1500, 9000, 65000, 7, 584])
    ]
    bodies += [writable, memoryview(writable)[5:25], memoryview(b"read-only view"), b"tail"]
    items = [(body, dests[k % 3].getsockname()) for k, body in enumerate(bodies)]

    tx = BatchSender(tx_sock, batch=5, use_mmsg=use_mmsg)
    assert tx.using_mmsg is use_mmsg
    assert tx.send_batch(items) == len(items)

    for d, dest in enumerate(dests):
        want = [bytes(body) for k, body in enumerate(bodies) if k % 3 == d]
        for body in want:
            data, addr = dest.recvfrom(65536)
            assert (data, addr) == (body, tx_sock.getsockname())
    for dest in dests:
        dest.setblocking(False)
        with pytest.raises(BlockingIOError):
            dest.recv(1)


def test_send_count_equals_items_sent(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    rx_sock, tx_sock = make_sock(), make_sock()
    items = [(payload(k, 64 + k), rx_sock.getsockname()) for k in range(200)]
    tx = BatchSender(tx_sock, use_mmsg=use_mmsg)
    assert tx.send_batch(items) == 200
    assert tx.send_batch([]) == 0
    rx = BatchReceiver(rx_sock, batch=64, bufsize=1024, use_mmsg=use_mmsg)
    got = drain(rx, rx_sock, 200)
    assert [g[0] for g in got] == [data for data, _ in items]


def test_ipv6_loopback(make_sock: Callable[..., socket.socket], use_mmsg: bool) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        rx_sock = make_sock(socket.AF_INET6, "::1")
        tx_sock = make_sock(socket.AF_INET6, "::1")
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    port = rx_sock.getsockname()[1]
    items = [(payload(k, size), ("::1", port)) for k, size in enumerate([0, 584, 65000, 12])]
    items.append((b"4-tuple", ("::1", port, 0, 0)))
    assert BatchSender(tx_sock, batch=2, use_mmsg=use_mmsg).send_batch(items) == len(items)
    rx = BatchReceiver(rx_sock, batch=3, use_mmsg=use_mmsg)
    got = drain(rx, rx_sock, len(items))
    src = ("::1", tx_sock.getsockname()[1])
    assert got == [(data, src, False, len(data)) for data, _ in items]


class _Flaky(socket.socket):
    """A socket whose sendto hits EAGAIN after ``budget`` datagrams (fallback path)."""

    budget = 1 << 30

    def sendto(self, data, *args):  # type: ignore[no-untyped-def, override]
        if self.budget <= 0:
            raise BlockingIOError(errno.EAGAIN, "simulated full buffer")
        self.budget -= 1
        return super().sendto(data, *args)


def test_partial_send_returns_count(
    make_sock: Callable[..., socket.socket], use_mmsg: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full send buffer can't be provoked on loopback (skbs are orphaned on transmit),
    # so EAGAIN is injected: a fake sendmmsg, or a socket whose sendto refuses.
    rx_sock, tx_sock = make_sock(), make_sock(cls=_Flaky)
    items = [(payload(k, 32), rx_sock.getsockname()) for k in range(10)]
    calls: list[int] = []
    if use_mmsg:
        real = mmsg._sendmmsg

        def fake(fd: int, msgs: int, vlen: int, flags: int) -> int:
            calls.append(vlen)
            if len(calls) == 1:  # EINTR is retried
                ctypes.set_errno(errno.EINTR)
                return -1
            if len(calls) == 2:  # kernel sent only part of the chunk
                return real(fd, msgs, min(vlen, 3), flags)
            ctypes.set_errno(errno.EAGAIN)
            return -1

        monkeypatch.setattr(mmsg, "_sendmmsg", fake)
    else:
        tx_sock.budget = 3
    tx = BatchSender(tx_sock, batch=4, use_mmsg=use_mmsg)

    assert tx.send_batch(items) == 3
    if use_mmsg:
        assert calls == [4, 4, 4]  # retried EINTR, then resumed after the partial send
    assert tx.send_batch(items[3:]) == 0  # still "full": nothing sent, nothing raised

    if use_mmsg:
        tx._sendmmsg = real
    else:
        tx_sock.budget = 99
    assert tx.send_batch(items[3:]) == 7
    rx = BatchReceiver(rx_sock, use_mmsg=use_mmsg)
    assert [g[0] for g in drain(rx, rx_sock, 10)] == [data for data, _ in items]


def test_send_error_after_progress(make_sock: Callable[..., socket.socket], use_mmsg: bool) -> None:
    rx_sock, tx_sock = make_sock(), make_sock()
    dest = rx_sock.getsockname()
    items = [(b"a", dest), (b"b", dest), (bytes(70000), dest), (b"c", dest)]
    tx = BatchSender(tx_sock, use_mmsg=use_mmsg)
    assert tx.send_batch(items) == 2  # progress is reported, not lost in an exception
    with pytest.raises(OSError) as info:
        tx.send_batch(items[2:])  # the bad item now comes first: it raises
    assert info.value.errno == errno.EMSGSIZE
    assert tx.send_batch(items[3:]) == 1
    # An address the socket's family can't reach fails the same way (no DNS involved).
    bad_addr = [(b"d", dest), (b"e", ("::1", dest[1])), (b"f", dest)]
    assert tx.send_batch(bad_addr) == 1
    with pytest.raises(socket.gaierror):
        tx.send_batch(bad_addr[1:])
    rx = BatchReceiver(rx_sock, use_mmsg=use_mmsg)
    assert [g[0] for g in drain(rx, rx_sock, 4)] == [b"a", b"b", b"c", b"d"]


def test_connection_refused_is_not_an_error(
    make_sock: Callable[..., socket.socket], use_mmsg: bool
) -> None:
    closed = make_sock()
    dead_port = closed.getsockname()[1]
    closed.close()
    sock, peer = make_sock(), make_sock()
    sock.connect((LOCAL, dead_port))
    sock.send(b"ping")  # the ICMP port-unreachable leaves ECONNREFUSED pending
    rx = BatchReceiver(sock, use_mmsg=use_mmsg)
    assert rx.recv_batch() == 0
    # A pending error must not hide data queued behind it.
    sock.send(b"ping")
    sock.connect(peer.getsockname())
    peer.sendto(b"data", sock.getsockname())
    assert [g[0] for g in drain(rx, sock, 1)] == [b"data"]


def test_closed_socket_raises(make_sock: Callable[..., socket.socket], use_mmsg: bool) -> None:
    sock = make_sock()
    rx = BatchReceiver(sock, use_mmsg=use_mmsg)
    tx = BatchSender(sock, use_mmsg=use_mmsg)
    sock.close()
    with pytest.raises(OSError) as info:
        rx.recv_batch()
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        tx.send_batch([(b"x", (LOCAL, 9))])
    assert info.value.errno == errno.EBADF


@pytest.mark.skipif(not mmsg._LIBC_MMSG, reason="libc lacks recvmmsg/sendmmsg")
def test_fallback_gives_identical_results(make_sock: Callable[..., socket.socket]) -> None:
    rx_sock, tx_sock = make_sock(), make_sock()
    dest = rx_sock.getsockname()
    items = [(payload(k, size), dest) for k, size in enumerate([0, 5, 584, 3000, 200, 65000])]
    results = []
    for use in (True, False):
        assert BatchSender(tx_sock, batch=4, use_mmsg=use).send_batch(items) == len(items)
        rx = BatchReceiver(rx_sock, batch=4, bufsize=2048, use_mmsg=use)
        counts = []
        got = []
        for _ in range(10):
            n = rx.recv_batch()
            counts.append(n)
            got += [(bytes(rx.packet(i)), rx.address(i), rx.truncated(i)) for i in range(n)]
            got.append(("iter", [(bytes(v), a) for v, a in rx.iter_packets()]))
            if n == 0:
                break
        results.append((counts, got))
    assert results[0] == results[1]
    assert results[0][0] == [4, 2, 0]


def test_env_var_and_flag_select_the_path(
    make_sock: Callable[..., socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = make_sock()
    monkeypatch.setenv("GWYH_NO_MMSG", "1")
    assert BatchReceiver(sock).using_mmsg is False
    assert BatchSender(sock).using_mmsg is False
    monkeypatch.delenv("GWYH_NO_MMSG")
    assert BatchReceiver(sock).using_mmsg is mmsg._LIBC_MMSG
    assert BatchSender(sock, use_mmsg=False).using_mmsg is False
    monkeypatch.setattr(mmsg, "_LIBC_MMSG", False)
    assert BatchReceiver(sock).using_mmsg is False
    with pytest.raises(RuntimeError):
        BatchSender(sock, use_mmsg=True)

    code = "from gwyh_mp.runtime import mmsg; print(mmsg.MMSG_AVAILABLE)"
    root = Path(__file__).resolve().parents[1]
    env = {"GWYH_NO_MMSG": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "False", out.stderr


def test_rejects_bad_arguments(make_sock: Callable[..., socket.socket]) -> None:
    sock = make_sock()
    with pytest.raises(ValueError):
        BatchReceiver(sock, batch=0)
    with pytest.raises(ValueError):
        BatchReceiver(sock, bufsize=0)
    with pytest.raises(ValueError):
        BatchSender(sock, batch=0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream, pytest.raises(ValueError):
        BatchReceiver(stream)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8,
    reason="checks the 64-bit Linux ABI",
)
def test_struct_layout_matches_64bit_linux() -> None:
    hdr = mmsg._MsgHdr
    assert ctypes.sizeof(hdr) == 56
    assert ctypes.sizeof(mmsg._MMsgHdr) == 64
    assert ctypes.sizeof(mmsg._IoVec) == 16
    offsets = {name: getattr(hdr, name).offset for name, _ in hdr._fields_}
    assert offsets == {
        "msg_name": 0,
        "msg_namelen": 8,
        "msg_iov": 16,
        "msg_iovlen": 24,
        "msg_control": 32,
        "msg_controllen": 40,
        "msg_flags": 48,
    }
    assert mmsg._MMsgHdr.msg_len.offset == 56
    assert ctypes.sizeof(mmsg._SockAddrIn) == 16
    assert ctypes.sizeof(mmsg._SockAddrIn6) == 28
