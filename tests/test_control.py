"""The control socket server in-process: where it lives, how it refuses what it must,
and how it answers malformed requests (one JSON error line, never a dropped node)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gwyh_mp import Config, Node
from gwyh_mp.control import ControlError, ControlServer, default_path, message_line
from gwyh_mp.protocol.events import Message

KEY = b"control-test-key-0123456789abcdefgh"


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/custom")
    assert default_path(7001) == "/run/custom/7001.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_path(7001) == "/run/gwyh-node/7001.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_path(7001) == "/run/user/1000/gwyh-node/7001.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_path(7001) == "/tmp/gwyh-node-1000/7001.sock"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = await Node(Config.local(bind=("127.0.0.1", 0), psks=[KEY])).start()
    yield n
    await n.stop()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gw", dir="/tmp") as d:
        yield Path(d)


async def ask(path: str, line: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(line)
    await writer.drain()
    reply = orjson.loads(await reader.readline())
    writer.close()
    return reply


async def test_bad_requests_get_one_error_line(node: Node, sockdir: Path) -> None:
    path = str(sockdir / "n.sock")
    server = ControlServer(node, path, lambda: None)
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for line, needle in [
            (b"not json\n", "bad request"),
            (b"[1, 2]\n", "bad request"),
            (b'{"cmd": "frobnicate"}\n', "unknown command"),
            (b'{"cmd": "publish", "data_b64": "***"}\n', "not base64"),
            (b'{"cmd": "keys", "action": "remove", "fingerprint": "00"}\n', "no key"),
            (b'{"cmd": "keys", "action": "install", "key_b64": "YWJj"}\n', "too weak"),
        ]:
            reply = await ask(path, line)
            assert reply["ok"] is False and needle in str(reply["error"]), reply
        reply = await ask(path, b'{"cmd": "members"}\n')
        assert reply["ok"] is True
        assert [m["self"] for m in reply["result"]] == [True]  # type: ignore[index]
        # The key in use cannot be removed; the node still runs after all of the above.
        listed = await ask(path, b'{"cmd": "keys", "action": "list"}\n')
        fp = listed["result"][0]["fingerprint"]  # type: ignore[index]
        reply = await ask(
            path, b'{"cmd": "keys", "action": "remove", "fingerprint": "%s"}\n' % fp.encode()
        )
        assert reply["ok"] is False and "in use" in str(reply["error"])
    finally:
        await server.close()
    assert not os.path.exists(path)


async def test_live_socket_is_refused_and_stale_one_replaced(node: Node, sockdir: Path) -> None:
    path = str(sockdir / "n.sock")
    first = ControlServer(node, path, lambda: None)
    await first.start()
    try:
        with pytest.raises(ControlError, match="in use by another running node"):
            await ControlServer(node, path, lambda: None).start()
    finally:
        await first.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file of a node that died
    second = ControlServer(node, path, lambda: None)
    await second.start()
    await second.close()
    Path(path).write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await ControlServer(node, path, lambda: None).start()


async def test_default_directory_must_be_private(node: Node, sockdir: Path) -> None:
    shared = sockdir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ControlError, match="not private"):
        await ControlServer(node, str(shared / "n.sock"), lambda: None, private_dir=True).start()


@given(st.binary(max_size=300), st.none() | st.floats(0, 2e9))
def test_message_line_is_the_documented_record(data: bytes, received_at: float | None) -> None:
    """The --stdio / tail line: text as is, anything else base64 (built straight into the
    line's bytes for speed), and the same keys in the same order either way."""
    msg = Message(data, b"\x01" * 16, b"\x02" * 16, 3)
    line = message_line(msg, received_at)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = orjson.loads(line)
    expected: dict[str, object] = {"id": "01" * 16, "origin": "02" * 16, "hops": 3}
    if received_at is not None:
        expected["received_at"] = round(received_at, 6)
    try:
        expected["data"] = data.decode("utf-8")
    except UnicodeDecodeError:
        expected["data"] = base64.b64encode(data).decode()
        expected["encoding"] = "base64"
    assert list(record.items()) == list(expected.items())
