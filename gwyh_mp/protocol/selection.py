"""Provider (peer) selection: which members this node subscribes to.

Sans-IO and pure: every random decision comes from the ``random.Random`` passed in, and
candidates are sorted by node id before any sampling, so the result depends only on the
inputs and the RNG state -- never on the iteration order of the caller's containers
(the original gwyh iterated hash maps, which made selection non-deterministic).

Selection re-runs on every membership change, so it is built to avoid churn: providers in
``current`` that are still candidates and still allowed by the strategy are kept, and
only the shortfall is sampled afresh. Feeding a result back in as ``current`` returns the
same result (a fixed point), whatever the RNG.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "Strategy", "rng_for", "select_providers"]


class Strategy(enum.StrEnum):
    UNIFORM = "uniform"
    HUB_AND_SPOKE = "hub-and-spoke"
    PREFER_LOCAL = "prefer-local"
    PREFER_REMOTE = "prefer-remote"

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """Parse a strategy name: case-insensitive, ``_`` and ``-`` interchangeable."""
        key = text.strip().lower().replace("_", "-")
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown strategy {text!r}; valid: {valid}") from None


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: bytes  # 16 bytes
    zone: str | None  # free-form label; None is a zone of its own (None == None)


def rng_for(node_id: bytes, seed: int | None) -> random.Random:
    """A deterministic RNG for ``node_id``, optionally perturbed by a user seed.

    Mixing in the node id keeps nodes sharing one configured seed from all making the same
    choices (which would concentrate subscriptions on the same providers).
    """
    h = hashlib.blake2b(digest_size=8, person=b"gwyh_mp.select")
    # Length-prefix the id so (id, seed) pairs cannot collide by shifting bytes across.
    h.update(len(node_id).to_bytes(2, "big"))
    h.update(node_id)
    if seed is not None:
        h.update(b"\x01")
        h.update(seed.to_bytes(seed.bit_length() // 8 + 1, "big", signed=True))
    return random.Random(int.from_bytes(h.digest(), "big"))


def select_providers(
    *,
    own_zone: str | None,
    candidates: Iterable[Candidate],
    current: Collection[bytes],
    n: int,
    strategy: Strategy,
    rng: random.Random,
) -> list[bytes]:
    """Return the node ids this node should subscribe to, sorted by node id.

    ``candidates`` are the UP members other than ourselves (the caller filters);
    ``current`` the providers we subscribe to now. ``n`` is the desired provider count.

    UNIFORM / PREFER_LOCAL / PREFER_REMOTE return ``min(n, len(candidates))`` ids. The
    prefer-* strategies sample without replacement with weight 2 for the preferred side
    (same zone for PREFER_LOCAL, other zones for PREFER_REMOTE) and 1 for the other, so
    the non-preferred side can still be chosen.

    HUB_AND_SPOKE takes exactly one provider per remote zone, then up to
    ``max(0, n - remote_zones)`` providers from the local zone. Two deliberate
    consequences:

    * the result exceeds ``n`` when there are more remote zones than ``n`` (every zone
      must stay reachable);
    * it never takes a second provider from a remote zone, even when there are too few
      local candidates to reach ``n`` -- the result is then simply smaller than ``n``.
    """
    if n <= 0:
        return []
    pool = _dedupe_sorted(candidates)
    if not pool:
        return []
    cur = set(current)

    if strategy is Strategy.UNIFORM:
        chosen = _keep_and_fill(pool, cur, min(n, len(pool)), rng, _uniform)
    elif strategy is Strategy.PREFER_LOCAL:
        sample = _weighted(lambda c: 2 if c.zone == own_zone else 1)
        chosen = _keep_and_fill(pool, cur, min(n, len(pool)), rng, sample)
    elif strategy is Strategy.PREFER_REMOTE:
        sample = _weighted(lambda c: 1 if c.zone == own_zone else 2)
        chosen = _keep_and_fill(pool, cur, min(n, len(pool)), rng, sample)
    elif strategy is Strategy.HUB_AND_SPOKE:
        chosen = _hub_and_spoke(pool, cur, own_zone, n, rng)
    else:  # pragma: no cover - exhaustive over Strategy
        raise ValueError(f"unsupported strategy {strategy!r}")

    return sorted(c.node_id for c in chosen)


# A sampler picks k distinct items from a node-id-sorted sequence, using only rng.
_Sampler = Callable[[Sequence[Candidate], int, random.Random], list[Candidate]]


def _dedupe_sorted(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Sort by node id and drop repeated ids.

    The caller should not pass duplicates; if it does, which entry wins must not depend on
    input order, so ties are broken by zone (None first).
    """
    ordered = list(candidates)
    ids = [c.node_id for c in ordered]
    if all(a < b for a, b in itertools.pairwise(ids)):
        return ordered  # already sorted and unique (what NodeCore passes): skip the sort
    ordered.sort(key=lambda c: (c.node_id, _zone_key(c.zone)))
    out: list[Candidate] = []
    for c in ordered:
        if not out or out[-1].node_id != c.node_id:
            out.append(c)
    return out


