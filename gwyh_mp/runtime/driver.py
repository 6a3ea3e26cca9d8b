"""What every runtime does around the core, written once: timers, flush scheduling,
handing events to the application, and backpressure wakeups."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from gwyh_mp.protocol.events import Event
from gwyh_mp.protocol.node import NodeCore

log = logging.getLogger("gwyh_mp")


def freeze_startup_heap() -> None:
    """Take everything allocated so far (modules, the event loop, the node's tables)
    out of the cyclic collector's reach, for a process that is all node (gwyh-node, a
    receiver). Under load the node allocates fast enough to trigger a full collection
    every few seconds, and each one walked the whole import-time heap: 0.1-0.3 s per
    collection, 20-30 % of a busy node's CPU in bench cluster, and stalls long enough
    to overflow socket buffers. Frozen objects are still freed by reference counting;
    only cycles among them are never collected, and startup makes none that die.
    A library embedder can call it (or gc.freeze()) after Node.start() likewise."""
    gc.collect()
    gc.freeze()


class CoreDriver:
    """Base of the single-process and multiprocess runtimes. Subclasses set ``core``
    and ``_loop`` in ``start()`` and implement ``_flush()``, which sends what the core
    produced and then calls ``_after_flush()``."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self.core: NodeCore | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._last_flush = float("-inf")
        self._drained: asyncio.Event | None = None

    def _active(self) -> bool:
        """False once the runtime is shutting down: no more timers."""
        return True

    def _flush(self) -> None:
        raise NotImplementedError

    def broadcast(self, data: bytes) -> bytes:
        assert self.core is not None and self._loop is not None
        msg_id = self.core.broadcast(data, self._loop.time())
        self.schedule_flush()
        return msg_id

    def schedule_flush(self) -> None:
        # Several broadcasts in one loop iteration share one flush (and datagrams).
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush_after_receive(self) -> None:
        """Flush what a receive batch produced: at once, unless the last flush was less
        than Config.flush_interval_s ago; then at the end of that interval, so what
        arrives meanwhile is coalesced into the same datagrams."""
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return
        interval = core.config.flush_interval_s
        if interval <= 0:
            self._flush()
            return
        if self._flush_scheduled:
            return  # a flush is already on its way
        due = self._last_flush + interval
        if loop.time() >= due:
            self._flush()
        else:
            self._flush_scheduled = True
            loop.call_at(due, self._flush)

    async def wait_drained(self) -> None:
        """Wait until the core accepts broadcasts again (its send backlog drained)."""
        if self._drained is None:
            self._drained = asyncio.Event()
        self._drained.clear()
        await self._drained.wait()

    def _after_flush(self, core: NodeCore) -> None:
        if self._loop is not None:
            self._last_flush = self._loop.time()
        while (event := core.next_event()) is not None:
            self._on_event(event)
        while core.warnings:
            log.warning("%s", core.warnings.popleft())
        if self._drained is not None and core.accepting:
            self._drained.set()
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def _on_timer(self) -> None:
        due, self._timer, self._timer_at = self._timer_at, None, None
        if self.core is None or self._loop is None or not self._active():
            return
        try:
            now = self._loop.time()
            if due is not None:
                # The core has no clock: tell its failure detector how late the loop
                # woke us, so that our own slowness stretches our timeouts.
                self.core.detector.report_lag(now - due, now)
            self.core.handle_timer(now)
            self._flush()
        finally:
            self._arm_timer()  # an error must not stop the node's clock

    def _arm_timer(self) -> None:
        core, loop = self.core, self._loop
        if core is None or loop is None or not self._active():
            return
        when = core.get_timer()
        if when is None:
            return
        if self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)
