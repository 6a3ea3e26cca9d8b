"""protocol/history.py: the bounded recent-entry store (catch-up, lazy-push GRAFTs)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol.history import ENTRY_OVERHEAD_BYTES, History


def mid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_add_get_and_duplicate_add_is_ignored() -> None:
    h = History(30.0, 1 << 20)
    h.add(mid(1), b"one", 0.0)
    h.add(mid(1), b"other", 1.0)
    assert h.get(mid(1)) == b"one"
    assert len(h) == 1 and h.last_seq == 1
    assert h.get(mid(2)) is None


def test_evicts_by_age_oldest_first_and_counts_it() -> None:
    h = History(10.0, 1 << 20)
    for i in range(20):
        h.add(mid(i), b"x", float(i))
    # At t=19 everything added before t=9 is older than the window.
    assert mid(8) not in h and mid(9) in h
    assert h.evicted == 9
    assert h.evicted_since(0.0) == 9
    assert h.evicted_since(5.0) == 4
    h.expire(100.0)
    assert len(h) == 0 and h.bytes == 0


def test_evicts_by_bytes_oldest_first() -> None:
    size = 100 + ENTRY_OVERHEAD_BYTES
    h = History(1000.0, 5 * size)
    for i in range(8):
        h.add(mid(i), bytes(100), 0.0)
    assert [i for i in range(8) if mid(i) in h] == [3, 4, 5, 6, 7]
    assert h.bytes == 5 * size
    h.add(mid(99), bytes(10 * size), 0.0)  # larger than the whole store: not kept
    assert mid(99) not in h and len(h) == 5


def test_evicts_by_count_oldest_first() -> None:
    h = History(1000.0, 1 << 20, max_entries=3)
    for i in range(5):
        h.add(mid(i), b"x", 0.0)
    assert [i for i in range(5) if mid(i) in h] == [2, 3, 4]


def test_disabled_window_keeps_nothing() -> None:
    h = History(0.0, 1 << 20)
    h.add(mid(1), b"x", 0.0)
    assert len(h) == 0


def test_paging_by_time_and_sequence() -> None:
    h = History(100.0, 1 << 20)
    for i in range(10):
        h.add(mid(i), b"x", float(i))
    ids, last = h.page(since=4.0, after_seq=0, limit=3)
    assert ids == [mid(4), mid(5), mid(6)] and last == 7
    ids, last = h.page(since=4.0, after_seq=last, limit=3)
    assert ids == [mid(7), mid(8), mid(9)] and last == 10
    assert h.page(since=4.0, after_seq=last, limit=3) == ([], 10)
    assert h.page(since=0.0, after_seq=0, limit=0) == ([], 0)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 300), st.floats(0.0, 3.0)),
        max_size=300,
    ),
    max_age=st.floats(0.5, 20.0),
    max_bytes=st.integers(200, 5000),
)
def test_matches_a_simple_model(
    ops: list[tuple[int, int, float]], max_age: float, max_bytes: int
) -> None:
    """Against a list model: same content, within both bounds, pages in order."""
    h = History(max_age, max_bytes)
    model: list[tuple[bytes, float, bytes]] = []
    now = 0.0
    for key, size, step in ops:
        now += step
        entry = bytes(size)
        if size + ENTRY_OVERHEAD_BYTES <= max_bytes and all(m[0] != mid(key) for m in model):
            model.append((mid(key), now, entry))
        h.add(mid(key), entry, now)
        h.expire(now)
        model = [m for m in model if m[1] >= now - max_age]
        while sum(len(m[2]) + ENTRY_OVERHEAD_BYTES for m in model) > max_bytes:
            model.pop(0)
        assert h._ids[h._head :] == [m[0] for m in model]
        assert len(h) == len(model)
        assert h.bytes <= max_bytes
        for m in model:
            assert h.get(m[0]) == m[2]
    # Paging from the start, three at a time, returns everything in order exactly once.
    got: list[bytes] = []
    after = 0
    while True:
        ids, after = h.page(-1.0, after, 3)
        if not ids:
            break
        got += ids
    assert got == [m[0] for m in model]
