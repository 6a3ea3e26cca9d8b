"""`python -m bench ingest`: the per-role CPU split and the scaling model it predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ingest import MODEL_RECEIVERS, scaling_model

ROOT = Path(__file__).resolve().parent.parent


def test_model_adds_receivers_until_the_coordinator_saturates() -> None:
    # 100 us of receiver CPU per message, 25 us of coordinator CPU: a receiver alone
    # takes 10,000 msg/s, the coordinator caps everything at 40,000 msg/s.
    rows = scaling_model(25.0, 100.0)
    assert [r["receivers"] for r in rows] == list(MODEL_RECEIVERS)
    assert [r["predicted_msgs_per_s"] for r in rows] == [
        10_000.0,
        20_000.0,
        40_000.0,
        40_000.0,
        40_000.0,
    ]
    assert [r["limit"] for r in rows] == [
        "receivers",
        "receivers",
        "coordinator",
        "coordinator",
        "coordinator",
    ]
    # A coordinator that costs more than a receiver is the limit from the start.
    assert all(r["limit"] == "coordinator" for r in scaling_model(50.0, 40.0))


def test_tiny_ingest_run_splits_cpu_by_role(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "ingest",
            "--workers",
            "2",
            "--peers",
            "20",
            "--rates",
            "400",
            "--seconds",
            "1",
            "--floor-seconds",
            "0.1",
            "--quiet",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    (step,) = result["steps"]
    assert step["delivered"] > 0 and step["receivers"] == 2
    assert step["coordinator_us_per_msg"] > 0 and step["receivers_us_per_msg"] > 0
    assert step["cpu_us_per_delivered"] == pytest.approx(
        step["coordinator_us_per_msg"] + step["receivers_us_per_msg"], abs=0.02
    )
    scaling = result["scaling"]
    assert scaling["coordinator_us_per_msg"] == step["coordinator_us_per_msg"]
    assert scaling["predicted"] == scaling_model(
        step["coordinator_us_per_msg"], step["receivers_us_per_msg"]
    )
    text = proc.stdout.decode()
    assert "predicted msg/s = min(" in text and " receivers  predicted msg/s  limit" in text
