"""Timestamp a node's stdout: ``node --stdio | python -m bench.load_tap OUT``.

Each complete line read from stdin is written to OUT as ``<time.time_ns()> <line>``.
It runs as its own small process so the receive time is taken when the line arrives,
not whenever the busy load generator next gets the GIL.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m bench.load_tap OUTFILE\n")
        return 2
    fd_in = sys.stdin.fileno()
    with open(argv[0], "wb", buffering=0) as out:
        pending = b""
        while True:
            chunk = os.read(fd_in, 1 << 16)
            if not chunk:
                break
            stamp = b"%d " % time.time_ns()
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            if cut:
                lines = data[:cut].split(b"\n")[:-1]
                out.write(b"".join([stamp + line + b"\n" for line in lines]))
            pending = data[cut:]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
