"""Who is in the cluster, and which news about a member wins.

Every status carries the member's incarnation, a counter only the member itself
raises. The rules (SWIM's) make the outcome independent of arrival order:

- a higher incarnation always wins;
- at equal incarnation DOWN beats UP (suspicion sticks until refuted);
- a node that hears itself declared DOWN at its current incarnation refutes by
  announcing UP with incarnation + 1, which beats that DOWN everywhere.

So an old DOWN can never override a newer UP (gwyh §8.14).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gwyh_mp.protocol.events import Member
from gwyh_mp.protocol.wire import MemberRecord, MemberState


class Change(enum.Enum):
    NONE = "none"  # stale or identical news
    JOINED = "joined"  # a member we did not know, UP
    UP = "up"  # known member went DOWN -> UP
    DOWN = "down"  # UP -> DOWN
    REFRESHED = "refreshed"  # same state, newer incarnation or address


@dataclass(slots=True)
class MemberInfo:
    node_id: bytes
    host: str
    port: int
    zone: str | None
    state: MemberState
    incarnation: int

    def snapshot(self) -> Member:
        return Member(self.node_id, self.host, self.port, self.zone, self.state, self.incarnation)

    def record(self) -> MemberRecord:
        return MemberRecord(
            self.node_id, self.incarnation, self.state, self.host, self.port, self.zone
        )


def supersedes(new_state: MemberState, new_inc: int, old_state: MemberState, old_inc: int) -> bool:
    if new_inc != old_inc:
        return new_inc > old_inc
    return new_state == MemberState.DOWN and old_state == MemberState.UP


class MemberTable:
    """All members except ourselves. Bounded: DOWN members beyond ``max_down`` are
    forgotten oldest first, so churn cannot grow memory without limit."""

    def __init__(self, max_down: int = 10_000) -> None:
        self.members: dict[bytes, MemberInfo] = {}
        self._down_order: dict[bytes, None] = {}
        self.max_down = max_down

    def get(self, node_id: bytes) -> MemberInfo | None:
        return self.members.get(node_id)

    def up_members(self) -> list[MemberInfo]:
        return [m for m in self.members.values() if m.state == MemberState.UP]

    def apply(self, record: MemberRecord, *, keep_address: bool = False) -> Change:
        """Merge news about a member. ``keep_address``: we hold a live session with it,
        and the address that session uses is better than hearsay."""
        current = self.members.get(record.node_id)
        if current is None:
            if record.state == MemberState.DOWN:
                return Change.NONE  # nothing to forget; do not grow the table
            self.members[record.node_id] = MemberInfo(
                record.node_id,
                record.host,
                record.port,
                record.zone,
                record.state,
                record.incarnation,
            )
            return Change.JOINED
        if not supersedes(record.state, record.incarnation, current.state, current.incarnation):
            return Change.NONE
        old_state = current.state
        current.incarnation = record.incarnation
        current.state = record.state
        current.zone = record.zone
        if not keep_address:
            current.host, current.port = record.host, record.port
        if record.state == MemberState.DOWN:
            self._down_order[record.node_id] = None
            self._trim_down()
        else:
            self._down_order.pop(record.node_id, None)
        if old_state == record.state:
            return Change.REFRESHED
        return Change.DOWN if record.state == MemberState.DOWN else Change.UP

    def _trim_down(self) -> None:
        while len(self._down_order) > self.max_down:
            oldest = next(iter(self._down_order))
            del self._down_order[oldest]
            self.members.pop(oldest, None)
