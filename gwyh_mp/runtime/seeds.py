"""Seeds given by DNS name (``--bootstrap gwyh.prod.svc.cluster.local:6969``).

Resolution is I/O, so it lives here in the runtime and not in the sans-IO core: the
names are resolved at start, again every few seconds while the node has no provider
(the pod set behind a Kubernetes headless service changes as pods come and go), and
every ``REFRESH_S`` otherwise. Each new answer replaces the core's seed addresses
(``NodeCore.set_seeds``); IP seeds are kept as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("gwyh_mp")

Addr = tuple[str, int]
REFRESH_S = 30.0
ISOLATED_RETRY_S = 2.0
RESOLVE_TIMEOUT_S = 10.0


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_seeds(seeds: list[Addr]) -> tuple[list[Addr], list[Addr]]:
    """(seeds given as IP addresses, seeds given as names)."""
    ips = [a for a in seeds if is_ip(a[0])]
    return ips, [a for a in seeds if not is_ip(a[0])]


async def resolve(names: list[Addr], family: int) -> list[Addr]:
    """Every address of every name (A for an IPv4 node, AAAA for an IPv6 one), sorted
    and without repeats; a name that does not resolve is logged and skipped."""
    loop = asyncio.get_running_loop()
    found: set[Addr] = set()
    for host, port in names:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except (OSError, TimeoutError) as exc:
            log.warning("seed %s:%d does not resolve: %s", host, port, exc)
            continue
        for *_, sockaddr in infos:
            found.add((str(sockaddr[0]), int(sockaddr[1])))
    return sorted(found)


class SeedResolver:
    """Keeps the core's seed list in step with DNS for as long as the node runs."""

    def __init__(
        self,
        seeds: list[Addr],
        family: int,
        apply: Callable[[list[Addr]], None],
        isolated: Callable[[], bool],
    ) -> None:
        self.fixed, self.names = split_seeds(seeds)
        self.family = family
        self._apply = apply
        self._isolated = isolated
        self.current: list[Addr] | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        addrs = sorted(set(self.fixed) | set(await resolve(self.names, self.family)))
        if addrs != self.current:
            if self.current is not None:
                log.info("seeds now %s", ", ".join(f"{h}:{p}" for h, p in addrs) or "none")
            self.current = addrs
            self._apply(addrs)

    async def start(self) -> None:
        """Resolve once (the node joins through the answer at once), then keep at it."""
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(ISOLATED_RETRY_S if self._isolated() else REFRESH_S)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
