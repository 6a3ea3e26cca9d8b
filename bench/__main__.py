"""`python -m bench <command> [options]`: one entry point for every benchmark.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported lazily so a broken or heavy bench
(matplotlib, say) never slows down the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "ceiling": ("bench.ceiling", "this machine's raw UDP and PyNaCl limits"),
    "cluster": ("bench.cluster", "10-node gwyh-node cluster throughput vs the naive floor"),
    "ingest": ("bench.ingest", "drive one (multiprocess) node at full speed"),
    "load": ("bench.load", "thousands of virtual peers against one node"),
    "sim": ("bench.sim", "discrete-event simulation of the real protocol core"),
    "large": ("bench.large", "large-message goodput and delivery under loss"),
    "membership": ("bench.membership", "convergence, crash detection and false DOWNs"),
    "ipc": ("bench.ipc", "inter-process hand-off: shared-memory ring vs multiprocessing.Queue"),
    "udp": ("bench.udp", "batched recvmmsg/sendmmsg vs plain socket calls"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == wanted:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                parser.error(f"benchmark {name!r} is not implemented yet")
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
