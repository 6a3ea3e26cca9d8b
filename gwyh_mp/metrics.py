"""Prometheus metrics and health endpoints for a running node (``--metrics HOST:PORT``).

Nothing on the packet path is instrumented for this: a custom collector reads the
counters the node already keeps (the core's, the handshaker's, and with ``--workers N``
the ones every receiver reports to the coordinator once a second) when Prometheus
scrapes. The HTTP server runs on the node's own event loop, so a scrape reads the
counters between two packets, never while the loop is changing them.

Every family and every label value is emitted from the first scrape on, zero if
nothing happened yet, so dashboards and ``rate()`` never see a series appear late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gwyh_mp.protocol.events import Message
from gwyh_mp.protocol.wire import MemberState

if TYPE_CHECKING:
    from gwyh_mp.api import Node

log = logging.getLogger("gwyh_mp.metrics")

# Drop reasons: (label, counter keys in the core's or a receiver's stats). Decryption
# failures and duplicates have families of their own.
DROP_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("short", ("drop_short",)),
    ("bad_version", ("drop_bad_version",)),
    ("bad_type", ("drop_bad_type",)),
    ("malformed", ("drop_malformed",)),
    ("unknown_session", ("drop_unknown_session",)),
    ("no_channel_key", ("drop_no_channel_key",)),
    ("replay", ("drop_replay",)),
    ("send_error", ("send_errors",)),
    ("send_buffer_full", ("send_dropped",)),
    ("ring_full", ("up_ring_dropped",)),
    ("shed", ("drop_raw_shed",)),  # receivers: over the budget for the coordinator's judgement
)
# Handshake outcomes: (label, handshaker stats keys, prefixed "handshake_" by Node.stats()).
HANDSHAKE_OUTCOMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("established", ("established_initiator", "established_responder")),
    ("timeout", ("initiator_timeout", "responder_timeout")),
    ("bad_mac", ("hello_bad_mac", "ohai_bad_mac", "okboss_bad_mac", "goteam_bad_mac")),
    ("bad_key", ("hello_bad_key", "ohai_bad_key")),
    ("stale", ("hello_stale",)),
    ("replay", ("hello_replay",)),
    ("overload", ("hello_overload",)),
    ("self", ("hello_self", "ohai_self")),
    ("unknown", ("ohai_unknown", "okboss_unknown", "goteam_unknown")),
)
HOPS_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


class HopsHistogram:
    """Hops of every delivered message: one list index bump per message, turned into
    a Prometheus histogram only when scraped."""

    def __init__(self) -> None:
        self.counts = [0] * 256  # the wire's hop field is one byte
        self.total = 0

    def observe(self, msg: Message) -> None:
        self.counts[msg.hops] += 1

    def family(self) -> HistogramMetricFamily:
        counts = self.counts
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        low = 0
        for bound in HOPS_BUCKETS:
            cumulative += sum(counts[low : bound + 1])
            low = bound + 1
            buckets.append((str(float(bound)), cumulative))
        total = sum(counts)
        buckets.append(("+Inf", total))
        hops_sum = sum(h * c for h, c in enumerate(counts) if c)
        return HistogramMetricFamily(
            "gwyh_message_hops",
            "Hops each delivered message travelled from its origin (1 = direct)",
            buckets=buckets,
            sum_value=hops_sum,
        )


class _Monotonic:
    """Counters that never go backwards although their source restarts: a receiver
    replaced after a crash starts counting from zero again."""

    def __init__(self) -> None:
        self._last: dict[tuple[object, str], float] = {}
        self._carried: dict[tuple[object, str], float] = {}

    def last(self, source: object, key: str) -> float:
        slot = (source, key)
        return self._carried.get(slot, 0) + self._last.get(slot, 0)

    def value(self, source: object, key: str, current: float) -> float:
        slot = (source, key)
        last = self._last.get(slot, 0)
        if current < last:
            self._carried[slot] = self._carried.get(slot, 0) + last
        self._last[slot] = current
        return self._carried.get(slot, 0) + current


def _sum(stats: Mapping[str, Any], keys: Iterable[str]) -> int:
    return sum(int(stats.get(k, 0)) for k in keys)


class NodeCollector(Collector):
    """Reads a started ``gwyh_mp.api.Node`` at scrape time."""

    def __init__(self, node: Node, hops: HopsHistogram | None = None) -> None:
        self.node = node
        self.hops = hops
        self._monotonic = _Monotonic()
        self._own = psutil.Process(os.getpid())

    def _receivers(self) -> list[dict[str, Any]]:
        return [p for p in self.node.process_stats() if str(p.get("role", "")) != "coordinator"]

    def _receiver_sum(self, receivers: list[dict[str, Any]], key: str) -> float:
        mono = self._monotonic.value
        return sum(mono(r["role"], key, r.get(key, 0)) for r in receivers)

    def collect(self) -> Iterator[Metric]:
        node = self.node
        core_stats = node.stats()
        receivers = self._receivers()
        multi = bool(receivers) or node.config.workers > 1

        def core(*keys: str) -> int:
            return _sum(core_stats, keys)

        def recv(key: str) -> float:
            return self._receiver_sum(receivers, key)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        # With receivers, the socket is theirs: datagram and byte counts are theirs.
        # The coordinator's core sees only what they pass on.
        yield counter(
            "gwyh_datagrams_received",
            "UDP datagrams read from the socket",
            recv("packets_in") if multi else core("packets_in"),
        )
        yield counter(
            "gwyh_datagrams_sent",
            "UDP datagrams handed to the kernel",
            recv("packets_out") if multi else core("packets_out"),
        )
        yield counter(
            "gwyh_received_bytes",
            "UDP payload bytes read from the socket",
            recv("bytes_in") if multi else core("bytes_in"),
        )
        yield counter(
            "gwyh_sent_bytes",
            "UDP payload bytes handed to the kernel",
            recv("bytes_out") if multi else core("bytes_out"),
        )
        drops = CounterMetricFamily(
            "gwyh_dropped_datagrams",
            "Datagrams dropped, by reason (decryption failures and duplicates not included)",
            labels=["reason"],
        )
        for reason, keys in DROP_REASONS:
            value = core(*keys) + sum(recv(k) for k in keys)
            drops.add_metric([reason], value)
        yield drops
        yield counter(
            "gwyh_decrypt_failures",
            "Datagrams that failed authentication or decryption",
            core("drop_decrypt") + recv("drop_decrypt"),
        )
        yield counter(
            "gwyh_duplicate_datagrams",
            "Data datagrams dropped before decryption: every message in them was seen",
            core("duplicates"),
        )
        yield counter(
            "gwyh_duplicate_entries",
            "Messages received again after their first delivery (dropped)",
            core("duplicate_entries"),
        )
        yield counter(
            "gwyh_messages_delivered", "Messages delivered to the application", core("delivered")
        )
        yield counter(
            "gwyh_broadcasts", "Messages this node broadcast as origin", core("broadcasts")
        )
        yield counter(
            "gwyh_retransmitted_datagrams",
            "Data datagrams sent again after a NAK",
            core("retransmits"),
        )
        yield counter(
            "gwyh_retransmitted_fragments",
            "Fragments of large messages sent again after a FRAGMENT_NAK",
            core("fragments_resent"),
        )
        naks = CounterMetricFamily(
            "gwyh_naks", "Negative acknowledgements, by direction", labels=["direction"]
        )
        naks.add_metric(["sent"], core("naks_sent", "fragment_naks_sent"))
        naks.add_metric(["received"], core("naks_received"))
        yield naks
        shed = CounterMetricFamily(
            "gwyh_shed_datagrams",
            "Outgoing data shed instead of queued, by reason",
            labels=["reason"],
        )
        shed.add_metric(["link_queue_full"], core("shed_datagrams"))
        shed.add_metric(["no_subscribers"], core("shed_no_subscribers"))
        yield shed
        handshakes = CounterMetricFamily(
            "gwyh_handshakes", "Handshakes, by outcome", labels=["outcome"]
        )
        for outcome, keys in HANDSHAKE_OUTCOMES:
            handshakes.add_metric([outcome], core(*(f"handshake_{k}" for k in keys)))
        yield handshakes
        yield counter(
            "gwyh_handshakes_initiated", "Handshakes this node started", core("handshake_initiated")
        )
        yield counter(
            "gwyh_members_declared_down",
            "Members this node declared DOWN after a failed probe and the suspicion timeout",
            core("declared_down"),
        )
        yield counter(
            "gwyh_members_suspected",
            "Members this node suspected (its probe of them failed; refutable)",
            core("suspected"),
        )
        yield counter("gwyh_probes", "Failure-detector probes of silent peers", core("fd_probes"))
        yield counter(
            "gwyh_probes_failed",
            "Probes that ended without an answer, direct or indirect",
            core("fd_probes_failed"),
        )
        yield counter(
            "gwyh_isolations",
            "Times every provider went silent at once and the node restarted from its seeds",
            core("isolated"),
        )
        yield counter("gwyh_reassignments", "Provider re-selections", core("reassignments"))
        yield counter(
            "gwyh_rejoin_handshakes",
            "Handshakes started to known members while isolated or after a pause of this process",
            core("rejoin_handshakes"),
        )
        yield counter(
            "gwyh_saturations",
            "Times the application stopped reading long enough that this node shed its subscribers",
            core("saturated"),
        )
        yield counter(
            "gwyh_subscribers_shed",
            "Subscribers told this node could not serve them (the application was not reading)",
            core("subscribers_shed"),
        )
        catch_up = CounterMetricFamily(
            "gwyh_catch_up_messages",
            "Broadcasts missed while away (paused, cut off, DOWN): recovered by catch-up, "
            "or missed for good (beyond the catch-up window)",
            labels=["outcome"],
        )
        catch_up.add_metric(["recovered"], core("catch_up_recovered"))
        catch_up.add_metric(["missed"], core("catch_up_missed"))
        yield catch_up

        members = GaugeMetricFamily(
            "gwyh_members", "Other cluster members known, by state", labels=["state"]
        )
        by_state = dict.fromkeys(MemberState, 0)
        for member in node.members():
            by_state[member.state] = by_state.get(member.state, 0) + 1
        for state, count in by_state.items():
            members.add_metric([state.name.lower()], count)
        yield members
        yield GaugeMetricFamily(
            "gwyh_providers", "Providers this node receives from", value=core("providers")
        )
        yield GaugeMetricFamily(
            "gwyh_subscribers", "Subscribers this node sends to", value=core("subscribers")
        )
        yield GaugeMetricFamily(
            "gwyh_message_queue_messages",
            "Delivered messages waiting for the application",
            value=core("message_queue"),
        )
        yield GaugeMetricFamily(
            "gwyh_send_backlog_bytes",
            "Data waiting for the pacers",
            value=core("send_backlog_bytes"),
        )
        yield GaugeMetricFamily(
            "gwyh_seen_ids", "Message ids remembered for de-duplication", value=core("seen_ids")
        )
        yield from self._process_families(receivers)
        if self.hops is not None:
            yield self.hops.family()

    def _process_families(self, receivers: list[dict[str, Any]]) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "gwyh_process_cpu_seconds",
            "CPU time (user + system) of each process of the node",
            labels=["role", "receiver"],
        )
        rss = GaugeMetricFamily(
            "gwyh_process_resident_memory_bytes",
            "Resident memory of each process of the node",
            labels=["role", "receiver"],
        )
        with contextlib.suppress(psutil.Error):
            times = self._own.cpu_times()
            cpu.add_metric(["coordinator", ""], times.user + times.system)
            rss.add_metric(["coordinator", ""], self._own.memory_info().rss)
        ring = GaugeMetricFamily(
            "gwyh_ring_used_bytes",
            "Bytes waiting in the shared-memory rings between coordinator and receivers",
            labels=["receiver", "direction"],
        )
        restarts = CounterMetricFamily(
            "gwyh_receiver_restarts", "Receivers replaced after they died", labels=["receiver"]
        )
        for record in receivers:
            index = str(record["role"]).removeprefix("receiver-")
            # A receiver being restarted has no process yet: it keeps its last figure.
            if "cpu_s" in record:
                cpu_s = self._monotonic.value(record["role"], "cpu_s", record["cpu_s"])
            else:
                cpu_s = self._monotonic.last(record["role"], "cpu_s")
            cpu.add_metric(["receiver", index], cpu_s)
            rss.add_metric(["receiver", index], int(record.get("rss_bytes", 0)))
            ring.add_metric([index, "up"], int(record.get("up_ring_bytes", 0)))
            ring.add_metric([index, "down"], int(record.get("down_ring_bytes", 0)))
            restarts.add_metric([index], int(record.get("restarts", 0)))
        yield cpu
        yield rss
        yield ring
        yield restarts


def is_ready(node: Node) -> bool:
    """Joined: at least one provider, or alone by configuration (no seeds: the node
    that starts a cluster is ready before anyone joins it)."""
    return bool(node.providers) or not node.config.bootstrap


def is_alive(node: Node) -> bool:
    """Started; and since the answer comes from the node's own event loop, that loop
    is not stuck (receivers that die are replaced by the coordinator)."""
    try:
        node.local_member()
    except RuntimeError:
        return False
    return True


class MetricsServer:
    """A minimal HTTP/1.1 server on the node's event loop: GET /metrics, /healthz, /readyz."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.hops = HopsHistogram()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, self.hops))
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> MetricsServer:
        self.node.on_message = self.hops.observe
        self._server = await asyncio.start_server(self._handle, host, port)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def render(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            ok = is_alive(self.node)
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"stopped\n"
        if path == "/readyz":
            ok = is_ready(self.node)
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"no provider yet\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            elif parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                status, ctype, body = self.render(parts[1])
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
            header = (
                f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(header if parts and parts[0] == "HEAD" else header + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except ConnectionError:
            pass
        except Exception:  # a scrape must never take the node down
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
