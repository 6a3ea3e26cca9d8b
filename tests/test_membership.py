"""Membership news and incarnations (gwyh_mp.protocol.membership, NodeCore refutation)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol.events import MemberDown, MemberUp
from gwyh_mp.protocol.membership import Change, MemberTable, newer_incarnation, supersedes
from gwyh_mp.protocol.node import NodeCore
from gwyh_mp.protocol.wire import MemberRecord, MemberState
from tests.helpers_core import addr, lone_core, node_id

UP, DOWN = MemberState.UP, MemberState.DOWN


def rec(
    i: int,
    inc: int,
    state: MemberState = UP,
    *,
    host: str = "10.0.0.1",
    port: int = 7000,
    zone: str | None = "a",
) -> MemberRecord:
    return MemberRecord(node_id(i), inc, state, host, port, zone)


@pytest.mark.parametrize(
    ("new", "old", "wins"),
    [
        ((UP, 2), (UP, 1), True),
        ((UP, 2), (DOWN, 1), True),  # higher incarnation always wins
        ((DOWN, 2), (UP, 1), True),
        ((UP, 1), (DOWN, 2), False),  # an old UP never resurrects
        ((DOWN, 1), (UP, 2), False),  # an old DOWN never overrides a newer UP
        ((DOWN, 1), (UP, 1), True),  # equal incarnation: DOWN beats UP
        ((UP, 1), (DOWN, 1), False),
        ((UP, 1), (UP, 1), False),  # identical news is not news
        ((DOWN, 1), (DOWN, 1), False),
    ],
)
def test_supersedes(new: tuple[MemberState, int], old: tuple[MemberState, int], wins: bool) -> None:
    assert supersedes(new[0], new[1], old[0], old[1]) is wins


def test_apply_reports_each_kind_of_change() -> None:
    t = MemberTable()
    assert t.apply(rec(1, 0)) is Change.JOINED
    assert t.apply(rec(1, 0)) is Change.NONE
    assert t.apply(rec(1, 0, DOWN)) is Change.DOWN
    assert t.apply(rec(1, 0, UP)) is Change.NONE  # suspicion sticks at equal incarnation
    assert t.apply(rec(1, 1, UP)) is Change.UP  # refuted
    assert t.apply(rec(1, 3, UP)) is Change.REFRESHED
    assert t.apply(rec(1, 2, DOWN)) is Change.NONE  # old DOWN, newer UP stays
    member = t.get(node_id(1))
    assert member is not None
    assert (member.state, member.incarnation) == (UP, 3)
    assert [m.node_id for m in t.up_members()] == [node_id(1)]


def test_down_for_an_unknown_member_does_not_grow_the_table() -> None:
    t = MemberTable()
    for i in range(100):
        assert t.apply(rec(i, 5, DOWN)) is Change.NONE
    assert t.members == {}
    # and a later, older UP still joins normally
    assert t.apply(rec(3, 0)) is Change.JOINED


def test_address_and_zone_follow_news_unless_a_session_pins_the_address() -> None:
    t = MemberTable()
    t.apply(rec(1, 0, host="10.0.0.1", zone="a"))
    t.apply(rec(1, 1, host="10.0.0.2", port=8000, zone="b"))
    m = t.get(node_id(1))
    assert m is not None and (m.host, m.port, m.zone) == ("10.0.0.2", 8000, "b")
    t.apply(rec(1, 2, host="10.6.6.6", zone="c"), keep_address=True)
    m = t.get(node_id(1))  # members are immutable snapshots: news replaces them
    assert m is not None and (m.host, m.port, m.zone, m.incarnation) == ("10.0.0.2", 8000, "c", 2)
    # stale news changes nothing at all
    t.apply(rec(1, 0, host="10.9.9.9", zone="z"))
    assert t.get(node_id(1)) is m


def test_down_entries_are_bounded_oldest_first() -> None:
    t = MemberTable(max_down=3)
    for i in range(8):
        t.apply(rec(i, 0))
    for i in range(6):
        t.apply(rec(i, 0, DOWN))
    assert sorted(t.members) == [node_id(i) for i in (3, 4, 5, 6, 7)]
    assert {i: t.members[node_id(i)].state for i in (3, 4, 5, 6, 7)} == {
        3: DOWN,
        4: DOWN,
        5: DOWN,
        6: UP,
        7: UP,
    }
    # a refuted member is no longer counted as DOWN
    t.apply(rec(3, 1, UP))
    t.apply(rec(6, 0, DOWN))
    assert node_id(3) in t.members and node_id(4) in t.members
    t.apply(rec(7, 0, DOWN))
    assert node_id(4) not in t.members
    assert len([m for m in t.members.values() if m.state == DOWN]) == 3


def test_many_downs_keep_memory_bounded() -> None:
    t = MemberTable(max_down=50)
    for i in range(1000):
        t.apply(rec(i, 0))
        t.apply(rec(i, 0, DOWN))
    assert len(t.members) == 50


news = st.lists(st.tuples(st.sampled_from([UP, DOWN]), st.integers(0, 6)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(news)
def test_outcome_is_independent_of_arrival_order(items: list[tuple[MemberState, int]]) -> None:
    """For a member already known UP at incarnation 0, any order of the same news ends in
    the same state: the maximum by (incarnation, DOWN > UP)."""
    expected = max([(0, UP), *((inc, s) for s, inc in items)], key=lambda x: (x[0], x[1] == DOWN))
    for order in itertools.islice(itertools.permutations(items), 30):
        t = MemberTable()
        t.apply(rec(1, 0))
        for state, inc in order:
            t.apply(rec(1, inc, state))
        m = t.get(node_id(1))
        assert m is not None
        assert (m.incarnation, m.state) == expected


# ----------------------------------------------------------------------------- node level


def _core(**overrides: object) -> NodeCore:
    return lone_core("membership-core", **overrides)


def _events(core: NodeCore) -> list[object]:
    out = []
    while (e := core.next_event()) is not None:
        out.append(e)
    return out


def test_node_refutes_a_down_about_itself() -> None:
    core = _core()
    me = core.node_id
    assert core.incarnation == 0
    down = MemberRecord(me, 0, DOWN, *addr(0), None)
    core.membership.apply(down, 1.0, announce=False)
    assert core.incarnation == 1
    assert core.stats["refutations"] == 1 and core.stats["status_announced"] == 1
    assert core.member_list() == []  # we never list ourselves
    # stale news about ourselves is ignored: no second refutation
    core.membership.apply(down, 1.1, announce=False)
    core.membership.apply(MemberRecord(me, 7, UP, *addr(0), None), 1.1, announce=False)
    assert core.incarnation == 1 and core.stats["refutations"] == 1
    # a DOWN at a higher incarnation is refuted above it
    core.membership.apply(MemberRecord(me, 4, DOWN, *addr(0), None), 1.2, announce=False)
    assert core.incarnation == 5
    assert core.local_member().incarnation == 5 and core.local_member().is_up


def test_node_that_left_does_not_refute() -> None:
    core = _core()
    core.leave(1.0)
    assert not core.running
    core.membership.apply(MemberRecord(core.node_id, 0, DOWN, *addr(0), None), 1.1, announce=False)
    assert core.incarnation == 0 and core.stats.get("refutations", 0) == 0
    assert not core.local_member().is_up


def test_node_emits_member_events_for_real_changes_only() -> None:
    core = _core()
    _events(core)
    core.membership.apply(rec(1, 0), 1.0, announce=False)
    core.membership.apply(rec(1, 0), 1.0, announce=False)
    core.membership.apply(rec(2, 0, DOWN), 1.0, announce=False)  # unknown: nothing
    core.membership.apply(rec(1, 0, DOWN), 1.0, announce=False)
    core.membership.apply(rec(1, 0, UP), 1.0, announce=False)  # does not beat DOWN(0)
    core.membership.apply(rec(1, 1, UP), 1.0, announce=False)
    kinds = [
        (type(e).__name__, e.member.incarnation)
        for e in _events(core)
        if isinstance(e, MemberUp | MemberDown)
    ]
    assert kinds == [("MemberUp", 0), ("MemberDown", 0), ("MemberUp", 1)]
    assert len(core.member_list()) == 1


def test_refutation_at_the_top_incarnation_does_not_break_the_node() -> None:
    """Regression: refuting DOWN(0xFFFFFFFF) used to set incarnation 2**32, which the u32
    wire field cannot carry; every later Hello or record encode then raised."""
    core = _core()
    top = 0xFFFFFFFF
    core.membership.apply(
        MemberRecord(core.node_id, top, DOWN, *addr(0), None), 1.0, announce=False
    )
    assert core.incarnation <= top
    # the node must keep working: its own record still encodes, timers still run
    core._self_record(UP).encode()
    core.membership.apply(rec(1, 0, host="10.0.0.2"), 1.0, announce=True)
    for t in (1.5, 2.0, 2.5):
        core.handle_timer(t)
        core.datagrams_to_send(t)


def test_incarnations_compare_around_the_wrap() -> None:
    """Issue 11 item 6: serial-number order, so no incarnation is a dead end."""
    top = 0xFFFFFFFF
    assert newer_incarnation(0, top) and not newer_incarnation(top, 0)
    assert newer_incarnation(top, 0x80000000) and newer_incarnation(0x7FFFFFFF, 0)
    # exactly half the space apart: unordered, neither replaces the other
    assert not newer_incarnation(0x80000000, 0) and not newer_incarnation(0, 0x80000000)
    t = MemberTable()
    t.apply(rec(1, 0xFFFFFFF0))
    assert t.apply(rec(1, top, DOWN)) is Change.DOWN
    assert t.apply(rec(1, 0, UP)) is Change.UP  # the refutation, wrapped to 0
    assert t.apply(rec(1, top, DOWN)) is Change.NONE  # the old lie stays beaten
    assert t.digests == MemberTable().digests_with(node_id(1), 0)


def test_node_refutes_a_down_at_the_top_incarnation() -> None:
    core = _core()
    core.incarnation = 0xFFFFFFF0
    core.membership.apply(
        MemberRecord(core.node_id, 0xFFFFFFFF, DOWN, *addr(0), None), 1.0, announce=False
    )
    assert core.incarnation == 0 and core.stats["refutations"] == 1
    # a DOWN from before the wrap is now old news: corrected, not refuted again
    core.membership.apply(
        MemberRecord(core.node_id, 0xFFFFFFF0, DOWN, *addr(0), None), 1.1, announce=False
    )
    assert core.incarnation == 0 and core.stats["refutations"] == 1
