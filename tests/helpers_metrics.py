"""Scraping a node's metrics endpoint in tests: plain HTTP, parsed with
prometheus-client's own text parser."""

from __future__ import annotations

import http.client
import re

from prometheus_client.parser import text_string_to_metric_families

METRICS_LOG = re.compile(r"metrics on http://([^/]+):(\d+)/metrics")


def http_get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    status, body = http_get(host, port, "/metrics")
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metrics_address(stderr_lines: list[str]) -> tuple[str, int] | None:
    """Where a ``gwyh-node --metrics HOST:0`` process said it listens."""
    for line in stderr_lines:
        found = METRICS_LOG.search(line)
        if found:
            return found.group(1), int(found.group(2))
    return None
