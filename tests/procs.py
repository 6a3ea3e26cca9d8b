"""Helpers to run real ``gwyh-node`` processes in tests and always clean them up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from bench.common import free_udp_port

__all__ = ["free_udp_port"]  # the one port helper, shared with the benches

NODE_CMD = [sys.executable, "-m", "gwyh_mp.cli"]


def node_args(port: int, key: str, *extra: str) -> list[str]:
    """``gwyh-node`` arguments for a loopback node on ``port`` with the key file ``key``."""
    return ["--bind", f"127.0.0.1:{port}", "--psk-file", key, *extra]


STDIO_FAST = ("--stdio", "--heartbeat-interval", "0.5", "--stats-interval", "0.2")
"""Flags of a ``--stdio`` test node with quick heartbeats and stats lines."""


def write_key(directory: Path, name: str, key: bytes) -> str:
    path = directory / name
    path.write_bytes(key + b"\n")
    path.chmod(0o600)  # as an operator should: a readable key file gets a warning
    return str(path)


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM (a graceful leave), then SIGKILL if it does not exit in time; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class NodeProcess:
    """A ``gwyh-node`` subprocess whose stdout JSON lines and stderr lines are read
    by background threads, so a test can wait for conditions without blocking."""

    def __init__(self, args: list[str], *, stdin: bool = True, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that execs the node (``ip netns exec NS``)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*prefix, *NODE_CMD, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.messages: list[dict[str, object]] = []
        self.stats: list[dict[str, object]] = []
        self.process_stats: list[dict[str, object]] = []
        self.stderr_lines: list[str] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.messages.append(orjson.loads(line))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                if line.startswith("{"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        record = orjson.loads(line)
                        if record.get("event") == "process":
                            self.process_stats.append(record)
                        else:
                            self.stats.append(record)
                self.stderr_lines.append(line)
                self._changed.notify_all()

    def send_line(self, text: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate: Callable[[NodeProcess], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not predicate(self)):
                    return predicate(self)
                self._changed.wait(min(left, 0.2))
        return True

    def last_stats(self) -> dict[str, object]:
        with self._lock:
            return self.stats[-1] if self.stats else {}

    def terminate(self, timeout: float = 10.0) -> int:
        return terminate(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def node_processes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def wait_all(
    items: list[NodeProcess], predicate: Callable[[NodeProcess], bool], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    return all(p.wait_for(predicate, max(0.1, deadline - time.monotonic())) for p in items)
