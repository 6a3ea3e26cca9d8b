"""Config.flush_interval_s: flush at once when idle, at most once per interval under load.
The driver logic runs against a hand-driven clock; real clusters check nothing is lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

from gwyh_mp import Config, Node
from gwyh_mp.cli import build_run_parser
from gwyh_mp.config import ConfigError
from gwyh_mp.runtime.driver import CoreDriver
from tests.helpers_nodes import start_hub_and_spokes

KEY = b"flush-interval-test-key-0123456789"


class _Clock:
    """Just what CoreDriver uses of an event loop: time() and call_at()."""

    def __init__(self) -> None:
        self.now = 0.0
        self.scheduled: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        self.scheduled.append((when, callback))

    def run_due(self) -> None:
        due = [(w, cb) for w, cb in self.scheduled if w <= self.now]
        self.scheduled = [(w, cb) for w, cb in self.scheduled if w > self.now]
        for _, callback in due:
            callback()


class _Core:
    def __init__(self, interval: float) -> None:
        self.config = Config.local(psks=[KEY], flush_interval_s=interval)


class _Driver(CoreDriver):
    def __init__(self, interval: float) -> None:
        super().__init__(on_event=lambda event: None)
        self.clock = _Clock()
        self._loop = self.clock  # type: ignore[assignment]
        self.core = _Core(interval)  # type: ignore[assignment]
        self.flushes: list[float] = []

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.flushes.append(self.clock.now)
        self._last_flush = self.clock.now  # what _after_flush records


def test_idle_node_flushes_at_once_and_a_busy_one_once_per_interval() -> None:
    d = _Driver(0.005)
    d.flush_after_receive()  # idle: at once
    assert d.flushes == [0.0] and not d.clock.scheduled
    for t in (0.001, 0.002, 0.004):  # busy: one flush, at the end of the interval
        d.clock.now = t
        d.flush_after_receive()
    assert d.flushes == [0.0] and [w for w, _ in d.clock.scheduled] == [0.005]
    d.clock.now = 0.005
    d.clock.run_due()
    assert d.flushes == [0.0, 0.005]
    d.clock.now = 0.02  # idle again: at once
    d.flush_after_receive()
    assert d.flushes == [0.0, 0.005, 0.02] and not d.clock.scheduled


def test_zero_interval_flushes_after_every_receive_batch() -> None:
    d = _Driver(0.0)
    for t in (0.0, 0.0001, 0.0002):
        d.clock.now = t
        d.flush_after_receive()
    assert d.flushes == [0.0, 0.0001, 0.0002] and not d.clock.scheduled


@pytest.mark.parametrize("bad", [-0.001, 1.5, "0.005", True, float("nan")])
def test_config_rejects_bad_flush_interval(bad: object) -> None:
    with pytest.raises(ConfigError, match="flush_interval_s"):
        Config.local(psks=[KEY], flush_interval_s=bad).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["-1", "2", "soon"])
def test_cli_rejects_bad_flush_interval(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_run_parser().parse_args(["--psk-file", "k", "--flush-interval", bad])
    assert exc.value.code == 2
    assert "--flush-interval" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
async def test_cluster_with_a_flush_interval_delivers_exactly_once(workers: int) -> None:
    base = Config.local(bind=("127.0.0.1", 0), psks=[KEY], flush_interval_s=0.005)
    nodes = await start_hub_and_spokes(base, hub_workers=workers)
    try:
        sent = {}
        for node in nodes:
            for k in range(20):
                sent[await node.broadcast(b"message %d" % k)] = node
        got = {n.node_id: Counter[bytes]() for n in nodes}

        async def read(node: Node) -> None:
            want = {m for m, s in sent.items() if s is not node}
            async for msg in node.messages():
                got[node.node_id][msg.id] += 1
                if want <= set(got[node.node_id]):
                    return

        await asyncio.wait_for(asyncio.gather(*(read(n) for n in nodes)), 30)
        await asyncio.sleep(0.3)
        for node in nodes:
            assert set(got[node.node_id]) == {m for m, s in sent.items() if s is not node}
            assert all(c == 1 for c in got[node.node_id].values())
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
