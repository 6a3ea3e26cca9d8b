"""Tests for the fault-injecting UDP relay (gwyh_mp.relay).

Everything runs on 127.0.0.1. Waits are condition polls with generous
deadlines; senders are paced on the relay's own receive counter so no kernel
buffer can overflow on a slow machine; nothing asserts an upper time bound.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.relay import FaultModel, FaultProfile, Link, RelayMesh, RelayThread, main

LOCAL = "127.0.0.1"
DEADLINE_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent
Addr = tuple[str, int]


def wait_until(pred: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


class Peer:
    """A UDP socket on 127.0.0.1 whose reader thread records (data, src, time)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE works when root
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                break
            except OSError:
                pass
        self.sock.bind((LOCAL, 0))
        self.sock.settimeout(0.05)
        self.addr: Addr = self.sock.getsockname()
        self.got: list[tuple[bytes, Addr, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((data, src, time.monotonic()))
            if self.echo:
                self.sock.sendto(data, src)

    def send(self, data: bytes, dest: Addr) -> None:
        self.sock.sendto(data, dest)

    def payloads(self) -> list[bytes]:
        return [data for data, _, _ in self.got]

    def wait_count(self, n: int) -> None:
        wait_until(lambda: len(self.got) >= n, f"{n} datagrams at {self.addr}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(echo: bool = False) -> Peer:
        made.append(Peer(echo))
        return made[-1]

    yield make
    for p in made:
        p.close()


def route_to(*targets: Addr) -> list[tuple[Addr, Addr]]:
    return [((LOCAL, 0), t) for t in targets]


def send_paced(
    relay: RelayThread, sender: Peer, dest: Addr, payloads: Sequence[bytes], chunk: int = 25
) -> None:
    """Send in chunks, each once the relay has read the previous one."""
    base = relay.stats()["received"]
    for i in range(0, len(payloads), chunk):
        for data in payloads[i : i + chunk]:
            sender.send(data, dest)
        want = base + min(i + chunk, len(payloads))
        wait_until(lambda want=want: relay.stats()["received"] >= want, f"relay to read {want}")


def assert_accounting(s: dict[str, int]) -> None:
    dropped = s["dropped_loss"] + s["dropped_rate"] + s["dropped_error"] + s["dropped_foreign"]
    assert s["received"] + s["duplicated"] == s["forwarded"] + dropped + s["pending"], s


def settle_one_way(relay: RelayThread, sink: Peer, sent: int) -> dict[str, int]:
    """Wait until the relay saw `sent` datagrams, released them all, and the sink has them."""

    def done() -> bool:
        s = relay.stats()
        return s["received"] == sent and s["pending"] == 0 and len(sink.got) == s["forwarded"]

    wait_until(done, "the relay to settle")
    return relay.stats()


def seqs(payloads: Sequence[bytes]) -> list[int]:
    return [int.from_bytes(p[:4], "big") for p in payloads]


def numbered(n: int, size: int = 8) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(n)]


# -- profile validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": -0.1},
        {"loss": 1.5},
        {"duplicate": float("nan")},
        {"reorder": True},
        {"delay_ms": -1},
        {"jitter_ms": float("inf")},
        {"reorder_extra_ms": -5},
        {"rate_bytes_per_s": -1},
        {"queue_bytes": 0},
        {"burst_bytes": 1.5},
        {"seed": "x"},
    ],
)
def test_profile_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FaultProfile(**kwargs)


def test_profile_defaults() -> None:
    assert FaultProfile(delay_ms=3).reorder_extra_s == pytest.approx(0.010)
    assert FaultProfile(delay_ms=30).reorder_extra_s == pytest.approx(0.060)
    assert FaultProfile(reorder_extra_ms=7).reorder_extra_s == pytest.approx(0.007)
    assert FaultProfile(rate_bytes_per_s=1e6).effective_burst_bytes == 10_000


