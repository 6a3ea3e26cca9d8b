"""A node's identity on disk (``--data-dir``): the node id survives restarts, so a
restarted node rejoins as itself (it refutes its own stale DOWN with a higher
incarnation) instead of leaving a dead twin behind.

The directory is locked while a node uses it: two nodes sharing one id would fight
over it in the cluster.
"""

from __future__ import annotations

import fcntl
import os

from gwyh_mp.protocol import wire

NODE_ID_FILE = "node-id"
LOCK_FILE = "lock"


class IdentityError(Exception):
    """The data directory cannot be used; the message names it and says why."""


class DataDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd = -1

    def open(self) -> bytes:
        """Lock the directory and return the node id kept there (made on first use)."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise IdentityError(
                f"cannot use --data-dir {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise IdentityError(
                f"--data-dir {self.path} is in use by another running node"
            ) from None
        self._lock_fd = fd
        try:
            return self._node_id()
        except BaseException:
            self.close()
            raise

    def _node_id(self) -> bytes:
        path = os.path.join(self.path, NODE_ID_FILE)
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            node_id = os.urandom(wire.NODE_ID_BYTES)
            tmp = path + ".tmp"
            try:
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                    f.write(node_id.hex() + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # all or nothing, even on a crash
            except OSError as exc:
                raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from None
            return node_id
        except OSError as exc:
            raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            node_id = bytes.fromhex(text)
        except ValueError:
            node_id = b""
        if len(node_id) != wire.NODE_ID_BYTES:
            raise IdentityError(
                f"{path} does not hold a node id ({2 * wire.NODE_ID_BYTES} hex digits)"
            )
        return node_id

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
