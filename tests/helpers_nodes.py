"""In-process library nodes on 127.0.0.1 for integration tests."""

from __future__ import annotations

import asyncio
import time

from gwyh_mp import Config, Node


async def start_hub_and_spokes(base: Config, *, hub_workers: int, spokes: int = 3) -> list[Node]:
    """A hub (``hub_workers`` receiver processes) and ``spokes`` single-process nodes that
    bootstrap through it; returns once everyone knows everyone and has all its providers."""
    hub = await Node(base.replace(workers=hub_workers)).start()
    others = [await Node(base.replace(bootstrap=[hub.address])).start() for _ in range(spokes)]
    nodes = [hub, *others]
    try:
        await asyncio.gather(*(n.wait_for_members(spokes, timeout=30) for n in nodes))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            len(n.providers) == min(spokes, base.subscriptions) for n in nodes
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # channel keys in flight
    except BaseException:
        await asyncio.gather(*(n.stop() for n in nodes))
        raise
    return nodes
