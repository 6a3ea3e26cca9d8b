"""Every ``gwyh-node run`` option from a TOML file, the environment or the command line.

Operators run services from a config file and container platforms inject environment
variables; neither should need a 15-flag command line. The keys and variable names are
derived from the run parser's own actions, so every flag (including ones added later)
is available in all three ways with the flag's own validation:

    --heartbeat-interval 2   <->   heartbeat-interval = 2   <->   GWYH_HEARTBEAT_INTERVAL=2

TOML keys are the long flag names without ``--`` (dashes, not underscores). Precedence:
defaults < config file (``--config FILE`` or ``GWYH_CONFIG``) < ``GWYH_*`` environment
< command line. Repeatable flags take TOML arrays and, in the environment, values
separated by commas or whitespace; a value given at a higher level replaces the whole
list. Switches (``--stdio``) take TOML booleans and, in the environment, 1/0, true/false,
yes/no, on/off. An unknown key or a bad value is one line naming the key (or variable)
and the file, exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gwyh_mp import keys

ENV_PREFIX = "GWYH_"
CONFIG_ENV = "GWYH_CONFIG"
# GWYH_* variables that are not run options, so not typos of one.
OTHER_ENV = {CONFIG_ENV, "GWYH_NO_MMSG"}
EXIT_USAGE = 2
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
SKIPPED_DESTS = {"help", "version", "config"}


class ConfigFileError(Exception):
    """A bad config file, key, value or variable: one line, exit status 2."""


@dataclass
class Layered:
    """The parsed run options and where each came from: ``default``, the file's path,
    ``$GWYH_…`` or ``command line``."""

    args: argparse.Namespace
    sources: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f'TOML file of run options (keys are the flag names: bind = "0.0.0.0:6969"); '
        f"${CONFIG_ENV} names one too. Precedence: file < {ENV_PREFIX}* environment < flags",
    )


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The run options by config key: ``heartbeat-interval`` for ``--heartbeat-interval``."""
    found = {}
    for action in parser._actions:
        if action.dest in SKIPPED_DESTS or not action.option_strings:
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            found[longs[0][2:]] = action
    return found


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace("-", "_")


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)


def _is_repeatable(action: argparse.Action) -> bool:
    """Flags whose value is a list: append/extend, or several words (``nargs="+"``)."""
    return isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")


