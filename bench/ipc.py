"""`python -m bench ipc`: inter-process hand-off, shared-memory ring vs multiprocessing.Queue.

One producer process streams records of a fixed size to one consumer process,
for each record size, in three variants:

* ``mp_queue_item``: ``multiprocessing.Queue``, one ``put`` per record;
* ``mp_queue_batch``: ``multiprocessing.Queue``, one ``put`` per list of ``--batch`` records;
* ``shm_ring``: :class:`gwyh_mp.runtime.shm_ring.ShmRing`, ``put_all`` of ``--batch``
  records, consumer ``get_many`` (copies every record out, as a real consumer would).

The rate is measured at the consumer: records received during a round's share of
``--seconds`` after the first one arrived.  The variants take turns for
``--rounds`` rounds and the median round is reported (with every round's rate),
so that a noisy neighbour on a shared VM hurts all variants alike.  After each
run the consumer raises a stop event and keeps draining until the producer's end
marker, so neither side blocks at shutdown.  Queues are bounded (like the ring)
so a fast producer cannot balloon memory.  Every run is bounded in time: stuck
children are killed and the bench fails with a RuntimeError.  Output: items/s per
variant on stdout; ``--json FILE`` adds machine info, every round's rate and the
ratios ring / Queue-per-item and ring / Queue-batched.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import queue
import time
from typing import Any

from bench.common import machine_description, median, write_json
from gwyh_mp.runtime.shm_ring import DEFAULT_CAPACITY, ShmRing

VARIANTS = ("mp_queue_item", "mp_queue_batch", "shm_ring")
QUEUE_MAX_ITEMS = 65_536  # bound for the per-item queue; batched: this / batch lists
POOL_RECORDS = 1024  # distinct payload objects the producer cycles through
STOP_CHECK_EVERY = 16  # producer polls the stop event once per this many puts
GRACE_S = 30.0  # extra time a run may take beyond --seconds before it is killed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per variant")
    parser.add_argument("--sizes", default="100,1200", help="comma-separated record sizes in bytes")
    parser.add_argument("--batch", type=int, default=64, help="records per batch")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; --seconds is split across them"
    )
    parser.add_argument(
        "--capacity", type=int, default=DEFAULT_CAPACITY, help="ShmRing capacity in bytes"
    )
    parser.add_argument(
        "--start-method",
        default="fork",
        choices=("fork", "spawn", "forkserver"),
        help="multiprocessing start method of the children",
    )


# ------------------------------------------------------------------ children


def _batches(size: int, batch: int) -> list[list[bytes]]:
    """Distinct random payloads: pickle memoizes repeated objects by identity, so
    a list of one object repeated would flatter the batched Queue enormously."""
    pool = [os.urandom(size) for _ in range(max(POOL_RECORDS, batch))]
    return [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]


def _queue_producer(q: Any, stop: Any, size: int, batch: int, batched: bool) -> None:
    batches = _batches(size, batch)
    items = itertools.cycle(batches if batched else [r for b in batches for r in b])
    put = q.put
    while not stop.is_set():
        for _ in range(STOP_CHECK_EVERY if batched else STOP_CHECK_EVERY * batch):
            put(next(items))
    put(None)  # end marker
    q.close()
    q.join_thread()


def _queue_consumer(q: Any, stop: Any, seconds: float, batched: bool, result: Any) -> None:
    get = q.get
    first = get()
    start = time.perf_counter()
    end = start + seconds
    count = len(first) if batched else 1
    now = start
    while now < end:
        item = get()
        count += len(item) if batched else 1
        now = time.perf_counter()
    stop.set()
    while get() is not None:  # unblock the producer; not counted
        pass
    result.put((count, now - start))


def _ring_producer(handle: Any, stop: Any, size: int, batch: int) -> None:
    ring = ShmRing.attach(handle)
    batches = itertools.cycle(_batches(size, batch))
    put_all = ring.put_all
    while not stop.is_set():
        for _ in range(STOP_CHECK_EVERY):
            put_all(next(batches))
    ring.mark_eof()
    ring.close()


def _ring_consumer(handle: Any, stop: Any, seconds: float, result: Any) -> None:
    ring = ShmRing.attach(handle)
    get_many, wait = ring.get_many, ring.wait
    wait(None)
    start = time.perf_counter()
    end = start + seconds
    count = 0
    now = start
    while now < end:
        got = get_many(4096)
        if got:
            count += len(got)
        else:
            wait(None)
        now = time.perf_counter()
    stop.set()
    while not ring.eof:  # unblock the producer; not counted
        if not get_many(4096):
            wait(None)
    ring.close()
    result.put((count, now - start))


# -------------------------------------------------------------------- driver


def _run_pair(
    ctx: Any, producer: tuple[Any, ...], consumer: tuple[Any, ...], result: Any, limit_s: float
) -> tuple[int, float]:
    procs = [ctx.Process(target=fn, args=args, daemon=True) for fn, *args in (producer, consumer)]
    for proc in procs:
        proc.start()
    try:
        try:
            count, elapsed = result.get(timeout=limit_s)
        except queue.Empty:
            raise RuntimeError(f"{consumer[0].__name__} gave no result in {limit_s:.0f}s") from None
        for proc in procs:
            proc.join(GRACE_S)
        return count, elapsed
    finally:
        for proc in procs:  # only if something went wrong
            if proc.is_alive():
                proc.kill()
                proc.join()


def _measure(variant: str, ctx: Any, size: int, seconds: float, args: argparse.Namespace) -> float:
    """One producer/consumer run of ``variant``; returns items/s at the consumer."""
    stop = ctx.Event()
    result = ctx.Queue()
    limit = seconds + GRACE_S
    if variant == "shm_ring":
        ring = ShmRing.create(args.capacity)
        try:
            count, elapsed = _run_pair(
                ctx,
                (_ring_producer, ring.handle, stop, size, args.batch),
                (_ring_consumer, ring.handle, stop, seconds, result),
                result,
                limit,
            )
        finally:
            ring.close()
            ring.unlink()
    else:
        batched = variant == "mp_queue_batch"
        q = ctx.Queue(max(1, QUEUE_MAX_ITEMS // args.batch) if batched else QUEUE_MAX_ITEMS)
        count, elapsed = _run_pair(
            ctx,
            (_queue_producer, q, stop, size, args.batch, batched),
            (_queue_consumer, q, stop, seconds, batched, result),
            result,
            limit,
        )
    return count / elapsed if elapsed > 0 else 0.0


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    ctx = mp.get_context(args.start_method)
    machine = machine_description()
    rounds = max(1, args.rounds)
    results = []
    for size in sizes:
        # Variants take turns, round after round, so that a noisy neighbour
        # hurts them alike; the median round is reported.
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(rounds):
            for variant in VARIANTS:
                rates[variant].append(_measure(variant, ctx, size, args.seconds / rounds, args))
        row: dict[str, Any] = {"size": size}
        for variant in VARIANTS:
            rate = median(rates[variant])
            row[variant] = {
                "items_per_s": round(rate),
                "mb_per_s": round(rate * size / 1e6, 1),
                "rounds_items_per_s": [round(r) for r in rates[variant]],
            }
        ring_rate = row["shm_ring"]["items_per_s"]
        for base in ("mp_queue_item", "mp_queue_batch"):
            base_rate = row[base]["items_per_s"]
            row[f"ratio_ring_vs_{base.removeprefix('mp_')}"] = (
                round(ring_rate / base_rate, 2) if base_rate else None
            )
        results.append(row)
    print(f"{'record':>7}" + "".join(f"{v + ' items/s':>24}" for v in VARIANTS))
    print(f"{'bytes':>7}" + "".join(f"{'(median of rounds)':>24}" for _ in VARIANTS))
    for row in results:
        print(f"{row['size']:>7}" + "".join(f"{row[v]['items_per_s']:>24,}" for v in VARIANTS))
    write_json(
        args.json,
        {
            "bench": "ipc",
            "machine": machine,
            "loadavg_end": list(os.getloadavg()),
            "params": {
                "seconds": args.seconds,
                "rounds": rounds,
                "sizes": sizes,
                "batch": args.batch,
                "ring_capacity": args.capacity,
                "start_method": args.start_method,
                "queue_max_items": QUEUE_MAX_ITEMS,
            },
            "results": results,
        },
    )
    return 0
