"""Every knob of a gwyh_mp node, with its default, its unit and why it is what it is.

Start from a preset (``Config.local()``, ``Config.lan()``, ``Config.wan()``) and
override what you need; ``validate()`` (run by the node at start) turns bad values
into one clear ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field

from gwyh_mp.protocol import wire
from gwyh_mp.protocol.selection import Strategy

Addr = tuple[str, int]
MIN_HEARTBEAT_INTERVAL_S = 0.01
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def parse_addr(text: str, *, default_host: str = "127.0.0.1") -> Addr:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[V6]:PORT`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address; expected HOST:PORT")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"bad address {text!r}; expected [V6ADDR]:PORT")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    else:
        host, port_text = "", text
    host = host or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in {text!r}; expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range 0-65535 in {text!r}")
    return host, port


@dataclass(slots=True)
class Config:
    # -- identity and network --------------------------------------------------
    bind: Addr = ("127.0.0.1", 6969)
    """UDP address to listen on (port 0 picks a free one)."""
    advertise: Addr | None = None
    """Address other nodes should use for us, if not the bind address (NAT, 0.0.0.0).
    Its port is kept as given (a port mapping); port 0 means "the bound port"."""
    psks: list[bytes] = field(default_factory=list)
    """Pre-shared keys. All are accepted; list old and new together while rotating."""
    bootstrap: list[Addr] = field(default_factory=list)
    """Seed peers to handshake with at start and whenever this node is isolated."""
    zone: str | None = None
    """Free-form zone label (datacenter, rack); None is a zone of its own."""
    name: str = ""
    """Human-readable node name (--name), carried in the member record; not unique."""
    tags: tuple[tuple[str, str], ...] = ()
    """KEY=VALUE labels (--tag), carried in the member record. A dict is accepted too;
    validate() turns it into (key, value) pairs sorted by key."""
    node_id: bytes | None = None
    """16 bytes; random by default, so a restarted process is a new node."""

    # -- membership ----------------------------------------------------------------
    strategy: Strategy = Strategy.UNIFORM
    """How providers are picked: uniform, hub-and-spoke, prefer-local, prefer-remote."""
    subscriptions: int = 5
    """N: how many providers this node receives broadcasts from (its in-degree)."""
    heartbeat_interval_s: float = 5.0
    """Providers heartbeat subscribers (and subscribers refresh) this often; at least
    MIN_HEARTBEAT_INTERVAL_S (shorter only spins the CPU)."""
    missed_heartbeats: int = 3
    """A provider silent for this many intervals is declared DOWN."""
    reassign_delay_s: tuple[float, float] = (0.05, 0.5)
    """Random delay before re-selecting providers, so bursts of changes coalesce."""
    peer_sync_interval_s: float = 30.0
    """How often to ask a provider for its member list (anti-entropy for lost news)."""
    max_members: int = 20_000
    """Most members the table holds (DOWN ones aside, which are bounded separately):
    news of further members is refused and counted (``members_refused``), except a
    member completing a handshake with us, which replaces one known only by hearsay.
    About 500 bytes each (measured): the default bounds the table near 10 MB."""
    peer_list_max_records: int = 1024
    """Member records in one answer to a peer-list request (one page, ~45 KB at most);
    views larger than that converge over successive anti-entropy rounds."""
    seed: int | None = None
    """Seed for peer selection; with a fixed node_id, selection is reproducible."""

    # -- handshake -------------------------------------------------------------------
    handshake_window_s: float = 60.0
    """A Hello's timestamp must be within this many seconds of our clock."""
    handshake_timeout_s: float = 10.0
    """Half-open handshakes are forgotten after this long."""
    handshake_retry_s: float = 1.0
    """Unanswered handshake packets are retransmitted this often."""
    max_half_open: int = 1024
    """Bound on responder handshakes waiting for their OkBoss."""

    # -- dissemination ---------------------------------------------------------------
    seen_set_size: int = 200_000
    """Message ids remembered for de-duplication (memory: ~100 B per id)."""
    max_datagram_bytes: int = 1400
    """Largest UDP payload we send: fits a 1500-byte Ethernet MTU with IPv6 headers."""
    max_message_bytes: int = 16 << 20
    """Largest broadcast accepted from the application or the network; larger than one
    datagram means fragmented, sent window by window and reassembled at every hop."""
    reassembly_memory_bytes: int = 256 << 20
    """Bound on memory held by partly received large messages, all peers together."""
    reassembly_timeout_s: float = 30.0
    """An incomplete large message that makes no progress this long is dropped."""

    catch_up_window_s: float = 30.0
    """A node back from a pause or a partition this long (or shorter) gets every broadcast
    it missed, exactly once (protocol/catch_up.py): each node keeps what it forwarded for
    this long. 30 s covers a VM migration, a GC or SIGSTOP stall and a short network cut
    at the LAN preset's heartbeat; older misses are counted (``catch_up_missed``) and
    logged. 0 turns catch-up off (nothing is kept)."""
    catch_up_bytes: int = 16 << 20
    """Bound on that history (entries plus ~120 B each of bookkeeping), and on what one
    peer may pull from this node per window. At 16 MiB it holds the full 30 s window up
    to ~2,000 msg/s of 150-byte messages; beyond, the window shrinks (oldest first) and
    the loss is counted."""

    # -- congestion control and backpressure -------------------------------------------
    send_rate_initial_bytes_per_s: int = 32 << 20
    """Starting pace of data to each peer; AIMD moves it between min and max."""
    send_rate_min_bytes_per_s: int = 64 << 10
    """Floor of the per-peer pace: loss never throttles a link below this."""
    send_rate_max_bytes_per_s: int = 1 << 30
    """Ceiling of the per-peer pace."""
    send_rate_increase_bytes_per_s: int = 1 << 20
    """Additive increase per loss-free interval (50 ms)."""
    link_queue_bytes: int = 8 << 20
    """Data waiting for one peer's pacer; forwarded datagrams beyond it are shed (counted)."""
    send_queue_bytes: int = 64 << 20
    """Above this much queued data, broadcast() waits (backpressure) instead of queueing."""
    flush_interval_s: float = 0.0
    """Coalescing window for traffic caused by received datagrams (forwards, replies): a
    node flushes at once when idle, but at most once per this interval under load, so
    entries that arrive meanwhile share datagrams (fewer packets to send, receive and
    decrypt at every hop). Costs up to this much latency per hop; 0 flushes after every
    receive batch. 0.005 halves CPU per delivery in the 10-node bench (README)."""

    # -- runtime ---------------------------------------------------------------------
    socket_buffer_bytes: int = 8 << 20
    """SO_RCVBUF/SO_SNDBUF request; bursts from many peers need deep buffers."""
    message_queue_size: int = 100_000
    """Delivered messages buffered for the application before the node applies
    backpressure to the network reader."""
    workers: int = 1
    """Receiver processes sharing the port (multiprocess runtime)."""
    ring_bytes: int = 16 << 20
    """Each receiver's two shared-memory rings (to and from the coordinator), in /dev/shm.
    Shrunk (halved, with a warning) at start when /dev/shm cannot hold them all."""

    # -- presets ---------------------------------------------------------------------
    @classmethod
    def local(cls, **overrides: object) -> Config:
        """One machine (tests, demos): fast heartbeats, jumbo loopback datagrams."""
        base: dict[str, object] = {
            "heartbeat_interval_s": 0.5,
            "peer_sync_interval_s": 5.0,
            "reassign_delay_s": (0.01, 0.1),
            "handshake_retry_s": 0.25,
            "max_datagram_bytes": 65_000,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def lan(cls, **overrides: object) -> Config:
        """A datacenter network: the defaults."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def wan(cls, **overrides: object) -> Config:
        """Links across regions: slower heartbeats, more patience, smaller datagrams."""
        base: dict[str, object] = {
            "heartbeat_interval_s": 10.0,
            "missed_heartbeats": 4,
            "handshake_retry_s": 2.0,
            "handshake_timeout_s": 20.0,
            "max_datagram_bytes": 1200,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> Config:
        """Raise ConfigError on the first invalid value; returns self for chaining."""
        if not self.psks:
            raise ConfigError("no pre-shared key configured (generate one: gwyh-node keygen)")
        if len(self.psks) > wire.MAX_PSKS_PER_HELLO:
            raise ConfigError(f"at most {wire.MAX_PSKS_PER_HELLO} pre-shared keys at once")
        for psk in self.psks:
            if len(psk) < 16:
                raise ConfigError("pre-shared keys must be at least 16 bytes")
        _check_addr("bind", self.bind)
        if self.advertise is not None:
            _check_addr("advertise", self.advertise)
        for addr in self.bootstrap:
            _check_addr("bootstrap", addr, names=True)
            if addr[1] == 0:
                raise ConfigError(f"bootstrap {addr[0]}:0: port 0 is not a peer's port")
        if self.zone is not None and len(self.zone.encode()) > wire.MAX_ZONE_BYTES:
            raise ConfigError(f"zone must be at most {wire.MAX_ZONE_BYTES} bytes of UTF-8")
        if isinstance(self.tags, dict):
            self.tags = tuple(self.tags.items())
        self.tags = tuple(sorted((str(k), str(v)) for k, v in self.tags))
        problem = wire.metadata_problem(self.name, self.tags)
        if problem is not None:
            raise ConfigError(problem)
        if self.node_id is not None and len(self.node_id) != wire.NODE_ID_BYTES:
            raise ConfigError(f"node_id must be {wire.NODE_ID_BYTES} bytes")
        if not isinstance(self.strategy, Strategy):
            try:
                self.strategy = Strategy.parse(str(self.strategy))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        _positive_int("subscriptions", self.subscriptions, maximum=64)
        _positive("heartbeat_interval_s", self.heartbeat_interval_s)
        if self.heartbeat_interval_s < MIN_HEARTBEAT_INTERVAL_S:
            raise ConfigError(
                f"heartbeat_interval_s must be >= {MIN_HEARTBEAT_INTERVAL_S}, "
                f"got {self.heartbeat_interval_s!r}"
            )
        _positive_int("missed_heartbeats", self.missed_heartbeats, maximum=100)
        _positive("peer_sync_interval_s", self.peer_sync_interval_s)
        _positive_int("max_members", self.max_members, minimum=16, maximum=10_000_000)
        _positive_int("peer_list_max_records", self.peer_list_max_records, minimum=16)
        low, high = self.reassign_delay_s
        if not 0 <= low <= high:
            raise ConfigError("reassign_delay_s must be (low, high) with 0 <= low <= high")
        _positive("handshake_window_s", self.handshake_window_s)
        _positive("handshake_timeout_s", self.handshake_timeout_s)
        _positive("handshake_retry_s", self.handshake_retry_s)
        _positive_int("max_half_open", self.max_half_open)
        _positive_int("seen_set_size", self.seen_set_size, minimum=1000)
        _positive_int(
            "max_datagram_bytes",
            self.max_datagram_bytes,
            minimum=576,
            maximum=wire.MAX_DATAGRAM_BYTES,
        )
        _positive_int("max_message_bytes", self.max_message_bytes, maximum=(1 << 32) - 1)
        _positive_int("reassembly_memory_bytes", self.reassembly_memory_bytes)
        window = self.catch_up_window_s
        if isinstance(window, bool) or not isinstance(window, int | float) or window < 0:
            raise ConfigError(f"catch_up_window_s must be >= 0 (seconds), got {window!r}")
        _positive_int("catch_up_bytes", self.catch_up_bytes, minimum=1 << 16)

        _positive("reassembly_timeout_s", self.reassembly_timeout_s)
        _positive_int("send_rate_min_bytes_per_s", self.send_rate_min_bytes_per_s)
        _positive_int(
            "send_rate_initial_bytes_per_s",
            self.send_rate_initial_bytes_per_s,
            minimum=self.send_rate_min_bytes_per_s,
        )
        _positive_int(
            "send_rate_max_bytes_per_s",
            self.send_rate_max_bytes_per_s,
            minimum=self.send_rate_initial_bytes_per_s,
        )
        _positive_int("send_rate_increase_bytes_per_s", self.send_rate_increase_bytes_per_s)
        _positive_int("link_queue_bytes", self.link_queue_bytes, minimum=wire.MAX_DATAGRAM_BYTES)
        _positive_int("send_queue_bytes", self.send_queue_bytes, minimum=wire.MAX_DATAGRAM_BYTES)
        interval = self.flush_interval_s
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not 0 <= interval <= 1
        ):
            raise ConfigError(
                f"flush_interval_s must be between 0 and 1 (seconds), got {interval!r}"
            )
        _positive_int("socket_buffer_bytes", self.socket_buffer_bytes)
        _positive_int("message_queue_size", self.message_queue_size)
        _positive_int("workers", self.workers, maximum=max(64, (os.cpu_count() or 1) * 4))
        _positive_int("ring_bytes", self.ring_bytes, minimum=1 << 20, maximum=1 << 30)
        return self

    @property
    def advertised(self) -> Addr:
        """The address we tell others about (before a bound port 0 is known)."""
        if self.advertise is not None:
            host, port = self.advertise
            return host, port or self.bind[1]
        host, port = self.bind
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return host, port


def _check_addr(name: str, addr: Addr, *, names: bool = False) -> None:
    """``names``: a DNS name is fine too (seeds; the runtime resolves them)."""
    if not (isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[1], int)):
        raise ConfigError(f"{name} must be a (host, port) tuple, got {addr!r}")
    host, port = addr
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} port {port} out of range 0-65535")
    if not host or not host.isascii() or len(host) > wire.MAX_HOST_BYTES:
        raise ConfigError(f"{name} host {host!r} is empty or too long")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if names:
            if _HOSTNAME.fullmatch(host):
                return
            raise ConfigError(
                f"{name} host {host!r} is neither an IP address nor a DNS name"
            ) from None
        if host != "localhost":
            raise ConfigError(
                f"{name} host {host!r} must be an IP address (or localhost)"
            ) from None


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _positive_int(name: str, value: int, *, minimum: int = 1, maximum: int | None = None) -> None:
    if not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
