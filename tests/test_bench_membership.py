"""`python -m bench membership` on tiny clusters: the JSON has its shape and the crash
is seen by every survivor. No figure is asserted against a time: that is the bench's job."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import membership

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "membership.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "membership", "--repeat", "1"),
            *("--quiet-period", "1", "--timeout", "60", "--json", str(out), *extra),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "crash all s" in proc.stdout.decode()  # the table, on stdout
    return json.loads(out.read_text())


def check_detected(result: dict, nodes: int, mode: str) -> dict:
    assert result["bench"] == "membership"
    assert {"cpu_count", "packages", "loadavg"} <= result["machine"].keys()
    (system,) = result["systems"]
    assert system["system"] == "gwyh_mp" and system["preset"] == "local"
    assert system["mode"].startswith(mode)
    (run,) = system["runs"]
    assert set(membership.FIGURES) <= run.keys() and system["median"].keys() == set(
        membership.FIGURES
    )
    assert run["survivors"] == nodes - 1
    assert run["crash_detected_by"] == nodes - 1  # every survivor saw the crash
    assert run["convergence_s"] > 0 and 0 < run["crash_first_s"] <= run["crash_all_s"]
    # Counted, not asserted zero: a loaded machine may really stall a node for 1.5 s.
    assert run["false_down_events"] >= 0 and run["declared_down"] >= 0
    assert run["packets_in_per_node_per_s"] > 0
    return run


def test_in_process_cluster_detects_the_crash(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--nodes", "4", "--preset", "local")
    run = check_detected(result, 4, "in-process")
    assert run["accused_live_nodes"] <= run["false_down_events"]
    assert run["bytes_out_per_node_per_s"] is None  # no relay, no byte counter


def test_processes_behind_the_relay_detect_the_crash(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--nodes", "3", "--processes", "--loss", "0")
    run = check_detected(result, 3, "processes")
    assert run["bytes_out_per_node_per_s"] > 0  # the relay counts the bytes
    assert result["systems"][0]["cli_preset_flags"]


def args_for(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    membership.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_arguments_are_one_line() -> None:
    assert "--nodes" in (membership.check_args(args_for("--nodes", "2")) or "")
    assert "--loss" in (membership.check_args(args_for("--loss", "1.5")) or "")
    problem = membership.check_args(args_for("--compare", "kinship", "--loss", "0.1"))
    assert problem and "TCP" in problem
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "membership", "--nodes", "1"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and "--nodes" in proc.stderr.decode()


def test_compare_without_kinship_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(membership.importlib.metadata, "version", missing)
    problem = membership.check_args(args_for("--compare", "kinship"))
    assert problem and "pip install" in problem and "compare" in problem
