"""MemberTable's incremental indexes (UP count, per-zone UP counts, anti-entropy digests)
and its scans (``up_members``, ``bucket_members``).

Every index is checked against a brute-force recomputation from ``table.members`` after
each step of long random histories, and every step's ``Change`` against a small reference
model of the SWIM rules (including the oldest-first trimming of DOWN members). Digests
cover UP members only: which DOWN members a table remembers must not matter.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol.membership import (
    DIGEST_BUCKETS,
    Change,
    MemberTable,
    bucket_of,
    digest_term,
    id_hash,
    metadata_hash,
)
from gwyh_mp.protocol.wire import MemberRecord, MemberState

UP, DOWN, LEFT = MemberState.UP, MemberState.DOWN, MemberState.LEFT
SUSPECT = MemberState.SUSPECT
ALIVE = (UP, SUSPECT)  # a SUSPECT counts as UP in every index until it is DOWN
RANK = {UP: 0, SUSPECT: 1, DOWN: 2, LEFT: 3}
NAMES = ("", "", "web-1", "db")
MASK64 = (1 << 64) - 1
ZONES: tuple[str | None, ...] = (None, "a", "b")


def id_pool(seed: int, size: int = 30) -> list[bytes]:
    """``size`` random 16-byte ids, most of them sharing a digest bucket with another
    (so bucket sums over several members are exercised, not just single terms)."""
    rng = random.Random(seed)
    by_bucket: dict[int, list[bytes]] = {}
    pool: list[bytes] = []
    while len(pool) < size:
        nid = rng.randbytes(16)
        group = by_bucket.setdefault(bucket_of(id_hash(nid)), [])
        group.append(nid)
        if len(group) == 2:
            pool.extend(group)
        elif len(group) > 2:
            pool.append(nid)
    return pool[:size]


# ----------------------------------------------------------------------------- reference


@dataclass
class ModelMember:
    incarnation: int
    state: MemberState
    zone: str | None
    host: str
    port: int
    name: str = ""


class Model:
    """The SWIM rules, written the obvious way."""

    def __init__(self, max_down: int) -> None:
        self.max_down = max_down
        self.members: dict[bytes, ModelMember] = {}
        self.down_since: list[bytes] = []  # ids in the order they (last) went DOWN

    def apply(self, r: MemberRecord, keep_address: bool) -> Change:
        cur = self.members.get(r.node_id)
        if cur is None:
            if r.state is not UP:
                return Change.NONE
            self.members[r.node_id] = ModelMember(
                r.incarnation, r.state, r.zone, r.host, r.port, r.name
            )
            return Change.JOINED
        newer = r.incarnation > cur.incarnation or (
            r.incarnation == cur.incarnation and RANK[r.state] > RANK[cur.state]
        )
        if not newer:
            same = r.incarnation == cur.incarnation and r.state is cur.state
            if same and r.name and r.name != cur.name:
                cur.name = r.name  # a record that says who the member is
                return Change.UPDATED
            return Change.NONE
        old = cur.state
        cur.incarnation, cur.state, cur.zone = r.incarnation, r.state, r.zone
        cur.name = r.name or cur.name  # a record without metadata keeps what we knew
        if not keep_address:
            cur.host, cur.port = r.host, r.port
        if r.state not in ALIVE:
            if r.node_id not in self.down_since:
                self.down_since.append(r.node_id)
            while len(self.down_since) > self.max_down:
                del self.members[self.down_since.pop(0)]
        elif r.node_id in self.down_since:
            self.down_since.remove(r.node_id)
        if old is r.state:
            return Change.REFRESHED
        if r.state is UP and old is SUSPECT:
            return Change.ALIVE  # refuted
        if r.state is SUSPECT:
            return Change.SUSPECT if old is UP else Change.UP  # back from DOWN or LEFT
        return {UP: Change.UP, DOWN: Change.DOWN, LEFT: Change.LEFT}[r.state]


def brute_digests(table: MemberTable) -> list[int]:
    """Sum of every UP member's term per bucket; DOWN members contribute nothing."""
    digests = [0] * DIGEST_BUCKETS
    for nid, m in table.members.items():
        if m.state not in ALIVE:
            continue
        idh = id_hash(nid)
        b = bucket_of(idh)
        meta = metadata_hash(m.name, m.tags)
        digests[b] = (digests[b] + digest_term(idh, m.incarnation, UP, meta)) & MASK64
    return digests


def differing_buckets(a: MemberTable, b: MemberTable) -> list[int]:
    return [i for i in range(DIGEST_BUCKETS) if a.digests[i] != b.digests[i]]


