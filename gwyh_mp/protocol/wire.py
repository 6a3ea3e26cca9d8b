"""Wire format v1: every byte of every datagram (docs/PROTOCOL.md describes the same).

All integers are big-endian. Every datagram starts with ``version:u8 type:u8``.
Handshake packets travel in clear, authenticated by MACs; everything else is
XSalsa20-Poly1305 ciphertext behind a small clear header that carries only what
the receiver needs to pick the key and drop duplicates *before* decrypting.

Decoders raise :class:`WireError` on anything malformed; the node turns that into
a counted, silent drop.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

VERSION = 1

MAX_DATAGRAM_BYTES = 65_507  # IPv4 UDP payload ceiling
NODE_ID_BYTES = 16
MESSAGE_ID_BYTES = 16
PUBLIC_KEY_BYTES = 32
MAC_BYTES = 32
CHALLENGE_BYTES = 16
TAG_BYTES = 16  # Poly1305
MAX_ZONE_BYTES = 64
MAX_HOST_BYTES = 64
MAX_PSKS_PER_HELLO = 8
# A Hello is padded to this size so that the Ohai it provokes is never larger:
# an unauthenticated (or replayed) Hello can never be used for amplification.
HELLO_PADDED_BYTES = 200


class WireError(ValueError):
    """A datagram or frame that does not parse. Always dropped, never answered."""


class PacketType(enum.IntEnum):
    HELLO = 0x01
    OHAI = 0x02
    OKBOSS = 0x03
    GOTEAM = 0x04
    CONTROL = 0x10  # pairwise-session ciphertext carrying control frames
    BROADCAST = 0x11  # provider-channel ciphertext carrying broadcast entries


class FrameType(enum.IntEnum):
    """Frames inside a CONTROL packet (point-to-point, never forwarded)."""

    PING = 0x01
    PONG = 0x02
    HEARTBEAT = 0x03
    SUBSCRIBE = 0x04
    SUBSCRIBED = 0x05
    UNSUBSCRIBE = 0x06
    PEERS_REQUEST = 0x07
    PEERS = 0x08
    NAK = 0x09
    CHANNEL_KEY = 0x0A
    FRAGMENT_NAK = 0x0B
    TAIL = 0x0C
    PING_REQ = 0x10  # target:16 nonce:u32 - PING the target for me (failure_detector.py)
    PING_ACK = 0x11  # target:16 nonce:u32 status:u8 (1 it answered, 0 nack)
    # Epidemic broadcast trees (protocol/trees.py): lazy announcements and their repair.
    IHAVE = 0x18
    GRAFT = 0x19
    PRUNE = 0x1A
    # Catch-up (protocol/catch_up.py).
    CATCHUP_ASK = 0x20
    CATCHUP_OFFER = 0x21


class EntryKind(enum.IntEnum):
    """Entries inside a BROADCAST packet (forwarded cluster-wide)."""

    APP = 0x00
    STATUS = 0x01
    FRAGMENT = 0x02


class MemberState(enum.IntEnum):
    UP = 1
    DOWN = 2  # declared failed by the cluster
    LEFT = 3  # announced its own graceful leave
    SUSPECT = 4  # a probe failed; DOWN after the suspicion timeout unless it refutes


# States a member counts as alive in: a SUSPECT keeps its subscriptions, sessions and
# place in the digests until it is declared DOWN (or refutes).
ALIVE_STATES = frozenset((MemberState.UP, MemberState.SUSPECT))


PREFIX = struct.Struct("!BB")

# ---------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------

# version, type, hs_id, node_id, ephemeral public key, receive session id, incarnation,
# unix time ns
HELLO_FIXED = struct.Struct("!BB16s16s32sIIQ")
# version, type, hs_id, node_id, ephemeral public key, receive session id, incarnation,
# challenge
OHAI_FIXED = struct.Struct("!BB16s16s32sII16s")
# version, type, hs_id, mac
CONFIRM = struct.Struct("!BB16s32s")


@dataclass(frozen=True, slots=True)
class Hello:
    hs_id: bytes
    node_id: bytes
    public_key: bytes
    session_id: int
    incarnation: int
    timestamp_ns: int
    zone: str | None
    signed: bytes  # the bytes the MACs cover
    macs: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Ohai:
    hs_id: bytes
    node_id: bytes
    public_key: bytes
    session_id: int
    incarnation: int
    challenge: bytes
    zone: str | None
    signed: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class Confirm:
    """OkBoss or GoTeam: a key-confirmation MAC over the whole transcript."""

    packet_type: PacketType
    hs_id: bytes
    mac: bytes


def _encode_zone(zone: str | None) -> bytes:
    # 0xFF marks "no zone", distinct from the empty-string zone.
    if zone is None:
        return b"\xff"
    raw = zone.encode()
    if len(raw) > MAX_ZONE_BYTES:
        raise ValueError(f"zone is {len(raw)} bytes; at most {MAX_ZONE_BYTES} allowed")
    return bytes((len(raw),)) + raw


def _decode_zone(buf: bytes | memoryview, offset: int) -> tuple[str | None, int]:
    if offset >= len(buf):
        raise WireError("truncated zone")
    length = buf[offset]
    offset += 1
    if length == 0xFF:
        return None, offset
    if length > MAX_ZONE_BYTES or offset + length > len(buf):
        raise WireError("bad zone length")
    try:
        return bytes(buf[offset : offset + length]).decode(), offset + length
    except UnicodeDecodeError as exc:
        raise WireError("zone is not UTF-8") from exc


def encode_hello_signed(
    hs_id: bytes,
    node_id: bytes,
    public_key: bytes,
    session_id: int,
    incarnation: int,
    timestamp_ns: int,
    zone: str | None,
) -> bytes:
    return HELLO_FIXED.pack(
        VERSION,
        PacketType.HELLO,
        hs_id,
        node_id,
        public_key,
        session_id,
        incarnation,
        timestamp_ns,
    ) + _encode_zone(zone)


def finish_hello(signed: bytes, macs: list[bytes]) -> bytes:
    body = signed + bytes((len(macs),)) + b"".join(macs)
    return body + bytes(max(0, HELLO_PADDED_BYTES - len(body)))


def decode_hello(data: bytes) -> Hello:
    if len(data) < HELLO_PADDED_BYTES:
        raise WireError("short hello")  # unpadded hellos are refused: no amplification
    _, _, hs_id, node_id, pk, sid, inc, ts = HELLO_FIXED.unpack_from(data)
    zone, offset = _decode_zone(data, HELLO_FIXED.size)
    signed = data[:offset]
    if offset >= len(data):
        raise WireError("truncated hello")
    count = data[offset]
    offset += 1
    if not 1 <= count <= MAX_PSKS_PER_HELLO or offset + count * MAC_BYTES > len(data):
        raise WireError("bad hello mac count")
    macs = tuple(data[offset + i * MAC_BYTES : offset + (i + 1) * MAC_BYTES] for i in range(count))
    return Hello(hs_id, node_id, pk, sid, inc, ts, zone, signed, macs)


def encode_ohai_signed(
    hs_id: bytes,
    node_id: bytes,
    public_key: bytes,
    session_id: int,
    incarnation: int,
    challenge: bytes,
    zone: str | None,
) -> bytes:
    return OHAI_FIXED.pack(
        VERSION,
        PacketType.OHAI,
        hs_id,
        node_id,
        public_key,
        session_id,
        incarnation,
        challenge,
    ) + _encode_zone(zone)


def decode_ohai(data: bytes) -> Ohai:
    if len(data) < OHAI_FIXED.size + 1 + MAC_BYTES:
        raise WireError("short ohai")
    _, _, hs_id, node_id, pk, sid, inc, challenge = OHAI_FIXED.unpack_from(data)
    zone, offset = _decode_zone(data, OHAI_FIXED.size)
    if offset + MAC_BYTES != len(data):
        raise WireError("bad ohai length")
    return Ohai(hs_id, node_id, pk, sid, inc, challenge, zone, data[:offset], data[offset:])


def encode_confirm(packet_type: PacketType, hs_id: bytes, mac: bytes) -> bytes:
    return CONFIRM.pack(VERSION, packet_type, hs_id, mac)


def decode_confirm(data: bytes) -> Confirm:
    if len(data) != CONFIRM.size:
        raise WireError("bad confirm length")
    _, ptype, hs_id, mac = CONFIRM.unpack(data)
    if ptype not in (PacketType.OKBOSS, PacketType.GOTEAM):
        raise WireError("not a confirm packet")
    return Confirm(PacketType(ptype), hs_id, mac)


# ---------------------------------------------------------------------------
# Encrypted packets
# ---------------------------------------------------------------------------

# CONTROL: version, type, reserved, receiver session id, session sequence (also the nonce)
CONTROL_HEADER = struct.Struct("!BBHIQ")
# BROADCAST: version, type, entry count, flags, receiver session id, link sequence (u32,
# wraps; loss detection), channel sequence (the nonce, never wraps); then count x 16-byte
# message ids in clear so duplicates are dropped before any decryption.
BROADCAST_HEADER = struct.Struct("!BBBBIIQ")
MAX_ENTRIES_PER_DATAGRAM = 255
CONTROL_OVERHEAD = CONTROL_HEADER.size + TAG_BYTES
BROADCAST_OVERHEAD = BROADCAST_HEADER.size + TAG_BYTES

FRAME_HEADER = struct.Struct("!BH")  # frame type, body length
MAX_FRAME_BODY = 0xFFFF

# Broadcast entry inside the plaintext: kind, hops, origin node id, body length.
# The message id is not repeated: it sits in the clear header, which the nonce binds.
ENTRY_HEADER = struct.Struct("!BB16sI")
ENTRY_OVERHEAD = ENTRY_HEADER.size + MESSAGE_ID_BYTES

# FRAGMENT entry body: message id, fragment index, fragment count, total length; then
# the fragment's bytes. The clear id of a fragment entry is fragment_id(msg_id, index).
FRAGMENT_HEADER = struct.Struct("!16sIII")

# NAK frame: link datagrams received and lost since the previous report (for the
# sender's loss rate), count of ranges, then (first lost link sequence u32, count u16) each.
NAK_HEADER = struct.Struct("!IIH")
NAK_RANGE = struct.Struct("!IH")
MAX_NAK_RANGES = 200  # 1,210 B of ranges: fits the default 1,400-byte datagram

# FRAGMENT_NAK frame: message id, count, then that many u32 fragment indexes.
FRAGMENT_NAK_HEADER = struct.Struct("!16sH")
MAX_FRAGMENT_NAK_INDEXES = 256


# CATCHUP_ASK frame: how far back (ms), the offer cursor asked for (0: from the start of
# that range; CATCHUP_NO_MORE: no more offers, only the entries), count, then that many
# message ids wanted (from the previous offer). CATCHUP_OFFER frame: the cursor it answers,
# the cursor to ask next (CATCHUP_NO_MORE: that was all), entries of the range the sender
# no longer holds (first page only), count, then that many message ids it holds.
CATCHUP_ASK_HEADER = struct.Struct("!IQH")
CATCHUP_OFFER_HEADER = struct.Struct("!QQIH")
CATCHUP_NO_MORE = (1 << 64) - 1
MAX_CATCHUP_IDS = (MAX_FRAME_BODY - CATCHUP_OFFER_HEADER.size) // MESSAGE_ID_BYTES


def _catchup_ids(body: bytes, offset: int, count: int) -> list[bytes]:
    if count > MAX_CATCHUP_IDS or len(body) != offset + count * MESSAGE_ID_BYTES:
        raise WireError("bad catch-up id count")
    return [body[i : i + MESSAGE_ID_BYTES] for i in range(offset, len(body), MESSAGE_ID_BYTES)]


def encode_catchup_ask(since_ms: int, cursor: int, wanted: list[bytes]) -> bytes:
    wanted = wanted[:MAX_CATCHUP_IDS]
    return CATCHUP_ASK_HEADER.pack(min(since_ms, 0xFFFFFFFF), cursor, len(wanted)) + b"".join(
        wanted
    )


def decode_catchup_ask(body: bytes) -> tuple[int, int, list[bytes]]:
    """-> (since_ms, cursor, wanted ids)"""
    if len(body) < CATCHUP_ASK_HEADER.size:
        raise WireError("short catch-up ask")
    since_ms, cursor, count = CATCHUP_ASK_HEADER.unpack_from(body)
    return since_ms, cursor, _catchup_ids(body, CATCHUP_ASK_HEADER.size, count)


def encode_catchup_offer(cursor: int, next_cursor: int, missed: int, ids: list[bytes]) -> bytes:
    ids = ids[:MAX_CATCHUP_IDS]
    header = CATCHUP_OFFER_HEADER.pack(cursor, next_cursor, min(missed, 0xFFFFFFFF), len(ids))
    return header + b"".join(ids)


def decode_catchup_offer(body: bytes) -> tuple[int, int, int, list[bytes]]:
    """-> (cursor, next cursor, missed, ids)"""
    if len(body) < CATCHUP_OFFER_HEADER.size:
        raise WireError("short catch-up offer")
    cursor, next_cursor, missed, count = CATCHUP_OFFER_HEADER.unpack_from(body)
    return cursor, next_cursor, missed, _catchup_ids(body, CATCHUP_OFFER_HEADER.size, count)


def fragment_id(msg_id: bytes, index: int) -> bytes:
    """The clear id a FRAGMENT entry travels under: distinct per fragment, so the
    seen-set drops duplicate fragments before decryption like whole messages."""
    return hashlib.blake2b(msg_id + index.to_bytes(4, "big"), digest_size=16).digest()


def encode_nak(received: int, lost: int, ranges: list[tuple[int, int]]) -> bytes:
    ranges = ranges[:MAX_NAK_RANGES]
    return NAK_HEADER.pack(
        min(received, 0xFFFFFFFF), min(lost, 0xFFFFFFFF), len(ranges)
    ) + b"".join(NAK_RANGE.pack(start & 0xFFFFFFFF, min(count, 0xFFFF)) for start, count in ranges)


def decode_nak(body: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    """-> (received, lost, [(first lost seq, count), ...])"""
    if len(body) < NAK_HEADER.size:
        raise WireError("short nak")
    received, lost, count = NAK_HEADER.unpack_from(body)
    if count > MAX_NAK_RANGES or len(body) != NAK_HEADER.size + count * NAK_RANGE.size:
        raise WireError("bad nak length")
    ranges = [
        NAK_RANGE.unpack_from(body, NAK_HEADER.size + i * NAK_RANGE.size) for i in range(count)
    ]
    return received, lost, ranges


def encode_fragment_nak(msg_id: bytes, indexes: list[int]) -> bytes:
    indexes = indexes[:MAX_FRAGMENT_NAK_INDEXES]
    return FRAGMENT_NAK_HEADER.pack(msg_id, len(indexes)) + struct.pack(
        f"!{len(indexes)}I", *indexes
    )


def decode_fragment_nak(body: bytes) -> tuple[bytes, list[int]]:
    if len(body) < FRAGMENT_NAK_HEADER.size:
        raise WireError("short fragment nak")
    msg_id, count = FRAGMENT_NAK_HEADER.unpack_from(body)
    if count > MAX_FRAGMENT_NAK_INDEXES or len(body) != FRAGMENT_NAK_HEADER.size + 4 * count:
        raise WireError("bad fragment nak length")
    return msg_id, list(struct.unpack_from(f"!{count}I", body, FRAGMENT_NAK_HEADER.size))


# Member record (PEERS frames and STATUS entries):
# node id, incarnation, state, port; then zone and host, length-prefixed. The state
# byte's top bit flags a trailing metadata block (name and tags); a record without
# metadata encodes exactly as before the block existed.
MEMBER_FIXED = struct.Struct("!16sIBH")
STATE_METADATA_FLAG = 0x80
META_LEN = struct.Struct("!H")
MAX_NAME_BYTES = 64
MAX_TAGS = 16
MAX_TAG_KEY_BYTES = 32
MAX_TAG_VALUE_BYTES = 128
# The whole block after its length; keeps the largest record (153 + 2 + 320 B) inside
# one STATUS entry and one PEERS frame at the smallest allowed datagram (576 B).
MAX_METADATA_BYTES = 320
TAG_KEY_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

Tags = tuple[tuple[str, str], ...]


def metadata_problem(name: str, tags: Tags) -> str | None:
    """Why this name and these tags cannot travel in a member record (None: they can).
    Config.validate says the same to the user; encode refuses the same."""
    raw_name = name.encode()
    if len(raw_name) > MAX_NAME_BYTES:
        return f"name is {len(raw_name)} bytes of UTF-8; at most {MAX_NAME_BYTES} allowed"
    if len(tags) > MAX_TAGS:
        return f"tags: {len(tags)} given; at most {MAX_TAGS} allowed"
    seen: set[str] = set()
    for key, value in tags:
        raw_key = key.encode()
        if not raw_key or len(raw_key) > MAX_TAG_KEY_BYTES or not set(raw_key) <= TAG_KEY_CHARS:
            return (
                f"tags: key {key!r} must be 1-{MAX_TAG_KEY_BYTES} characters from A-Z a-z 0-9 _ . -"
            )
        if key in seen:
            return f"tags: key {key!r} given twice"
        seen.add(key)
        if len(value.encode()) > MAX_TAG_VALUE_BYTES:
            return f"tags: value of {key!r} is over {MAX_TAG_VALUE_BYTES} bytes of UTF-8"
    size = len(encode_metadata(name, tags))
    if size > MAX_METADATA_BYTES:
        return (
            f"tags: name and tags take {size} bytes encoded; at most {MAX_METADATA_BYTES} allowed"
        )
    return None


def encode_metadata(name: str, tags: Tags) -> bytes:
    parts = [bytes((len(raw := name.encode()),)), raw, bytes((len(tags),))]
    for key, value in tags:
        raw_key, raw_value = key.encode(), value.encode()
        parts += [bytes((len(raw_key),)), raw_key, bytes((len(raw_value),)), raw_value]
    return b"".join(parts)


def _decode_text(block: bytes, offset: int, limit: int) -> tuple[bytes, int]:
    if offset >= len(block):
        raise WireError("truncated metadata")
    length = block[offset]
    offset += 1
    if length > limit or offset + length > len(block):
        raise WireError("bad metadata field length")
    return block[offset : offset + length], offset + length


def _decode_metadata(block: bytes) -> tuple[str, Tags]:
    """Only the canonical form decodes (keys in increasing order, nothing after the
    tags, not empty), so every accepted record re-encodes to the same bytes."""
    try:
        raw_name, offset = _decode_text(block, 0, MAX_NAME_BYTES)
        if offset >= len(block):
            raise WireError("truncated metadata")
        count = block[offset]
        offset += 1
        if count > MAX_TAGS:
            raise WireError("too many tags")
        tags = []
        for _ in range(count):
            raw_key, offset = _decode_text(block, offset, MAX_TAG_KEY_BYTES)
            raw_value, offset = _decode_text(block, offset, MAX_TAG_VALUE_BYTES)
            if not raw_key or not set(raw_key) <= TAG_KEY_CHARS:
                raise WireError("bad tag key")
            tags.append((raw_key.decode(), raw_value.decode()))
        name = raw_name.decode()
    except UnicodeDecodeError as exc:
        raise WireError("metadata is not UTF-8") from exc
    if offset != len(block):
        raise WireError("trailing bytes in metadata")
    if not name and not tags:
        raise WireError("empty metadata block")
    if any(tags[i][0] >= tags[i + 1][0] for i in range(len(tags) - 1)):
        raise WireError("tag keys not in increasing order")
    return name, tuple(tags)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    node_id: bytes
    incarnation: int
    state: MemberState
    host: str
    port: int
    zone: str | None
    name: str = ""
    tags: Tags = ()  # (key, value) pairs sorted by key, keys unique

    @property
    def has_metadata(self) -> bool:
        return bool(self.name or self.tags)

    def encode(self) -> bytes:
        try:
            host = self.host.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"host {self.host!r} is not ASCII") from None
        if len(host) > MAX_HOST_BYTES:
            raise ValueError("host too long")
        state = int(self.state)
        metadata = b""
        if self.name or self.tags:
            problem = metadata_problem(self.name, self.tags)
            if problem is not None:
                raise ValueError(problem)
            block = encode_metadata(self.name, tuple(sorted(self.tags)))
            metadata = META_LEN.pack(len(block)) + block
            state |= STATE_METADATA_FLAG
        return (
            MEMBER_FIXED.pack(self.node_id, self.incarnation, state, self.port)
            + _encode_zone(self.zone)
            + bytes((len(host),))
            + host
            + metadata
        )


def decode_member(buf: bytes | memoryview, offset: int = 0) -> tuple[MemberRecord, int]:
    if offset + MEMBER_FIXED.size > len(buf):
        raise WireError("truncated member record")
    node_id, incarnation, state, port = MEMBER_FIXED.unpack_from(buf, offset)
    try:
        member_state = MemberState(state & ~STATE_METADATA_FLAG)
    except ValueError as exc:
        raise WireError("bad member state") from exc
    zone, offset = _decode_zone(buf, offset + MEMBER_FIXED.size)
    if offset >= len(buf):
        raise WireError("truncated host")
    host_len = buf[offset]
    offset += 1
    if host_len > MAX_HOST_BYTES or offset + host_len > len(buf):
        raise WireError("bad host length")
    if port == 0:
        raise WireError("member port 0")  # sendto() refuses it (EINVAL): never learn it
    try:
        host = bytes(buf[offset : offset + host_len]).decode("ascii")
        host.encode("idna")  # what sendto() does with a name; refused names (a..b) are dropped
    except UnicodeError as exc:
        raise WireError("host is not a usable ASCII name") from exc
    offset += host_len
    name, tags = "", ()
    if state & STATE_METADATA_FLAG:
        if offset + META_LEN.size > len(buf):
            raise WireError("truncated metadata length")
        (meta_len,) = META_LEN.unpack_from(buf, offset)
        offset += META_LEN.size
        if meta_len > MAX_METADATA_BYTES or offset + meta_len > len(buf):
            raise WireError("bad metadata length")
        name, tags = _decode_metadata(bytes(buf[offset : offset + meta_len]))
        offset += meta_len
    record = MemberRecord(
        node_id=node_id,
        incarnation=incarnation,
        state=member_state,
        host=host,
        port=port,
        zone=zone,
        name=name,
        tags=tags,
    )
    return record, offset


def encode_members(records: list[MemberRecord]) -> bytes:
    return struct.pack("!H", len(records)) + b"".join(r.encode() for r in records)


def decode_members(buf: bytes | memoryview) -> list[MemberRecord]:
    if len(buf) < 2:
        raise WireError("truncated member list")
    (count,) = struct.unpack_from("!H", buf)
    offset = 2
    out = []
    for _ in range(count):
        record, offset = decode_member(buf, offset)
        out.append(record)
    if offset != len(buf):
        raise WireError("trailing bytes after member list")
    return out


def encode_frame(frame_type: FrameType, body: bytes = b"") -> bytes:
    if len(body) > MAX_FRAME_BODY:
        raise ValueError("frame body too large")
    return FRAME_HEADER.pack(frame_type, len(body)) + body


def iter_frames(plaintext: bytes | memoryview) -> list[tuple[int, bytes]]:
    """Split a CONTROL plaintext into (frame type, body). Unknown types are kept: the
    caller skips them, so a newer peer's extra frames do not poison the packet."""
    frames = []
    offset = 0
    end = len(plaintext)
    while offset < end:
        if offset + FRAME_HEADER.size > end:
            raise WireError("truncated frame header")
        ftype, length = FRAME_HEADER.unpack_from(plaintext, offset)
        offset += FRAME_HEADER.size
        if offset + length > end:
            raise WireError("truncated frame body")
        frames.append((ftype, bytes(plaintext[offset : offset + length])))
        offset += length
    return frames


