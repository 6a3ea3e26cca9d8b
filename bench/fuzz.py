"""`python -m bench fuzz`: coverage-guided fuzzing of the sans-IO core (atheris/libFuzzer).

One target per attack surface (bench/fuzz_targets.py): ``datagram`` (the wire decoders,
including the frame and record decoders an insider reaches after decryption),
``handshake`` (Hello/Ohai/OkBoss/GoTeam into an initiator and a responder), ``reassembler``
(fragments with arbitrary headers), ``member`` (the member-record codec) and ``node`` (any
datagram from an outsider into a whole NodeCore). Each asserts the invariants the node
relies on, not only the absence of exceptions.

libFuzzer ends the process with exit() when it is done, so the fuzzing runs in a child
process (``python -m bench.fuzz --child``) whose gwyh_mp.protocol imports are instrumented for
coverage; this parent reads libFuzzer's report and prints (or writes) a JSON summary.
A crash leaves its input under --artifacts; ``--replay FILE`` runs one input again, and
every crash found belongs in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_NAMES = ("datagram", "handshake", "reassembler", "member", "node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = __doc__
    parser.add_argument("--target", choices=TARGET_NAMES, required=True, help="what to fuzz")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to try")
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="stop after this long as well (0: no limit)"
    )
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--max-len", type=int, default=4096, help="largest input in bytes")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus directory to start from and grow (default: a fresh one with the seeds)",
    )
    parser.add_argument(
        "--artifacts", type=Path, default=Path("."), help="where a crashing input is written"
    )
    parser.add_argument("--replay", type=Path, default=None, help="run one input file and exit")


def run(args: argparse.Namespace) -> int:
    for flag, value, low in (("--runs", args.runs, 1), ("--max-len", args.max_len, 1)):
        if value < low:
            raise SystemExit(f"{flag} must be >= {low}, got {value}")
    if args.seconds < 0:
        raise SystemExit(f"--seconds must be >= 0, got {args.seconds}")
    if args.replay is not None:
        return _replay(args.target, args.replay)
    with tempfile.TemporaryDirectory(prefix="gwyh-fuzz-") as scratch:
        corpus = args.corpus or Path(scratch)
        corpus.mkdir(parents=True, exist_ok=True)
        args.artifacts.mkdir(parents=True, exist_ok=True)
        libfuzzer = [
            str(corpus),
            f"-runs={args.runs}",
            f"-seed={args.seed}",
            f"-max_len={args.max_len}",
            f"-artifact_prefix={args.artifacts.resolve()}/",
            "-print_final_stats=1",
        ]
        if args.seconds:
            libfuzzer.append(f"-max_total_time={max(1, round(args.seconds))}")
        cmd = [sys.executable, "-m", "bench.fuzz", "--child", args.target, *libfuzzer]
        started = time.monotonic()
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # a crash input replays the same way
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        elapsed = time.monotonic() - started
    summary = _summarize(args, proc.returncode, proc.stderr + proc.stdout, elapsed)
    # Imported here, not at the top: the fuzzing child must import gwyh_mp only under
    # atheris' instrumentation, or it sees no coverage.
    from bench.common import write_json

    if args.json != "-":
        print(
            f"fuzz {summary['target']}: {summary['runs']} runs in {elapsed:.1f} s, "
            f"{summary['coverage_edges']} edges, "
            f"{'CRASHED' if summary['crashed'] else 'no crash'}"
        )
    write_json(args.json, summary)
    if summary["crashed"]:
        sys.stderr.write(proc.stderr[-4000:])
    return 1 if summary["crashed"] or summary["runs"] == 0 else 0


def _summarize(
    args: argparse.Namespace, returncode: int, log: str, elapsed: float
) -> dict[str, object]:
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/", log)
    stat_runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    runs = int(done[-1][0]) if done else int(stat_runs.group(1)) if stat_runs else 0
    progress = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", log)
    cov, ft, corp = (
        int(x) for x in (done[-1][1:] if done else progress[-1] if progress else (0,) * 3)
    )
    artifact = re.search(r"Test unit written to (\S+)", log)
    exception = re.search(
        r"Uncaught Python exception: ===\n(?:.*\n)*?(\w[\w.]*(?:Error|Exception)[^\n]*)", log
    )
    crash_file = artifact.group(1) if artifact else None
    crash_hex = Path(crash_file).read_bytes()[:512].hex() if crash_file else None
    return {
        "target": args.target,
        "runs": runs,
        "runs_requested": args.runs,
        "seconds": round(elapsed, 2),
        "execs_per_s": round(runs / elapsed) if elapsed > 0 else None,
        "seed": args.seed,
        "max_len": args.max_len,
        "coverage_edges": cov,
        "features": ft,
        "corpus_inputs": corp,
        "crashed": returncode != 0,
        "returncode": returncode,
        "exception": exception.group(1) if exception else None,
        "crash_file": crash_file,
        "crash_input_hex": crash_hex,
        "engine": _engine(),
    }


def _engine() -> str:
    try:
        from importlib.metadata import version

        return f"atheris {version('atheris')}"
    except Exception:  # metadata missing: still report the run
        return "atheris"


def _replay(target: str, path: Path) -> int:
    from bench.fuzz_targets import TARGETS

    TARGETS[target](path.read_bytes())
    print(f"replay {target} {path}: ok")
    return 0


def _child(target: str, libfuzzer_args: list[str]) -> None:
    try:
        import atheris
    except ImportError:
        raise SystemExit(
            "atheris is not installed: pip install -e '.[fuzz]' (it ships wheels for "
            "CPython 3.11 on Linux x86-64)"
        ) from None
    with atheris.instrument_imports(include=["gwyh_mp.protocol"]):
        from bench.fuzz_targets import TARGETS, seeds
    corpus = Path(libfuzzer_args[0])
    for k, seed in enumerate(seeds(target)):
        path = corpus / f"seed-{k}"
        if not path.exists():
            path.write_bytes(seed)
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit("run it as: python -m bench fuzz --help")
