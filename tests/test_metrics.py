"""``--metrics``: Prometheus text on /metrics, /healthz and /readyz, read from the
node's own counters; checked by scraping real nodes and parsing the text with
prometheus-client's parser."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gwyh_mp import Config, Node
from gwyh_mp.metrics import HopsHistogram, MetricsServer, _Monotonic
from gwyh_mp.protocol.events import Message
from tests.helpers_metrics import http_get, metrics_address, scrape
from tests.procs import NodeProcess, free_udp_port, node_args, node_processes, write_key

KEY = b"metrics-test-key-0123456789abcdef"

# Families a dashboard relies on: present (zero) from the first scrape.
STABLE = [
    ("gwyh_datagrams_received_total", ()),
    ("gwyh_datagrams_sent_total", ()),
    ("gwyh_received_bytes_total", ()),
    ("gwyh_sent_bytes_total", ()),
    ("gwyh_dropped_datagrams_total", (("reason", "replay"),)),
    ("gwyh_dropped_datagrams_total", (("reason", "malformed"),)),
    ("gwyh_decrypt_failures_total", ()),
    ("gwyh_duplicate_datagrams_total", ()),
    ("gwyh_messages_delivered_total", ()),
    ("gwyh_broadcasts_total", ()),
    ("gwyh_retransmitted_datagrams_total", ()),
    ("gwyh_naks_total", (("direction", "sent"),)),
    ("gwyh_shed_datagrams_total", (("reason", "link_queue_full"),)),
    ("gwyh_handshakes_total", (("outcome", "established"),)),
    ("gwyh_handshakes_total", (("outcome", "bad_mac"),)),
    ("gwyh_members", (("state", "up"),)),
    ("gwyh_members", (("state", "down"),)),
    ("gwyh_providers", ()),
    ("gwyh_subscribers", ()),
    ("gwyh_message_queue_messages", ()),
    ("gwyh_send_backlog_bytes", ()),
    ("gwyh_saturations_total", ()),
    ("gwyh_process_cpu_seconds_total", (("receiver", ""), ("role", "coordinator"))),
    ("gwyh_process_resident_memory_bytes", (("receiver", ""), ("role", "coordinator"))),
    ("gwyh_message_hops_bucket", (("le", "+Inf"),)),
    ("gwyh_message_hops_count", ()),
]


def test_hops_histogram_is_cumulative() -> None:
    hist = HopsHistogram()
    for hops in (1, 1, 2, 7, 30):
        hist.observe(Message(b"", b"i" * 16, b"o" * 16, hops))
    family = hist.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["1.0"] == 2
    assert buckets["2.0"] == 3
    assert buckets["6.0"] == 3
    assert buckets["8.0"] == 4
    assert buckets["20.0"] == 4
    assert buckets["+Inf"] == 5
    total = {s.name: s.value for s in family.samples}
    assert total["gwyh_message_hops_sum"] == 41


def test_counters_survive_a_restarted_source() -> None:
    mono = _Monotonic()
    assert mono.value("receiver-0", "packets_in", 10) == 10
    assert mono.value("receiver-0", "packets_in", 15) == 15
    assert mono.value("receiver-0", "packets_in", 3) == 18  # restarted from zero
    assert mono.value("receiver-0", "packets_in", 5) == 20
    assert mono.last("receiver-0", "packets_in") == 20


async def test_in_process_scrape_counts_deliveries_and_probes_answer() -> None:
    first = await Node(Config.local(bind=("127.0.0.1", 0), psks=[KEY])).start()
    second = await Node(
        Config.local(bind=("127.0.0.1", 0), psks=[KEY], bootstrap=[first.address])
    ).start()
    servers = [await MetricsServer(n).start("127.0.0.1", 0) for n in (first, second)]
    try:
        host, port = servers[1].address  # type: ignore[misc]
        before = await asyncio.to_thread(scrape, host, port)
        for name, labels in STABLE:
            assert (name, labels) in before, name
        assert before[("gwyh_messages_delivered_total", ())] == 0
        status, _ = await asyncio.to_thread(http_get, host, port, "/healthz")
        assert status == 200
        await second.wait_for_members(1, timeout=30)
        async with asyncio.timeout(30):
            while not second.providers:
                await asyncio.sleep(0.05)
        status, body = await asyncio.to_thread(http_get, host, port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        # No seeds configured: the first node is ready alone.
        assert (await asyncio.to_thread(http_get, *servers[0].address, "/readyz"))[0] == 200
        assert (await asyncio.to_thread(http_get, host, port, "/nope"))[0] == 404

        sent = 20
        for i in range(sent):
            await first.broadcast(f"m{i}".encode())
        got = 0
        async with asyncio.timeout(30):
            async for _ in second.messages():
                got += 1
                if got == sent:
                    break
        after = await asyncio.to_thread(scrape, host, port)
        assert after[("gwyh_messages_delivered_total", ())] == sent
        assert after[("gwyh_message_hops_count", ())] == sent
        assert after[("gwyh_members", (("state", "up"),))] == 1
        assert after[("gwyh_datagrams_received_total", ())] > 0
        assert after[("gwyh_received_bytes_total", ())] > 0
        assert after[("gwyh_handshakes_total", (("outcome", "established"),))] >= 1
        origin = await asyncio.to_thread(scrape, *servers[0].address)
        assert origin[("gwyh_broadcasts_total", ())] == sent
        assert origin[("gwyh_sent_bytes_total", ())] > 0
    finally:
        for server in servers:
            await server.stop()
        await second.stop()
        await first.stop()


def test_node_process_with_workers_serves_the_whole_node(tmp_path: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    seed_port, port = free_udp_port(), free_udp_port()
    fast = ("--heartbeat-interval", "0.5")
    with node_processes() as procs:
        seed = NodeProcess(node_args(seed_port, key, "--workers", "1", *fast))
        procs.append(seed)
        node = NodeProcess(
            node_args(
                port,
                key,
                "--workers",
                "2",
                "--stdio",
                "--metrics",
                "127.0.0.1:0",
                "--bootstrap",
                f"127.0.0.1:{seed_port}",
                *fast,
            )
        )
        procs.append(node)
        assert node.wait_for(lambda p: metrics_address(p.stderr_lines) is not None, 30), (
            node.stderr_lines
        )
        where = metrics_address(node.stderr_lines)
        assert where is not None

        def ready() -> bool:
            return http_get(*where, "/readyz")[0] == 200

        assert node.wait_for(lambda p: ready(), 30)
        # A third node broadcasts; the node under test counts what it prints.
        sender_port = free_udp_port()
        sender = NodeProcess(
            node_args(
                sender_port,
                key,
                "--workers",
                "1",
                "--stdio",
                "--bootstrap",
                f"127.0.0.1:{seed_port}",
                *fast,
            )
        )
        procs.append(sender)
        sent = 30
        # Broadcast once the node under test knows the sender.
        assert node.wait_for(
            lambda p: scrape(*where)[("gwyh_members", (("state", "up"),))] >= 2, 30
        )
        for i in range(sent):
            sender.send_line(f"line {i}".encode())
        assert node.wait_for(lambda p: len(p.messages) >= sent, 30), len(node.messages)
        samples = scrape(*where)
        assert samples[("gwyh_messages_delivered_total", ())] == len(node.messages) == sent
        assert samples[("gwyh_message_hops_count", ())] == sent
        # Receivers report once a second; their datagram counts reach the scrape.
        assert node.wait_for(
            lambda p: scrape(*where)[("gwyh_datagrams_received_total", ())] > 0, 10
        )
        for worker in ("0", "1"):
            labels = (("receiver", worker), ("role", "receiver"))
            assert ("gwyh_process_cpu_seconds_total", labels) in samples
            assert samples[("gwyh_process_resident_memory_bytes", labels)] > 0
            assert ("gwyh_ring_used_bytes", (("direction", "up"), ("receiver", worker))) in samples
        assert http_get(*where, "/healthz")[0] == 200
