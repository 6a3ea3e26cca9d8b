"""The node's counters: one dict every mechanism bumps, read by ``Node.stats()``."""

from __future__ import annotations


class Stats(dict[str, int]):
    def bump(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n
