"""Run options from a TOML config file and ``GWYH_*`` variables (gwyh_mp.configfile).

The coverage test walks the run parser's actions, so a flag added later is checked
in all three forms (file, environment, command line) without touching this file.
A real node started from a config file alone joins a cluster started from the
environment alone."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from gwyh_mp import configfile, keys
from gwyh_mp.cli import build_run_parser
from tests.procs import NODE_CMD, free_udp_port, write_key
from tests.test_cli_ops import sockdir, until  # noqa: F401 - a fixture

KEY = b"config-file-test-key-0123456789abcdefghij"
# Texts tried, in order, until a flag's own type accepts one: a sample for each flag.
SAMPLE_TEXTS = ["3", "0.5", "1500", "2097152", "127.0.0.1:7000", "prefer-local", "role=web", "dc1"]


def _layered(argv: list[str], env: dict[str, str] | None = None) -> configfile.Layered:
    return configfile.parse_layered(build_run_parser(), argv, env or {})


def _toml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _sample(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.choices is not None:
        return str(list(action.choices)[-1])
    for text in SAMPLE_TEXTS:
        try:
            action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        return text
    raise AssertionError(f"no sample value for {action.option_strings}: extend SAMPLE_TEXTS")


# ---------------------------------------------------------------- every flag, three ways


def test_every_run_flag_is_reachable_from_the_file_and_the_environment(tmp_path: Path) -> None:
    parser = build_run_parser()
    found = configfile.options(parser)
    assert {"bind", "psk-file", "bootstrap", "heartbeat-interval", "stdio", "workers"} <= set(found)
    base = ["--psk-file", "k"]
    for key, action in found.items():
        flag = f"--{key}"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            toml_value, env_text, argv = "true", "1", [flag]
        elif isinstance(action, argparse._AppendAction):
            text = _sample(parser, action)
            toml_value, env_text, argv = (
                f'["{text}", "{text}"]',
                f"{text}, {text}",
                [flag, text] * 2,
            )
        else:
            text = _sample(parser, action)
            toml_value, env_text, argv = f'"{text}"', text, [flag, text]
        cli = build_run_parser().parse_args(base + argv if key != "psk-file" else argv)
        expected = getattr(cli, action.dest)
        path = _toml(tmp_path / f"{key}.toml", f"{key} = {toml_value}\n")
        rest = [] if key == "psk-file" else base
        from_file = _layered(["--config", path, *rest])
        assert getattr(from_file.args, action.dest) == expected, key
        assert from_file.sources[action.dest] == path
        name = configfile.env_name(key)
        assert name == "GWYH_" + key.upper().replace("-", "_")
        from_env = _layered(rest, {name: env_text})
        assert getattr(from_env.args, action.dest) == expected, name
        assert from_env.sources[action.dest] == "$" + name


def test_precedence_defaults_file_environment_command_line(tmp_path: Path) -> None:
    path = _toml(tmp_path / "n.toml", 'psk-file = ["k"]\nheartbeat-interval = 2\n')
    env = {"GWYH_HEARTBEAT_INTERVAL": "3"}
    assert _layered(["--psk-file", "k"]).args.heartbeat_interval == 5.0
    assert _layered(["--config", path]).args.heartbeat_interval == 2.0
    assert _layered(["--config", path], env).args.heartbeat_interval == 3.0
    top = _layered(["--config", path, "--heartbeat-interval", "4"], env)
    assert top.args.heartbeat_interval == 4.0
    assert top.sources["heartbeat_interval"] == "command line"
    # GWYH_CONFIG names the file when --config does not.
    via_env = _layered([], {"GWYH_CONFIG": path})
    assert via_env.args.heartbeat_interval == 2.0 and via_env.config_path == path


def test_repeatable_flags_and_switches(tmp_path: Path) -> None:
    path = _toml(
        tmp_path / "n.toml",
        'psk-file = ["a", "b"]\nbootstrap = ["10.0.0.1:1", "seed.example:2"]\n'
        "stdio = true\nno-control = false\nworkers = 2\n",
    )
    args = _layered(["--config", path]).args
    assert args.psk_file == ["a", "b"]
    assert args.bootstrap == [("10.0.0.1", 1), ("seed.example", 2)]
    assert args.stdio is True and args.no_control is False and args.workers == 2
    # A higher level replaces the whole list rather than adding to it.
    env = {"GWYH_BOOTSTRAP": "10.0.0.3:3,10.0.0.4:4 10.0.0.5:5", "GWYH_STDIO": "off"}
    args = _layered(["--config", path], env).args
    assert [p for _, p in args.bootstrap] == [3, 4, 5] and args.stdio is False
    args = _layered(["--config", path, "--bootstrap", "10.0.0.9:9"], env).args
    assert args.bootstrap == [("10.0.0.9", 9)]
    # A single string is one item.
    one = _toml(tmp_path / "one.toml", 'psk-file = "k"\n')
    assert _layered(["--config", one]).args.psk_file == ["k"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("heartbeat-interval = -1", "heartbeat-interval: '-1' must be >= 0.01"),
        ("heartbeat-interval = inf", "heartbeat-interval: 'inf' is not a finite number"),
        ("workers = 1.5", "workers: '1.5' is not an integer"),
        ('bind = "nowhere"', "bind: "),
        ('log-level = "loud"', "log-level: invalid choice: 'loud'"),
        ('stdio = "yes"', "stdio: expected true or false"),
        ("zone = true", "zone: expected a string or a number, not a boolean"),
        ("bootstrap = [[1]]", "bootstrap: expected a string or a number, not a list"),
        ("heartbeat_interval = 2", "unknown key 'heartbeat_interval' (did you mean "),
        ("[network]\nbind = '1.2.3.4:5'", "unknown key 'network'"),
        ("bind = ", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _toml(tmp_path / "node.toml", text + "\n")
    with pytest.raises(configfile.ConfigFileError) as err:
        _layered(["--config", path, "--psk-file", "k"])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(configfile.ConfigFileError, match=r"GWYH_WORKERS: '0' must be between"):
        _layered(["--psk-file", "k"], {"GWYH_WORKERS": "0"})
    with pytest.raises(configfile.ConfigFileError, match=r"did you mean 'GWYH_WORKERS'"):
        _layered(["--psk-file", "k"], {"GWYH_WORKRS": "2"})
    with pytest.raises(configfile.ConfigFileError, match=r"GWYH_STDIO: expected 1/0"):
        _layered(["--psk-file", "k"], {"GWYH_STDIO": "maybe"})
    # Variables that are not run options are left alone; so is everything else.
    _layered(["--psk-file", "k"], {"GWYH_NO_MMSG": "1", "HOME": "/root"})


def _gwyh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GWYH_")}
    return subprocess.run(
        NODE_CMD + list(args), capture_output=True, text=True, env=clean | (env or {}), timeout=60
    )


def test_node_refuses_to_start_on_a_bad_file_or_variable(tmp_path: Path) -> None:
    path = _toml(tmp_path / "node.toml", "heartbeat-interval = 0\n")
    out = _gwyh("--config", path, "--psk-file", "k")
    assert out.returncode == 2
    assert out.stderr == f"gwyh-node: error: {path}: heartbeat-interval: '0' must be >= 0.01\n"
    out = _gwyh("--psk-file", "k", env={"GWYH_BIND": "1.2.3.4"})
    assert out.returncode == 2 and out.stderr.startswith("gwyh-node: error: environment: GWYH_BIND")
    out = _gwyh(env={})
    assert out.returncode == 2 and "--psk-file" in out.stderr and "GWYH_" in out.stderr
    # A value that passes its flag's type but not the node's own checks still names its origin.
    key = write_key(tmp_path, "cluster.key", KEY)
    long_zone = _toml(tmp_path / "zone.toml", f'zone = "{"z" * 100}"\n')
    out = _gwyh("--config", long_zone, "--psk-file", key, "--no-control")
    assert out.returncode == 1
    assert out.stderr.endswith(
        f"gwyh-node: error: {long_zone}: zone must be at most 64 bytes of UTF-8\n"
    )
    out = _gwyh("--psk-file", key, "--no-control", env={"GWYH_ZONE": "z" * 100})
    assert out.stderr.endswith(
        "gwyh-node: error: environment: GWYH_ZONE must be at most 64 bytes of UTF-8\n"
    )


# ---------------------------------------------------------------- config check / show


def test_config_check(tmp_path: Path) -> None:
    good = _toml(tmp_path / "good.toml", 'bind = "0.0.0.0:6969"\nworkers = 2\n')
    out = _gwyh("config", "check", good)
    assert out.returncode == 0 and out.stdout == f"{good}: ok (2 options)\n"
    bad = _toml(tmp_path / "bad.toml", 'bind = "0.0.0.0:6969"\nwokers = 2\n')
    out = _gwyh("config", "check", bad)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and f"{bad}: unknown key 'wokers'" in out.stderr
    assert "did you mean 'workers'" in out.stderr
    out = _gwyh("config", "check", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_config_show_is_the_effective_config_with_keys_as_fingerprints(tmp_path: Path) -> None:
    key = write_key(tmp_path, "cluster.key", KEY)
    path = _toml(tmp_path / "n.toml", f'psk-file = ["{key}"]\nworkers = 2\nzone = "dc1"\n')
    out = _gwyh("config", "show", "--zone", "dc2", env={"GWYH_CONFIG": path, "GWYH_WORKERS": "3"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert KEY.decode() not in text
    assert keys.fingerprint(KEY) in text
    assert f'psk-file = ["{key}"]  # {path}' in text
    assert "workers = 3  # $GWYH_WORKERS" in text
    assert 'zone = "dc2"  # command line' in text
    assert "heartbeat-interval = 5.0  # default" in text
    # What it prints is a config file that gives the same configuration.
    shown = _toml(tmp_path / "shown.toml", text)
    again = _layered(["--config", shown]).args
    expected = _layered(["--zone", "dc2"], {"GWYH_CONFIG": path, "GWYH_WORKERS": "3"}).args
    for name, value in vars(expected).items():
        if name != "config":
            assert getattr(again, name) == value, name


# ---------------------------------------------------------------- a real node


def _members(control: str) -> list[dict[str, Any]]:
    out = _gwyh("members", "--json", "--control", control)
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)


def _start(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GWYH_")}
    with open(out, "wb") as stdout, open(f"{out}.err", "wb") as stderr:
        return subprocess.Popen(
            NODE_CMD + args,
            stdin=subprocess.PIPE,  # held open: --stdio nodes keep running
            stdout=stdout,
            stderr=stderr,
            env=clean | env | {"PYTHONUNBUFFERED": "1"},
        )


def _wait_for_socket(proc: subprocess.Popen[bytes], control: str, log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, Path(f"{log}.err").read_text()
        return os.path.exists(control)

    until(ready)


def test_nodes_started_from_a_config_file_and_from_the_environment_alone(
    tmp_path: Path,
    sockdir: Path,  # noqa: F811 - the fixture
) -> None:
    key = write_key(tmp_path, "cluster.key", KEY)
    first, second = free_udp_port(), free_udp_port()
    control_a, control_b = str(sockdir / "a.sock"), str(sockdir / "b.sock")
    path = _toml(
        tmp_path / "node.toml",
        f'bind = "127.0.0.1:{first}"\npsk-file = ["{key}"]\ncontrol = "{control_a}"\n'
        "heartbeat-interval = 0.5\nworkers = 1\nstdio = true\n",
    )
    env_b = {
        "GWYH_BIND": f"127.0.0.1:{second}",
        "GWYH_PSK_FILE": key,
        "GWYH_CONTROL": control_b,
        "GWYH_BOOTSTRAP": f"127.0.0.1:{first}",
        "GWYH_HEARTBEAT_INTERVAL": "0.5",
        "GWYH_WORKERS": "1",
    }
    started: list[subprocess.Popen[bytes]] = []
    try:
        out_a, out_b = tmp_path / "a.out", tmp_path / "b.out"
        started.append(a := _start(["--config", path], {}, out_a))
        _wait_for_socket(a, control_a, out_a)
        started.append(b := _start([], env_b, out_b))
        _wait_for_socket(b, control_b, out_b)
        for control in (control_a, control_b):
            until(lambda c=control: [m["state"] for m in _members(c)] == ["UP", "UP"])
        me = next(m for m in _members(control_a) if m["self"])
        assert me["addr"] == f"127.0.0.1:{first}"
        # stdio = true from the file: what b publishes comes out on a's stdout.
        published = _gwyh("publish", "--control", control_b, "from-the-environment")
        assert published.returncode == 0, published.stderr
        until(lambda: b"from-the-environment" in out_a.read_bytes())
    finally:
        for proc in started:
            proc.kill()
            proc.wait(10)
            if proc.stdin is not None:
                proc.stdin.close()


def test_flags_added_later_need_no_change_here(tmp_path: Path) -> None:
    # The shapes other options take: a free string, a repeatable KEY=VALUE, a bounded
    # integer, a list of words.
    from gwyh_mp.cliargs import Parser, int_range

    parser = Parser(prog="gwyh-node")
    configfile.add_config_option(parser)
    parser.add_argument("--name")
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("--max-members", type=int_range(2, 100), default=10)
    parser.add_argument("--words", nargs="+")
    path = _toml(
        tmp_path / "n.toml",
        'name = "web-1"\ntag = ["role=web", "dc=1"]\nmax-members = 50\nwords = ["a", "b"]\n',
    )
    args = configfile.parse_layered(parser, ["--config", path], {"GWYH_NAME": "web-2"}).args
    assert (args.name, args.tag, args.max_members, args.words) == (
        "web-2",
        ["role=web", "dc=1"],
        50,
        ["a", "b"],
    )
    args = configfile.parse_layered(parser, ["--words", "c"], {"GWYH_TAG": "x=1 y=2"}).args
    assert args.tag == ["x=1", "y=2"] and args.words == ["c"] and args.max_members == 10
    bad = _toml(tmp_path / "bad.toml", "max-members = 1000\n")
    with pytest.raises(configfile.ConfigFileError, match=f"^{bad}: max-members: '1000' must be"):
        configfile.parse_layered(parser, ["--config", bad], {})
