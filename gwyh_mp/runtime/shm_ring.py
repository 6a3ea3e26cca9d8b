"""Single-producer / single-consumer ring of byte records in POSIX shared memory.

Receiver processes hand decoded events to the coordinator (and the coordinator
hands send jobs back) through one :class:`ShmRing` per direction and per
receiver.  The point is batching: a whole batch of records costs one header
store and at most one wakeup syscall, instead of a pickle + pipe write +
semaphore per item as with :class:`multiprocessing.Queue`.

Layout
------
A :class:`multiprocessing.shared_memory.SharedMemory` segment holds a 384-byte
header followed by the data area.  The header is read and written as aligned
native 8-byte words (a ``memoryview.cast("Q")``, whose element access is a
single ``memcpy`` of 8 bytes, i.e. one ``mov``)::

    word  0..3   magic, layout version, data-area size, requested capacity
    word 16..18  producer-owned: head, eof flag, space-wait epoch
    word 32..35  consumer-owned: tail, data-wait epoch, and how many records
                 (and blob bytes) of the frame at tail were already taken

Producer and consumer words sit on different cache-line pairs so that the two
sides do not false-share.  ``head`` and ``tail`` are monotonic byte counters
(never reduced modulo the size, so ``head - tail`` is the number of used bytes
and full/empty are never ambiguous).  Every word has exactly one writer.

Records are written in frames, one per :meth:`ShmRing.put_many` call (two when
the call wraps around).  A frame is ``uint32 count, uint32 blob_len`` followed
by a blob that is a length-prefixed record stream which happens to be exactly
the :mod:`marshal` (version 2) encoding of a list of bytes::

    "[" uint32 count   then per record:   "s" uint32 length, payload

all little-endian, padded to 8 bytes.  That choice is about speed: the
consumer turns a whole frame into a ``list[bytes]`` with one C call
(``marshal.loads``, ~20 ns per 100-byte record) instead of a Python loop per
record (~250 ns), and the producer builds a frame with ``bytes.join`` over
cached per-length headers.  The format is checked against ``marshal`` at
import; both ends run the same interpreter, and only trusted processes of the
same program share a ring (marshal must never see foreign data).

A frame never straddles the end of the data area: a batch that reaches the end
is split, and the producer writes the count ``0xFFFFFFFF`` (a wrap marker) in
the unusable remainder and continues at offset 0.  The data area is
``capacity + 40`` bytes, which guarantees that any record of at most
``capacity // 2`` bytes (:attr:`max_record`) fits into an empty ring whatever
the current offset, so a producer that waits for space can never deadlock.  A
consumer may take part of a frame (``max_records``; done with a Python loop);
how many records of the frame at ``tail`` it already returned, and where the
next one starts, are kept in consumer-owned header words, and the frame's space
is released once all of its records are consumed.

Memory ordering
---------------
This module assumes x86-64 (TSO): stores become visible in program order and
loads are not reordered with other loads, so "write payload, then store head"
on the producer and "load head, then read payload" on the consumer need no
barrier (likewise "read payload, then store tail" versus "load tail, then
overwrite").  Aligned 8-byte stores and loads are single-copy atomic, so a
counter is never seen half-written.  The compiler cannot reorder these either:
every access is a separate opaque C call from the interpreter.

The one place where TSO is not enough is the sleep/wakeup handshake, a Dekker
pattern (consumer: store "sleeping", load head; producer: store head, load
"sleeping"), which needs store->load ordering.  ``ShmRing._full_fence`` provides
it by acquiring and releasing a :class:`threading.Lock`: on Linux/glibc that is
a POSIX semaphore whose ``sem_trywait``/``sem_post`` are ``lock``-prefixed
read-modify-writes, i.e. full barriers on x86-64.  It costs ~0.1 us and runs
once per batch.  On weakly ordered CPUs (aarch64) the payload/counter ordering
is NOT guaranteed by this pure-Python implementation; do not use it there.

Wakeups
-------
Two eventfds (``EFD_NONBLOCK | EFD_CLOEXEC``), one per direction: "data
available" (producer -> consumer) and "space available" (consumer ->
producer).  A side that wants to sleep bumps its wait epoch to an odd value,
fences, re-checks the ring and only then blocks on its eventfd; the other side
signals only when it sees an odd epoch it has not signalled yet, so a busy
stream costs no syscalls at all.  The data eventfd is what asyncio consumers
register with ``loop.add_reader(ring.fileno(), ...)`` (see :meth:`wait_async`
and :meth:`prepare_wait`).

Lifecycle and start methods
---------------------------
The parent calls :meth:`ShmRing.create`, passes :attr:`ShmRing.handle` to the
child (as a ``Process`` argument, or through a ``multiprocessing`` queue or
pipe), and the child calls :meth:`ShmRing.attach`.  The handle carries the
segment name and the two eventfds; it pickles the fds with
:func:`multiprocessing.reduction.DupFd`, so it works with the ``fork``,
``spawn`` and ``forkserver`` start methods alike (fds are inherited, passed to
the spawned interpreter, or sent over the forkserver/resource-sharer Unix
socket).  A process started some other way (``subprocess`` with ``pass_fds``)
can build ``ShmRingHandle(name, data_fd, space_fd)`` itself.

Only the creating process may :meth:`unlink`.  On Python < 3.13 attaching with
``SharedMemory(name)`` registers the segment with the attaching process's
resource tracker.  For ``multiprocessing`` children that tracker is the
parent's (shared) one, and the usual "unregister after attaching" recipe then
removes the *parent's* registration (the parent's later ``unlink`` makes the
tracker print a ``KeyError`` traceback, and crash cleanup is lost).  For an
unrelated process it is a fresh tracker, which unlinks the segment under the
parent's feet when that process exits and warns about "leaked shared_memory
objects".  :meth:`attach` therefore never registers at all (``track=False`` on
3.13+, a register filter for just this segment name before that): the creator
alone owns the segment, and its tracker still removes it if the creator dies
without unlinking.
"""