@pytest.mark.parametrize(
    "routes",
    [
        [],
        [((LOCAL, 0), (LOCAL, 0))],
        [((LOCAL, -1), (LOCAL, 9))],
        [(("", 0), (LOCAL, 9))],
        [((LOCAL, 0),)],
    ],
)
def test_mesh_rejects_bad_routes(routes: Any) -> None:
    with pytest.raises(ValueError):
        RelayMesh(routes)


def test_mesh_rejects_duplicate_target_and_self_loop(peer: Callable[..., Peer]) -> None:
    node = peer()
    with pytest.raises(ValueError, match="used twice"):
        RelayThread(route_to(node.addr, node.addr)).start()
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((LOCAL, 0))
    port = holder.getsockname()[1]
    holder.close()  # the relay binds this port itself and is told to forward to it
    with pytest.raises(ValueError, match="relay address"):
        RelayThread([((LOCAL, port), (LOCAL, port))]).start()


# -- the pure model ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 1),
    dup=st.floats(0, 1),
    reorder=st.floats(0, 1),
    jitter=st.floats(0, 50),
    rate=st.sampled_from([0.0, 5_000.0, 1e6]),
    arrivals=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2000), st.floats(0, 0.01)), max_size=80
    ),
)
def test_model_is_reproducible(
    seed: int,
    loss: float,
    dup: float,
    reorder: float,
    jitter: float,
    rate: float,
    arrivals: list[tuple[int, int, float]],
) -> None:
    profile = FaultProfile(
        loss=loss,
        duplicate=dup,
        reorder=reorder,
        delay_ms=5,
        jitter_ms=jitter,
        rate_bytes_per_s=rate,
        seed=seed,
    )

    def run() -> list[list[float]]:
        model = FaultModel(profile)
        links = [Link() for _ in range(3)]
        now = 100.0
        out = []
        for link, size, dt in arrivals:
            now += dt
            whens = model.plan(links[link], size, now)
            assert all(w >= now for w in whens)
            out.append(whens)
        return out

    assert run() == run()


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(1_000, 1e7),
    queue=st.integers(1_500, 100_000),
    burst=st.integers(1_500, 20_000),
    arrivals=st.lists(st.tuples(st.integers(1, 1500), st.floats(0, 0.02)), max_size=200),
)
def test_model_token_bucket(
    rate: float, queue: int, burst: int, arrivals: list[tuple[int, float]]
) -> None:
    model = FaultModel(FaultProfile(rate_bytes_per_s=rate, queue_bytes=queue, burst_bytes=burst))
    link = Link()
    now = 50.0
    sent: list[tuple[int, float]] = []  # (size, departure) of accepted packets
    for size, dt in arrivals:
        now += dt
        whens = model.plan(link, size, now)
        assert len(whens) <= 1
        if whens:
            sent.append((size, whens[0]))
        # Bytes admitted but not yet released never exceed the queue (+ the
        # packet in service, which the virtual clock charges fractionally).
        held = sum(s for s, d in sent if d > now)
        assert held <= queue + 1500
    departures = [d for _, d in sent]
    assert departures == sorted(departures)  # FIFO
    for i in range(len(sent)):  # never faster than rate, beyond one burst
        total = 0
        for j in range(i, len(sent)):
            total += sent[j][0]
            assert total <= burst + rate * (sent[j][1] - sent[i][1]) + 1e-3
    assert model.dropped_rate == len(arrivals) - len(sent)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 1500), max_size=100), rate=st.floats(1_000, 1e6))
def test_model_conforming_traffic_is_untouched(sizes: list[int], rate: float) -> None:
    model = FaultModel(FaultProfile(rate_bytes_per_s=rate, burst_bytes=1500))
    link = Link()
    now = 10.0
    for size in sizes:
        assert model.plan(link, size, now) == [now]
        now += size / rate * 1.0001  # arrivals no faster than the token refill
    assert model.dropped_rate == 0


def test_model_fifo_ties_without_jitter() -> None:
    model = FaultModel(FaultProfile(delay_ms=10))
    link = Link()
    whens = [model.plan(link, 100, 1.0)[0] for _ in range(50)]  # same arrival instant
    assert all(a < b for a, b in itertools.pairwise(whens))
    assert whens[0] == pytest.approx(1.010)


