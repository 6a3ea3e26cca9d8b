"""Seeds by DNS name: accepted by the configuration, resolved by the runtime at start,
re-resolved while the node is isolated, and handed to the core's bootstrap."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gwyh_mp import Config, Node
from gwyh_mp.config import ConfigError
from gwyh_mp.runtime import seeds

KEY = b"seeds-test-key-0123456789abcdef"


def test_config_takes_names_for_seeds_only() -> None:
    base = Config(psks=[KEY])
    base.replace(bootstrap=[("gwyh.prod.svc.cluster.local", 6969), ("10.0.0.1", 1)]).validate()
    with pytest.raises(ConfigError, match="bootstrap host 'bad_name' is neither"):
        base.replace(bootstrap=[("bad_name", 6969)]).validate()
    with pytest.raises(ConfigError, match="bind host"):
        base.replace(bind=("gwyh.example", 6969)).validate()


def test_split_seeds() -> None:
    ips, names = seeds.split_seeds([("10.0.0.1", 1), ("localhost", 2), ("::1", 3)])
    assert ips == [("10.0.0.1", 1), ("::1", 3)]
    assert names == [("localhost", 2)]


async def test_localhost_resolves_for_the_node_family() -> None:
    assert await seeds.resolve([("localhost", 7000)], socket.AF_INET) == [("127.0.0.1", 7000)]


async def test_a_node_joins_through_a_seed_name() -> None:
    first = await Node(Config.local(bind=("127.0.0.1", 0), psks=[KEY])).start()
    port = first.address[1]
    second = await Node(
        Config.local(bind=("127.0.0.1", 0), psks=[KEY], bootstrap=[("localhost", port)])
    ).start()
    try:
        assert second._seeds is not None and second._seeds.current == [("127.0.0.1", port)]
        await second.wait_for_members(1, timeout=30)
        await first.wait_for_members(1, timeout=30)
    finally:
        await second.stop()
        await first.stop()


async def test_names_are_re_resolved_while_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [[("10.0.0.1", 6969)], [("10.0.0.1", 6969)], [("10.0.0.2", 6969)]]
    calls = 0

    async def fake_resolve(names: list[seeds.Addr], family: int) -> list[seeds.Addr]:
        nonlocal calls
        calls += 1
        return answers[min(calls, len(answers)) - 1]

    monkeypatch.setattr(seeds, "resolve", fake_resolve)
    monkeypatch.setattr(seeds, "ISOLATED_RETRY_S", 0.01)
    applied: list[list[seeds.Addr]] = []
    resolver = seeds.SeedResolver(
        [("seeds.example", 6969), ("192.0.2.7", 1)], socket.AF_INET, applied.append, lambda: True
    )
    await resolver.start()
    try:
        async with asyncio.timeout(10):
            while len(applied) < 2:
                await asyncio.sleep(0.01)
    finally:
        await resolver.stop()
    # Only changes are applied; IP seeds stay alongside the resolved ones.
    assert applied == [
        [("10.0.0.1", 6969), ("192.0.2.7", 1)],
        [("10.0.0.2", 6969), ("192.0.2.7", 1)],
    ]
