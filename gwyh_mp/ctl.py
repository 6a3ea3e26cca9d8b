"""Client subcommands of ``gwyh-node`` that talk to a running node through its
control socket (``gwyh_mp.control``): members, publish, tail, stats, leave, keys.

Each prints one clear line on stderr and exits non-zero when the node cannot be
reached or refuses the request; ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Callable
from typing import Any

import orjson

from gwyh_mp import keys
from gwyh_mp.cliargs import Parser
from gwyh_mp.control import Client, ControlError, default_path

PROG = "gwyh-node"
DEFAULT_PORT = 6969


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} {name}", description=description)
    p.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help=f"the node's control socket (default: $GWYH_CONTROL, else "
        f"{default_path(DEFAULT_PORT)}, "
        f"where a node on port {DEFAULT_PORT} puts it)",
    )
    return p


def _path(args: argparse.Namespace) -> str:
    # $GWYH_CONTROL: the same variable that sets a node's --control (configfile.py).
    return args.control or os.environ.get("GWYH_CONTROL") or default_path(DEFAULT_PORT)


def _print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# ---------------------------------------------------------------- members


def members_parser() -> argparse.ArgumentParser:
    p = _parser("members", "List the members a running node knows, itself first.")
    p.add_argument("--json", action="store_true", help="a JSON list of member objects")
    return p


def members(args: argparse.Namespace) -> int:
    with Client(_path(args)) as client:
        result = client.call("members")
    if args.json:
        _print_json(result)
        return 0
    rows = [["NAME", "NODE_ID", "ADDR", "ZONE", "STATE", "INC", "TAGS"]]
    for m in result:
        tags = ",".join(f"{k}={v}" for k, v in sorted(m.get("tags", {}).items()))
        rows.append(
            [
                m.get("name") or "-",
                m["node_id"] + (" (self)" if m.get("self") else ""),
                m["addr"],
                m.get("zone") or "-",
                m["state"],
                str(m["incarnation"]),
                tags or "-",
            ]
        )
    print(_table(rows))
    return 0


# ---------------------------------------------------------------- publish


def publish_parser() -> argparse.ArgumentParser:
    p = _parser("publish", "Broadcast one message from a running node; prints its id.")
    p.add_argument("data", nargs="?", help="the message text; - reads it from stdin")
    p.add_argument("--file", metavar="F", help="send the contents of file F")
    return p


def publish(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.file is None):
        raise UsageError("give exactly one of DATA, - or --file F")
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ControlError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    elif args.data == "-":
        data = sys.stdin.buffer.read()
    else:
        data = args.data.encode()
    with Client(_path(args)) as client:
        result = client.call("publish", data_b64=base64.b64encode(data).decode())
    print(result["id"])
    return 0


# ---------------------------------------------------------------- tail


def tail_parser() -> argparse.ArgumentParser:
    p = _parser(
        "tail",
        "Print the messages a running node delivers, from now on, until interrupted.",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object a line (the --stdio schema)"
    )
    return p


def tail(args: argparse.Namespace) -> int:
    with Client(_path(args)) as client:
        client.call("tail")
        out = sys.stdout
        while (record := client.read()) is not None:
            if record.get("event") == "lost":
                sys.stderr.write(f"{PROG} tail: too slow, {record['count']} message(s) lost\n")
                continue
            if args.json:
                out.write(orjson.dumps(record).decode() + "\n")
            else:
                out.write(f"{record['origin'][:12]} {record['hops']} {record['data']}\n")
            out.flush()
    raise ControlError("the node closed the connection (it stopped)")


# ---------------------------------------------------------------- stats


def stats_parser() -> argparse.ArgumentParser:
    p = _parser("stats", "Print a running node's counters.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    return p


def stats(args: argparse.Namespace) -> int:
    with Client(_path(args)) as client:
        result = client.call("stats")
    if args.json:
        _print_json(result)
        return 0
    print(f"node {result['node_id']} on {result['addr']}")
    for key, value in sorted(result["stats"].items()):
        print(f"  {key:<32} {value}")
    for proc in result.get("processes", []):
        fields = " ".join(f"{k}={v}" for k, v in sorted(proc.items()) if k != "role")
        print(f"  [{proc.get('role')}] {fields}")
    return 0


# ---------------------------------------------------------------- leave


def leave_parser() -> argparse.ArgumentParser:
    return _parser("leave", "Make a running node leave the cluster gracefully and exit 0.")


def leave(args: argparse.Namespace) -> int:
    with Client(_path(args)) as client:
        result = client.call("leave")
        while client.read() is not None:  # the node closes the socket once it is gone
            pass
    print(f"node {result['node_id']} left the cluster")
    return 0


# ---------------------------------------------------------------- keys


def keys_parser() -> argparse.ArgumentParser:
    p = _parser(
        "keys",
        "Rotate a running node's pre-shared keys without a restart. Keys are shown only "
        "as fingerprints. Procedure: install the new key on every node, then use it on "
        "every node, then remove the old one on every node.",
    )
    # --control and --json are accepted after the action too (keys list --json).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", metavar="PATH", default=argparse.SUPPRESS, help="as above")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="the keys the node holds (* = in use)")
    install = sub.add_parser(
        "install", parents=[common], help="add the key in FILE (accepted at once)"
    )
    install.add_argument("file", metavar="FILE")
    use = sub.add_parser(
        "use", parents=[common], help="make the key with this fingerprint the one in use"
    )
    use.add_argument("fingerprint", metavar="FINGERPRINT")
    remove = sub.add_parser(
        "remove", parents=[common], help="stop accepting the key with this fingerprint"
    )
    remove.add_argument("fingerprint", metavar="FINGERPRINT")
    p.add_argument("--json", action="store_true", help="print the key list as JSON")
    return p


def keys_command(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"action": args.action}
    if args.action == "install":
        try:
            key = keys.read_key_file(args.file)
        except keys.KeyFileError as exc:
            raise ControlError(str(exc)) from None
        fields["key_b64"] = base64.b64encode(key).decode()
    elif args.action in ("use", "remove"):
        fields["fingerprint"] = args.fingerprint
    with Client(_path(args)) as client:
        result = client.call("keys", **fields)
    if args.json:
        _print_json(result)
    else:
        for entry in result:
            print(("* " if entry["primary"] else "  ") + entry["fingerprint"])
    return 0


COMMANDS: dict[
    str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int], str]
] = {
    "members": (members_parser, members, "list the members a running node knows"),
    "publish": (publish_parser, publish, "broadcast a message from a running node"),
    "tail": (tail_parser, tail, "print the messages a running node delivers"),
    "stats": (stats_parser, stats, "print a running node's counters"),
    "leave": (leave_parser, leave, "make a running node leave gracefully"),
    "keys": (keys_parser, keys_command, "list, install, use or remove keys live"),
}
