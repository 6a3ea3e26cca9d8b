"""Fault-injecting UDP relay: a user-space stand-in for ``tc netem``.

Tests, benchmarks and people rehearsing a bad network put real gwyh_mp nodes
behind this relay to get packet loss, delay, jitter, reordering, duplication
and rate limiting without root or kernel qdiscs.

Each *route* is ``(listen_addr, target_addr)``: something really listens on
``target`` and everyone else is told to reach it at ``listen``. A datagram
arriving on route k's listen socket from source S is handled in one of two ways:

* **mesh**: S is route j's target (node j's real socket). The datagram goes to
  target k *from route j's listen socket*, so node k learns j's address as
  ``listen_j`` and its replies cross the relay too. Every address a node learns
  is a relay address, hence every packet between nodes gets faults.
* **NAT**: S is unknown (a load generator, a client of a single node). A
  per-client upstream socket forwards to target k, and what the target sends
  back to that socket returns to S from ``listen_k``.

Faults are applied per packet and per direction, in this order: loss,
duplication, rate limiting (token bucket per directed link with a bounded,
tail-drop queue), then delay + jitter (+ reorder extra delay). As with netem,
jitter may reorder packets; without jitter a link stays FIFO except for packets
picked for reordering. All randomness comes from one ``random.Random(seed)``
and is drawn in an order that depends only on packet arrival order, never on
timing, so a run is reproducible given the same arrival order.

Command line::

    python -m gwyh_mp.relay --route 127.0.0.1:0=127.0.0.1:9000 --loss 0.05 --delay-ms 20

prints ``{"event":"ready","routes":[["127.0.0.1:P","127.0.0.1:9000"]]}`` on
stdout once bound, optional stats lines on stderr, and exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ipaddress
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Self

import orjson

Addr = tuple[str, int]
Route = tuple[Addr, Addr]

_RECV_BUF = 65536  # larger than any UDP payload, so datagrams are never truncated
_READ_BATCH = 64  # datagrams per readiness callback: bounded so sockets share the loop fairly
_BUFFER_BYTES = 4 * 1024 * 1024
_NAT_BUFFER_BYTES = 1024 * 1024  # per NAT client; thousands of them must not pin much memory
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_MAX_DELAY_MS = 3_600_000.0  # one hour: anything longer is surely a unit mistake
_FIFO_EPSILON = 1e-9  # seconds; see FaultModel.plan


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """What the relay does to each packet. Probabilities are in [0, 1]."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # uniform +/- around delay_ms; total delay is clamped at 0
    reorder: float = 0.0  # probability of an extra delay so that later packets overtake
    reorder_extra_ms: float | None = None  # None: max(10 ms, 2 * delay_ms)
    duplicate: float = 0.0
    rate_bytes_per_s: float = 0.0  # 0 = unlimited
    queue_bytes: int = 64 * 1024  # bytes a rate-limited link may hold back before tail-drop
    burst_bytes: int = 0  # token bucket depth; 0 = max(1500, 10 ms of rate)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "reorder", "duplicate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("delay_ms", "jitter_ms", "reorder_extra_ms"):
            value = getattr(self, name)
            if value is None and name == "reorder_extra_ms":
                continue
            if not _is_number(value) or not 0.0 <= value <= _MAX_DELAY_MS:
                raise ValueError(f"{name} must be between 0 and {_MAX_DELAY_MS:.0f}, got {value!r}")
        if not _is_number(self.rate_bytes_per_s) or self.rate_bytes_per_s < 0:
            raise ValueError(f"rate_bytes_per_s must be >= 0, got {self.rate_bytes_per_s!r}")
        for name, low in (("queue_bytes", 1), ("burst_bytes", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def reorder_extra_s(self) -> float:
        if self.reorder_extra_ms is not None:
            return self.reorder_extra_ms / 1000.0
        return max(10.0, 2.0 * self.delay_ms) / 1000.0

    @property
    def effective_burst_bytes(self) -> int:
        if self.burst_bytes:
            return self.burst_bytes
        return max(1500, int(self.rate_bytes_per_s / 100))


class Link:
    """Per directed link state: token bucket and FIFO guard."""

    __slots__ = ("fifo_last", "virtual")

    def __init__(self) -> None:
        # Time at which the token bucket is exactly empty; tokens at t are
        # min(burst, (t - virtual) * rate). Starts "long ago", i.e. full.
        self.virtual = -math.inf
        self.fifo_last = -math.inf  # last deadline given to an in-order packet


class FaultModel:
    """Pure decision logic (no sockets): which copies of a packet leave, and when.

    Kept separate from the relay so it can be tested exhaustively and reused by
    simulations. Counters are cumulative.
    """

    def __init__(self, profile: FaultProfile) -> None:
        self.profile = profile
        self._rng = random.Random(profile.seed)
        self._loss = profile.loss
        self._dup = profile.duplicate
        self._reorder = profile.reorder
        self._delay = profile.delay_ms / 1000.0
        self._jitter = profile.jitter_ms / 1000.0
        self._extra = profile.reorder_extra_s
        self._rate = float(profile.rate_bytes_per_s)
        self._queue = profile.queue_bytes
        self._burst_s = profile.effective_burst_bytes / self._rate if self._rate else 0.0
        # No fault configured: the relay can skip planning (and timers) entirely.
        self.passthrough = not (
            self._loss or self._dup or self._reorder or self._delay or self._jitter or self._rate
        )
        self.dropped_loss = 0
        self.dropped_rate = 0
        self.duplicated = 0
        self.reordered = 0

    def plan(self, link: Link, nbytes: int, now: float) -> list[float]:
        """Return the absolute send time of each copy (empty: the packet is dropped)."""
        rng = self._rng
        if self._loss and rng.random() < self._loss:
            self.dropped_loss += 1
            return []
        copies = 1
        if self._dup and rng.random() < self._dup:
            copies = 2
            self.duplicated += 1
        out: list[float] = []
        for _ in range(copies):
            # Draw every random number before the (timing dependent) rate
            # decision so the RNG stream depends on arrival order only.
            latency = self._delay
            if self._jitter:
                latency = max(0.0, latency + rng.uniform(-self._jitter, self._jitter))
            reordered = bool(self._reorder) and rng.random() < self._reorder
            depart = now
            if self._rate:
                start = max(link.virtual, now - self._burst_s)
                finish = start + nbytes / self._rate
                # (finish - now) * rate = bytes still waiting for tokens.
                if (finish - now) * self._rate > self._queue:
                    self.dropped_rate += 1
                    continue
                link.virtual = finish
                depart = max(now, finish)
            when = depart + latency
            if reordered:
                when += self._extra
                self.reordered += 1
            elif not self._jitter and when > now:
                # Equal deadlines may fire in either order on the default loop
                # (its timer heap is not stable), so in-order packets get
                # strictly increasing ones.
                if when <= link.fifo_last:
                    when = link.fifo_last + _FIFO_EPSILON
                link.fifo_last = when
            out.append(when)
        return out


class _NatClient:
    __slots__ = ("client", "down", "fd", "key", "route", "sock", "up")

    def __init__(self, key: tuple[int, Addr], route: int, client: Any, sock: socket.socket) -> None:
        self.key = key
        self.route = route
        self.client = client  # full sockaddr, as received
        self.sock = sock
        self.fd = sock.fileno()
        self.up = Link()  # client -> target
        self.down = Link()  # target -> client


def _tune_buffers(sock: socket.socket, nbytes: int) -> None:
    # The *FORCE variants ignore net.core.[rw]mem_max but need CAP_NET_ADMIN.
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
                continue
            except OSError:
                pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)
        except OSError:
            pass


def _check_addr(addr: object, what: str, *, allow_port_zero: bool) -> Addr:
    if not (isinstance(addr, tuple | list) and len(addr) == 2):
        raise ValueError(f"{what} must be a (host, port) pair, got {addr!r}")
    host, port = addr
    low = 0 if allow_port_zero else 1
    if not isinstance(host, str) or not host:
        raise ValueError(f"{what} host must be a non-empty string, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not low <= port <= 65535:
        raise ValueError(f"{what} port must be an integer in [{low}, 65535], got {port!r}")
    return (host, port)


def format_addr(addr: Sequence[Any]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _resolve(loop: asyncio.AbstractEventLoop, addr: Addr) -> tuple[int, Any]:
    try:
        infos = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {addr[0]!r}: {exc.strerror}") from None
    if not infos:
        raise ValueError(f"cannot resolve {addr[0]!r}")
    # Prefer IPv4: "localhost" may list ::1 first while nodes bind 127.0.0.1.
    family, _, _, _, sockaddr = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
    return family, sockaddr


class RelayMesh:
    """The relay. See the module docstring for the routing rules.

    Use ``async with RelayMesh(routes, profile) as mesh`` (or start/stop) on a
    running asyncio or uvloop loop; ``listen_addrs`` then holds the bound
    addresses (useful with port 0).
    """

    def __init__(
        self,
        routes: Sequence[Route],
        profile: FaultProfile | None = None,
        *,
        max_nat_clients: int = 4096,
        buffer_bytes: int = _BUFFER_BYTES,
    ) -> None:
        if not routes:
            raise ValueError("at least one route (listen_addr, target_addr) is required")
        checked: list[Route] = []
        for i, route in enumerate(routes):
            if not (isinstance(route, tuple | list) and len(route) == 2):
                raise ValueError(f"route {i} must be (listen_addr, target_addr), got {route!r}")
            listen = _check_addr(route[0], f"route {i} listen", allow_port_zero=True)
            target = _check_addr(route[1], f"route {i} target", allow_port_zero=False)
            checked.append((listen, target))
        if not isinstance(max_nat_clients, int) or max_nat_clients < 1:
            raise ValueError(f"max_nat_clients must be an integer >= 1, got {max_nat_clients!r}")
        self.routes = checked
        self.profile = profile if profile is not None else FaultProfile()
        self._model = FaultModel(self.profile)
        self._max_nat = max_nat_clients
        self._buffer_bytes = buffer_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> "running" -> "stopped"; no restart
        self._socks: list[socket.socket] = []
        self._targets: list[Any] = []  # resolved sockaddrs
        self._target_keys: list[Addr] = []
        self._by_target: dict[Addr, int] = {}
        self._listen_addrs: list[Addr] = []
        self._mesh_links: dict[tuple[int, int], Link] = {}
        self._nat: OrderedDict[tuple[int, Addr], _NatClient] = OrderedDict()
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)
        self.received = 0
        self.forwarded = 0
        self.bytes_received = 0
        self.bytes_forwarded = 0
        self.delayed = 0
        self.pending = 0
        self.dropped_error = 0  # send failed, socket gone, or still pending at stop
        self.dropped_foreign = 0  # NAT upstream got a datagram not from its target
        self.nat_evicted = 0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("a RelayMesh can be started only once")
        loop = asyncio.get_running_loop()
        try:
            for i, (listen, target) in enumerate(self.routes):
                family, listen_sa = await _resolve(loop, listen)
                _, target_sa = await _resolve(loop, target)
                sock = socket.socket(family, socket.SOCK_DGRAM)
                self._socks.append(sock)
                sock.setblocking(False)
                _tune_buffers(sock, self._buffer_bytes)
                try:
                    sock.bind(listen_sa)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot bind {format_addr(listen)}: {exc.strerror}"
                    ) from None
                self._listen_addrs.append(tuple(sock.getsockname()[:2]))  # type: ignore[arg-type]
                key: Addr = tuple(target_sa[:2])  # type: ignore[assignment]
                if key in self._by_target:
                    raise ValueError(f"route {i}: target {format_addr(key)} is used twice")
                self._by_target[key] = i
                self._targets.append(target_sa)
                self._target_keys.append(key)
            for i, key in enumerate(self._target_keys):
                if key in self._listen_addrs:
                    # The relay would forward to itself, forever.
                    raise ValueError(f"route {i}: target {format_addr(key)} is a relay address")
            for k, sock in enumerate(self._socks):
                loop.add_reader(sock.fileno(), self._on_listen, k)
        except BaseException:
            for sock in self._socks:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock.fileno())
                sock.close()
            self._socks.clear()
            self._state = "stopped"
            raise
        self._loop = loop
        self._state = "running"

    async def stop(self) -> None:
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        loop = self._loop
        assert loop is not None
        for nat in list(self._nat.values()):
            self._close_nat(nat)
        self._nat.clear()
        for sock in self._socks:
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()
        # Timers still scheduled become no-ops; count their packets as lost now.
        self.dropped_error += self.pending
        self.pending = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def listen_addrs(self) -> list[Addr]:
        """Actual bound listen address of each route (after start)."""
        return list(self._listen_addrs)

    @property
    def target_addrs(self) -> list[Addr]:
        """Resolved target address of each route (after start)."""
        return list(self._target_keys)

    @property
    def running(self) -> bool:
        return self._state == "running"

    def stats(self) -> dict[str, int]:
        """Counters. Invariant: received + duplicated == forwarded + pending + all dropped_*."""
        model = self._model
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "dropped_loss": model.dropped_loss,
            "dropped_rate": model.dropped_rate,
            "dropped_error": self.dropped_error,
            "dropped_foreign": self.dropped_foreign,
            "duplicated": model.duplicated,
            "reordered": model.reordered,
            "delayed": self.delayed,
            "pending": self.pending,
            "nat_clients": len(self._nat),
            "nat_evicted": self.nat_evicted,
            "bytes_received": self.bytes_received,
            "bytes_forwarded": self.bytes_forwarded,
        }

    # -- datapath --------------------------------------------------------------

    def _read(self, sock: socket.socket) -> Iterator[tuple[int, Any]]:
        """Up to _READ_BATCH (length, source) of datagrams read into self._buf, counted."""
        buf = self._buf
        for _ in range(_READ_BATCH):
            try:
                n, src = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. a queued ICMP error; consumed by this call, so keep reading.
                continue
            self.received += 1
            self.bytes_received += n
            yield n, src

    def _on_listen(self, k: int) -> None:
        view = self._view
        for n, src in self._read(self._socks[k]):
            data = bytes(view[:n])
            j = self._by_target.get(src[:2])
            if j is not None:
                link = self._mesh_links.get((j, k))
                if link is None:
                    link = self._mesh_links[(j, k)] = Link()
                self._forward(link, data, self._socks[j], self._targets[k])
                continue
            nat = self._nat_for(k, src)
            if nat is None:
                self.dropped_error += 1
                continue
            self._forward(nat.up, data, nat.sock, self._targets[k])

    def _on_upstream(self, nat: _NatClient) -> None:
        if self._nat.get(nat.key) is not nat:
            return  # evicted; its reader is already gone
        view = self._view
        target_key = self._target_keys[nat.route]
        for n, src in self._read(nat.sock):
            if src[:2] != target_key:
                self.dropped_foreign += 1
                continue
            self._nat.move_to_end(nat.key)
            self._forward(nat.down, bytes(view[:n]), self._socks[nat.route], nat.client)

    def _nat_for(self, k: int, src: Any) -> _NatClient | None:
        key: tuple[int, Addr] = (k, src[:2])
        nat = self._nat.get(key)
        if nat is not None:
            self._nat.move_to_end(key)
            return nat
        if len(self._nat) >= self._max_nat:
            _, oldest = self._nat.popitem(last=False)
            self._close_nat(oldest)
            self.nat_evicted += 1
        target = self._targets[k]
        family = socket.AF_INET6 if len(target) == 4 else socket.AF_INET
        try:
            loopback = ipaddress.ip_address(target[0].split("%", 1)[0]).is_loopback
        except ValueError:
            loopback = False
        host = ("::1" if family == socket.AF_INET6 else "127.0.0.1") if loopback else ""
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return None  # out of descriptors: drop this packet, keep running
        try:
            sock.setblocking(False)
            _tune_buffers(sock, min(self._buffer_bytes, _NAT_BUFFER_BYTES))
            sock.bind((host, 0))
            nat = _NatClient(key, k, src, sock)
            assert self._loop is not None
            self._loop.add_reader(nat.fd, self._on_upstream, nat)
        except Exception:
            sock.close()
            return None
        self._nat[key] = nat
        return nat

    def _close_nat(self, nat: _NatClient) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(nat.fd)
        nat.sock.close()

    def _forward(self, link: Link, data: bytes, sock: socket.socket, dest: Any) -> None:
        if self._model.passthrough:
            self._send(sock, data, dest)
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for when in self._model.plan(link, len(data), now):
            if when <= now:
                self._send(sock, data, dest)
            else:
                # One timer handle per delayed packet; no task per packet.
                self.delayed += 1
                self.pending += 1
                loop.call_at(when, self._fire, sock, data, dest)

    def _fire(self, sock: socket.socket, data: bytes, dest: Any) -> None:
        if self._state != "running":
            return  # already counted as dropped_error by stop()
        self.pending -= 1
        self._send(sock, data, dest)

    def _send(self, sock: socket.socket, data: bytes, dest: Any) -> None:
        try:
            sock.sendto(data, dest)
        except OSError:
            # Full send buffer, evicted NAT socket, unreachable: a lost packet.
            self.dropped_error += 1
            return
        self.forwarded += 1
        self.bytes_forwarded += len(data)


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class RelayThread:
    """Run a RelayMesh on its own event loop in a background thread.

    ``with RelayThread([(("127.0.0.1", 0), node_addr)], FaultProfile(loss=0.1)) as r:``
    then send to ``r.listen_addrs[0]``. ``stats()`` is safe to call from any thread.
    """

    def __init__(
        self,
        mesh: RelayMesh | Sequence[Route],
        profile: FaultProfile | None = None,
        *,
        use_uvloop: bool = True,
        start_timeout: float = 30.0,
        max_nat_clients: int = 4096,
    ) -> None:
        if isinstance(mesh, RelayMesh):
            if profile is not None:
                raise TypeError("pass the profile to RelayMesh, not RelayThread")
            self.mesh = mesh
        else:
            self.mesh = RelayMesh(mesh, profile, max_nat_clients=max_nat_clients)
        self._use_uvloop = use_uvloop
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("RelayThread already started")
        self._thread = threading.Thread(target=self._run, name="gwyh-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            self.stop()
            raise TimeoutError(f"relay did not start within {self._start_timeout} s")
        if self._error is not None:
            self._thread.join(self._start_timeout)
            raise self._error
        return self

    def _run(self) -> None:
        loop = _new_loop(self._use_uvloop)
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self.mesh.start())
            except BaseException as exc:
                self._error = exc
                return
            self._loop = loop
            self._ready.set()
            # stop() sets the flag before reading _loop, so it either reaches
            # this check or stops the loop we are about to run.
            if not self._stopping.is_set():
                loop.run_forever()
            loop.run_until_complete(self.mesh.stop())
        finally:
            self._ready.set()
            asyncio.set_event_loop(None)
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        loop, thread = self._loop, self._thread
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def listen_addrs(self) -> list[Addr]:
        return self.mesh.listen_addrs

    @property
    def target_addrs(self) -> list[Addr]:
        return self.mesh.target_addrs

    def stats(self, timeout: float = 30.0) -> dict[str, int]:
        """A consistent snapshot, taken on the relay's own loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return self.mesh.stats()
        fut: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()
        try:
            loop.call_soon_threadsafe(lambda: fut.set_result(self.mesh.stats()))
        except RuntimeError:
            return self.mesh.stats()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return fut.result(0.05)
            except TimeoutError:
                if not thread.is_alive():  # loop stopped before running our callback
                    return self.mesh.stats()
        raise TimeoutError("relay loop did not answer a stats request")


# -- command line --------------------------------------------------------------

_PROG = "gwyh_mp.relay"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage; we want exactly one line.
        raise _UsageError(message)


def _parse_hostport(text: str, *, allow_port_zero: bool) -> Addr:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses as [HOST]:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    low = 0 if allow_port_zero else 1
    if not host or not low <= port <= 65535:
        raise ValueError(f"bad address {text!r} (port must be {low}..65535)")
    return (host, port)


def _route_arg(text: str) -> Route:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LISTEN=TARGET, got {text!r}")
    try:
        return (
            _parse_hostport(listen, allow_port_zero=True),
            _parse_hostport(target, allow_port_zero=False),
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"python -m {_PROG}",
        description="Fault-injecting UDP relay (user-space netem) for gwyh_mp nodes.",
    )
    p.add_argument(
        "--route",
        action="append",
        type=_route_arg,
        required=True,
        metavar="LISTEN=TARGET",
        help="HOST:PORT=HOST:PORT; repeat for a mesh. LISTEN port 0 picks a free port",
    )
    p.add_argument("--loss", type=float, default=0.0, help="drop probability")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- around the delay")
    p.add_argument("--reorder", type=float, default=0.0, help="probability of an extra delay")
    p.add_argument("--reorder-extra-ms", type=float, default=None)
    p.add_argument("--duplicate", type=float, default=0.0, help="probability of a second copy")
    p.add_argument("--rate", type=float, default=0.0, help="bytes/s per directed link, 0 = off")
    p.add_argument("--queue-bytes", type=int, default=64 * 1024)
    p.add_argument("--burst-bytes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-nat-clients", type=int, default=4096)
    p.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="print a stats JSON line to stderr every S seconds (0 = never)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def _emit(stream: Any, obj: dict[str, Any]) -> None:
    try:
        stream.write(orjson.dumps(obj).decode() + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # closed pipe: the relay itself keeps working


async def _serve(mesh: RelayMesh, stats_interval: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await mesh.start()
    try:
        routes = [
            [format_addr(listen), format_addr(target)]
            for listen, target in zip(mesh.listen_addrs, mesh.target_addrs, strict=True)
        ]
        _emit(sys.stdout, {"event": "ready", "routes": routes})
        while not stop.is_set():
            if stats_interval > 0:
                try:
                    await asyncio.wait_for(stop.wait(), stats_interval)
                except TimeoutError:
                    _emit(sys.stderr, {"event": "stats", **mesh.stats()})
            else:
                await stop.wait()
    finally:
        await mesh.stop()
        if stats_interval > 0:
            _emit(sys.stderr, {"event": "stats", "final": True, **mesh.stats()})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 after SIGTERM/SIGINT, 2 on bad arguments, 1 on other errors."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if not (math.isfinite(args.stats_interval) and args.stats_interval >= 0):
            raise _UsageError("--stats-interval must be >= 0")
        profile = FaultProfile(
            loss=args.loss,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            reorder=args.reorder,
            reorder_extra_ms=args.reorder_extra_ms,
            duplicate=args.duplicate,
            rate_bytes_per_s=args.rate,
            queue_bytes=args.queue_bytes,
            burst_bytes=args.burst_bytes,
            seed=args.seed,
        )
        mesh = RelayMesh(args.route, profile, max_nat_clients=args.max_nat_clients)
    except (_UsageError, ValueError) as exc:
        _error_line(str(exc))
        return 2
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = lambda: _new_loop(  # noqa: E731
        not args.no_uvloop
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(mesh, args.stats_interval))
    except ValueError as exc:  # unresolvable host, target pointing back at the relay
        _error_line(str(exc))
        return 2
    except OSError as exc:  # cannot bind, out of descriptors
        _error_line(str(exc))
        return 1
    except KeyboardInterrupt:  # signal before our handlers were installed
        return 0


def _error_line(message: str) -> None:
    print(f"{_PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _early_term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM during start-up (before the loop's handlers exist) still exits 0.
    signal.signal(signal.SIGTERM, _early_term)
    sys.exit(main())


__all__ = [
    "Addr",
    "FaultModel",
    "FaultProfile",
    "Link",
    "RelayMesh",
    "RelayThread",
    "Route",
    "format_addr",
    "main",
]
