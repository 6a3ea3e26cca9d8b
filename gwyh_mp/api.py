"""The asyncio library API.

async with Node(Config.local(bind=("127.0.0.1", 7001), psks=[key])) as node:
    msg_id = await node.broadcast(b"hello")
    async for msg in node.messages():
        print(msg.origin.hex(), msg.data)

Every ``messages()``, ``message_batches()`` and ``member_events()`` call is a stream of
its own, with its own bounded queue, starting the moment it is made (several consumers
each see everything). Backpressure policy with several consumers:

- A message stream opened with ``backpressure=True`` (the default) never loses a
  message: while its queue holds ``Config.message_queue_size`` messages the node stops
  reading the network, so the whole node runs at the pace of its slowest such stream.
- A stream opened with ``backpressure=False`` (and every member-event stream) never
  slows the node: when its queue is full, what does not fit is dropped for that stream
  alone, and its next read raises ``StreamOverflow`` saying how many it lost, at the
  point of the gap; the stream stays usable afterwards.
- Messages that arrive while no message stream is open wait for the next one opened
  (at most ``message_queue_size``; beyond that the oldest are dropped and counted in
  ``stats()["messages_unclaimed_dropped"]``), so "broadcast, then start reading" misses
  nothing and a node nobody reads from keeps gossiping.

A stream is closed by ``close()``, by leaving ``async with stream:``, or when it is
garbage collected (an abandoned ``async for`` loop); a closed stream holds nothing up.
When the node stops, every stream ends once its reader has read what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from gwyh_mp.config import Config
from gwyh_mp.protocol.crypto import PskKeyring
from gwyh_mp.protocol.events import (
    Event,
    Member,
    MemberDown,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    Message,
    ProviderChanged,
    RejectedHandshakes,
)
from gwyh_mp.protocol.node import MessageTooLarge, NotRunning
from gwyh_mp.runtime.coordinator import MultiProcessRuntime
from gwyh_mp.runtime.seeds import SeedResolver, split_seeds
from gwyh_mp.runtime.single import SingleProcessRuntime

# MemberLeft is a MemberDown: a graceful leave. MemberUpdated: new name or tags.
# MemberSuspect: a probe failed; a MemberDown follows unless it refutes (a MemberUp).
MemberEvent = MemberUp | MemberUpdated | MemberSuspect | MemberDown

__all__ = [
    "MessageStream",
    "MessageTooLarge",
    "Node",
    "NotRunning",
    "SendQueueFull",
    "StreamOverflow",
]

MEMBER_EVENT_QUEUE = 10_000
T = TypeVar("T")


class SendQueueFull(RuntimeError):
    """broadcast(timeout=...) gave up: the send backlog did not drain in time."""


class StreamOverflow(Exception):
    """A stream without backpressure fell behind: ``lost`` items were dropped for it
    (for this stream only) at this point of the stream. Reading on continues after
    the gap."""

    def __init__(self, lost: int) -> None:
        super().__init__(f"this stream fell behind and lost {lost} item(s)")
        self.lost = lost


class _Gap:
    """Stands in a stream's queue where items were dropped; counts them."""

    __slots__ = ("lost",)

    def __init__(self) -> None:
        self.lost = 0


class _Stream(Generic[T]):
    """One consumer's bounded queue, fed by the node's fan-out."""

    def __init__(self, node: Node, limit: int, backpressure: bool) -> None:
        self._node = node
        self._items: deque[T | _Gap] = deque()
        self._ready = asyncio.Event()
        self.limit = limit
        self.backpressure = backpressure
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T) -> bool:
        """Queue ``item``; returns True when this stream asks the node to pause reading."""
        items = self._items
        if len(items) >= self.limit:
            if self.backpressure:
                # A batch already read from the socket must be delivered even when it
                # overshoots the bound; reading pauses right after.
                items.append(item)
                return True
            last = items[-1]
            if not isinstance(last, _Gap):
                last = _Gap()
                items.append(last)
            last.lost += 1
            return False
        items.append(item)
        self._ready.set()
        return self.backpressure and len(items) >= self.limit

    async def _wait(self) -> None:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def _pop(self) -> T:
        item = self._items.popleft()
        if isinstance(item, _Gap):
            raise StreamOverflow(item.lost)
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ready.set()
            self._node._forget(self)

    def end(self) -> None:
        """The node stopped: what is queued is still read, then iteration ends."""
        self.closed = True
        self._ready.set()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned stream must not hold the node up (backpressure) or hold memory.
        with contextlib.suppress(Exception):
            self.close()


