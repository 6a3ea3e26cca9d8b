"""The asyncio library API.

async with Node(Config.local(bind=("127.0.0.1", 7001), psks=[key])) as node:
    msg_id = await node.broadcast(b"hello")
    async for msg in node.messages():
        print(msg.origin.hex(), msg.data)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Event, Member, MemberDown, MemberUp, Message, ProviderChanged
from gwyh_mp.protocol.node import MessageTooLarge, NotRunning
from gwyh_mp.runtime.coordinator import MultiProcessRuntime
from gwyh_mp.runtime.seeds import SeedResolver, split_seeds
from gwyh_mp.runtime.single import SingleProcessRuntime

MemberEvent = MemberUp | MemberDown

__all__ = ["MessageTooLarge", "Node", "NotRunning", "SendQueueFull"]


class SendQueueFull(RuntimeError):
    """broadcast(timeout=...) gave up: the send backlog did not drain in time."""


class Node:
    """A gwyh_mp node. Start it (``await node.start()`` or ``async with``), then
    broadcast, read messages and watch membership. Not thread-safe: use it from the
    event loop that started it."""

    def __init__(self, config: Config) -> None:
        self.config = config.validate()
        self._runtime: SingleProcessRuntime | MultiProcessRuntime
        # Seeds given by name reach the core once resolved (runtime/seeds.py).
        ip_seeds, self._seed_names = split_seeds(config.bootstrap)
        core_config = config.replace(bootstrap=ip_seeds) if self._seed_names else config
        if config.workers > 1:
            self._runtime = MultiProcessRuntime(core_config, self._on_event)
        else:
            self._runtime = SingleProcessRuntime(core_config, self._on_event)
        self._seeds: SeedResolver | None = None
        # A deque, not an asyncio.Queue: a batch already read from the socket must be
        # delivered even when it overshoots the bound (reading pauses right after).
        self._inbox: deque[Message] = deque()
        self._inbox_ready = asyncio.Event()
        self._inbox_limit = config.message_queue_size
        self._member_events: asyncio.Queue[MemberEvent] = asyncio.Queue(10_000)
        self._providers: tuple[bytes, ...] = ()
        self._started = False
        self._stopped = False
        self._reading_paused = False
        self._changed = asyncio.Event()
        self.stats_shed_waits = 0  # broadcasts that had to wait for the send queue
        self.on_message: Callable[[Message], None] | None = None  # observer (metrics)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> Node:
        if self._started:
            raise RuntimeError("node already started")
        await self._runtime.start()
        self._started = True
        if self._seed_names:
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
            self._seeds = SeedResolver(
                self.config.bootstrap, family, self._set_seeds, lambda: not self._providers
            )
            await self._seeds.start()
        return self

    def _set_seeds(self, addrs: list[tuple[str, int]]) -> None:
        loop, core = asyncio.get_running_loop(), self._core()
        core.set_seeds(addrs, loop.time())
        self._runtime.schedule_flush()

    async def stop(self) -> None:
        """Leave the cluster gracefully and close the socket. Idempotent."""
        if self._started and not self._stopped:
            self._stopped = True
            if self._seeds is not None:
                await self._seeds.stop()
            await self._runtime.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------ identity

    @property
    def node_id(self) -> bytes:
        return self._core().node_id

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        if self._runtime.address is None:
            raise NotRunning("node is not started")
        return self._runtime.address

    @property
    def max_message_bytes(self) -> int:
        return self._core().max_message_bytes

    # ------------------------------------------------------------ messaging

    async def broadcast(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``data`` to every node in the cluster; returns the 16-byte message id.

        Messages larger than one datagram are fragmented and reassembled transparently.
        When more than ``Config.send_queue_bytes`` are waiting to leave, this waits until
        the backlog drains (backpressure); with ``timeout`` it raises ``SendQueueFull``
        instead of waiting longer. Raises MessageTooLarge or NotRunning."""
        if not self._started or self._stopped:
            raise NotRunning("node is not running")
        core = self._core()
        if not core.accepting:
            self.stats_shed_waits += 1
            try:
                async with asyncio.timeout(timeout):
                    while not core.accepting:
                        if self._stopped:
                            raise NotRunning("node stopped while waiting to send")
                        await self._runtime.wait_drained()
            except TimeoutError:
                raise SendQueueFull(
                    f"send queue still holds {core.backlog_bytes} bytes after {timeout}s "
                    f"(limit {self.config.send_queue_bytes}); the message was not sent"
                ) from None
        return self._runtime.broadcast(bytes(data))

    async def messages(self) -> AsyncIterator[Message]:
        """Every broadcast from other nodes, exactly once each, in arrival order."""
        inbox = self._inbox
        while True:
            while not inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            msg = inbox.popleft()
            if self._reading_paused and len(inbox) < self._inbox_limit // 2:
                self._reading_paused = False
                self._runtime.resume_reading()
            yield msg

    async def message_batches(self, max_batch: int = 4096) -> AsyncIterator[list[Message]]:
        """Like ``messages()``, but yields everything already waiting as one list: the
        cheap way to consume at high rates (one wakeup, one write per batch)."""
        inbox = self._inbox
        while True:
            while not inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            take = min(len(inbox), max_batch)
            batch = [inbox.popleft() for _ in range(take)]
            if self._reading_paused and len(inbox) < self._inbox_limit // 2:
                self._reading_paused = False
                self._runtime.resume_reading()
            yield batch

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message (raises TimeoutError after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            async for msg in self.messages():
                return msg
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ membership

    def members(self) -> list[Member]:
        """Every other node this node knows of, UP or DOWN."""
        return self._core().member_list()

    def local_member(self) -> Member:
        return self._core().local_member()

    @property
    def providers(self) -> tuple[bytes, ...]:
        """Node ids this node currently receives broadcasts from."""
        return self._providers

    async def member_events(self) -> AsyncIterator[MemberEvent]:
        while True:
            yield await self._member_events.get()

    async def wait_for_members(self, count: int, timeout: float = 30.0) -> list[Member]:
        """Wait until at least ``count`` other members are UP."""
        async with asyncio.timeout(timeout):
            while True:
                up = [m for m in self.members() if m.is_up]
                if len(up) >= count:
                    return up
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._changed.wait()

    def process_stats(self) -> list[dict[str, object]]:
        """Per-process figures (multiprocess runtime: coordinator and each receiver)."""
        if isinstance(self._runtime, MultiProcessRuntime):
            return self._runtime.process_stats()
        return []

    def stats(self) -> dict[str, int]:
        core = self._core()
        out = dict(core.stats)
        for key, value in core.handshaker.stats.items():
            out[f"handshake_{key}"] = value
        out["members_up"] = core.members.up_count
        out["providers"] = len(core.providers)
        out["subscribers"] = len(core.subscribers)
        out["seen_ids"] = len(core.seen)
        out["message_queue"] = len(self._inbox)
        out["send_backlog_bytes"] = core.backlog_bytes
        out["broadcast_waits"] = self.stats_shed_waits
        out["shed_no_subscribers"] = core.fanout.shed
        return out

    # ------------------------------------------------------------ internals

    def _core(self):  # type: ignore[no-untyped-def]
        if self._runtime.core is None:
            raise NotRunning("node is not started")
        return self._runtime.core

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Message):
            if self.on_message is not None:
                self.on_message(event)
            self._inbox.append(event)
            self._inbox_ready.set()
            if len(self._inbox) >= self._inbox_limit and not self._reading_paused:
                # Backpressure: stop reading the socket until the app catches up,
                # rather than dropping messages we already accepted.
                self._reading_paused = True
                self._runtime.pause_reading()
        elif isinstance(event, MemberUp | MemberDown):
            if self._member_events.full():
                self._member_events.get_nowait()  # keep the newest; members() is exact
            self._member_events.put_nowait(event)
            self._changed.set()
        elif isinstance(event, ProviderChanged):
            self._providers = event.providers
            self._changed.set()