from __future__ import annotations

import asyncio
import marshal
import math
import os
import select
import struct
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from multiprocessing import reduction, resource_tracker
from multiprocessing.shared_memory import SharedMemory
from operator import itemgetter
from typing import Any, Self

__all__ = ["DEFAULT_CAPACITY", "ShmRing", "ShmRingHandle"]

DEFAULT_CAPACITY = 4 * 1024 * 1024
_MIN_CAPACITY = 64
_MAX_CAPACITY = 1 << 30  # keeps every length well below the wrap marker value

_MAGIC = int.from_bytes(b"GWYHRING", "little")
_VERSION = 1
_HEADER_SIZE = 384
# Header word indices (8-byte words); see the module docstring.
_W_MAGIC, _W_VERSION, _W_DATA_SIZE, _W_CAPACITY = 0, 1, 2, 3
_W_HEAD, _W_EOF, _W_SPACE_WAIT = 16, 17, 18  # written by the producer only
_W_TAIL, _W_DATA_WAIT, _W_SKIP, _W_SKIP_OFF = 32, 33, 34, 35  # consumer only

_FRAME = struct.Struct("<II")  # record count (or _WRAP), blob bytes
_FRAME_AND_LIST = struct.Struct("<IIcI")  # frame header + marshal list header
_REC = struct.Struct("<cI")  # marshal bytes header: b"s", length
_U32 = struct.Struct("<I")
_WRAP = 0xFFFFFFFF
_FRAME_OVERHEAD = _FRAME_AND_LIST.size  # 13
_SLACK = 40  # data area = capacity + _SLACK, see "Layout"
_PLUS5 = (_REC.size).__add__  # bytes a record takes in a frame: header + payload
# The blob must be what marshal itself writes for a list of bytes (checked
# explicitly rather than with assert, which -O would strip).
if marshal.dumps([b"ab", b""], 2) != b"[\x02\x00\x00\x00s\x02\x00\x00\x00abs\x00\x00\x00\x00":
    raise ImportError("unexpected marshal encoding of a list of bytes; ShmRing unusable")