class MessageStream(_Stream[Message]):
    """``async for msg in node.messages()``: this consumer's own copy of every message."""

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        await self._wait()
        msg = self._pop()
        self._node._consumed(self)
        return msg

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class MessageBatchStream(_Stream[Message]):
    """``async for batch in node.message_batches()``: lists of what was waiting."""

    def __init__(self, node: Node, limit: int, backpressure: bool, max_batch: int) -> None:
        super().__init__(node, limit, backpressure)
        self.max_batch = max_batch

    def __aiter__(self) -> MessageBatchStream:
        return self

    async def __anext__(self) -> list[Message]:
        await self._wait()
        items = self._items
        batch: list[Message] = []
        take = min(len(items), self.max_batch)
        for _ in range(take):
            if isinstance(items[0], _Gap):
                if batch:
                    break  # deliver what preceded the gap first
                raise StreamOverflow(items.popleft().lost)  # type: ignore[union-attr]
            batch.append(items.popleft())  # type: ignore[arg-type]
        self._node._consumed(self)
        return batch

    async def __aenter__(self) -> MessageBatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class MemberEventStream(_Stream[MemberEvent]):
    """``async for event in node.member_events()``: MemberUp / MemberSuspect / MemberDown
    from now on."""

    def __aiter__(self) -> MemberEventStream:
        return self

    async def __anext__(self) -> MemberEvent:
        await self._wait()
        return self._pop()

    async def __aenter__(self) -> MemberEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


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
        # Fan-out: weak references, so an abandoned stream is collected and unregistered.
        self._message_streams: list[weakref.ref[_Stream[Message]]] = []
        self._event_streams: list[weakref.ref[_Stream[MemberEvent]]] = []
        # Messages that arrived while no message stream was open (see the module doc).
        self._unclaimed: deque[Message] = deque(maxlen=config.message_queue_size)
        self.stats_unclaimed_dropped = 0
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
            for stream in self._live(self._message_streams) + self._live(self._event_streams):
                stream.end()  # readers finish what is queued, then their loops end

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

    def messages(
        self, *, backpressure: bool = True, queue_size: int | None = None
    ) -> MessageStream:
        """A new stream of every broadcast from other nodes, exactly once each, in
        arrival order, from now on (see the module doc for backpressure). Its queue
        holds ``queue_size`` messages (default ``Config.message_queue_size``)."""
        stream = MessageStream(self, queue_size or self.config.message_queue_size, backpressure)
        self._open_message_stream(stream)
        return stream

    def message_batches(
        self, max_batch: int = 4096, *, backpressure: bool = True, queue_size: int | None = None
    ) -> MessageBatchStream:
        """Like ``messages()``, but yields everything already waiting as one list: the
        cheap way to consume at high rates (one wakeup, one write per batch)."""
        limit = queue_size or self.config.message_queue_size
        stream = MessageBatchStream(self, limit, backpressure, max_batch)
        self._open_message_stream(stream)
        return stream

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message (raises TimeoutError after ``timeout`` seconds)."""
        async with self.messages() as stream, asyncio.timeout(timeout):
            return await anext(stream)

    # ------------------------------------------------------------ membership

    def members(self) -> list[Member]:
        """Every other node this node knows of, UP, DOWN or LEFT."""
        return self._core().member_list()

    def local_member(self) -> Member:
        return self._core().local_member()

    def rejected_handshakes(self) -> list[RejectedHandshakes]:
        """Handshakes refused for a wrong key or as expired, as (reason, source address,
        count), since the previous call. Bounded: at most 64 sources are listed between
        two calls, the rest are summed under the address None."""
        return self._core().take_rejected_handshakes()

    @property
    def providers(self) -> tuple[bytes, ...]:
        """Node ids this node currently receives broadcasts from."""
        return self._providers

    def member_events(self, queue_size: int = MEMBER_EVENT_QUEUE) -> MemberEventStream:
        """A new stream of MemberUp / MemberSuspect / MemberDown (MemberLeft, a MemberDown,
        for a graceful leave) from now on (``members()`` is the state so far). It never slows
        the node: a reader that falls ``queue_size`` events behind gets
        ``StreamOverflow`` at the gap."""
        stream = MemberEventStream(self, queue_size, backpressure=False)
        self._event_streams.append(weakref.ref(stream))
        return stream

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

    # ------------------------------------------------------------ keys

    @property
    def psks(self) -> list[bytes]:
        """The pre-shared keys this node accepts and offers now."""
        return list(self.config.psks)

    def set_psks(self, psks: Sequence[bytes]) -> None:
        """Replace the accepted keys live (rotation): handshakes from now on use these.
        Established sessions are unaffected (their keys came from the handshake), so no
        membership is lost. Raises ConfigError for an empty or invalid list."""
        new = list(psks)
        self.config.replace(psks=new).validate()
        keyring = PskKeyring(new)
        if self._runtime.core is not None:
            # The core's Handshaker shares this keyring object; swapping its keys is
            # enough, in every runtime: receivers never see PSKs, only session keys.
            self._runtime.core.keyring.keys = keyring.keys
        self.config.psks = new

    def stats(self) -> dict[str, int]:
        core = self._core()
        out = dict(core.stats)
        for key, value in core.handshaker.stats.items():
            out[f"handshake_{key}"] = value
        out["members_up"] = core.members.up_count
        out["providers"] = len(core.providers)
        out["subscribers"] = len(core.subscribers)
        out["seen_ids"] = len(core.seen)
        out["message_queue"] = max((len(s) for s in self._live(self._message_streams)), default=0)
        out["message_streams"] = len(self._message_streams)
        out["messages_unclaimed"] = len(self._unclaimed)
        out["messages_unclaimed_dropped"] = self.stats_unclaimed_dropped
        out["reading_paused"] = int(self._reading_paused)
        out["send_backlog_bytes"] = core.backlog_bytes
        out["broadcast_waits"] = self.stats_shed_waits
        out["shed_no_subscribers"] = core.fanout.shed
        return out

    # ------------------------------------------------------------ internals

    def _core(self):  # type: ignore[no-untyped-def]
        if self._runtime.core is None:
            raise NotRunning("node is not started")
        return self._runtime.core

    @staticmethod
    def _live(refs: list[weakref.ref[_Stream[T]]]) -> list[_Stream[T]]:
        return [s for r in refs if (s := r()) is not None]

    def _open_message_stream(self, stream: _Stream[Message]) -> None:
        if not self._live(self._message_streams) and self._unclaimed:
            stream._items.extend(self._unclaimed)
            stream._ready.set()
            self._unclaimed.clear()
        self._message_streams.append(weakref.ref(stream))

    def _forget(self, stream: _Stream[T]) -> None:
        # New lists, not in-place edits: a fan-out loop may be iterating the old ones.
        self._message_streams = [
            r for r in self._message_streams if (s := r()) is not None and s is not stream
        ]
        self._event_streams = [
            r for r in self._event_streams if (s := r()) is not None and s is not stream
        ]
        if isinstance(stream, MessageStream | MessageBatchStream):
            if not self._message_streams:
                # The last reader went away: what it had not read waits for the next one.
                for item in stream._items:
                    if isinstance(item, Message):
                        self._keep_unclaimed(item)
            stream._items.clear()
            self._consumed(None)

    def _keep_unclaimed(self, msg: Message) -> None:
        if len(self._unclaimed) == self._unclaimed.maxlen:
            self.stats_unclaimed_dropped += 1
        self._unclaimed.append(msg)

    def _consumed(self, stream: _Stream[Message] | None) -> None:
        """A reader made room: resume reading once every backpressure stream has
        drained to half its bound."""
        if not self._reading_paused:
            return
        if stream is not None and len(stream) >= stream.limit // 2:
            return
        for s in self._live(self._message_streams):
            if s.backpressure and len(s) >= s.limit // 2:
                return
        self._reading_paused = False
        if not self._stopped:
            self._runtime.resume_reading()
            self._core().set_reading_paused(False)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Message):
            if self.on_message is not None:
                self.on_message(event)
            pause = False
            delivered = False
            for ref in self._message_streams:
                stream = ref()
                if stream is not None:
                    pause |= stream.push(event)
                    delivered = True
            if not delivered:
                self._keep_unclaimed(event)
            if pause and not self._reading_paused:
                # Backpressure: stop reading the socket until the slow reader catches
                # up, rather than dropping messages we already accepted.
                self._reading_paused = True
                self._runtime.pause_reading()
                self._core().set_reading_paused(True)
        elif isinstance(event, MemberUp | MemberUpdated | MemberSuspect | MemberDown):
            for ref in self._event_streams:
                stream = ref()
                if stream is not None:
                    stream.push(event)
            self._changed.set()
        elif isinstance(event, ProviderChanged):
            self._providers = event.providers
            self._changed.set()