# ---------------------------------------------------------------- broadcast trees
# IHAVE and GRAFT bodies: groups of message ids that share an origin.
#   group: origin:16s  hops:u8  count:u8  count x id:16s   (GRAFT: hops is 0)
# A GRAFT group with count 0 asks for the origin's messages in full from now on,
# without asking for any message. A PRUNE body is origins only: n x origin:16s.
TREE_GROUP_HEADER = struct.Struct("!16sBB")
MAX_TREE_GROUP_IDS = 255


def encode_id_groups(groups: list[tuple[bytes, int, list[bytes]]]) -> bytes:
    """(origin, hops, ids) groups as one IHAVE/GRAFT body; a group of more than 255
    ids is split. The caller keeps the body under MAX_FRAME_BODY."""
    parts: list[bytes] = []
    pack = TREE_GROUP_HEADER.pack
    for origin, hops, ids in groups:
        if len(origin) != NODE_ID_BYTES:
            raise ValueError("origin must be 16 bytes")
        if not ids:
            parts.append(pack(origin, hops, 0))
            continue
        for start in range(0, len(ids), MAX_TREE_GROUP_IDS):
            chunk = ids[start : start + MAX_TREE_GROUP_IDS]
            parts.append(pack(origin, min(hops, 255), len(chunk)))
            parts.extend(chunk)
    return b"".join(parts)


def decode_id_groups(body: bytes) -> list[tuple[bytes, int, list[bytes]]]:
    """The inverse of encode_id_groups; WireError on anything truncated."""
    out: list[tuple[bytes, int, list[bytes]]] = []
    offset = 0
    end = len(body)
    header = TREE_GROUP_HEADER
    while offset < end:
        if offset + header.size > end:
            raise WireError("truncated id group")
        origin, hops, count = header.unpack_from(body, offset)
        offset += header.size
        stop = offset + count * MESSAGE_ID_BYTES
        if stop > end:
            raise WireError("truncated id group ids")
        out.append((origin, hops, [body[i : i + 16] for i in range(offset, stop, 16)]))
        offset = stop
    return out


def encode_origins(origins: list[bytes]) -> bytes:
    """A PRUNE body."""
    if any(len(o) != NODE_ID_BYTES for o in origins):
        raise ValueError("origins must be 16 bytes")
    return b"".join(origins)


def decode_origins(body: bytes) -> list[bytes]:
    if len(body) % NODE_ID_BYTES:
        raise WireError("prune body is not a whole number of origins")
    return [body[i : i + NODE_ID_BYTES] for i in range(0, len(body), NODE_ID_BYTES)]