def _convert_text(action: argparse.Action, text: str) -> Any:
    """One value through the flag's own type and choices, as argparse would."""
    try:
        value = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as exc:
        raise ConfigFileError(str(exc)) from None
    except (TypeError, ValueError):
        name = getattr(action.type, "__name__", "value")
        raise ConfigFileError(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ConfigFileError(f"invalid choice: {text!r} (choose from {choices})")
    return value


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        kind = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise ConfigFileError(f"expected a string or a number, not {kind}")
    return value if isinstance(value, str) else repr(value)


def convert_toml(action: argparse.Action, value: Any) -> Any:
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigFileError(f"expected true or false, not {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if _is_repeatable(action):
        items = value if isinstance(value, list) else [value]
        return [_convert_text(action, _scalar_text(v)) for v in items]
    return _convert_text(action, _scalar_text(value))


def convert_env(action: argparse.Action, text: str) -> Any:
    if _is_switch(action):
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ConfigFileError(f"expected 1/0, true/false, yes/no or on/off, not {text!r}")
        on = word in TRUE_WORDS
        return on if isinstance(action, argparse._StoreTrueAction) else not on
    if _is_repeatable(action):
        return [_convert_text(action, w) for w in re.split(r"[,\s]+", text.strip()) if w]
    return _convert_text(action, text)


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def read_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's options by argparse dest, each value validated like its flag."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
    known = options(parser)
    values = {}
    for key, value in table.items():
        action = known.get(key)
        if action is None:
            raise ConfigFileError(f"{path}: {_unknown(key, list(known))}")
        try:
            values[action.dest] = convert_toml(action, value)
        except ConfigFileError as exc:
            raise ConfigFileError(f"{path}: {key}: {exc}") from None
    return values


def read_env(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict[str, Any]:
    """``GWYH_*`` options by argparse dest; an unknown ``GWYH_`` name is rejected."""
    by_env = {env_name(k): a for k, a in options(parser).items()}
    values = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        action = by_env.get(name)
        if action is None:
            raise ConfigFileError(
                f"environment: {_unknown(name, list(by_env))}".replace("key", "variable", 1)
            )
        try:
            values[action.dest] = convert_env(action, environ[name])
        except ConfigFileError as exc:
            raise ConfigFileError(f"environment: {name}: {exc}") from None
    return values


_UNSET = object()


def parse_layered(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> Layered:
    """Parse ``argv`` over the environment over the config file over the defaults.

    The command line is parsed first, alone, so it is checked before any file is read
    and ``--config`` (else ``$GWYH_CONFIG``) says which file. Raises ConfigFileError
    for the file and the environment; argparse errors (the command line, a required
    option given nowhere) exit through ``parser.error``."""
    environ = os.environ if environ is None else environ
    actions = list(options(parser).values())
    saved = [(a, a.default, a.required) for a in actions]
    try:
        # Parse the command line alone: whatever is still a marker was not given there.
        for action in actions:
            action.default = None if _is_repeatable(action) else _UNSET
            action.required = False
        args = parser.parse_args(list(argv))
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    path = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    from_file = read_file(parser, path) if path else {}
    from_env = read_env(parser, environ)
    sources: dict[str, str] = {}
    missing = []
    for action in actions:
        given = getattr(args, action.dest)
        if given is not _UNSET and not (_is_repeatable(action) and given is None):
            sources[action.dest] = "command line"
        elif action.dest in from_env:
            setattr(args, action.dest, from_env[action.dest])
            sources[action.dest] = "$" + env_name(_key_of(action))
        elif action.dest in from_file:
            setattr(args, action.dest, from_file[action.dest])
            sources[action.dest] = str(path)
        else:
            setattr(args, action.dest, _default(action))
            sources[action.dest] = "default"
            if action.required:
                missing.append("/".join(action.option_strings))
    if missing:
        parser.error(
            f"the following arguments are required: {', '.join(missing)} "
            f"(a flag, a config file key or {ENV_PREFIX}* variable)"
        )
    args.config = path
    return Layered(args, sources, path)


def name_origin(message: str, parser: argparse.ArgumentParser, layered: Layered) -> str:
    """Re-address a later error about ``--flag`` to the file or variable that set it:
    ``--zone must be ...`` -> ``/etc/gwyh/node.toml: zone must be ...``."""
    for key, action in options(parser).items():
        flag = f"--{key}"
        if not message.startswith(flag) or message[len(flag) : len(flag) + 1] not in " :":
            continue
        source = layered.sources.get(action.dest, "")
        if source.startswith("$"):
            return f"environment: {source[1:]}{message[len(flag) :]}"
        if source == layered.config_path:
            return f"{source}: {key}{message[len(flag) :]}"
    return message


def _key_of(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))[2:]


def _default(action: argparse.Action) -> Any:
    default = action.default
    if isinstance(default, str) and callable(action.type):
        return action.type(default)  # what argparse does with a string default
    return list(default) if isinstance(default, list) else default


def parse_or_exit(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> Layered:
    try:
        return parse_layered(parser, argv, environ)
    except ConfigFileError as exc:
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        raise SystemExit(EXIT_USAGE) from None


# ---------------------------------------------------------------- gwyh-node config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return json.dumps(str(value.value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host, port = value  # a HOST:PORT address
        return json.dumps(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _key_comment(path: str) -> str:
    try:
        return "key " + keys.fingerprint(keys.read_key_file(path))
    except keys.KeyFileError as exc:
        return f"unreadable: {exc}"


def render(parser: argparse.ArgumentParser, layered: Layered) -> str:
    """The effective configuration as TOML a ``--config`` file accepts, each value's
    origin in a comment. Key files are paths; only their fingerprints are shown."""
    lines = ["# effective gwyh-node configuration"]
    if layered.config_path:
        lines.append(f"# config file: {layered.config_path}")
    for key, action in options(parser).items():
        value = getattr(layered.args, action.dest)
        source = layered.sources.get(action.dest, "default")
        if isinstance(action, argparse._StoreFalseAction):
            value = not value
        if value is None:
            lines.append(f"# {key}: not set ({source})")
            continue
        lines.append(f"{key} = {_toml_value(value)}  # {source}")
        if action.dest == "psk_file":
            lines.extend(f"#   {p}: {_key_comment(p)}" for p in value)
    return "\n".join(lines) + "\n"


def config_parser(prog: str) -> argparse.ArgumentParser:
    from gwyh_mp.cliargs import Parser

    p = Parser(
        prog=f"{prog} config",
        description="Check a config file, or show the effective configuration.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{check,show}")
    check = sub.add_parser("check", help="validate a TOML config file (exit 0 or 2)")
    check.add_argument("file", metavar="FILE")
    sub.add_parser(
        "show",
        help="print the effective configuration as TOML (file, environment and the run "
        "flags that follow); key files as fingerprints",
        add_help=False,
    )
    return p


def config_command(
    argv: Sequence[str],
    build_run_parser: Callable[[str], argparse.ArgumentParser],
    prog: str,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``config check FILE`` and ``config show [run options]``."""
    argv = list(argv)
    if argv[:1] == ["show"]:
        run_parser = build_run_parser(f"{prog} config show")
        layered = parse_or_exit(run_parser, argv[1:], environ)
        sys.stdout.write(render(run_parser, layered))
        return 0
    args = config_parser(prog).parse_args(argv)
    try:
        values = read_file(build_run_parser(prog), args.file)
    except ConfigFileError as exc:
        sys.stderr.write(f"{prog} config check: error: {exc}\n")
        return EXIT_USAGE
    sys.stdout.write(f"{args.file}: ok ({len(values)} options)\n")
    return 0