# -- real sockets -------------------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_point_to_point_echo_no_faults(peer: Callable[..., Peer], use_uvloop: bool) -> None:
    server, client = peer(echo=True), peer()
    big = [bytes([i % 251]) * size for i, size in enumerate([0, 1, 100, 1400, 9000, 65507])]
    small = [i.to_bytes(4, "big") + os.urandom(60) for i in range(200)]
    with RelayThread(route_to(server.addr), use_uvloop=use_uvloop) as relay:
        (listen,) = relay.listen_addrs
        assert listen[0] == LOCAL and listen[1] != 0
        assert relay.target_addrs == [server.addr]
        send_paced(relay, client, listen, big, chunk=1)
        send_paced(relay, client, listen, small)
        total = len(big) + len(small)
        client.wait_count(total)
        assert client.payloads() == big + small  # intact and, with no faults, in order
        assert {src for _, src, _ in client.got} == {listen}
        assert {src for _, src, _ in server.got} != {client.addr}  # reached via NAT socket
        wait_until(lambda: relay.stats()["forwarded"] == 2 * total, "echo replies forwarded")
        s = relay.stats()
        assert s["received"] == 2 * total and s["nat_clients"] == 1
        assert s["dropped_loss"] == s["dropped_rate"] == s["dropped_error"] == 0
        assert_accounting(s)
    assert relay.stats()["nat_clients"] == 0  # upstream sockets closed on stop


async def test_async_api_on_running_loop(peer: Callable[..., Peer]) -> None:
    server, client = peer(echo=True), peer()
    async with RelayMesh(route_to(server.addr), FaultProfile(delay_ms=1)) as mesh:
        assert mesh.running
        (listen,) = mesh.listen_addrs
        for i in range(10):
            client.send(b"ping %d" % i, listen)
        deadline = time.monotonic() + DEADLINE_S
        while len(client.got) < 10:
            assert time.monotonic() < deadline, "echoes did not come back"
            await asyncio.sleep(0.005)
        assert sorted(client.payloads()) == sorted(b"ping %d" % i for i in range(10))
        assert mesh.stats()["delayed"] >= 10
    assert not mesh.running
    assert_accounting(mesh.stats())


def test_loss_band_and_accounting(peer: Callable[..., Peer]) -> None:
    sink, sender = peer(), peer()
    n = 1000
    with RelayThread(route_to(sink.addr), FaultProfile(loss=0.3, seed=1234)) as relay:
        send_paced(relay, sender, relay.listen_addrs[0], numbered(n), chunk=50)
        s = settle_one_way(relay, sink, n)
    assert 200 <= s["dropped_loss"] <= 400, s
    assert s["forwarded"] + s["dropped_loss"] == n
    assert s["duplicated"] == s["dropped_rate"] == s["dropped_error"] == 0
    assert_accounting(s)
    got = seqs(sink.payloads())
    assert len(set(got)) == len(got) == s["forwarded"]
    assert set(got) <= set(range(n))


def _delivered(make_peer: Callable[..., Peer], seed: int) -> list[int]:
    sink, sender = make_peer(), make_peer()
    n = 300
    with RelayThread(route_to(sink.addr), FaultProfile(loss=0.5, seed=seed)) as relay:
        send_paced(relay, sender, relay.listen_addrs[0], numbered(n), chunk=50)
        settle_one_way(relay, sink, n)
    return sorted(seqs(sink.payloads()))


def test_same_seed_same_drop_pattern(peer: Callable[..., Peer]) -> None:
    first = _delivered(peer, seed=7)
    assert _delivered(peer, seed=7) == first
    assert _delivered(peer, seed=8) != first
    # The live relay made exactly the decisions the pure model makes.
    model = FaultModel(FaultProfile(loss=0.5, seed=7))
    link = Link()
    assert [i for i in range(300) if model.plan(link, 8, 0.0)] == first


