"""A bounded, fixed-seed run of every fuzz target (bench/fuzz.py), so the harness stays
runnable and the invariants it asserts keep holding on every change.

Each run is capped in inputs and in seconds; the long runs belong to
`python -m bench fuzz --target NAME --runs N`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import fuzz, fuzz_targets

# Enough inputs to get past the seeds into mutated structure; at most ~3 s of fuzzing each.
RUNS = {
    "datagram": 20_000,
    "member": 20_000,
    "node": 20_000,
    "handshake": 1_500,
    "reassembler": 1_500,
}


def test_every_target_has_a_bounded_run() -> None:
    assert set(RUNS) == set(fuzz.TARGET_NAMES) == set(fuzz_targets.TARGETS)


@pytest.mark.parametrize("target", fuzz.TARGET_NAMES)
def test_bounded_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    summary_file = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "fuzz",
        "--target",
        target,
        "--runs",
        str(RUNS[target]),
        "--seconds",
        "3",
        "--seed",
        "7",
        "--artifacts",
        str(tmp_path),
        "--json",
        str(summary_file),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["target"] == target and not summary["crashed"], summary
    assert summary["runs"] > 0 and summary["coverage_edges"] > 0, summary
    assert f"fuzz {target}:" in proc.stdout and "no crash" in proc.stdout


@pytest.mark.parametrize("target", fuzz.TARGET_NAMES)
def test_seeds_satisfy_their_target(target: str) -> None:
    """The starting corpus itself passes: a failing seed would hide every other finding."""
    for seed in fuzz_targets.seeds(target):
        fuzz_targets.TARGETS[target](seed)


def test_replay_runs_one_input(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(fuzz_targets.seeds("member")[0])
    out = subprocess.run(
        [sys.executable, "-m", "bench", "fuzz", "--target", "member", "--replay", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip().endswith(": ok")


def test_help_shows_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "fuzz", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--runs RUNS" in out and "(default: 100000)" in out and "reassembler" in out


def test_a_crash_report_is_summarized(tmp_path: Path) -> None:
    """What libFuzzer and atheris print for a crash becomes the JSON summary's fields."""
    crash = tmp_path / "crash-abc"
    crash.write_bytes(b"\x01\x02")
    log = (
        "#1234\tNEW    cov: 40 ft: 80 corp: 12/300b lim: 4 exec/s: 0 rss: 50Mb\n"
        " === Uncaught Python exception: ===\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in member\n'
        "bench.fuzz_targets.InvariantError: host 'a..b' cannot be sent to\n"
        "==1== ERROR: libFuzzer: fuzz target exited\n"
        f"artifact_prefix='{tmp_path}/'; Test unit written to {crash}\n"
        "stat::number_of_executed_units: 1300\n"
    )
    args = fuzz.argparse.Namespace(target="member", runs=5000, seed=1, max_len=64)
    summary = fuzz._summarize(args, 77, log, 2.0)
    assert summary["crashed"] and summary["runs"] == 1300 and summary["coverage_edges"] == 40
    assert (
        summary["exception"] == "bench.fuzz_targets.InvariantError: host 'a..b' cannot be sent to"
    )
    assert summary["crash_file"] == str(crash) and summary["crash_input_hex"] == "0102"