def check_bucket_members(table: MemberTable, buckets: set[int]) -> None:
    members = table.members
    listed = table.bucket_members(buckets)
    want = {nid for nid in members if bucket_of(id_hash(nid)) in buckets}
    assert len(listed) == len(want), buckets
    assert {m.node_id for m in listed} == want, buckets
    # the listed objects are the live table entries (their records are sent as-is)
    assert all(members.get(m.node_id) is m for m in listed), buckets


def assert_indexes_consistent(table: MemberTable, rng: random.Random | None = None) -> None:
    members = table.members
    up = {nid for nid, m in members.items() if m.state in ALIVE}
    listed_up = [m.node_id for m in table.up_members()]
    assert len(listed_up) == len(up) == table.up_count
    assert set(listed_up) == up
    zones = Counter(m.zone for m in members.values() if m.state in ALIVE)
    assert table.up_zones == dict(zones)
    assert all(count > 0 for count in table.up_zones.values())
    for nid, m in members.items():
        assert m.node_id == nid
    assert table.digests == brute_digests(table)
    assert table.bucket_members(set()) == []
    occupied = {bucket_of(id_hash(nid)) for nid in members}
    for b in occupied:
        check_bucket_members(table, {b})
    check_bucket_members(table, set(range(DIGEST_BUCKETS)))
    if rng is not None:  # a few random sets of buckets, occupied ones likely
        for _ in range(3):
            some = {b for b in occupied if rng.random() < 0.5}
            some |= {rng.randrange(DIGEST_BUCKETS) for _ in range(2)}
            check_bucket_members(table, some)
    downs = sum(1 for m in members.values() if m.state not in ALIVE)
    assert downs <= table.max_down


def assert_matches_model(table: MemberTable, model: Model) -> None:
    assert set(table.members) == set(model.members)
    for nid, want in model.members.items():
        got = table.members[nid]
        assert (got.incarnation, got.state, got.zone, got.host, got.port, got.name) == (
            want.incarnation,
            want.state,
            want.zone,
            want.host,
            want.port,
            want.name,
        )


def random_record(rng: random.Random, pool: list[bytes], incs: dict[bytes, int]) -> MemberRecord:
    """Mostly news near what the model holds (so bumps, refutations and stale news all
    happen), sometimes an older or a much newer incarnation."""
    nid = rng.choice(pool)
    base = incs.get(nid, 0)
    inc = max(0, base + rng.choice((-1, 0, 0, 0, 1, 1, 2)))
    state = UP if rng.random() < 0.5 else rng.choice((SUSPECT, SUSPECT, DOWN, DOWN, LEFT))
    host = f"10.1.{rng.randrange(4)}.{rng.randrange(1, 5)}"
    name = rng.choice(NAMES)
    port = 7000 + rng.randrange(3)
    return MemberRecord(nid, inc, state, host, port, rng.choice(ZONES), name=name)


def run_history(seed: int, steps: int, max_down: int = 5) -> tuple[Counter[Change], int]:
    rng = random.Random(seed)
    pool = id_pool(seed)
    table = MemberTable(max_down=max_down)
    model = Model(max_down)
    changes: Counter[Change] = Counter()
    trimmed = 0
    for _ in range(steps):
        incs = {nid: m.incarnation for nid, m in model.members.items()}
        record = random_record(rng, pool, incs)
        keep = rng.random() < 0.3
        before = len(model.members)
        want = model.apply(record, keep)
        if record.state not in ALIVE and len(model.members) < before:
            trimmed += 1
        got = table.apply(record, keep_address=keep)
        assert got is want, (record, keep)
        changes[got] += 1
        assert_indexes_consistent(table, rng)
        assert_matches_model(table, model)
    return changes, trimmed


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_histories_keep_every_index_exact(seed: int) -> None:
    changes, trimmed = run_history(seed, 2500)
    # the history really exercised every kind of change, and the trimming
    assert set(changes) == set(Change), changes
    assert trimmed > 0


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 11),  # which id
            st.integers(0, 4),  # incarnation
            st.sampled_from([UP, DOWN]),
            st.sampled_from(ZONES),
            st.booleans(),  # keep_address
            st.integers(0, 2),  # host choice
        ),
        max_size=60,
    ),
    max_down=st.integers(0, 4),
)
def test_hypothesis_histories_keep_every_index_exact(
    steps: list[tuple[int, int, MemberState, str | None, bool, int]], max_down: int
) -> None:
    pool = id_pool(99, size=12)
    table = MemberTable(max_down=max_down)
    model = Model(max_down)
    for i, inc, state, zone, keep, host in steps:
        record = MemberRecord(pool[i], inc, state, f"10.2.0.{host + 1}", 7000, zone)
        assert table.apply(record, keep_address=keep) is model.apply(record, keep)
        assert_indexes_consistent(table)
        assert_matches_model(table, model)