@pytest.mark.parametrize(("delay_ms", "jitter_ms"), [(60, 0), (40, 20)])
def test_delay_is_never_early(peer: Callable[..., Peer], delay_ms: int, jitter_ms: int) -> None:
    sink, sender = peer(), peer()
    floor_s = (delay_ms - jitter_ms) / 1000 - 0.005  # ~1 ms timer granularity, with margin
    profile = FaultProfile(delay_ms=delay_ms, jitter_ms=jitter_ms, seed=3)
    with RelayThread(route_to(sink.addr), profile) as relay:
        listen = relay.listen_addrs[0]
        for i in range(8):
            sent_at = time.monotonic()
            sender.send(b"d%d" % i, listen)
            sink.wait_count(i + 1)
            assert sink.got[i][2] - sent_at >= floor_s
        s = settle_one_way(relay, sink, 8)
    assert s["delayed"] == 8 and s["forwarded"] == 8


def test_duplicate_doubles_every_packet(peer: Callable[..., Peer]) -> None:
    sink, sender = peer(), peer()
    n = 40
    with RelayThread(route_to(sink.addr), FaultProfile(duplicate=1.0)) as relay:
        send_paced(relay, sender, relay.listen_addrs[0], numbered(n))
        s = settle_one_way(relay, sink, n)
    assert s["duplicated"] == n and s["forwarded"] == 2 * n
    assert collections.Counter(seqs(sink.payloads())) == {i: 2 for i in range(n)}
    assert_accounting(s)


def test_reorder_lets_later_packets_overtake(peer: Callable[..., Peer]) -> None:
    sink, sender = peer(), peer()
    n = 40
    # A large extra delay makes "a later packet overtakes" robust on a slow machine.
    profile = FaultProfile(reorder=0.3, reorder_extra_ms=400, seed=5)
    with RelayThread(route_to(sink.addr), profile) as relay:
        send_paced(relay, sender, relay.listen_addrs[0], numbered(n), chunk=10)
        s = settle_one_way(relay, sink, n)
    order = seqs(sink.payloads())
    assert sorted(order) == list(range(n))
    assert order != sorted(order)
    model = FaultModel(profile)
    link = Link()
    expected = sum(1 for _ in range(n) if model.plan(link, 8, 0.0) != [0.0])
    assert 0 < s["reordered"] == expected < n


def test_rate_limit_tail_drops_and_counts(peer: Callable[..., Peer]) -> None:
    sink, sender = peer(), peer()
    n = 150
    profile = FaultProfile(rate_bytes_per_s=20_000, queue_bytes=5_000, burst_bytes=1_500)
    with RelayThread(route_to(sink.addr), profile) as relay:
        # 25 kB per chunk against a 1.5 kB bucket and a 5 kB queue: most must drop.
        send_paced(relay, sender, relay.listen_addrs[0], numbered(n, size=1000))
        s = settle_one_way(relay, sink, n)
    assert s["dropped_rate"] > 0
    assert s["forwarded"] > 0
    assert s["forwarded"] + s["dropped_rate"] == n
    assert_accounting(s)
    got = seqs(sink.payloads())
    assert got == sorted(got)  # a rate-limited link is still FIFO


def test_mesh_nodes_see_relay_addresses(peer: Callable[..., Peer]) -> None:
    nodes = [peer(), peer(), peer()]
    with RelayThread(route_to(*(p.addr for p in nodes)), FaultProfile(delay_ms=2)) as relay:
        listen = relay.listen_addrs
        assert len(set(listen)) == 3
        for a in range(3):
            for b in range(3):
                if a == b:
                    continue
                msg = b"%d->%d" % (a, b)
                nodes[a].send(msg, listen[b])
                wait_until(lambda b=b, msg=msg: msg in nodes[b].payloads(), f"{msg!r}")
                src = next(src for data, src, _ in nodes[b].got if data == msg)
                assert src == listen[a]  # node b learns a's relay address
                reply = b"re:" + msg
                nodes[b].send(reply, src)  # ...and replying to it reaches node a
                wait_until(lambda a=a, r=reply: r in nodes[a].payloads(), f"{reply!r}")
                assert next(s for d, s, _ in nodes[a].got if d == reply) == listen[b]
        s = relay.stats()
    assert s["nat_clients"] == 0
    assert s["received"] == s["forwarded"] == s["delayed"] == 12  # faults on both legs
    for node in nodes:
        assert len(node.got) == 4  # nothing leaked to the wrong node