def _zone_key(zone: str | None) -> tuple[bool, str]:
    # Total order over zones including None, so zone iteration order is deterministic.
    return (zone is not None, zone or "")


def _uniform(items: Sequence[Candidate], k: int, rng: random.Random) -> list[Candidate]:
    return rng.sample(list(items), min(k, len(items)))


def _weighted(weight: Callable[[Candidate], int]) -> _Sampler:
    def sample(items: Sequence[Candidate], k: int, rng: random.Random) -> list[Candidate]:
        # Successive draws proportional to weight, removing each pick: weighted sampling
        # without replacement. Integer weights + randrange keep it exact and portable.
        # O(k * len(items)), fine for provider counts in the single digits.
        rest = list(items)
        weights = [weight(c) for c in rest]
        total = sum(weights)
        out: list[Candidate] = []
        for _ in range(min(k, len(rest))):
            r = rng.randrange(total)
            i = 0
            while r >= weights[i]:
                r -= weights[i]
                i += 1
            out.append(rest.pop(i))
            total -= weights.pop(i)
        return out

    return sample


def _keep_and_fill(
    pool: Sequence[Candidate],
    cur: set[bytes],
    target: int,
    rng: random.Random,
    sample: _Sampler,
) -> list[Candidate]:
    """Keep current providers still in ``pool``, then fill to ``target`` with ``sample``.

    If more current providers remain than ``target``, a subset is chosen with the same
    sampler, so the trimming honours the strategy's preference too.
    """
    kept = [c for c in pool if c.node_id in cur]
    if len(kept) >= target:
        return sample(kept, target, rng)
    rest = [c for c in pool if c.node_id not in cur]
    return kept + sample(rest, target - len(kept), rng)


def _hub_and_spoke(
    pool: Sequence[Candidate],
    cur: set[bytes],
    own_zone: str | None,
    n: int,
    rng: random.Random,
) -> list[Candidate]:
    # Group by zone explicitly (the original grouped consecutive runs of an unsorted list,
    # so one zone could be split and get several "one per zone" providers).
    by_zone: dict[str | None, list[Candidate]] = {}
    for c in pool:  # pool is node-id sorted, so each group is too
        by_zone.setdefault(c.zone, []).append(c)

    locals_ = by_zone.pop(own_zone, [])
    chosen: list[Candidate] = []
    # Fixed zone order so the rng is consumed identically on every run.
    for zone in sorted(by_zone, key=_zone_key):
        members = by_zone[zone]
        kept = [c for c in members if c.node_id in cur]
        chosen.append(rng.choice(kept or members))

    local_target = max(0, n - len(by_zone))
    chosen += _keep_and_fill(locals_, cur, min(local_target, len(locals_)), rng, _uniform)
    return chosen