# Record header per length; bounded, and rebuilt on demand after a clear.
_rec_headers: dict[int, bytes] = {}
_REC_HEADERS_MAX = 16384


def _record_headers(lengths: list[int]) -> Sequence[bytes]:
    """The marshal header of each record, looked up in C (itemgetter) when cached."""
    try:
        if len(lengths) == 1:
            return (_rec_headers[lengths[0]],)
        return itemgetter(*lengths)(_rec_headers)  # type: ignore[no-any-return]
    except KeyError:  # lengths not seen before: the slow path, rarely taken
        if len(_rec_headers) > _REC_HEADERS_MAX:
            _rec_headers.clear()
        headers = []
        for n in lengths:  # no re-lookup after filling: another thread may clear
            header = _rec_headers.get(n)
            if header is None:
                header = _rec_headers[n] = _REC.pack(b"s", n)
            headers.append(header)
        return headers


def _frame_size(length: int) -> int:
    """Bytes a frame holding a single record of ``length`` bytes occupies."""
    return (_FRAME_OVERHEAD + _REC.size + length + 7) & ~7


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _poll_ms(deadline: float | None) -> int:
    """Milliseconds left until ``deadline`` for poll(); -1 means forever."""
    if deadline is None:
        return -1
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


_tracker_filter_lock = threading.Lock()