def test_nat_clients_are_bounded_lru(peer: Callable[..., Peer]) -> None:
    server = peer(echo=True)
    clients = [peer(), peer(), peer()]
    with RelayThread(route_to(server.addr), max_nat_clients=2) as relay:
        listen = relay.listen_addrs[0]
        for round_ in range(2):
            for i, client in enumerate(clients):
                client.send(b"c%d" % i, listen)
                client.wait_count(round_ + 1)
        s = relay.stats()
        assert s["nat_clients"] == 2
        assert s["nat_evicted"] == 4  # round-robin over 3 clients with room for 2
        assert all(c.payloads() == [b"c%d" % i] * 2 for i, c in enumerate(clients))
    assert relay.stats()["nat_clients"] == 0


def test_foreign_datagram_on_nat_socket_is_dropped(peer: Callable[..., Peer]) -> None:
    server, client, stranger = peer(), peer(), peer()
    with RelayThread(route_to(server.addr)) as relay:
        client.send(b"hello", relay.listen_addrs[0])
        server.wait_count(1)
        upstream = server.got[0][1]  # the relay's per-client NAT socket
        stranger.send(b"spoof", upstream)
        wait_until(lambda: relay.stats()["dropped_foreign"] == 1, "foreign datagram dropped")
        server.send(b"genuine", upstream)
        client.wait_count(1)
        assert client.payloads() == [b"genuine"]
        assert_accounting(relay.stats())


# -- command line ----------------------------------------------------------------


def _relay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gwyh_mp.relay", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_cli_ready_traffic_and_sigterm(peer: Callable[..., Peer]) -> None:
    server, client = peer(echo=True), peer()
    route = f"{LOCAL}:0={LOCAL}:{server.addr[1]}"
    args = f"--route {route} --delay-ms 2 --seed 3 --stats-interval 0.05".split()
    proc = subprocess.Popen(
        _relay_cmd(*args),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines: queue.Queue[bytes] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        ready = orjson.loads(lines.get(timeout=DEADLINE_S))
        assert ready["event"] == "ready"
        [[listen_text, target_text]] = ready["routes"]
        assert target_text == f"{LOCAL}:{server.addr[1]}"
        host, port = listen_text.rsplit(":", 1)
        listen = (host, int(port))
        assert host == LOCAL and listen[1] != 0
        for i in range(5):
            client.send(b"cli %d" % i, listen)
        client.wait_count(5)
        assert sorted(client.payloads()) == [b"cli %d" % i for i in range(5)]
        assert {src for _, src, _ in client.got} == {listen}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    stats = [orjson.loads(line) for line in err.splitlines() if line.strip()]
    assert stats and all(s["event"] == "stats" for s in stats)
    assert stats[-1]["forwarded"] == 10


def test_cli_bad_args_subprocess() -> None:
    proc = subprocess.run(
        _relay_cmd("--route", f"{LOCAL}:0={LOCAL}:0"),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "port" in err[0], err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--route", "nonsense"],
        ["--route", "127.0.0.1:0"],
        ["--route", "127.0.0.1:x=127.0.0.1:9"],
        ["--route", "::1:0=127.0.0.1:9"],
        ["--route", "127.0.0.1:0=127.0.0.1:70000"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--loss", "2"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--loss", "nan"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--jitter-ms", "-1"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--rate", "fast"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--queue-bytes", "0"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--stats-interval", "-1"],
        ["--route", "127.0.0.1:0=127.0.0.1:9", "--bogus"],
    ],
)
def test_cli_bad_args_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
