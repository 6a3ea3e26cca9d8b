"""Keys, MACs, sealing and anti-replay (gwyh_mp.protocol.crypto)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gwyh_mp.protocol.crypto import (
    LABEL_GOTEAM,
    LABEL_HELLO,
    LABEL_OHAI,
    LABEL_OKBOSS,
    AntiReplayWindow,
    DecryptError,
    PskKeyring,
    SessionKeys,
    ids_digest,
    mac,
    nonce,
    open_sealed,
    psk_to_key,
    seal,
    transcript_hash,
    x25519,
    x25519_keypair,
)
from tests.helpers_core import PSK_NEW, PSK_OLD, PSK_WRONG, seeded_random

FAST = settings(max_examples=100, deadline=None, derandomize=True)
KEY = bytes(range(32))

# ----------------------------------------------------------------------------- keys, MACs


def test_psk_to_key_is_deterministic_and_distinct() -> None:
    assert psk_to_key(PSK_OLD) == psk_to_key(PSK_OLD)
    assert len(psk_to_key(PSK_OLD)) == 32
    assert psk_to_key(PSK_OLD) != psk_to_key(PSK_NEW)
    assert psk_to_key(PSK_OLD) != PSK_OLD[:32]  # the PSK itself is never the key
    with pytest.raises(ValueError):
        psk_to_key(b"")


def test_mac_labels_separate_roles() -> None:
    labels = [LABEL_HELLO, LABEL_OHAI, LABEL_OKBOSS, LABEL_GOTEAM]
    macs = {mac(KEY, label, b"data") for label in labels}
    assert len(macs) == len(labels)
    assert all(len(m) == 32 for m in macs)
    assert mac(KEY, LABEL_HELLO, b"data") != mac(bytes(32), LABEL_HELLO, b"data")
    assert mac(KEY, LABEL_HELLO, b"data") != mac(KEY, LABEL_HELLO, b"datA")


def test_transcript_hash_is_length_prefixed() -> None:
    assert transcript_hash(b"ab", b"c") != transcript_hash(b"a", b"bc")
    assert transcript_hash(b"ab", b"") != transcript_hash(b"ab")
    assert transcript_hash(b"x", b"y") == transcript_hash(b"x", b"y")
    assert len(transcript_hash(b"x")) == 32


def test_keyring_offers_one_mac_per_psk_and_verifies_any() -> None:
    ring = PskKeyring([PSK_OLD, PSK_NEW])
    data = b"signed bytes"
    macs = ring.macs(LABEL_HELLO, data)
    assert len(macs) == 2
    assert macs == [
        mac(psk_to_key(PSK_OLD), LABEL_HELLO, data),
        mac(psk_to_key(PSK_NEW), LABEL_HELLO, data),
    ]

    only_old, only_new = PskKeyring([PSK_OLD]), PskKeyring([PSK_NEW])
    wrong = PskKeyring([PSK_WRONG])
    # The responder finds the key that matches, whichever position the MAC has.
    assert only_old.verify_any(LABEL_HELLO, data, macs) == psk_to_key(PSK_OLD)
    assert only_new.verify_any(LABEL_HELLO, data, macs) == psk_to_key(PSK_NEW)
    assert only_new.verify_any(LABEL_HELLO, data, [b"\x00" * 32, macs[1]]) == psk_to_key(PSK_NEW)
    assert ring.verify_any(LABEL_HELLO, data, only_new.macs(LABEL_HELLO, data)) == psk_to_key(
        PSK_NEW
    )
    assert wrong.verify_any(LABEL_HELLO, data, macs) is None
    assert only_old.verify_any(LABEL_HELLO, data + b"!", macs) is None
    assert only_old.verify_any(LABEL_OHAI, data, macs) is None  # role label matters
    assert only_old.verify_any(LABEL_HELLO, data, []) is None
    assert only_old.verify_any(LABEL_HELLO, data, [macs[0][:31]]) is None
    with pytest.raises(ValueError):
        PskKeyring([])


def test_x25519_agreement_and_low_order_points() -> None:
    rand = seeded_random("x25519")
    a_secret, a_public = x25519_keypair(rand)
    b_secret, b_public = x25519_keypair(rand)
    assert a_public != b_public
    assert x25519(a_secret, b_public) == x25519(b_secret, a_public)
    with pytest.raises(DecryptError):
        x25519(a_secret, bytes(32))  # the all-zero point gives an all-zero secret
    with pytest.raises(DecryptError):
        x25519(a_secret, (1).to_bytes(32, "little"))


def test_session_keys_are_distinct_and_depend_on_every_input() -> None:
    base = SessionKeys(KEY, b"s" * 32, b"t" * 32)
    keys = {base.initiator_to_responder, base.responder_to_initiator, base.confirm}
    assert len(keys) == 3
    for other in (
        SessionKeys(bytes(32), b"s" * 32, b"t" * 32),
        SessionKeys(KEY, b"S" * 32, b"t" * 32),
        SessionKeys(KEY, b"s" * 32, b"T" * 32),
    ):
        assert other.initiator_to_responder != base.initiator_to_responder
        assert other.confirm != base.confirm


# ----------------------------------------------------------------------------- sealing


def test_nonce_layout() -> None:
    assert nonce(1) == (1).to_bytes(8, "big") + bytes(16)
    assert nonce(2**64 - 1, b"t" * 16) == b"\xff" * 8 + b"t" * 16
    assert len(nonce(5)) == 24


def test_ids_digest() -> None:
    one = b"i" * 16
    assert ids_digest(one) == one
    two = one + b"j" * 16
    assert len(ids_digest(two)) == 16
    assert ids_digest(two) != ids_digest(b"j" * 16 + one)  # order matters
    assert ids_digest(two) not in (one, b"j" * 16)


@FAST
@given(st.binary(max_size=2000), st.integers(1, 2**64 - 1), st.binary(min_size=16, max_size=16))
def test_seal_open_round_trip(plaintext: bytes, counter: int, tail: bytes) -> None:
    n = nonce(counter, tail)
    sealed = seal(KEY, n, plaintext)
    assert len(sealed) == len(plaintext) + 16
    assert open_sealed(KEY, n, sealed) == plaintext


def test_every_tampered_ciphertext_byte_fails() -> None:
    n = nonce(7, b"x" * 16)
    sealed = seal(KEY, n, b"attack at dawn")
    for pos in range(len(sealed)):
        tampered = sealed[:pos] + bytes((sealed[pos] ^ 0x01,)) + sealed[pos + 1 :]
        with pytest.raises(DecryptError):
            open_sealed(KEY, n, tampered)
    for bad in (sealed[:-1], sealed + b"\x00", b"", sealed[:15]):
        with pytest.raises(DecryptError):
            open_sealed(KEY, n, bad)


def test_tampered_nonce_or_wrong_key_fails() -> None:
    n = nonce(7, b"x" * 16)
    sealed = seal(KEY, n, b"attack at dawn")
    for pos in range(24):
        bad_nonce = n[:pos] + bytes((n[pos] ^ 0x80,)) + n[pos + 1 :]
        with pytest.raises(DecryptError):
            open_sealed(KEY, bad_nonce, sealed)
    with pytest.raises(DecryptError):
        open_sealed(bytes(32), n, sealed)
    with pytest.raises(DecryptError):
        open_sealed(KEY, nonce(8, b"x" * 16), sealed)  # the counter is bound


# ----------------------------------------------------------------------------- anti-replay


def _accept(window: AntiReplayWindow, counter: int) -> bool:
    """What the node does: check, then (after authentication) mark."""
    if not window.check(counter):
        return False
    window.mark(counter)
    return True


def test_counter_zero_and_negative_are_rejected() -> None:
    w = AntiReplayWindow()
    assert not w.check(0)
    assert not w.check(-1)
    assert _accept(w, 1)
    assert not w.check(0)


def test_replay_is_rejected_and_check_does_not_mark() -> None:
    w = AntiReplayWindow()
    assert w.check(5) and w.check(5)  # checking alone changes nothing (forgeries can't move it)
    assert w.highest == 0
    assert _accept(w, 5)
    assert not w.check(5)
    assert _accept(w, 6)
    assert not w.check(5) and not w.check(6)


def test_out_of_order_within_window_is_accepted_once() -> None:
    w = AntiReplayWindow(size=64)
    assert _accept(w, 100)
    for c in (99, 50, 37, 98):
        assert _accept(w, c), c
        assert not w.check(c), c
    assert w.check(97)
    assert w.highest == 100


def test_old_counters_beyond_the_window_are_rejected() -> None:
    w = AntiReplayWindow(size=64)
    assert _accept(w, 100)
    assert w.check(37)  # offset 63: the oldest slot still inside
    assert not w.check(36)  # offset 64: outside
    assert not w.check(1)
    assert _accept(w, 1000)  # a jump slides the window
    assert not w.check(936) and w.check(937)
    assert not w.check(100)


def test_default_window_size() -> None:
    w = AntiReplayWindow()
    assert w.size == 2048
    assert _accept(w, 5000)
    assert w.check(5000 - 2047) and not w.check(5000 - 2048)


def test_window_counts_up_to_u64() -> None:
    w = AntiReplayWindow(size=64)
    top = 2**64 - 1
    assert _accept(w, top - 10)
    assert _accept(w, top)
    assert not w.check(top) and not w.check(top - 10)
    assert _accept(w, top - 5)


def test_large_counter_jump_costs_constant_memory() -> None:
    """Regression: mark() used to shift the bitmap by the whole jump before masking."""
    w = AntiReplayWindow()
    assert _accept(w, 1)
    tracemalloc.start()
    try:
        w.mark(1 + (1 << 26))  # 64 Mi positions ahead (2**40 would need 128 GiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.highest == 1 + (1 << 26)
    assert peak < 1 << 20


@FAST
@given(
    size=st.sampled_from([1, 8, 64, 2048]),
    counters=st.lists(st.integers(-2, 400), max_size=200),
)
def test_window_matches_a_set_based_reference(size: int, counters: list[int]) -> None:
    w = AntiReplayWindow(size=size)
    seen: set[int] = set()
    highest = 0
    for c in counters:
        expected = c >= 1 and c not in seen and c > highest - size
        assert _accept(w, c) == expected, (c, sorted(seen)[-5:], highest)
        if expected:
            seen.add(c)
            highest = max(highest, c)
    assert w.highest == highest


class ReplayModel(RuleBasedStateMachine):
    """Interleaved checks, authenticated marks and forged (checked, never marked) counters
    against a set-based reference."""

    @initialize(size=st.sampled_from([4, 32, 128]))
    def setup(self, size: int) -> None:
        self.window = AntiReplayWindow(size=size)
        self.size = size
        self.seen: set[int] = set()
        self.highest = 0

    def _expected(self, c: int) -> bool:
        return c >= 1 and c not in self.seen and c > self.highest - self.size

    @rule(delta=st.integers(-150, 150))
    def authenticated(self, delta: int) -> None:
        c = max(0, self.highest + delta)
        expected = self._expected(c)
        assert self.window.check(c) == expected
        if expected:
            self.window.mark(c)
            self.seen.add(c)
            self.highest = max(self.highest, c)

    @rule(delta=st.integers(-150, 10_000))
    def forged(self, delta: int) -> None:
        c = max(0, self.highest + delta)
        assert self.window.check(c) == self._expected(c)  # checked, fails auth: no mark

    @invariant()
    def highest_matches(self) -> None:
        if hasattr(self, "window"):
            assert self.window.highest == self.highest


TestReplayModel = ReplayModel.TestCase
TestReplayModel.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True
)
