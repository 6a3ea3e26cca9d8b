"""The control socket of a running node: a Unix domain socket (mode 0600) speaking
JSON lines, so operators and scripts can list members, publish, tail, read stats,
rotate keys and make the node leave, without restarting it. The protocol is in
docs/CONTROL.md; the client subcommands are in ``gwyh_mp.ctl``.

The server only calls the public ``Node`` API (``members()``, ``message_batches()``,
``broadcast()``, ``stats()``, ``set_psks()``), the same one applications use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import orjson

from gwyh_mp import keys
from gwyh_mp.api import MessageTooLarge, Node, StreamOverflow
from gwyh_mp.config import ConfigError
from gwyh_mp.logs import member_fields
from gwyh_mp.protocol.events import Message

log = logging.getLogger("gwyh_mp.control")

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 << 20  # a 16 MiB message, base64-encoded, fits
TAIL_QUEUE = 10_000


class ControlError(Exception):
    """The control socket cannot be created or reached; the message says where."""


def default_path(port: int) -> str:
    """Where a node on ``port`` puts its control socket when ``--control`` is not given:
    systemd's $RUNTIME_DIRECTORY, else /run/gwyh-node for root, else
    $XDG_RUNTIME_DIR/gwyh-node, else /tmp/gwyh-node-UID."""
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not base:
        if os.geteuid() == 0:
            base = "/run/gwyh-node"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "gwyh-node")
        else:
            base = f"/tmp/gwyh-node-{os.geteuid()}"
    return os.path.join(base, f"{port}.sock")


def _record_head(msg: Message, received_at: float | None) -> dict[str, object]:
    record: dict[str, object] = {"id": msg.id.hex(), "origin": msg.origin.hex(), "hops": msg.hops}
    if received_at is not None:
        record["received_at"] = round(received_at, 6)
    return record


def message_record(msg: Message, received_at: float | None = None) -> dict[str, object]:
    """A delivered message in the --stdio / tail schema, as a dict (``message_line``'s)."""
    return orjson.loads(message_line(msg, received_at))  # type: ignore[no-any-return]


def message_line(msg: Message, received_at: float | None = None) -> bytes:
    """``message_record`` as one JSON line. Binary data is base64-encoded straight into
    the line's bytes (base64 needs no JSON escaping): for a 4 MiB message that skips
    turning 5.6 MB of base64 into a str and orjson encoding it back, about 40 % of the
    line's cost."""
    try:
        text = msg.data.decode("utf-8")
    except UnicodeDecodeError:
        head = orjson.dumps(_record_head(msg, received_at))
        return b"".join(
            (head[:-1], b',"data":"', base64.b64encode(msg.data), b'","encoding":"base64"}\n')
        )
    record = _record_head(msg, received_at)
    record["data"] = text
    return orjson.dumps(record) + b"\n"


class ControlServer:
    """Serves one node's control socket. ``on_leave`` is called after a ``leave``
    request was answered: the node's owner stops it (graceful leave) and exits 0."""

    def __init__(
        self, node: Node, path: str, on_leave: Callable[[], None], *, private_dir: bool = False
    ) -> None:
        """``private_dir``: the socket's directory must be this user's alone (the default
        path: /tmp/gwyh-node-UID could have been made by someone else)."""
        self.node = node
        self.path = path
        self.on_leave = on_leave
        self.private_dir = private_dir
        self._server: asyncio.AbstractServer | None = None
        self._primary: bytes | None = node.psks[0] if node.psks else None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create {directory}: {exc.strerror or exc}") from None
        if self.private_dir:
            info = os.stat(directory)
            if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ControlError(f"{directory} is not private to this user")
        self._remove_stale()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"cannot use {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left by a node that died: nobody answers on it
            return
        finally:
            probe.close()
        raise ControlError(f"{self.path} is in use by another running node (use --control PATH)")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._server = None

    # ------------------------------------------------------------ requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                await self._reply(writer, error="request too large")
                return
            if not line:
                return
            try:
                request = orjson.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError
            except ValueError:
                await self._reply(writer, error="bad request: expected one JSON object with cmd")
                return
            await self._dispatch(request, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug must not take the node down with it
            log.exception("control request failed")
            with contextlib.suppress(Exception):
                await self._reply(writer, error=f"internal error: {exc}")
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _reply(
        self, writer: asyncio.StreamWriter, result: Any = None, *, error: str | None = None
    ) -> None:
        body: dict[str, Any] = {"ok": error is None}
        if error is None:
            body["result"] = result
        else:
            body["error"] = error
        writer.write(orjson.dumps(body) + b"\n")
        await writer.drain()

    async def _dispatch(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cmd = request["cmd"]
        node = self.node
        if cmd == "members":
            local = dict(member_fields(node.local_member()), self=True)
            others = [dict(member_fields(m), self=False) for m in node.members()]
            await self._reply(writer, [local, *others])
        elif cmd == "publish":
            try:
                data = base64.b64decode(request.get("data_b64", ""), validate=True)
            except ValueError:
                await self._reply(writer, error="publish: data_b64 is not base64")
                return
            try:
                msg_id = await node.broadcast(data)
            except MessageTooLarge as exc:
                await self._reply(writer, error=f"publish: {exc}")
                return
            await self._reply(writer, {"id": msg_id.hex()})
        elif cmd == "tail":
            await self._tail(reader, writer)
        elif cmd == "stats":
            await self._reply(
                writer,
                {
                    "node_id": node.node_id.hex(),
                    "addr": "{}:{}".format(*node.address),
                    "stats": node.stats(),
                    "processes": node.process_stats(),
                },
            )
        elif cmd == "leave":
            await self._reply(writer, {"node_id": node.node_id.hex()})
            self.on_leave()
        elif cmd == "keys":
            await self._keys(request, writer)
        else:
            await self._reply(writer, error=f"unknown command {cmd!r}")

    async def _tail(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A lossy stream: a slow or stuck tail must never slow the node down.
        stream = self.node.message_batches(backpressure=False, queue_size=TAIL_QUEUE)
        await self._reply(writer, {"node_id": self.node.node_id.hex()})
        gone = asyncio.ensure_future(reader.read())  # EOF: the client went away
        try:
            while not gone.done():
                batch_task = asyncio.ensure_future(anext(stream))
                await asyncio.wait({batch_task, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not batch_task.done():
                    batch_task.cancel()
                    break
                wall = time.time()  # one stamp per batch, as --stdio does
                try:
                    batch = batch_task.result()
                except StreamOverflow as exc:
                    writer.write(orjson.dumps({"event": "lost", "count": exc.lost}) + b"\n")
                else:
                    writer.write(b"".join([message_line(m, wall) for m in batch]))
                await writer.drain()
        finally:
            gone.cancel()
            stream.close()

    async def _keys(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        action = request.get("action")
        current = self.node.psks
        if self._primary not in current:
            self._primary = current[0] if current else None
        by_fp = {keys.fingerprint(k): k for k in current}
        if action == "list":
            pass
        elif action == "install":
            try:
                key = base64.b64decode(request.get("key_b64", ""), validate=True)
                keys.check_key(key, "to install")
            except ValueError as exc:
                await self._reply(writer, error=f"keys install: {exc}")
                return
            if key not in current and not await self._set(writer, "install", [*current, key]):
                return
        elif action in ("use", "remove"):
            fp = str(request.get("fingerprint", "")).lower()
            matches = [f for f in by_fp if f.startswith(fp)] if fp else []
            if len(matches) != 1:
                what = "no key" if not matches else "several keys"
                await self._reply(writer, error=f"keys {action}: {what} with fingerprint {fp!r}")
                return
            key = by_fp[matches[0]]
            if action == "use":
                self._primary = key
                if not await self._set(writer, "use", [key, *(k for k in current if k != key)]):
                    return
            else:
                if key == self._primary:
                    await self._reply(
                        writer,
                        error="keys remove: this is the key in use; `keys use` another key first",
                    )
                    return
                if not await self._set(writer, "remove", [k for k in current if k != key]):
                    return
        else:
            await self._reply(writer, error=f"keys: unknown action {action!r}")
            return
        await self._reply(writer, self.key_list())

    async def _set(self, writer: asyncio.StreamWriter, action: str, new: list[bytes]) -> bool:
        try:
            self.node.set_psks(new)
        except ConfigError as exc:
            await self._reply(writer, error=f"keys {action}: {exc}")
            return False
        log.info("keys %s: now %s", action, ", ".join(keys.fingerprint(k) for k in new))
        return True

    def key_list(self) -> list[dict[str, Any]]:
        return [
            {"fingerprint": keys.fingerprint(k), "primary": k == self._primary}
            for k in self.node.psks
        ]

    def keys_reloaded(self) -> None:
        """The key files were re-read (SIGHUP): the first file's key is in use again."""
        psks = self.node.psks
        self._primary = psks[0] if psks else None


# ---------------------------------------------------------------- client side


class Client:
    """One request on a control socket; errors become ControlError with one line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise ControlError(
                f"no control socket at {path} (is the node running? pass --control PATH)"
            ) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise ControlError(f"nothing answers on {path}: the node is not running") from None
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EACCES:
                raise ControlError(
                    f"permission denied on {path} (run as the node's user)"
                ) from None
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self.file = self.sock.makefile("rb")

    def send(self, cmd: str, **fields: Any) -> None:
        try:
            self.sock.sendall(orjson.dumps({"cmd": cmd, "v": PROTOCOL_VERSION, **fields}) + b"\n")
        except OSError as exc:
            raise ControlError(
                f"lost the connection to {self.path}: {exc.strerror or exc}"
            ) from None

    def read(self) -> dict[str, Any] | None:
        """The next JSON line, or None at EOF."""
        try:
            line = self.file.readline()
        except OSError as exc:
            raise ControlError(
                f"lost the connection to {self.path}: {exc.strerror or exc}"
            ) from None
        if not line:
            return None
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ControlError(f"{self.path} did not answer in JSON: is it a gwyh-node?") from None
        if not isinstance(value, dict):
            raise ControlError(f"{self.path} answered something unexpected")
        return value

    def call(self, cmd: str, **fields: Any) -> Any:
        """Send a request and return its result; raise ControlError on an error reply."""
        self.send(cmd, **fields)
        reply = self.read()
        if reply is None:
            raise ControlError(f"the node closed {self.path} without answering")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "request failed")))
        return reply.get("result")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
