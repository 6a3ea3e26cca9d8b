"""bench large's floor loop and its side-by-side table (the cluster parts are benchmarks,
run by hand; these check the pieces that must stay right for the figures to mean anything)."""

from __future__ import annotations

import pytest

from bench.large import fragment_payload, goodput_table, measure_floor
from tests.helpers_core import lone_core


@pytest.mark.parametrize("datagram", [576, 1400, 65000])
def test_floor_counts_the_payload_a_node_fragment_carries(datagram: int) -> None:
    assert fragment_payload(datagram) == lone_core("f", max_datagram_bytes=datagram).fragment_bytes


def test_floor_loop_seals_sends_receives_and_opens() -> None:
    result = measure_floor(1400, 0.2)
    assert result["sent"] > 0
    assert 0 < result["received_authenticated"] <= result["sent"]
    assert result["failed_authentication"] == 0
    assert result["floor_mib_s"] > 0
    assert result["fragment_payload_bytes"] == 1298
    assert result["floor_cpu_ms_per_mib"] > 0


def test_goodput_table_sets_node_beside_floor() -> None:
    goodput = {
        "runs": [
            {
                "max_datagram": 1400,
                "size": 4194304,
                "goodput_mib_s": 40.0,
                "floor_mib_s": 80.0,
                "goodput_vs_floor": 0.5,
                "raw_udp_pair_mib_s": 280.0,
                "complete": True,
                "node_cpu_ms_per_mib": 40.0,
                "floor_cpu_ms_per_mib": 12.5,
            },
            {"max_datagram": 65000, "error": "cluster did not converge"},
        ]
    }
    lines = goodput_table(goodput)
    assert "node MiB/s" in lines[0] and "floor MiB/s" in lines[0]
    assert lines[2].split() == [
        "1400",
        "4194304",
        "40.0",
        "80.0",
        "50",
        "%",
        "280.0",
        "True",
        "40.0",
        "12.5",
    ]
    assert "did not converge" in lines[3]
