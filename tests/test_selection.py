"""Tests for gwyh_mp.protocol.selection (provider selection strategies)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwyh_mp.protocol.selection import Candidate, Strategy, rng_for, select_providers

ZONES = [None, "a", "b", "c", "d"]


def nid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def cands(spec: dict[str | None, int], start: int = 0) -> list[Candidate]:
    """``{zone: count}`` -> candidates with consecutive ids starting at ``start``."""
    out: list[Candidate] = []
    i = start
    for zone, count in spec.items():
        for _ in range(count):
            out.append(Candidate(nid(i), zone))
            i += 1
    return out


def select(
    candidates: list[Candidate],
    *,
    own_zone: str | None = "a",
    current: set[bytes] | list[bytes] | frozenset[bytes] = frozenset(),
    n: int = 5,
    strategy: Strategy = Strategy.UNIFORM,
    seed: int = 0,
) -> list[bytes]:
    return select_providers(
        own_zone=own_zone,
        candidates=candidates,
        current=current,
        n=n,
        strategy=strategy,
        rng=random.Random(seed),
    )


# ---------------------------------------------------------------- hypothesis inputs


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    ids = draw(st.lists(st.binary(min_size=16, max_size=16), unique=True, max_size=25))
    candidates = [Candidate(i, draw(st.sampled_from(ZONES))) for i in ids]
    current = set(draw(st.lists(st.sampled_from(ids), max_size=10))) if ids else set()
    # Stale providers (no longer candidates) must be dropped.
    current |= set(draw(st.lists(st.binary(min_size=16, max_size=16), max_size=3)))
    return {
        "own_zone": draw(st.sampled_from(ZONES)),
        "candidates": candidates,
        "current": current,
        "n": draw(st.integers(-1, 8)),
        "strategy": draw(st.sampled_from(list(Strategy))),
        "seed": draw(st.integers(0, 2**32)),
    }


def run(sc: dict, **override) -> list[bytes]:
    args = {**sc, **override}
    return select_providers(
        own_zone=args["own_zone"],
        candidates=args["candidates"],
        current=args["current"],
        n=args["n"],
        strategy=args["strategy"],
        rng=random.Random(args["seed"]),
    )


def remote_zones(sc: dict) -> set[str | None]:
    return {c.zone for c in sc["candidates"] if c.zone != sc["own_zone"]}


# ---------------------------------------------------------------- generic properties


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_result_is_sorted_unique_subset(sc: dict) -> None:
    out = run(sc)
    assert out == sorted(set(out))
    assert set(out) <= {c.node_id for c in sc["candidates"]}


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_sizes(sc: dict) -> None:
    out = run(sc)
    n, pool = sc["n"], sc["candidates"]
    if n <= 0 or not pool:
        assert out == []
    elif sc["strategy"] is Strategy.HUB_AND_SPOKE:
        n_locals = sum(c.zone == sc["own_zone"] for c in pool)
        n_remote = len(remote_zones(sc))
        assert len(out) == n_remote + min(max(0, n - n_remote), n_locals)
    else:
        assert len(out) == min(n, len(pool))


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_deterministic_and_order_independent(sc: dict, shuffler: random.Random) -> None:
    out = run(sc)
    assert run(sc) == out
    shuffled = list(sc["candidates"])
    shuffler.shuffle(shuffled)
    cur = list(sc["current"])
    shuffler.shuffle(cur)
    # A one-shot iterator and a list for `current`: container type must not matter.
    assert run(sc, candidates=iter(shuffled), current=cur) == out


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 2**32))
def test_result_is_a_fixed_point(sc: dict, other_seed: int) -> None:
    # Re-running with the result as `current` must not churn, whatever the rng.
    out = run(sc)
    assert run(sc, current=set(out), seed=other_seed) == out


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_valid_current_providers_are_kept(sc: dict) -> None:
    out = set(run(sc))
    by_id = {c.node_id: c for c in sc["candidates"]}
    valid = [i for i in sc["current"] if i in by_id]
    n = sc["n"]
    if n <= 0:
        return
    if sc["strategy"] is not Strategy.HUB_AND_SPOKE:
        target = min(n, len(by_id))
        if len(valid) <= target:
            assert set(valid) <= out
        else:
            assert out <= set(valid)  # trimmed, but nothing new sampled
        return
    own = sc["own_zone"]
    for zone in remote_zones(sc):
        cur_in_zone = {i for i in valid if by_id[i].zone == zone}
        picked = {i for i in out if by_id[i].zone == zone}
        assert len(picked) == 1
        if cur_in_zone:
            assert picked <= cur_in_zone
    cur_locals = {i for i in valid if by_id[i].zone == own}
    out_locals = {i for i in out if by_id[i].zone == own}
    local_target = max(0, n - len(remote_zones(sc)))
    if len(cur_locals) <= local_target:
        assert cur_locals <= out_locals
    else:
        assert out_locals <= cur_locals


def test_empty_inputs() -> None:
    for strategy in Strategy:
        assert select([], strategy=strategy) == []
        assert select(cands({"a": 3, "b": 3}), n=0, strategy=strategy) == []
        assert select(cands({"a": 3, "b": 3}), n=-2, strategy=strategy) == []


def test_stale_current_is_replaced_not_churned() -> None:
    pool = cands({"a": 10, "b": 10})
    first = select(pool, strategy=Strategy.UNIFORM)
    gone = first[0]
    after = select([c for c in pool if c.node_id != gone], current=set(first), seed=99)
    assert len(after) == 5
    assert gone not in after
    assert set(first) - {gone} <= set(after)


def test_duplicate_candidate_ids_are_collapsed() -> None:
    dup = [Candidate(nid(1), "a"), Candidate(nid(1), "b"), Candidate(nid(2), "a")]
    for strategy in Strategy:
        out = select(dup, strategy=strategy)
        assert len(out) == len(set(out))
        assert select(list(reversed(dup)), strategy=strategy) == out


# ---------------------------------------------------------------- hub-and-spoke


def zone_of(pool: list[Candidate]) -> dict[bytes, str | None]:
    return {c.node_id: c.zone for c in pool}


def test_hub_one_per_remote_zone_rest_local() -> None:
    pool = cands({"a": 6, "b": 4, "c": 4, None: 3})
    for seed in range(50):
        out = select(pool, own_zone="a", n=5, strategy=Strategy.HUB_AND_SPOKE, seed=seed)
        zones = Counter(zone_of(pool)[i] for i in out)
        assert zones == {"b": 1, "c": 1, None: 1, "a": 2}


def test_hub_short_on_locals_never_takes_second_remote() -> None:
    pool = cands({"a": 1, "b": 5, "c": 5})
    out = select(pool, own_zone="a", n=5, strategy=Strategy.HUB_AND_SPOKE)
    assert Counter(zone_of(pool)[i] for i in out) == {"a": 1, "b": 1, "c": 1}
    # No local candidates at all: still one per remote zone, nothing more.
    out = select(pool, own_zone="z", n=5, strategy=Strategy.HUB_AND_SPOKE)
    assert Counter(zone_of(pool)[i] for i in out) == {"a": 1, "b": 1, "c": 1}


def test_hub_may_exceed_n_with_many_zones() -> None:
    pool = cands({f"z{i}": 2 for i in range(8)})
    out = select(pool, own_zone="z0", n=3, strategy=Strategy.HUB_AND_SPOKE)
    assert len(out) == 7  # one per remote zone, no locals (n - 7 < 0)
    assert {zone_of(pool)[i] for i in out} == {f"z{i}" for i in range(1, 8)}


def test_hub_none_zone_is_its_own_zone() -> None:
    pool = cands({None: 4, "a": 4, "b": 4})
    # Own zone None: the None-zone candidates are the locals.
    out = select(pool, own_zone=None, n=5, strategy=Strategy.HUB_AND_SPOKE)
    assert Counter(zone_of(pool)[i] for i in out) == {"a": 1, "b": 1, None: 3}
    # Own zone "a": None is just another remote zone.
    out = select(pool, own_zone="a", n=5, strategy=Strategy.HUB_AND_SPOKE)
    assert Counter(zone_of(pool)[i] for i in out) == {None: 1, "b": 1, "a": 3}


def test_hub_keeps_current_remote_and_drops_extra_one() -> None:
    pool = cands({"a": 4, "b": 4})
    b_ids = [c.node_id for c in pool if c.zone == "b"]
    out = select(pool, own_zone="a", n=3, strategy=Strategy.HUB_AND_SPOKE, current={b_ids[2]})
    assert b_ids[2] in out
    # Two current providers in one remote zone: exactly one survives, and it is current.
    out = select(pool, own_zone="a", n=3, strategy=Strategy.HUB_AND_SPOKE, current=set(b_ids[1:3]))
    assert len(set(out) & set(b_ids)) == 1
    assert set(out) & set(b_ids) <= set(b_ids[1:3])


# ---------------------------------------------------------------- prefer-local / remote


def pick_rate_ratio(strategy: Strategy, n: int, draws: int) -> float:
    """Per-candidate pick rate of same-zone candidates over that of other-zone ones."""
    pool = cands({"a": 10, "b": 5, "c": 5})
    zones = zone_of(pool)
    rng = random.Random(12345)  # fixed, so the test is deterministic
    local = remote = 0
    for _ in range(draws):
        out = select_providers(
            own_zone="a", candidates=pool, current=(), n=n, strategy=strategy, rng=rng
        )
        for i in out:
            if zones[i] == "a":
                local += 1
            else:
                remote += 1
    return (local / 10) / (remote / 10)


def test_prefer_local_weights_same_zone_double() -> None:
    # n=1 makes the per-candidate ratio exactly the weight ratio (2) in expectation.
    assert 1.8 < pick_rate_ratio(Strategy.PREFER_LOCAL, n=1, draws=6000) < 2.2
    # Several picks without replacement flatten it somewhat but it stays well above 1.
    assert 1.5 < pick_rate_ratio(Strategy.PREFER_LOCAL, n=3, draws=3000) < 2.7


def test_prefer_remote_weights_other_zones_double() -> None:
    assert 1.8 < 1 / pick_rate_ratio(Strategy.PREFER_REMOTE, n=1, draws=6000) < 2.2
    assert 1.5 < 1 / pick_rate_ratio(Strategy.PREFER_REMOTE, n=3, draws=3000) < 2.7


def test_prefer_strategies_can_pick_either_side() -> None:
    pool = cands({"a": 10, "b": 10})
    zones = zone_of(pool)
    for strategy in (Strategy.PREFER_LOCAL, Strategy.PREFER_REMOTE):
        seen = {zones[i] for s in range(200) for i in select(pool, strategy=strategy, seed=s)}
        assert seen == {"a", "b"}


def test_uniform_is_roughly_uniform() -> None:
    pool = cands({"a": 10, "b": 10})
    rng = random.Random(7)
    counts: Counter[bytes] = Counter()
    for _ in range(4000):
        counts.update(
            select_providers(
                own_zone="a",
                candidates=pool,
                current=(),
                n=5,
                strategy=Strategy.UNIFORM,
                rng=rng,
            )
        )
    # Expected 1000 picks each (4000 * 5 / 20).
    assert all(850 < counts[c.node_id] < 1150 for c in pool)


# ---------------------------------------------------------------- Strategy / rng_for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uniform", Strategy.UNIFORM),
        ("UNIFORM", Strategy.UNIFORM),
        ("hub-and-spoke", Strategy.HUB_AND_SPOKE),
        ("Hub_And_Spoke", Strategy.HUB_AND_SPOKE),
        ("prefer_local", Strategy.PREFER_LOCAL),
        ("PREFER-REMOTE", Strategy.PREFER_REMOTE),
        (" prefer-remote ", Strategy.PREFER_REMOTE),
    ],
)
def test_parse_accepts(text: str, expected: Strategy) -> None:
    assert Strategy.parse(text) is expected


@pytest.mark.parametrize("text", ["", "random", "hubandspoke", "prefer local", "local"])
def test_parse_rejects_with_valid_names(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        Strategy.parse(text)
    for s in Strategy:
        assert s.value in str(exc.value)


def test_strategy_is_str() -> None:
    assert str(Strategy.HUB_AND_SPOKE) == "hub-and-spoke"
    assert Strategy("prefer-local") is Strategy.PREFER_LOCAL


def test_rng_for_is_deterministic_and_distinct() -> None:
    a, b = nid(1), nid(2)

    def stream(node: bytes, seed: int | None) -> list[float]:
        rng = rng_for(node, seed)
        return [rng.random() for _ in range(4)]

    assert stream(a, None) == stream(a, None)
    assert stream(a, 42) == stream(a, 42)
    assert stream(a, -42) == stream(a, -42)
    distinct = {
        tuple(stream(node, seed)) for node in (a, b) for seed in (None, 0, 1, -1, 42, 2**70)
    }
    assert len(distinct) == 12
