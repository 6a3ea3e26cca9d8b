"""Issue 11 hardening (items 3, 4, 8): the member table's bound, peer-list pagination
and where its replies may go, send paths that survive addresses no socket accepts, and
an advertised port that a port mapping chose."""

from __future__ import annotations

from gwyh_mp.config import Config
from gwyh_mp.protocol.node import NodeCore
from tests.helpers_core import PSK, addr, seeded_random


def bound_core(label: str, **overrides: object) -> NodeCore:
    config = Config.local(bind=("127.0.0.1", 0), psks=[PSK], **overrides)  # type: ignore[arg-type]
    core = NodeCore(config, 0.0, random_bytes=seeded_random(label))
    core.set_bound_port(51234)
    return core


def test_advertised_port_survives_binding_port_0() -> None:
    # Regression (item 8): --advertise HOST:PORT kept the host but took the bound port.
    core = bound_core("adv", advertise=("203.0.113.7", 40000))
    member = core.local_member()
    assert (member.host, member.port) == ("203.0.113.7", 40000)
    # Port 0 in --advertise means "whatever port we bound".
    core = bound_core("adv0", advertise=("203.0.113.7", 0))
    assert core.local_member().port == 51234
    core = bound_core("bind")
    assert core.local_member().port == 51234
    assert Config(bind=addr(0), psks=[PSK], advertise=("10.9.9.9", 0)).advertised == (
        "10.9.9.9",
        7000,
    )
