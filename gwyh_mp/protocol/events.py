"""What the node core reports to its runtime and, through it, to the application."""

from __future__ import annotations

from dataclasses import dataclass

from gwyh_mp.protocol.wire import MemberState, Tags


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one cluster member as this node sees it."""

    node_id: bytes
    host: str
    port: int
    zone: str | None
    state: MemberState
    incarnation: int
    name: str = ""  # --name: free-form, "" when the member set none
    tags: Tags = ()  # --tag KEY=VALUE pairs, sorted by key

    @property
    def tag_dict(self) -> dict[str, str]:
        return dict(self.tags)

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def is_up(self) -> bool:
        return self.state == MemberState.UP

    @property
    def is_alive(self) -> bool:
        """UP or SUSPECT: not (yet) declared DOWN, not LEFT."""
        return self.state in (MemberState.UP, MemberState.SUSPECT)


@dataclass(frozen=True, slots=True)
class Message:
    """One broadcast, delivered exactly once per node (never to its own sender)."""

    data: bytes
    id: bytes
    origin: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class MemberUp:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """The member's name or tags became known or changed (serf's member-update); its
    state and incarnation did not change."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    """A probe of the member failed somewhere: it is SUSPECT, not yet DOWN. A MemberDown
    follows after the suspicion timeout unless it refutes, which brings a MemberUp."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberDown:
    """The member failed (declared DOWN), or, as the subclass MemberLeft, left."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberLeft(MemberDown):
    """The member announced a graceful leave (state LEFT). A MemberDown too, so code
    that only knows MemberDown still sees every member that went away."""


@dataclass(frozen=True, slots=True)
class ProviderChanged:
    """This node's set of providers changed (after a reassignment)."""

    providers: tuple[bytes, ...]


WRONG_KEY = "wrong_key"  # a MAC that none of our pre-shared keys verifies
EXPIRED = "expired"  # a Hello timestamped outside handshake_window_s


@dataclass(frozen=True, slots=True)
class RejectedHandshakes:
    """``count`` handshake packets from ``addr`` refused for ``reason`` (WRONG_KEY or
    EXPIRED) since the last drain; ``addr`` None sums the sources beyond the bound."""

    reason: str
    addr: tuple[str, int] | None
    count: int


Event = (
    Message | MemberUp | MemberUpdated | MemberSuspect | MemberDown | MemberLeft | ProviderChanged
)