def _attach_untracked(name: str) -> SharedMemory:
    """Open an existing segment without registering it with a resource tracker."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    # SharedMemory.__init__ calls ``resource_tracker.register`` (looked up on the
    # module at call time) with the slash-prefixed name.  Filter out exactly
    # that registration; any other thread's registrations still go through.
    skipped = "/" + name.lstrip("/")
    with _tracker_filter_lock:
        original = resource_tracker.register

        def register(rname: str, rtype: str) -> None:
            if not (rtype == "shared_memory" and rname == skipped):
                original(rname, rtype)

        resource_tracker.register = register
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = original


class ShmRingHandle:
    """Picklable reference to a ring: segment name plus the two eventfds.

    Pickling wraps the fds in :func:`multiprocessing.reduction.DupFd`, so a handle
    survives ``spawn``/``forkserver`` process creation and multiprocessing
    queues/pipes.  A handle rebuilt from a pickle owns the fds it received and
    closes them when garbage-collected; :meth:`ShmRing.attach` duplicates them,
    so attaching any number of times is safe.
    """

    __slots__ = ("_owns_fds", "data_fd", "name", "space_fd")

    def __init__(self, name: str, data_fd: int, space_fd: int, *, _owns_fds: bool = False):
        self.name = name
        self.data_fd = data_fd
        self.space_fd = space_fd
        self._owns_fds = _owns_fds

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handle,
            (self.name, reduction.DupFd(self.data_fd), reduction.DupFd(self.space_fd)),
        )

    def __del__(self) -> None:
        if self._owns_fds:
            self._owns_fds = False
            for fd in (self.data_fd, self.space_fd):
                try:
                    os.close(fd)
                except Exception:  # also at interpreter shutdown
                    pass

    def __repr__(self) -> str:
        return f"ShmRingHandle({self.name!r}, data_fd={self.data_fd}, space_fd={self.space_fd})"


def _rebuild_handle(name: str, data_fd: Any, space_fd: Any) -> ShmRingHandle:
    return ShmRingHandle(name, data_fd.detach(), space_fd.detach(), _owns_fds=True)


class ShmRing:
    """SPSC ring of variable-length byte records in shared memory.

    Exactly one process (or thread) produces and one consumes; a single object
    may play both roles (useful in tests).  Not safe for several producers or
    several consumers.  See the module docstring for layout, memory ordering,
    wakeups and start methods.
    """

    def __init__(
        self,
        shm: SharedMemory,
        data_fd: int,
        space_fd: int,
        *,
        creator: bool,
    ) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self._closed = True  # until fully initialised, so __del__ does nothing
        self._shm = shm
        self._data_fd = data_fd
        self._space_fd = space_fd
        self._creator_pid: int | None = os.getpid() if creator else None
        self._unlinked = False
        hdr = shm.buf[:_HEADER_SIZE].cast("Q")
        if hdr[_W_MAGIC] != _MAGIC or hdr[_W_VERSION] != _VERSION:
            hdr.release()
            raise ValueError(f"shared memory {shm.name!r} is not a ShmRing v{_VERSION}")
        self._size: int = hdr[_W_DATA_SIZE]
        self.capacity: int = hdr[_W_CAPACITY]
        #: Largest payload accepted by :meth:`put_many`.
        self.max_record: int = self.capacity // 2
        if shm.size < _HEADER_SIZE + self._size:
            hdr.release()
            raise ValueError(f"shared memory {shm.name!r} is smaller than its header says")
        self._hdr = hdr
        self._data = shm.buf[_HEADER_SIZE : _HEADER_SIZE + self._size]
        # Last wait epoch each side signalled: one wakeup per sleep episode.
        self._signalled_data = 0
        self._signalled_space = 0
        lock = threading.Lock()
        self._fence_acquire = lock.acquire
        self._fence_release = lock.release
        self._data_poll = select.poll()
        self._data_poll.register(data_fd, select.POLLIN)
        self._space_poll = select.poll()
        self._space_poll.register(space_fd, select.POLLIN)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, name: str | None = None) -> ShmRing:
        """Create a new segment (in the parent).  ``capacity`` is rounded up to 8."""
        if not _MIN_CAPACITY <= capacity <= _MAX_CAPACITY:
            raise ValueError(f"capacity must be in [{_MIN_CAPACITY}, {_MAX_CAPACITY}]")
        capacity = (capacity + 7) & ~7
        size = capacity + _SLACK
        data_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        space_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            shm = SharedMemory(name=name, create=True, size=_HEADER_SIZE + size)
        except BaseException:
            os.close(data_fd)
            os.close(space_fd)
            raise
        hdr = shm.buf[:_HEADER_SIZE].cast("Q")  # ftruncate zero-filled everything
        hdr[_W_DATA_SIZE] = size
        hdr[_W_CAPACITY] = capacity
        hdr[_W_VERSION] = _VERSION
        hdr[_W_MAGIC] = _MAGIC
        hdr.release()
        return cls(shm, data_fd, space_fd, creator=True)

    @classmethod
    def attach(cls, handle: ShmRingHandle) -> ShmRing:
        """Attach to an existing ring (in a child); never registers with a resource tracker."""
        data_fd = os.dup(handle.data_fd)
        space_fd = os.dup(handle.space_fd)
        try:
            shm = _attach_untracked(handle.name)
        except BaseException:
            os.close(data_fd)
            os.close(space_fd)
            raise
        try:
            return cls(shm, data_fd, space_fd, creator=False)
        except BaseException:
            shm.close()
            os.close(data_fd)
            os.close(space_fd)
            raise

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def handle(self) -> ShmRingHandle:
        """Picklable handle for :meth:`attach` in another process."""
        return ShmRingHandle(self._shm.name, self._data_fd, self._space_fd)

    def close(self) -> None:
        """Unmap the segment and close this object's eventfds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._data_poll.unregister(self._data_fd)
        self._space_poll.unregister(self._space_fd)
        self._hdr.release()
        self._data.release()
        self._shm.close()
        os.close(self._data_fd)
        os.close(self._space_fd)

    def unlink(self) -> None:
        """Remove the segment name; creating process only.  Safe after close()."""
        if self._creator_pid != os.getpid():
            raise RuntimeError("only the process that created the ring may unlink it")
        if not self._unlinked:
            self._unlinked = True
            self._shm.unlink()  # also unregisters it from our resource tracker

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close, and unlink when called in the creating process."""
        self.close()
        if self._creator_pid == os.getpid():
            self.unlink()

    def __del__(self) -> None:
        # Release our views before SharedMemory.__del__ tries to close the mmap.
        if not self.__dict__.get("_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.used_bytes()}/{self._size} bytes used"
        return f"<ShmRing {self.name!r} capacity={self.capacity} {state}>"

    # ------------------------------------------------------------------- state

    def fileno(self) -> int:
        """Data eventfd: readable after the producer signalled (consumer side)."""
        return self._data_fd

    def space_fileno(self) -> int:
        """Space eventfd: readable after the consumer freed space (producer side)."""
        return self._space_fd

    def used_bytes(self) -> int:
        hdr = self._hdr
        tail = hdr[_W_TAIL]
        return hdr[_W_HEAD] - tail

    def readable(self) -> bool:
        """True if at least one record is waiting (a wrap marker is always followed by one)."""
        hdr = self._hdr
        return hdr[_W_HEAD] != hdr[_W_TAIL]

    def consumer_waiting(self) -> bool:
        """True while the consumer is armed for a data wakeup (diagnostics, tests)."""
        return bool(self._hdr[_W_DATA_WAIT] & 1)

    def producer_waiting(self) -> bool:
        """True while the producer is armed for a space wakeup (diagnostics, tests)."""
        return bool(self._hdr[_W_SPACE_WAIT] & 1)

    @property
    def eof(self) -> bool:
        """True once the producer called :meth:`mark_eof` and every record was consumed."""
        hdr = self._hdr
        # The flag is loaded before head: head can no longer move once it is set.
        return bool(hdr[_W_EOF]) and hdr[_W_HEAD] == hdr[_W_TAIL]

    def can_put(self, length: int) -> bool:
        """Whether a record of ``length`` payload bytes fits right now."""
        hdr = self._hdr
        head = hdr[_W_HEAD]
        free = self._size - (head - hdr[_W_TAIL])
        total = _frame_size(length)
        room = self._size - head % self._size
        return (total if total <= room else room + total) <= free

    def _full_fence(self) -> None:
        """Full (store->load) barrier; see "Memory ordering" in the module docstring."""
        self._fence_acquire()
        self._fence_release()

    # ---------------------------------------------------------------- producer

    def put_many(self, records: Sequence[bytes | bytearray | memoryview]) -> int:
        """Append as many leading ``records`` as fit; return how many were written.

        Never overwrites unread data and never drops a record silently: the
        caller keeps ``records[n:]`` and retries, typically after
        :meth:`wait_space` (or use :meth:`put_all`).  A memoryview must be
        1-D bytes (``.cast("B")``).  Raises ValueError, writing nothing, if any
        record is larger than :attr:`max_record`.  The batch is published with
        a single head store and at most one wakeup.
        """
        n = len(records)
        if not n:
            return 0
        lengths = list(map(len, records))
        if max(lengths) > self.max_record:
            raise ValueError(f"record larger than max_record={self.max_record} bytes")
        headers = _record_headers(lengths)
        hdr = self._hdr
        size = self._size
        head = hdr[_W_HEAD]
        free = size - (head - hdr[_W_TAIL])
        pos = head % size
        # Nothing below is visible to the consumer until head is stored, so an
        # exception mid-way publishes nothing.
        blob = 5 + 5 * n + sum(lengths)
        if 8 + blob <= min(size - pos, free):  # common case: one frame, no split
            self._write_frame(pos, records, headers, blob)
            head += (8 + blob + 7) & ~7
            done = n
        else:
            head, done = self._put_split(records, lengths, headers, head, free)
        if done:
            hdr[_W_HEAD] = head
            self._full_fence()
            waiting = hdr[_W_DATA_WAIT]
            if waiting & 1 and waiting != self._signalled_data:
                self._signalled_data = waiting
                os.eventfd_write(self._data_fd, 1)
        return done

    def _write_frame(
        self, pos: int, records: Sequence[Any], headers: Sequence[bytes], blob: int
    ) -> None:
        count = len(records)
        data = self._data
        _FRAME_AND_LIST.pack_into(data, pos, count, blob, b"[", count)
        parts: list[Any] = [None] * (2 * count)
        parts[::2] = headers
        parts[1::2] = records
        data[pos + _FRAME_OVERHEAD : pos + 8 + blob] = b"".join(parts)

    def _put_split(
        self,
        records: Sequence[Any],
        lengths: list[int],
        headers: Sequence[bytes],
        head: int,
        free: int,
    ) -> tuple[int, int]:
        """Slow path of put_many: the batch reaches the end of the data area or
        exceeds the free space.  At most two frames and a wrap marker.  Returns
        the new head and the number of records written."""
        size = self._size
        n = len(records)
        # cum[i]: blob bytes (record headers + payloads) taken by records[:i].
        cum = list(accumulate(map(_PLUS5, lengths), initial=0))
        done = 0
        while done < n:
            pos = head % size
            room = size - pos
            # Largest end with 13 + cum[end] - cum[done] <= min(room, free).
            end = bisect_right(cum, cum[done] + min(room, free) - _FRAME_OVERHEAD, done) - 1
            if end > done:
                blob = 5 + cum[end] - cum[done]
                self._write_frame(pos, records[done:end], headers[done:end], blob)
                used = (8 + blob + 7) & ~7
                head += used
                free -= used
                done = end
            elif room < free and _frame_size(lengths[done]) <= free - room:
                _U32.pack_into(self._data, pos, _WRAP)  # skip the end, go on at offset 0
                head += room
                free -= room
            else:
                break
        return head, done

    def put(self, record: bytes | bytearray | memoryview) -> bool:
        """Append one record; False if the ring is full."""
        return self.put_many((record,)) == 1

    def put_all(
        self, records: Sequence[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        """Write every record, sleeping for space as needed; return how many were written
        (fewer than ``len(records)`` only if ``timeout`` expired)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.put_many(records)
        while done < len(records):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.wait_space(remaining, len(records[done])):
                break
            done += self.put_many(records[done:])
        return done

    def mark_eof(self) -> None:
        """Producer: no more records will follow; wakes a sleeping consumer."""
        hdr = self._hdr
        hdr[_W_EOF] = 1
        self._full_fence()
        if hdr[_W_DATA_WAIT] & 1:
            os.eventfd_write(self._data_fd, 1)

    def prepare_wait_space(self, length: int = 0) -> bool:
        """Producer: announce it will sleep on :meth:`space_fileno` until a record
        of ``length`` bytes fits.  Returns False (not armed) if it already fits."""
        self._arm(_W_SPACE_WAIT)
        if self.can_put(length):
            self.finish_wait_space()
            return False
        return True

    def finish_wait_space(self) -> None:
        """Producer: end a sleep started by :meth:`prepare_wait_space`."""
        self._disarm(_W_SPACE_WAIT, self._space_fd)

    def wait_space(self, timeout: float | None = None, length: int = 0) -> bool:
        """Producer: block until a record of ``length`` bytes fits; False on timeout."""
        if length > self.max_record:
            raise ValueError(f"record larger than max_record={self.max_record} bytes")
        if self.can_put(length):
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._block(
            self._space_poll,
            lambda: self.prepare_wait_space(length),
            self.finish_wait_space,
            lambda: self.can_put(length),
            deadline,
        )

    async def wait_space_async(self, timeout: float | None = None, length: int = 0) -> bool:
        """asyncio flavour of :meth:`wait_space` (uses ``loop.add_reader``)."""
        if length > self.max_record:
            raise ValueError(f"record larger than max_record={self.max_record} bytes")
        return await self._block_async(
            self._space_fd,
            lambda: self.prepare_wait_space(length),
            self.finish_wait_space,
            lambda: self.can_put(length),
            timeout,
        )

    # ---------------------------------------------------------------- consumer

    def get_many(self, max_records: int = 1024) -> list[bytes]:
        """Remove and return up to ``max_records`` records (copied out), oldest first.

        One tail store per call; wakes a producer sleeping in :meth:`wait_space`.
        """
        data = self._data
        size = self._size
        tail, skip, skip_off, head = before = self._read_cursor()
        out: list[bytes] = []
        want = max_records
        while want > 0 and tail != head:
            pos = tail % size
            count, blob = _FRAME.unpack_from(data, pos)
            if count == _WRAP:
                tail += size - pos
                continue
            if not skip and count <= want:
                records = marshal.loads(data[pos + 8 : pos + 8 + blob])
                if type(records) is not list or len(records) != count:
                    raise RuntimeError(f"corrupt frame at offset {pos} of ring {self.name!r}")
                out += records
                take = count
            else:  # part of a frame: walk the record headers in Python
                start = offset = pos + _FRAME_OVERHEAD + skip_off
                rec_unpack = _REC.unpack_from
                take = min(count - skip, want)
                for _ in range(take):
                    length = rec_unpack(data, offset)[1]
                    out.append(data[offset + 5 : offset + 5 + length].tobytes())
                    offset += 5 + length
                skip_off += offset - start
            want -= take
            skip += take
            if skip == count:
                tail += (8 + blob + 7) & ~7
                skip = skip_off = 0
        self._save_cursor(before, tail, skip, skip_off)
        return out

    def consume(self, callback: Callable[[memoryview], object], max_records: int = 1024) -> int:
        """Zero-copy variant of :meth:`get_many`: call ``callback(view)`` on each record.

        ``view`` points into shared memory and is released right after the
        callback returns (keep ``bytes(view)`` if you need the data later, and
        do not keep slices of it).  Returns the number of records consumed.  If
        the callback raises, the records before the failing one stay consumed
        and the failing one stays in the ring.  A Python loop per record: use it
        when the copy is the expensive part (large records).
        """
        data = self._data
        size = self._size
        tail, skip, skip_off, head = before = self._read_cursor()
        rec_unpack = _REC.unpack_from
        done = 0
        try:
            while done < max_records and tail != head:
                pos = tail % size
                count, blob = _FRAME.unpack_from(data, pos)
                if count == _WRAP:
                    tail += size - pos
                    continue
                base = pos + _FRAME_OVERHEAD
                while skip < count and done < max_records:
                    offset = base + skip_off
                    length = rec_unpack(data, offset)[1]
                    view = data[offset + 5 : offset + 5 + length]
                    try:
                        callback(view)
                    finally:
                        view.release()
                    skip_off += 5 + length
                    skip += 1
                    done += 1
                if skip == count:
                    tail += (8 + blob + 7) & ~7
                    skip = skip_off = 0
        finally:
            self._save_cursor(before, tail, skip, skip_off)
        return done

    def _read_cursor(self) -> tuple[int, int, int, int]:
        """The consumer's position: (tail, records of the tail frame already taken, their
        byte offset in it, the producer's head)."""
        hdr = self._hdr
        skip = hdr[_W_SKIP]
        return hdr[_W_TAIL], skip, hdr[_W_SKIP_OFF] if skip else 0, hdr[_W_HEAD]

    def _save_cursor(
        self, before: tuple[int, int, int, int], tail: int, skip: int, skip_off: int
    ) -> None:
        hdr = self._hdr
        if skip or before[1]:  # (skip, skip_off) can change even when skip ends equal
            hdr[_W_SKIP_OFF] = skip_off
            hdr[_W_SKIP] = skip
        if tail != before[0]:
            self._publish_tail(tail)

    def _publish_tail(self, tail: int) -> None:
        hdr = self._hdr
        hdr[_W_TAIL] = tail
        self._full_fence()
        waiting = hdr[_W_SPACE_WAIT]
        if waiting & 1 and waiting != self._signalled_space:
            self._signalled_space = waiting
            os.eventfd_write(self._space_fd, 1)

    def prepare_wait(self) -> bool:
        """Consumer: announce it will sleep on :meth:`fileno`.

        Returns False (and stays unarmed) if records are already waiting or EOF
        was marked: consume instead of sleeping.  When it returns True, the
        producer will make ``fileno()`` readable as soon as it publishes data;
        call :meth:`finish_wait` once woken.  Pattern for a long-lived asyncio
        reader kept registered with ``loop.add_reader(ring.fileno(), on_ready)``::

            def on_ready():
                ring.finish_wait()
                while True:
                    handle(ring.get_many())
                    if ring.prepare_wait():
                        return  # armed: on_ready runs again when data arrives
        """
        self._arm(_W_DATA_WAIT)
        if self._data_or_eof():
            self.finish_wait()
            return False
        return True

    def finish_wait(self) -> None:
        """Consumer: end a sleep started by :meth:`prepare_wait` (drains the eventfd)."""
        self._disarm(_W_DATA_WAIT, self._data_fd)

    def _data_or_eof(self) -> bool:
        hdr = self._hdr
        return bool(hdr[_W_EOF]) or hdr[_W_HEAD] != hdr[_W_TAIL]

    def wait(self, timeout: float | None = None) -> bool:
        """Consumer: block until a record is available or EOF was marked.

        Returns False on timeout.  Sleeps in poll(2) on the data eventfd, no
        busy waiting.
        """
        if self._data_or_eof():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._block(
            self._data_poll, self.prepare_wait, self.finish_wait, self._data_or_eof, deadline
        )

    async def wait_async(self, timeout: float | None = None) -> bool:
        """asyncio flavour of :meth:`wait` (uses ``loop.add_reader`` on :meth:`fileno`)."""
        return await self._block_async(
            self._data_fd, self.prepare_wait, self.finish_wait, self._data_or_eof, timeout
        )

    # ------------------------------------------------------------------ helpers

    def _arm(self, word: int) -> None:
        """Make a wait word's epoch odd (= "sleeping, wake me"), then a full fence so the
        caller's re-check of the ring cannot be ordered before that store."""
        hdr = self._hdr
        epoch = hdr[word]
        if not epoch & 1:
            hdr[word] = epoch + 1
        self._full_fence()

    def _disarm(self, word: int, fd: int) -> None:
        """Drain the wakeup eventfd and make the epoch even again (awake)."""
        _drain(fd)
        hdr = self._hdr
        epoch = hdr[word]
        if epoch & 1:
            hdr[word] = epoch + 1

    @staticmethod
    def _block(
        poller: select.poll,
        prepare: Callable[[], bool],
        finish: Callable[[], None],
        ready: Callable[[], bool],
        deadline: float | None,
    ) -> bool:
        while True:
            if not prepare():
                return True
            try:
                poller.poll(_poll_ms(deadline))
            finally:
                finish()
            # A wakeup may be stale (left over from an earlier episode): re-check.
            if ready():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    @staticmethod
    async def _block_async(
        fd: int,
        prepare: Callable[[], bool],
        finish: Callable[[], None],
        ready: Callable[[], bool],
        timeout: float | None,
    ) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if not prepare():
                return True
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_done, fut)
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait((fut,), timeout=remaining)
            finally:
                loop.remove_reader(fd)
                fut.cancel()
                finish()
            if ready():
                return True
            if deadline is not None and loop.time() >= deadline:
                return False


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
