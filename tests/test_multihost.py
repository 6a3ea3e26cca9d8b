"""Five hosts on one Ethernet segment: five network namespaces whose veths meet on a
bridge in a sixth namespace (nothing is added to the test machine's own network), one
``gwyh-node --workers 2`` per namespace on its own 10.77.0.x address, bootstrapped by
address. Broadcasts arrive exactly once everywhere; a SIGKILLed node is reported DOWN
by every other and UP again after its restart; every node's /metrics is scraped inside
its namespace and parsed, and its delivery counter matches what the test counted.

Needs root and network namespaces (CI runs the suite as root); skipped otherwise."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import NodeProcess, node_processes, write_key

KEY = b"multihost-test-key-0123456789abcdef"
HOSTS = 5
SUBNET = "10.77.0"  # exists only inside the test's namespaces
PORT = 6969
METRICS_PORT = 9469
PER_NODE = 4
# Quick failure detection: a silent peer is DOWN after ~1-2 s.
FAST = ["--heartbeat-interval", "0.3", "--missed-heartbeats", "3"]
TAG = f"gwmh{os.getpid() % 100000}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _namespaces_refused() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{TAG}probe"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns add refused: {made.stderr.strip()}"
    bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    _ip("netns", "del", probe)
    if bridge.returncode != 0:
        return f"no bridge in a namespace: {bridge.stderr.strip()}"
    return None


class Segment:
    """The namespaces and links; ``close()`` removes them all (also at exit)."""

    def __init__(self, hosts: int) -> None:
        self.hub = f"{TAG}hub"
        self.names = [f"{TAG}n{i}" for i in range(hosts)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        atexit.register(self.close)
        self._run("netns", "add", self.hub)
        self._run("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._run("-n", self.hub, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addrs, strict=True)):
            self._run("netns", "add", name)
            # One end on the bridge, the other in the host's namespace as eth0.
            self._run(
                "-n", self.hub, "link", "add", f"v{i}", "type", "veth",
                "peer", "name", "eth0", "netns", name,
            )  # fmt: skip
            self._run("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
            self._run("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._run("-n", name, "link", "set", "eth0", "up")
            self._run("-n", name, "link", "set", "lo", "up")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = _ip(*args)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def close(self) -> None:
        for name in [*self.names, self.hub]:
            _ip("netns", "del", name)  # takes its links with it


def _scrape(segment: Segment, i: int) -> dict[str, float]:
    """GET /metrics from inside host i's namespace; unlabelled samples and members."""
    fetch = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://{segment.addrs[i]}:{METRICS_PORT}"
        "/metrics',timeout=10).read().decode())"
    )
    result = subprocess.run(
        [*segment.exec_prefix(i), sys.executable, "-c", fetch],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = sample.value
            elif sample.name == "gwyh_members":
                out[f"members_{sample.labels['state']}"] = sample.value
    return out


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_five_namespaces_deliver_once_detect_a_kill_and_serve_metrics(tmp_path: Path) -> None:
    refused = _namespaces_refused()
    if refused:
        pytest.skip(refused)
    key = write_key(tmp_path, "k", KEY)
    segment = Segment(HOSTS)
    try:
        with node_processes() as procs:

            def start(i: int) -> NodeProcess:
                args = [
                    "--bind",
                    f"{segment.addrs[i]}:{PORT}",
                    "--psk-file",
                    key,
                    "--workers",
                    "2",
                    "--stdio",
                    "--metrics",
                    f"{segment.addrs[i]}:{METRICS_PORT}",
                    *FAST,
                ]
                if i:
                    args += ["--bootstrap", f"{segment.addrs[0]}:{PORT}"]
                node = NodeProcess(args, prefix=segment.exec_prefix(i))
                procs.append(node)
                return node

            nodes = [start(i) for i in range(HOSTS)]
            for i in range(HOSTS):
                _wait(
                    lambda i=i: _scrape(segment, i).get("members_up") == HOSTS - 1,
                    60,
                    f"host {i} to see the other {HOSTS - 1} UP",
                )

            for i, node in enumerate(nodes):
                for k in range(PER_NODE):
                    node.send_line(f"host {i} message {k}".encode())
            want = (HOSTS - 1) * PER_NODE
            for i, node in enumerate(nodes):
                assert node.wait_for(lambda p: len(p.messages) >= want, 30), (
                    f"host {i}: {len(node.messages)} of {want} messages"
                )
            time.sleep(0.5)  # a duplicate would show up now
            for i, node in enumerate(nodes):
                data = Counter(str(m["data"]) for m in node.messages)
                expected = {
                    f"host {j} message {k}" for j in range(HOSTS) if j != i for k in range(PER_NODE)
                }
                assert set(data) == expected and set(data.values()) == {1}, f"host {i}"
                samples = _scrape(segment, i)
                assert samples["gwyh_messages_delivered_total"] == len(node.messages) == want
                assert samples["gwyh_datagrams_received_total"] > 0
                print(
                    f"host {i} ({segment.addrs[i]}): {len(node.messages)} messages, each once; "
                    f"/metrics delivered={samples['gwyh_messages_delivered_total']:.0f} "
                    f"datagrams in={samples['gwyh_datagrams_received_total']:.0f}"
                )

            # SIGKILL host 4: no goodbye, every other host must notice on its own.
            victim = HOSTS - 1
            nodes[victim].kill()
            killed_at = time.monotonic()
            for i in range(victim):
                _wait(
                    lambda i=i: _scrape(segment, i).get("members_down", 0) >= 1,
                    30,
                    f"host {i} to report the killed host DOWN",
                )
                assert _scrape(segment, i)["members_up"] == HOSTS - 2
            took = time.monotonic() - killed_at
            print(f"host {victim} SIGKILLed: DOWN at all {victim} others after {took:.1f} s")

            # It comes back (a new node id on the same address) and is UP everywhere.
            nodes[victim] = start(victim)
            restarted_at = time.monotonic()
            for i in range(HOSTS):
                _wait(
                    lambda i=i: _scrape(segment, i).get("members_up") == HOSTS - 1,
                    60,
                    f"host {i} to see the restarted host UP",
                )
            took = time.monotonic() - restarted_at
            print(f"host {victim} restarted: UP at all {HOSTS} after {took:.1f} s")
            nodes[victim].send_line(b"back again")
            for i in range(victim):
                assert nodes[i].wait_for(
                    lambda p: any(m["data"] == "back again" for m in p.messages), 30
                )
                samples = _scrape(segment, i)
                assert samples["gwyh_messages_delivered_total"] == len(nodes[i].messages)
                assert len(nodes[i].messages) == want + 1
    finally:
        segment.close()
        atexit.unregister(segment.close)
