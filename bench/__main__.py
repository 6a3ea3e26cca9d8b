"""`python -m bench COMMAND` (or `gwyh-bench COMMAND`): gwyh_mp's benchmarks.

Every command prints a short table on stdout; `--json FILE` also writes the full
result as JSON (`--json -`: to stdout), `--quiet` drops the progress lines on stderr.
`python -m bench COMMAND --help` lists a command's options with their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each command lives in its own module exposing ``add_arguments(parser)`` and
# ``run(args) -> int``, imported only when chosen, so a heavy one (matplotlib, say)
# never slows down the others.
COMMANDS: dict[str, tuple[str, str]] = {
    "ceiling": ("bench.ceiling", "this machine's raw loopback UDP and PyNaCl limits"),
    "cluster": ("bench.cluster", "throughput of a cluster of gwyh-node processes vs the floor"),
    "ingest": ("bench.ingest", "one (multiprocess) node driven at full speed"),
    "load": ("bench.load", "thousands of virtual peers against one node: join, latency, churn"),
    "sim": ("bench.sim", "simulated cluster of the real protocol core: spread and detection"),
    "large": ("bench.large", "large-message goodput and delivery under loss"),
    "membership": ("bench.membership", "convergence, crash detection and false DOWNs"),
    "pause": ("bench.pause", "a gwyh-node stopped (SIGSTOP) during a stream: catch-up"),
    "ipc": ("bench.ipc", "inter-process hand-off: shared-memory ring vs multiprocessing.Queue"),
    "udp": ("bench.udp", "batched recvmmsg/sendmmsg vs plain socket calls"),
    "fuzz": ("bench.fuzz", "coverage-guided fuzzing of the decoders, handshake and reassembler"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The output options every command shares."""
    g = parser.add_argument_group("output")
    g.add_argument(
        "--json", metavar="FILE", help="also write the full result as JSON to FILE ('-': stdout)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
        )
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            add_output_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
