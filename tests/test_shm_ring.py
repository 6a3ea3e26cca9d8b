"""Tests for gwyh_mp.runtime.shm_ring.ShmRing.

Cross-process tests synchronise on observable state (the header's wait flags,
queue messages, exit codes) with generous deadlines, never on sleep lengths.
Segments get a per-run name prefix so /dev/shm comparisons ignore whatever
other processes on the machine create at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwyh_mp.runtime.shm_ring import ShmRing, ShmRingHandle

DEADLINE = 60.0  # generous: a loaded 2-core CI box must never hit it
SHM_DIR = "/dev/shm"
PREFIX = f"gwyhtest{os.getpid()}_"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _unique_name() -> str:
    return PREFIX + uuid.uuid4().hex[:12]


def _our_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)}


def _until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll a condition that another process/thread will make true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.001)


_POOL = bytes(range(256)) * 8


def _record(i: int) -> bytes:
    """Deterministic record ``i`` of the streaming tests: index + variable payload."""
    if i % 101 == 0:
        return b""
    length = (i * 7919) % 1400
    return i.to_bytes(8, "little") + _POOL[i % 256 : i % 256 + length]


def _digest_update(h: Any, rec: bytes) -> None:
    h.update(len(rec).to_bytes(4, "little"))
    h.update(rec)


@pytest.fixture
def make_ring() -> Iterator[Callable[..., ShmRing]]:
    rings: list[ShmRing] = []

    def make(capacity: int = 64 * 1024) -> ShmRing:
        ring = ShmRing.create(capacity, name=_unique_name())
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()
        ring.unlink()


@pytest.fixture
def start_process() -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(method: str, target: Callable[..., None], *args: Any) -> Any:
        proc = mp.get_context(method).Process(target=target, args=args, daemon=True)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:  # only our own children, by object
        if proc.is_alive():
            proc.kill()
        proc.join(DEADLINE)


# ---------------------------------------------------------------- single process


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class _Model:
    """Reference of the documented layout, written record by record: a frame per
    call (13-byte frame + list header, 5-byte header per record, padded to 8),
    split with a wrap marker at the end of the data area, freed once fully read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.head = self.tail = 0
        self.entries: deque[tuple[int, deque[bytes]]] = deque()  # (bytes, records)

    def put_many(self, batch: list[bytes]) -> int:
        done = 0
        while done < len(batch):
            room = self.size - self.head % self.size
            free = self.size - (self.head - self.tail)
            used, end = 13, done
            while end < len(batch) and used + 5 + len(batch[end]) <= min(room, free):
                used += 5 + len(batch[end])
                end += 1
            if end > done:
                self.entries.append((_align8(used), deque(batch[done:end])))
                self.head += _align8(used)
                done = end
            elif room < free and _align8(18 + len(batch[done])) <= free - room:
                self.entries.append((room, deque()))  # wrap marker
                self.head += room
            else:
                break
        return done

    def get_many(self, limit: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < limit and self.entries:
            nbytes, records = self.entries[0]
            while records and len(out) < limit:
                out.append(records.popleft())
            if not records:
                self.entries.popleft()
                self.tail += nbytes
        return out

    def __len__(self) -> int:
        return sum(len(records) for _, records in self.entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.sampled_from([64, 120, 256, 1000]), data=st.data())
def test_round_trip_matches_model(capacity: int, data: st.DataObject) -> None:
    ring = ShmRing.create(capacity, name=_unique_name())
    try:
        model = _Model(capacity + 40)  # the data area has 40 bytes of slack
        record = st.binary(max_size=ring.max_record)
        for _ in range(data.draw(st.integers(1, 40), label="steps")):
            if data.draw(st.booleans(), label="put?"):
                batch = data.draw(st.lists(record, max_size=12), label="batch")
                assert ring.put_many(batch) == model.put_many(batch)
            else:
                limit = data.draw(st.integers(1, 8), label="max_records")
                if data.draw(st.booleans(), label="zero-copy?"):
                    copies: list[bytes] = []
                    n = ring.consume(lambda view, out=copies: out.append(bytes(view)), limit)
                    assert n == len(copies)
                    assert copies == model.get_many(limit)
                else:
                    assert ring.get_many(limit) == model.get_many(limit)
            assert ring.used_bytes() == model.head - model.tail
            assert ring.readable() == bool(len(model))
        assert ring.get_many(10_000) == model.get_many(10_000)
        assert not ring.readable()
    finally:
        ring.close()
        ring.unlink()


def test_zero_and_max_size_records(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(1024)
    assert ring.max_record == 512
    big = bytes(range(256)) * 2
    with pytest.raises(ValueError):
        ring.put(big + b"!")
    with pytest.raises(ValueError):  # validated up front: nothing of the batch is written
        ring.put_many([b"a", big + b"!"])
    assert not ring.readable()
    assert ring.put(b"")
    assert ring.put(big)
    assert not ring.put(big)  # full: two max records never fit at once
    assert ring.get_many() == [b"", big]
    # A max-size record must fit into an empty ring whatever the current offset:
    # each round moves the offset by 536 + 32 bytes (frames of 512 and 12 bytes)
    # and gcd(568, 1064) == 8, so the max record is put at every 8-aligned offset
    # of the 1064-byte data area.
    for _ in range(1064 // 8):
        assert ring.put(big)
        assert ring.get_many() == [big]
        assert ring.put(b"y" * 12)
        assert ring.get_many() == [b"y" * 12]


def test_full_ring_keeps_unaccepted_records(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(256)
    recs = [bytes([i]) * 60 for i in range(10)]  # one frame: 13 + 65 bytes per record
    n = ring.put_many(recs)
    assert n == 4  # 13 + 4 * 65 <= 296-byte data area
    assert ring.put_many(recs[n:]) == 0
    assert not ring.can_put(60)
    assert ring.get_many(2) == recs[:2]
    assert ring.put_many(recs[n:]) == 0  # a frame's space is freed only once fully read
    assert ring.get_many(1) == recs[2:3]
    assert ring.get_many() == recs[3:4]
    m = ring.put_many(recs[n:])
    assert m >= 1
    assert ring.get_many() == recs[n : n + m]


def test_bytes_like_inputs_and_zero_copy_consume(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(4096)
    src = bytearray(b"0123456789")
    assert ring.put_many([bytes(src), src, memoryview(src)[2:5], b""]) == 4
    kept: list[memoryview] = []
    seen: list[bytes] = []

    def callback(view: memoryview) -> None:
        kept.append(view)
        seen.append(bytes(view))

    assert ring.consume(callback, max_records=3) == 3
    assert seen == [b"0123456789", b"0123456789", b"234"]
    with pytest.raises(ValueError):  # views are released after the callback
        bytes(kept[0])
    assert ring.get_many() == [b""]


def test_eventfd_signalled_only_for_a_sleeping_consumer(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(4096)

    def readable() -> bool:
        return bool(select.select([ring.fileno()], [], [], 0)[0])

    ring.put_many([b"a", b"b"])
    assert not readable()  # nobody asleep: no syscall, no wakeup
    assert not ring.prepare_wait()  # data already there: do not sleep
    ring.get_many()
    assert ring.prepare_wait()
    assert ring.consumer_waiting()
    ring.put(b"c")
    ring.put(b"d")
    assert readable()
    assert os.eventfd_read(ring.fileno()) == 1  # one wakeup per sleep episode
    ring.finish_wait()
    assert not ring.consumer_waiting()
    assert ring.get_many() == [b"c", b"d"]


def test_wait_timeout_and_eof(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(4096)
    assert ring.wait(0.02) is False
    assert not ring.consumer_waiting()
    ring.put(b"x")
    assert ring.wait(0) is True
    ring.mark_eof()
    assert not ring.eof  # a record is still pending
    assert ring.get_many() == [b"x"]
    assert ring.eof
    assert ring.wait(None) is True


def test_wait_space_woken_by_consumer_thread(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(256)
    big = b"z" * ring.max_record
    assert ring.put(big)
    assert ring.wait_space(0.01, len(big)) is False
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(ring.wait_space(DEADLINE, len(big))))
    waiter.start()
    _until(ring.producer_waiting)
    assert ring.get_many() == [big]
    waiter.join(DEADLINE)
    assert result == [True]
    assert ring.put(big)
    with pytest.raises(ValueError):
        ring.wait_space(0, ring.max_record + 1)


def test_attach_rejects_foreign_segment_and_non_creator_unlink(
    make_ring: Callable[..., ShmRing],
) -> None:
    from multiprocessing.shared_memory import SharedMemory

    ring = make_ring(4096)
    other = ShmRing.attach(ring.handle)
    try:
        assert other.put(b"via attach")
        assert ring.get_many() == [b"via attach"]
        with pytest.raises(RuntimeError):
            other.unlink()
    finally:
        other.close()
    assert ring.name in os.listdir(SHM_DIR)

    foreign = SharedMemory(name=_unique_name(), create=True, size=4096)
    try:
        fake = ShmRingHandle(foreign.name, ring.fileno(), ring.space_fileno())
        with pytest.raises(ValueError):
            ShmRing.attach(fake)
    finally:
        foreign.close()
        foreign.unlink()
    with pytest.raises(ValueError):
        ShmRing.create(16)


def test_no_segment_left_after_close_and_unlink() -> None:
    before = _our_segments()
    with ShmRing.create(4096, name=_unique_name()) as ring:
        assert ring.name in _our_segments()
        ring.put(b"x")
    assert _our_segments() == before


# ----------------------------------------------------------------- cross-process


def _stream_producer(handle: ShmRingHandle, n: int, out: Any) -> None:
    ring = ShmRing.attach(handle)
    h = hashlib.blake2b()
    i = k = 0
    while i < n:
        batch = [_record(j) for j in range(i, min(n, i + 1 + (k * 37) % 128))]
        k += 1
        if ring.put_all(batch, timeout=DEADLINE) != len(batch):
            out.put(("producer-timeout", i))
            return
        for rec in batch:
            _digest_update(h, rec)
        i += len(batch)
    ring.mark_eof()
    ring.close()
    out.put(("produced", n, h.hexdigest()))


def _stream_consumer(handle: ShmRingHandle, out: Any) -> None:
    ring = ShmRing.attach(handle)
    h = hashlib.blake2b()
    i = k = 0
    first_bad = None
    while True:
        recs = ring.get_many(1 + (k * 53) % 300)
        k += 1
        for rec in recs:
            if first_bad is None and rec != _record(i):
                first_bad = i
            _digest_update(h, rec)
            i += 1
        if not recs:
            if ring.eof:
                break
            if not ring.wait(DEADLINE):
                out.put(("consumer-timeout", i))
                return
    ring.close()
    out.put(("consumed", i, h.hexdigest(), first_bad))


@pytest.mark.parametrize(
    ("method", "n"), [("fork", 200_000), ("spawn", 20_000), ("forkserver", 20_000)]
)
def test_stream_between_processes(
    method: str, n: int, make_ring: Callable[..., ShmRing], start_process: Callable[..., Any]
) -> None:
    ring = make_ring(64 * 1024)  # small: many wrap-arounds and full-ring waits
    out = mp.get_context(method).Queue()
    consumer = start_process(method, _stream_consumer, ring.handle, out)
    producer = start_process(method, _stream_producer, ring.handle, n, out)
    results = {msg[0]: msg for msg in (out.get(timeout=DEADLINE), out.get(timeout=DEADLINE))}
    producer.join(DEADLINE)
    consumer.join(DEADLINE)
    assert set(results) == {"produced", "consumed"}, results
    _, produced, producer_digest = results["produced"]
    _, consumed, consumer_digest, first_bad = results["consumed"]
    assert first_bad is None
    assert produced == consumed == n
    expected = hashlib.blake2b()
    for i in range(n):
        _digest_update(expected, _record(i))
    assert producer_digest == consumer_digest == expected.hexdigest()
    assert (producer.exitcode, consumer.exitcode) == (0, 0)


def _blocked_consumer(handle: ShmRingHandle, out: Any) -> None:
    ring = ShmRing.attach(handle)
    woke = ring.wait(DEADLINE)
    out.put((woke, ring.get_many()))
    ring.close()


def test_blocked_wait_is_woken_by_producer(
    make_ring: Callable[..., ShmRing], start_process: Callable[..., Any]
) -> None:
    ring = make_ring(4096)
    out = mp.get_context("fork").Queue()
    child = start_process("fork", _blocked_consumer, ring.handle, out)
    _until(ring.consumer_waiting)  # the child is (about to be) asleep in poll()
    assert ring.put_many([b"wake", b"up"]) == 2
    assert out.get(timeout=DEADLINE) == (True, [b"wake", b"up"])
    child.join(DEADLINE)
    assert child.exitcode == 0


def _gated_producer(handle: ShmRingHandle, n: int, gated_batches: int) -> None:
    ring = ShmRing.attach(handle)
    i = k = 0
    while i < n:
        if k < gated_batches:  # make sure the event loop really sleeps on the fd
            _until(ring.consumer_waiting)
        batch = [_record(j) for j in range(i, min(n, i + 50))]
        k += 1
        ring.put_all(batch, timeout=DEADLINE)
        i += len(batch)
    ring.mark_eof()
    ring.close()


async def _consume_with_reader(ring: ShmRing) -> list[bytes]:
    """Long-lived add_reader registration, as a coordinator would run it."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        ring.finish_wait()
        while True:
            got.extend(ring.get_many())
            if ring.eof:
                if not done.done():
                    done.set_result(None)
                return
            if ring.prepare_wait():
                return

    loop.add_reader(ring.fileno(), on_ready)
    try:
        on_ready()
        await asyncio.wait_for(done, DEADLINE)
    finally:
        loop.remove_reader(ring.fileno())
    return got


async def _consume_with_wait_async(ring: ShmRing) -> list[bytes]:
    got: list[bytes] = []
    while True:
        recs = ring.get_many()
        got.extend(recs)
        if not recs:
            if ring.eof:
                return got
            assert await ring.wait_async(DEADLINE)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("pattern", ["add_reader", "wait_async"])
def test_asyncio_consumer(
    loop_kind: str,
    pattern: str,
    make_ring: Callable[..., ShmRing],
    start_process: Callable[..., Any],
) -> None:
    n = 3000
    ring = make_ring(16 * 1024)
    producer = start_process("fork", _gated_producer, ring.handle, n, 10)
    consume = _consume_with_reader if pattern == "add_reader" else _consume_with_wait_async
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        got = runner.run(consume(ring))
    producer.join(DEADLINE)
    assert producer.exitcode == 0
    assert got == [_record(i) for i in range(n)]


async def test_async_wait_timeout_and_wait_space_async(make_ring: Callable[..., ShmRing]) -> None:
    ring = make_ring(256)
    assert await ring.wait_async(0.02) is False
    big = b"q" * ring.max_record
    assert ring.put(big)
    waiter = asyncio.create_task(ring.wait_space_async(DEADLINE, len(big)))
    deadline = time.monotonic() + DEADLINE
    while not ring.producer_waiting():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    assert ring.get_many() == [big]
    assert await asyncio.wait_for(waiter, DEADLINE) is True


# ------------------------------------------------------------- segment lifetime


def _attach_put_close(handle: ShmRingHandle) -> None:
    ring = ShmRing.attach(handle)
    ring.put(b"from child")
    ring.close()


def _consume_forever(handle: ShmRingHandle, out: Any) -> None:
    ring = ShmRing.attach(handle)
    consumed = 0
    reported = False
    while True:
        consumed += len(ring.get_many())
        if consumed >= 1000 and not reported:
            out.put(consumed)
            reported = True
        ring.wait(DEADLINE)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_attach_leaves_no_segment(method: str, start_process: Callable[..., Any]) -> None:
    before = _our_segments()
    ring = ShmRing.create(4096, name=_unique_name())
    try:
        child = start_process(method, _attach_put_close, ring.handle)
        child.join(DEADLINE)
        assert child.exitcode == 0
        assert ring.get_many() == [b"from child"]
        assert ring.name in _our_segments()  # the child's exit did not unlink it
    finally:
        ring.close()
        ring.unlink()
    assert _our_segments() == before


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sigkilled_child_does_not_leak_segment(
    method: str, start_process: Callable[..., Any]
) -> None:
    before = _our_segments()
    ring = ShmRing.create(16 * 1024, name=_unique_name())
    try:
        out = mp.get_context(method).Queue()
        child = start_process(method, _consume_forever, ring.handle, out)
        batch = [b"m" * 100] * 32
        deadline = time.monotonic() + DEADLINE
        while out.empty():  # keep streaming until the child is mid-stream
            assert time.monotonic() < deadline and child.is_alive()
            if not ring.put_many(batch):
                ring.wait_space(0.01, 100)
        assert out.get(timeout=DEADLINE) >= 1000
        os.kill(child.pid, signal.SIGKILL)
        child.join(DEADLINE)
        assert child.exitcode == -signal.SIGKILL
    finally:
        ring.close()
        ring.unlink()
    assert _our_segments() == before


_TRACKER_SCRIPT = """
import multiprocessing as mp, os, signal, subprocess, sys
from gwyh_mp.runtime.shm_ring import ShmRing

def attach_and_close(handle):
    ShmRing.attach(handle).close()

def attach_and_hang(handle, ready):
    ring = ShmRing.attach(handle)
    ready.put(True)
    ring.wait(None)

if __name__ == "__main__":
    ring = ShmRing.create(4096, name=sys.argv[1])
    for method in ("fork", "spawn", "forkserver"):
        p = mp.get_context(method).Process(target=attach_and_close, args=(ring.handle,))
        p.start(); p.join(60); assert p.exitcode == 0, (method, p.exitcode)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    p = ctx.Process(target=attach_and_hang, args=(ring.handle, ready))
    p.start(); assert ready.get(timeout=60)
    os.kill(p.pid, signal.SIGKILL); p.join(60)
    # An unrelated interpreter (own resource tracker) attaching via inherited fds.
    code = ("import sys; from gwyh_mp.runtime.shm_ring import ShmRing, ShmRingHandle; "
            "h = ShmRingHandle(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])); "
            "r = ShmRing.attach(h); r.put(b'indep'); r.close()")
    fds = (ring.fileno(), ring.space_fileno())
    subprocess.run([sys.executable, "-c", code, ring.name, *map(str, fds)],
                   pass_fds=fds, check=True, timeout=60)
    assert os.path.exists("/dev/shm/" + ring.name), "segment destroyed by a child"
    assert ring.get_many() == [b"indep"]
    ring.close(); ring.unlink()
    assert not os.path.exists("/dev/shm/" + ring.name)
    print("OK")
"""


def test_attaching_children_cause_no_resource_tracker_noise(tmp_path: Path) -> None:
    """fork/spawn/forkserver/SIGKILLed/unrelated attachers: no leak warnings, no
    tracker tracebacks, no premature unlink; the tracker's output is captured
    because it inherits the script's stderr and outlives it only briefly."""
    script = tmp_path / "tracker_check.py"
    script.write_text(textwrap.dedent(_TRACKER_SCRIPT))
    name = _unique_name()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), name],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
    for noise in ("leaked", "Traceback", "KeyError", "Warning"):
        assert noise not in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, name))
