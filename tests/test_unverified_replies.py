"""What a node sends to an address that has not proven it receives there
(docs/PROTOCOL.md §8.6), pinned as the code behaves today.

The rule: no reply to an unverified address is larger than the request that provoked it.
The handshake keeps it; a captured Hello is nevertheless answered by every *other* node
of the cluster (1:1 reflection, smaller bytes), which these tests state exactly.
"""

from __future__ import annotations

from tests.helpers_core import WALL_NS, addr, make_party, run_handshake

SPOOFED = ("192.0.2.66", 4242)  # where a replayer points the reply (a victim)


def test_captured_hello_replayed_to_another_node_gets_an_ohai_per_repeat_for_10_s() -> None:
    a, b, c = make_party(1), make_party(2), make_party(3)  # one cluster, one PSK
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    # c never saw this hs_id: within the time lock the capture is a fresh, valid Hello.
    replies = []
    for t in (0.5, 1.0, 5.0, 9.9):
        reply, established = c.hs.handle(hello[1], hello, SPOOFED, t, WALL_NS + int(t * 1e9))
        assert established is None  # no session: the OkBoss needs a's ephemeral secret
        replies.append(reply)
    assert all(r is not None for r in replies) and len(set(replies)) == 1
    ohai = replies[0]
    assert ohai is not None and ohai[1] == 0x02 and len(ohai) < len(hello)  # smaller, not none
    assert c.hs.stats["ohai_sent"] == 1 and c.hs.stats["hello_retransmit"] == 3
    assert c.hs.half_open == 1  # the replay holds a half-open slot and a sid
    # After handshake_timeout_s (10 s) the state expires and the hs_id is remembered.
    c.hs.handle_timer(10.6)
    reply, _ = c.hs.handle(hello[1], hello, SPOOFED, 11.0, WALL_NS + 11 * 10**9)
    assert reply is None and c.hs.stats["hello_replay"] == 1
    assert c.hs.half_open == 0 and c.sids.released  # the sid came back


def test_captured_hello_replayed_to_its_own_responder_gets_nothing() -> None:
    a, b = make_party(1), make_party(2)
    transcript = run_handshake(a, b)
    hello = transcript.hello
    for source, t in ((a.addr, 1.0), (SPOOFED, 2.0), (a.addr, 30.0), (addr(9), 60.0)):
        b.hs.handle_timer(t)
        reply, established = b.hs.handle(hello[1], hello, source, t, WALL_NS + int(t * 1e9))
        assert (reply, established) == (None, None)


def test_retransmitted_hello_from_the_same_address_gets_the_same_ohai_until_okboss() -> None:
    a, b = make_party(1), make_party(2)
    hello = a.hs.initiate(b.addr, 0.0, WALL_NS)
    first, _ = b.hs.handle(hello[1], hello, a.addr, 0.0, WALL_NS)
    again, _ = b.hs.handle(hello[1], hello, a.addr, 1.0, WALL_NS)
    elsewhere, _ = b.hs.handle(hello[1], hello, SPOOFED, 1.0, WALL_NS)
    assert first is not None and again == first and elsewhere is None
