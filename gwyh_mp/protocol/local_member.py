"""This node as a member: the record it announces about itself.

Several mechanisms describe the node to others (anti-entropy answers, refutations,
graceful leave, the handshake's advertised address); they all read it here, so the
advertised address, name, tags and incarnation have one owner.
"""

from __future__ import annotations

from collections.abc import Callable

from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Member
from gwyh_mp.protocol.wire import MemberRecord, MemberState

Addr = tuple[str, int]


class LocalMember:
    def __init__(self, config: Config, node_id: bytes, incarnation: Callable[[], int]) -> None:
        self.node_id = node_id
        self.zone = config.zone
        self.name = config.name
        self.tags = config.tags
        self.advertised: Addr = config.advertised
        self._explicit_port = config.advertise is not None and config.advertise[1] != 0
        self._incarnation = incarnation  # liveness owns it (refutation raises it)

    def set_bound_port(self, port: int) -> None:
        """The runtime bound port 0 and learned the real one. An explicit advertised
        port is kept: behind a port mapping it differs from the bound one on purpose."""
        if not self._explicit_port:
            self.advertised = (self.advertised[0], port)

    def record(self, state: MemberState) -> MemberRecord:
        host, port = self.advertised
        return MemberRecord(
            node_id=self.node_id,
            incarnation=self._incarnation(),
            state=state,
            host=host,
            port=port,
            zone=self.zone,
            name=self.name,
            tags=self.tags,
        )

    def member(self, state: MemberState) -> Member:
        host, port = self.advertised
        return Member(
            self.node_id, host, port, self.zone, state, self._incarnation(), self.name, self.tags
        )