def test_trimming_forgets_the_oldest_down_and_its_digest() -> None:
    pool = id_pool(5, size=4)
    table = MemberTable(max_down=2)
    for nid in pool:
        table.apply(MemberRecord(nid, 0, UP, "10.0.0.1", 7000, "a"))
    for nid in pool[:3]:
        assert table.apply(MemberRecord(nid, 0, DOWN, "10.0.0.1", 7000, "a")) is Change.DOWN
    # the first to go DOWN was forgotten (its term left the digest when it went DOWN)
    assert set(table.members) == set(pool[1:])
    assert table.up_count == 1 and table.up_zones == {"a": 1}
    assert table.digests == brute_digests(table)
    gone = bucket_of(id_hash(pool[0]))
    assert pool[0] not in {m.node_id for m in table.bucket_members({gone})}
    assert pool[1] in {m.node_id for m in table.bucket_members(set(range(DIGEST_BUCKETS)))}
    # a DOWN refreshed to a newer incarnation keeps its place in line: pool[1] is next
    table.apply(MemberRecord(pool[1], 5, DOWN, "10.0.0.1", 7000, "a"))
    table.apply(MemberRecord(pool[3], 0, DOWN, "10.0.0.1", 7000, "a"))
    assert set(table.members) == {pool[2], pool[3]}
    assert table.up_count == 0 and table.up_zones == {}
    assert table.digests == [0] * DIGEST_BUCKETS  # nobody UP: DOWNs count for nothing


# ----------------------------------------------------------------------------- digests


def converged_records(seed: int) -> tuple[list[bytes], list[MemberRecord], list[MemberRecord]]:
    """Introductions of every member (UP, incarnation 0), then random later news. Once
    every member is known, the outcome does not depend on the order of the news."""
    rng = random.Random(seed)
    pool = id_pool(seed, size=24)
    intro = [MemberRecord(nid, 0, UP, "10.3.0.1", 7000, rng.choice(ZONES)) for nid in pool]
    news = [
        MemberRecord(
            rng.choice(pool), rng.randrange(4), rng.choice((UP, DOWN)), "10.3.0.2", 7001, None
        )
        for _ in range(200)
    ]
    return pool, intro, news


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_same_news_in_any_order_gives_equal_digests(seed: int) -> None:
    pool, intro, news = converged_records(seed)
    tables = []
    for order in range(3):
        table = MemberTable()
        for r in intro:
            table.apply(r)
        shuffled = list(news)
        random.Random(order).shuffle(shuffled)
        for r in shuffled:
            table.apply(r)
        tables.append(table)
    a, b, c = tables
    assert a.digests == b.digests == c.digests
    assert any(d != 0 for d in a.digests)
    views = [{nid: (m.incarnation, m.state) for nid, m in t.members.items()} for t in tables]
    assert views[0] == views[1] == views[2]
    # and the digests really are a function of the view: a table fed only each member's
    # final state has the same ones
    final = MemberTable()
    for r in intro:
        final.apply(r)
    for nid, (inc, state) in views[0].items():
        final.apply(MemberRecord(nid, inc, state, "h", 1, None))
    assert final.digests == a.digests
    assert len(pool) == len(a)


@pytest.mark.parametrize(
    ("state", "bump"),
    [
        (DOWN, 0),  # a suspicion at the same incarnation
        (UP, 1),  # a newer incarnation (a refutation, if it was DOWN)
        (DOWN, 1),  # DOWN at a newer incarnation
    ],
)
def test_one_member_apart_differs_in_exactly_its_bucket(state: MemberState, bump: int) -> None:
    """News that changes who is UP, or an UP member's incarnation, shows in exactly the
    member's bucket; news only about a DOWN member's incarnation shows nowhere."""
    _, intro, news = converged_records(21)
    a, b = MemberTable(), MemberTable()
    for table in (a, b):
        for r in intro + news:
            table.apply(r)
    assert a.digests == b.digests
    shown = hidden = 0
    for subject in sorted(a.members):
        m = b.members[subject]
        if m.state is DOWN and state is DOWN and bump == 0:
            continue  # already DOWN at its incarnation: not news
        was_up = m.state is UP
        record = MemberRecord(subject, m.incarnation + bump, state, m.host, m.port, m.zone)
        if m.state is state:
            expected = Change.REFRESHED
        else:
            expected = Change.DOWN if state is DOWN else Change.UP
        assert b.apply(record) is expected
        if was_up or state is UP:
            assert differing_buckets(a, b) == [bucket_of(id_hash(subject))]
            shown += 1
        else:  # DOWN at inc -> DOWN at inc + 1
            assert differing_buckets(a, b) == []
            hidden += 1
        a.apply(record)  # agree again before the next subject
        assert a.digests == b.digests == brute_digests(a)
    assert shown >= 5
    if (state, bump) == (DOWN, 1):
        assert hidden >= 2  # the history left some members DOWN


