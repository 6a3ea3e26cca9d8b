"""Operating ``gwyh-node`` processes on 127.0.0.1 as an operator would: the control
socket clients (members, publish, tail, stats, leave, keys), identity across restarts,
signals, stdin of every kind, busy ports, argument errors, logs. Each case the issue
listed as broken has its regression test here. Conditions are awaited with generous
deadlines; every process is killed at the end of its test."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gwyh_mp import keys
from tests.procs import NODE_CMD, free_udp_port, terminate, write_key

KEY = b"cli-ops-test-key-0123456789abcdefghij"
NEW_KEY = b"cli-ops-new-key-ZYXWVUTSRQ9876543210zyx"
FAST = ("--heartbeat-interval", "0.5", "--workers", "1")
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="gw", dir="/tmp") as d:
        yield Path(d)


class Proc:
    """A ``gwyh-node`` run whose stderr is collected by a thread."""

    def __init__(self, args: list[str], *, stdin: Any = subprocess.DEVNULL, **kw: Any) -> None:
        kw.setdefault("stdout", subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            NODE_CMD + args, stdin=stdin, stderr=subprocess.PIPE, env=ENV, **kw
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (needle, self.lines[-8:])
                self._cond.wait(min(left, 0.2))

    def count(self, needle: str) -> int:
        with self._cond:
            return sum(needle in line for line in self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        return terminate(self.proc, timeout)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)


def ctl(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODE_CMD + list(args), input=stdin, capture_output=True, env=ENV, timeout=timeout
    )


def ctl_json(*args: str) -> Any:
    out = ctl(*args, "--json")
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)


def until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def start_node(
    procs: list[Proc], sockdir: Path, key: str, port: int, *extra: str, **kw: Any
) -> tuple[Proc, str]:
    control = str(sockdir / f"{port}.sock")
    args = ["--bind", f"127.0.0.1:{port}", "--psk-file", key, "--control", control, *FAST]
    node = Proc([*args, *extra], **kw)
    procs.append(node)
    node.wait_line("control socket")
    return node, control


def states(control: str) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in ctl_json("members", "--control", control)}


# ---------------------------------------------------------------- a cluster through control


def test_three_node_cluster_driven_by_the_control_clients(tmp_path: Path, sockdir: Path) -> None:
    old = write_key(tmp_path, "old.key", KEY)
    new = write_key(tmp_path, "new.key", NEW_KEY)
    ports = [free_udp_port() for _ in range(4)]
    with processes() as procs:

        def meta(name: str) -> tuple[str, ...]:
            return ("--name", name, "--tag", f"role={name[0]}", "--tag", "dc=lab")

        a, ca = start_node(procs, sockdir, old, ports[0], *meta("alpha"))
        boot = ("--bootstrap", f"127.0.0.1:{ports[0]}")
        b, cb = start_node(procs, sockdir, old, ports[1], *boot, *meta("bravo"))
        c, cc = start_node(procs, sockdir, old, ports[2], *boot, "--workers", "2", *meta("charlie"))
        assert stat.S_IMODE(os.stat(ca).st_mode) == 0o600
        ids = {}
        for control in (ca, cb, cc):
            until(lambda control=control: list(states(control).values()) == ["UP"] * 3)
            members = ctl_json("members", "--control", control)
            me = next(m for m in members if m["self"])
            ids[control] = me["node_id"]
            for m in members:
                assert {"node_id", "name", "addr", "zone", "state", "incarnation", "tags"} <= set(m)
        want = {n: {"role": n[0], "dc": "lab"} for n in ("alpha", "bravo", "charlie")}
        for control in (ca, cb, cc):  # names and tags travel with the member records
            until(
                lambda control=control: (
                    {m["name"]: m["tags"] for m in ctl_json("members", "--control", control)}
                    == want
                )
            )
        table = ctl("members", "--control", ca)
        assert table.returncode == 0 and table.stdout.decode().count(" UP ") == 3
        assert "charlie" in table.stdout.decode() and "role=c" in table.stdout.decode()
        a.wait_line("member updated: bravo")  # its name followed the handshake

        # Two tails at once on b both see what a publishes.
        tails = [
            subprocess.Popen(
                [*NODE_CMD, "tail", "--json", "--control", cb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=ENV,
            )
            for _ in range(2)
        ]
        try:
            until(lambda: ctl_json("stats", "--control", cb)["stats"]["message_streams"] >= 2)
            published = ctl("publish", "--control", ca, "hello from a")
            assert published.returncode == 0, published.stderr
            msg_id = published.stdout.decode().strip()
            assert len(msg_id) == 32
            for tail in tails:
                assert tail.stdout is not None
                record = orjson.loads(tail.stdout.readline())
                assert record["id"] == msg_id and record["data"] == "hello from a"
                assert record["origin"] == ids[ca]
        finally:
            for tail in tails:
                tail.kill()
                tail.wait(5)
        from_stdin = ctl("publish", "--control", ca, "-", stdin=b"\x00binary")
        assert from_stdin.returncode == 0, from_stdin.stderr

        # Live rotation: install the new key everywhere, use it, remove the old one.
        fp_old, fp_new = keys.fingerprint(KEY), keys.fingerprint(NEW_KEY)
        for control in (ca, cb, cc):
            assert ctl("keys", "install", new, "--control", control).returncode == 0
        for control in (ca, cb, cc):
            listed = ctl_json("keys", "use", fp_new[:8], "--control", control)
            assert listed == [
                {"fingerprint": fp_new, "primary": True},
                {"fingerprint": fp_old, "primary": False},
            ]
        for control in (ca, cb, cc):
            assert ctl_json("keys", "remove", fp_old, "--control", control) == [
                {"fingerprint": fp_new, "primary": True}
            ]
        shown = ctl("keys", "list", "--control", ca).stdout.decode()
        assert fp_new in shown and KEY.decode() not in shown and NEW_KEY.decode() not in shown
        # Membership survived the rotation; a node holding only the new key joins.
        d, cd = start_node(procs, sockdir, new, ports[3], *boot)
        for control in (ca, cb, cc, cd):
            until(lambda control=control: list(states(control).values()) == ["UP"] * 4)

        # leave: c goes away gracefully (exit 0) and is LEFT (not DOWN) elsewhere.
        left = ctl("leave", "--control", cc)
        assert left.returncode == 0, left.stderr
        assert c.proc.wait(30) == 0
        for control in (ca, cb, cd):
            until(lambda control=control: states(control).get(ids[cc]) == "LEFT")
        assert "charlie" in a.wait_line(f"member left: charlie {ids[cc]}")
        assert a.count("member failed") == 0
        assert a.count("member joined") >= 3
        for node in (a, b, d):
            assert node.stop() == 0


def test_restart_with_the_same_data_dir_keeps_the_node_id(tmp_path: Path, sockdir: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    data = str(tmp_path / "data")
    pa, pb = free_udp_port(), free_udp_port()
    with processes() as procs:
        a, ca = start_node(procs, sockdir, key, pa)
        boot = ("--bootstrap", f"127.0.0.1:{pa}", "--data-dir", data)
        b, cb = start_node(procs, sockdir, key, pb, *boot)
        until(lambda: list(states(ca).values()) == ["UP", "UP"])
        first_id = next(m["node_id"] for m in ctl_json("members", "--control", cb) if m["self"])
        # A second node on the same data dir is refused (it would share the id).
        twin = ctl("--bind", f"127.0.0.1:{free_udp_port()}", "--psk-file", key, *boot)
        assert twin.returncode == 1 and b"in use by another running node" in twin.stderr
        b.proc.kill()  # no goodbye: the cluster must find out, then see it come back
        b.proc.wait(5)
        until(lambda: states(ca).get(first_id) == "DOWN")
        b2, cb = start_node(procs, sockdir, key, pb, *boot)
        again = next(m for m in ctl_json("members", "--control", cb) if m["self"])
        assert again["node_id"] == first_id
        until(lambda: states(ca).get(first_id) == "UP")
        until(lambda: list(states(cb).values()) == ["UP", "UP"])
        assert a.stop() == 0 and b2.stop() == 0


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize("stdio", [True, False], ids=["stdio", "no-stdio"])
@pytest.mark.parametrize("kind", ["devnull", "closed", "file"])
def test_any_stdin_works(tmp_path: Path, sockdir: Path, kind: str, stdio: bool) -> None:
    # Regression: `--stdio < /dev/null` aborted with SIGABRT (exit 134).
    key = write_key(tmp_path, "k", KEY)
    lines = tmp_path / "lines"
    lines.write_bytes(b"one\ntwo\n")
    extra = ("--stdio",) if stdio else ()
    kw: dict[str, Any] = {}
    if kind == "closed":
        kw = {"stdin": None, "preexec_fn": lambda: os.close(0)}
    with processes() as procs, open(lines, "rb") as f:
        if kind == "file":
            kw = {"stdin": f}
        node, control = start_node(procs, sockdir, key, free_udp_port(), *extra, **kw)
        if stdio:
            node.wait_line("stdin closed")
        assert ctl("stats", "--control", control).returncode == 0  # still serving
        assert node.stop() == 0
        assert not any("Traceback" in line or "Assertion" in line for line in node.lines)


def test_dead_stdout_consumer_is_logged_once_and_the_node_keeps_running(
    tmp_path: Path, sockdir: Path
) -> None:
    key = write_key(tmp_path, "k", KEY)
    pa, pb = free_udp_port(), free_udp_port()
    with processes() as procs:
        a, ca = start_node(procs, sockdir, key, pa)
        b, cb = start_node(
            procs,
            sockdir,
            key,
            pb,
            "--stdio",
            "--bootstrap",
            f"127.0.0.1:{pa}",
            stdout=subprocess.PIPE,
        )
        assert b.proc.stdout is not None
        b.proc.stdout.close()  # the consumer of b's stdout goes away
        until(lambda: list(states(ca).values()) == ["UP", "UP"])
        until(lambda: ctl_json("stats", "--control", cb)["stats"]["providers"] >= 1)
        for i in range(5):
            assert ctl("publish", "--control", ca, f"m{i}").returncode == 0
        b.wait_line("stdout is gone")
        for i in range(5):
            assert ctl("publish", "--control", ca, f"more {i}").returncode == 0
        assert ctl_json("stats", "--control", cb)["stats"]["reading_paused"] == 0
        assert b.proc.poll() is None and b.count("stdout is gone") == 1
        assert b.stop() == 0 and a.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_keys_and_log_level_and_sigusr1_does_not_kill(
    tmp_path: Path, sockdir: Path, workers: int
) -> None:
    # Regression: SIGHUP (a closed terminal: the whole process group) and SIGUSR1 killed
    # the node without a graceful leave.
    key_path = Path(write_key(tmp_path, "k", KEY))
    level = tmp_path / "level"
    level.write_text("info\n")
    with processes() as procs:
        node, control = start_node(
            procs,
            sockdir,
            str(key_path),
            free_udp_port(),
            "--log-level-file",
            str(level),
            "--workers",
            str(workers),
            start_new_session=True,
        )
        group = os.getpgid(node.proc.pid)
        os.killpg(group, signal.SIGUSR1)
        node.wait_line("stats {")
        key_path.write_bytes(NEW_KEY + b"\n")
        level.write_text("debug\n")
        os.killpg(group, signal.SIGHUP)
        node.wait_line(f"SIGHUP: keys now {keys.fingerprint(NEW_KEY)}")
        node.wait_line("SIGHUP: log level debug")
        listed = ctl_json("keys", "list", "--control", control)
        assert listed == [{"fingerprint": keys.fingerprint(NEW_KEY), "primary": True}]
        key_path.write_bytes(b"weak\n")  # a bad file changes nothing
        node.signal(signal.SIGHUP)
        node.wait_line("SIGHUP: nothing changed")
        assert ctl_json("keys", "list", "--control", control) == listed
        processes_now = ctl_json("stats", "--control", control)["processes"]
        assert all(p.get("restarts", 0) == 0 for p in processes_now)  # no receiver died
        assert node.count("exited with") == 0
        assert node.stop() == 0


@pytest.mark.parametrize("first,second", [(2, 2), (1, 2), (2, 1)])
def test_busy_port_is_refused_whatever_the_workers(
    tmp_path: Path, sockdir: Path, first: int, second: int
) -> None:
    # Regression: a second `--workers 2` node bound the port of a running one.
    key = write_key(tmp_path, "k", KEY)
    port = free_udp_port()
    with processes() as procs:
        node, _ = start_node(procs, sockdir, key, port, "--workers", str(first))
        other = ctl(
            "--bind",
            f"127.0.0.1:{port}",
            "--psk-file",
            key,
            "--workers",
            str(second),
            "--no-control",
        )
        assert other.returncode == 1
        err = other.stderr.decode().strip().splitlines()
        assert err[-1] == f"gwyh-node: error: cannot bind 127.0.0.1:{port}: Address already in use"
        assert node.proc.poll() is None
        assert node.stop() == 0


def test_help_version_and_subcommand_help() -> None:
    top = ctl("--help")
    assert top.returncode == 0
    text = top.stdout.decode()
    for name in ("keygen", "demo", "members", "publish", "tail", "stats", "leave", "keys"):
        assert f"  {name} " in text
        sub = ctl(name, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: gwyh-node {name}".encode())
    for action in ("list", "install", "use", "remove"):
        assert ctl("keys", action, "--help").returncode == 0
    version = ctl("--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("gwyh-node ")


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--heartbeat-interval", "inf", "--heartbeat-interval: 'inf' is not a finite number"),
        ("--heartbeat-interval", "nan", "--heartbeat-interval: 'nan' is not a finite number"),
        ("--stats-interval", "-inf", "--stats-interval: '-inf' is not a finite number"),
        ("--flush-interval", "nan", "--flush-interval: 'nan' is not a finite number"),
        ("--max-datagram", "100", "--max-datagram: '100' must be between 576 and 65507"),
        ("--subscriptions", "65", "--subscriptions: '65' must be between 1 and 64"),
        ("--missed-heartbeats", "0", "--missed-heartbeats: '0' must be between 1 and 100"),
        # Regression (issue 11 item 9): these spun the CPU or failed later as "cannot bind".
        ("--heartbeat-interval", "1e-9", "--heartbeat-interval: '1e-9' must be >= 0.01"),
        ("--stats-interval", "1e-9", "--stats-interval: '1e-9' must be >= 0.1"),
        ("--bootstrap", "127.0.0.1:0", "--bootstrap: '127.0.0.1:0': port 0 is not a peer's port"),
        ("--max-members", "5", "--max-members: '5' must be between 16 and 10000000"),
    ],
)
def test_bad_numbers_name_the_flag(tmp_path: Path, flag: str, value: str, needle: str) -> None:
    key = write_key(tmp_path, "k", KEY)
    out = ctl("--psk-file", key, "--no-control", f"{flag}={value}")
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert "_bytes" not in lines[0] and "_s " not in lines[0]


def test_config_errors_are_said_in_flags() -> None:
    from gwyh_mp.cli import _flag_message

    assert _flag_message("max_datagram_bytes must be an integer between 576 and 65507, got 1") == (
        "--max-datagram must be an integer between 576 and 65507, got 1"
    )


def test_weak_and_readable_keys(tmp_path: Path) -> None:
    weak = tmp_path / "weak"
    weak.write_bytes(b"0123456789abcdef\n")  # 16 bytes of text: 64 bits, not 128
    weak.chmod(0o600)
    out = ctl("--psk-file", str(weak), "--no-control")
    assert out.returncode == 1
    assert out.stderr.decode().strip().endswith("use gwyh-node keygen")
    assert "too weak" in out.stderr.decode()
    readable = tmp_path / "readable"
    readable.write_bytes(KEY + b"\n")
    readable.chmod(0o644)
    out = ctl(
        "--psk-file", str(readable), "--no-control", "--zone", "z" * 1000
    )  # refused after the key is read
    assert b"readable by others (mode 0644); chmod 600" in out.stderr


def test_key_files_that_are_not_small_regular_files(tmp_path: Path) -> None:
    # Regression (issue 11 item 9): a FIFO blocked forever; a long file must not be cut.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = ctl("--psk-file", str(fifo), "--no-control", timeout=60)
    assert out.returncode == 1
    assert out.stderr.decode().strip() == f"gwyh-node: error: key file {fifo} is not a regular file"
    big = tmp_path / "big"
    big.write_bytes(KEY * 200)
    big.chmod(0o600)
    out = ctl("--psk-file", str(big), "--no-control", timeout=60)
    assert out.returncode == 1
    assert out.stderr.decode().strip().endswith(f"key file {big} is larger than 4096 bytes")
    out = ctl("--psk-file", str(tmp_path), "--no-control", timeout=60)
    assert out.returncode == 1 and "Is a directory" in out.stderr.decode()


def test_key_strength_rules() -> None:
    assert all(keys.key_bits(keys.generate().encode()) >= 128 for _ in range(2000))
    assert keys.key_bits(b"0123456789abcdef" * 2) == 128  # 32 hex digits
    assert keys.key_bits(b"0123456789abcdef") < 128
    assert keys.key_bits(b"a" * 100) == 0  # too few distinct characters
    assert keys.key_bits(os.urandom(16)) >= 128 or len(set(os.urandom(16))) < 8


def test_client_errors_are_one_line(tmp_path: Path, sockdir: Path) -> None:
    missing = ctl("members", "--control", str(sockdir / "nope.sock"))
    assert missing.returncode == 1
    assert missing.stderr.decode().count("\n") == 1 and b"no control socket at" in missing.stderr
    import socket

    stale = str(sockdir / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on: a node that died
    dead = ctl("stats", "--control", stale)
    assert dead.returncode == 1 and b"not running" in dead.stderr
    assert dead.stderr.decode().count("\n") == 1
    bad = ctl("publish", "--control", stale)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1
    bad = ctl("keys", "frobnicate", "--control", stale)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1


def test_logs_json_wrong_key_and_unreachable_bootstrap(tmp_path: Path, sockdir: Path) -> None:
    key = write_key(tmp_path, "k", KEY)
    other = write_key(tmp_path, "other", NEW_KEY)
    pa, pb = free_udp_port(), free_udp_port()
    dead = free_udp_port()
    with processes() as procs:
        a, _ = start_node(procs, sockdir, key, pa, "--log-format", "json")
        b, _ = start_node(
            procs,
            sockdir,
            other,
            pb,
            "--bootstrap",
            f"127.0.0.1:{pa}",
            "--bootstrap",
            f"127.0.0.1:{dead}",
        )
        line = a.wait_line("wrong key")
        record = orjson.loads(line)
        assert record["level"] == "warning" and record["event"] == "wrong_key"
        assert f"127.0.0.1:{pb}" in line  # the source address is named
        assert record["sources"][f"127.0.0.1:{pb}"] >= 1
        b.wait_line(f"bootstrap peer 127.0.0.1:{dead} unreachable")
        b.wait_line(f"bootstrap peer 127.0.0.1:{pa} unreachable")
        assert all(orjson.loads(x) for x in a.lines)  # every line is one JSON object
        assert a.stop() == 0 and b.stop() == 0


def test_clients_take_the_control_path_from_gwyh_control(tmp_path: Path) -> None:
    """$GWYH_CONTROL names the socket for the clients as it does for the node."""
    missing = tmp_path / "absent.sock"
    result = subprocess.run(
        [*NODE_CMD, "members"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GWYH_CONTROL": str(missing)},
    )
    assert result.returncode != 0
    assert f"no control socket at {missing}" in result.stderr