def test_up_in_one_table_and_down_or_absent_in_the_other_differs() -> None:
    pool = id_pool(32, size=10)
    up, down, absent = (MemberTable(max_down=10) for _ in range(3))
    trimmed = MemberTable(max_down=0)
    for table in (up, down, absent, trimmed):
        for nid in pool[1:]:
            table.apply(MemberRecord(nid, 2, UP, "10.0.0.1", 7000, None))
    for table in (up, down, trimmed):
        table.apply(MemberRecord(pool[0], 2, UP, "10.0.0.1", 7000, None))
    for table in (down, trimmed):
        table.apply(MemberRecord(pool[0], 2, DOWN, "10.0.0.1", 7000, None))
    assert pool[0] in down.members and pool[0] not in trimmed.members
    bucket = [bucket_of(id_hash(pool[0]))]
    assert differing_buckets(up, down) == bucket
    assert differing_buckets(up, absent) == bucket
    assert differing_buckets(up, trimmed) == bucket
    # remembering a DOWN member, or having forgotten it, or never having known it: equal
    assert down.digests == absent.digests == trimmed.digests


def test_digests_ignore_which_down_members_are_remembered() -> None:
    """A table that joined late (never heard of members that had already left), one that
    trimmed them and one that remembers them all agree, whatever the DOWNs' incarnations."""
    pool = id_pool(33, size=16)
    live, gone = pool[:10], pool[10:]
    old, trimmed, late = MemberTable(max_down=100), MemberTable(max_down=2), MemberTable()
    for table in (old, trimmed):
        for i, nid in enumerate(pool):
            table.apply(MemberRecord(nid, i % 3, UP, "10.0.0.1", 7000, ZONES[i % 3]))
        for i, nid in enumerate(gone, start=len(live)):  # same or a newer incarnation
            table.apply(MemberRecord(nid, i % 3 + i % 2, DOWN, "10.0.0.1", 7000, None))
    for i, nid in enumerate(live):
        late.apply(MemberRecord(nid, i % 3, UP, "10.0.0.1", 7000, ZONES[i % 3]))
    # late news of the departures: unknown DOWNs are not learned
    for nid in gone:
        assert late.apply(MemberRecord(nid, 5, DOWN, "10.0.0.1", 7000, None)) is Change.NONE
    assert len(old) == 16 and len(trimmed) == 12 and len(late) == 10
    assert old.digests == trimmed.digests == late.digests == brute_digests(late)
    assert any(d != 0 for d in late.digests)
    # but an UP member at another incarnation is a difference
    late.apply(MemberRecord(live[0], 7, UP, "10.0.0.1", 7000, None))
    assert differing_buckets(old, late) == [bucket_of(id_hash(live[0]))]


def test_digest_term_separates_state_and_incarnation() -> None:
    idh = id_hash(bytes(range(16)))
    terms = {digest_term(idh, inc, s) for inc in range(50) for s in (UP, DOWN)}
    assert len(terms) == 100


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize(
    ("node_id", "expected", "bucket"),
    [
        (bytes(range(16)), 0x66F638D292B428B6, 25),
        (b"\xff" * 16, 0xA4D2EEE03E1EA99E, 41),
        (b"gwyh-node-000001", 0x23F2C535A06A3921, 8),
    ],
)
def test_id_hash_is_pinned(node_id: bytes, expected: int, bucket: int) -> None:
    """Digests are compared across processes and versions: id_hash must never depend
    on Python's salted hash() or change silently."""
    assert id_hash(node_id) == expected
    assert bucket_of(expected) == bucket
    assert 0 <= bucket < DIGEST_BUCKETS


def test_digest_term_is_pinned() -> None:
    idh = id_hash(bytes(range(16)))
    assert digest_term(idh, 0, UP) == 0xD29359E716E63D6C
    assert digest_term(idh, 7, DOWN) == 0x61028AE1B95EF9C0


def test_id_hash_spreads_ids_over_all_buckets() -> None:
    rng = random.Random(7)
    counts = Counter(bucket_of(id_hash(rng.randbytes(16))) for _ in range(6400))
    assert len(counts) == DIGEST_BUCKETS
    assert max(counts.values()) < 2 * 6400 // DIGEST_BUCKETS
    # sequential ids (as tests and tools like to make them) spread too
    seq = Counter(bucket_of(id_hash(i.to_bytes(16, "big"))) for i in range(6400))
    assert len(seq) == DIGEST_BUCKETS
