"""``gwyh-node demo``: a small cluster on loopback with a fresh key, live.

Starts N nodes in this process (each on its own UDP port), waits until they know
each other, broadcasts a few messages from random nodes and prints every delivery
as it happens, then a table of who got what. It stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

from gwyh_mp.api import Node
from gwyh_mp.cliargs import Parser, int_range, positive_float, positive_int
from gwyh_mp.config import Config
from gwyh_mp.protocol.events import Message


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gwyh-node demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int_range(2, 200), default=5, help="cluster size (default 5)")
    p.add_argument("--messages", type=positive_int, default=10, help="broadcasts (default 10)")
    p.add_argument(
        "--interval",
        type=positive_float,
        default=0.3,
        help="seconds between broadcasts (default 0.3)",
    )
    p.add_argument("--zones", type=positive_int, default=1, help="spread nodes over N zones")
    p.add_argument("--seed", type=int, default=None, help="seed for which node sends what")
    return p


async def _demo(args: argparse.Namespace) -> int:
    key = os.urandom(32)
    rng = random.Random(args.seed)
    out = sys.stdout

    def zone(i: int) -> str | None:
        return f"zone-{i % args.zones}" if args.zones > 1 else None

    first = await Node(Config.local(bind=("127.0.0.1", 0), psks=[key], zone=zone(0))).start()
    nodes = [first]
    for i in range(1, args.nodes):
        cfg = Config.local(
            bind=("127.0.0.1", 0), psks=[key], bootstrap=[first.address], zone=zone(i)
        )
        nodes.append(await Node(cfg).start())
    names = {n.node_id: f"node{i + 1}" for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):
        host, port = n.address
        out.write(f"node{i + 1}  {host}:{port}  id {n.node_id.hex()[:12]}  zone {zone(i) or '-'}\n")
    started = time.monotonic()
    await asyncio.gather(*(n.wait_for_members(args.nodes - 1, timeout=30) for n in nodes))
    # Give subscriptions a moment to settle after the last member appeared.
    await asyncio.sleep(0.5)
    out.write(
        f"\ncluster formed in {time.monotonic() - started:.2f}s; every node sees "
        f"{args.nodes - 1} peers UP (one shared key, per-pair X25519 sessions)\n\n"
    )

    received: dict[bytes, dict[bytes, Message]] = {n.node_id: {} for n in nodes}

    async def listen(node: Node) -> None:
        async for msg in node.messages():
            received[node.node_id][msg.id] = msg
            text = msg.data.decode(errors="replace")
            out.write(
                f"  {names[node.node_id]:>7} <- {text!r} from {names.get(msg.origin, '?')}"
                f" ({msg.hops} hop{'s' if msg.hops != 1 else ''})\n"
            )
            out.flush()

    listeners = [asyncio.create_task(listen(n)) for n in nodes]
    sent: list[tuple[bytes, bytes]] = []
    for k in range(args.messages):
        sender = rng.choice(nodes)
        text = f"message {k + 1} from {names[sender.node_id]}"
        msg_id = await sender.broadcast(text.encode())
        sent.append((sender.node_id, msg_id))
        out.write(f"{names[sender.node_id]} broadcasts {text!r}\n")
        out.flush()
        await asyncio.sleep(args.interval)

    def complete() -> bool:
        return all(
            mid in received[n.node_id] for origin, mid in sent for n in nodes if n.node_id != origin
        )

    deadline = time.monotonic() + 5
    while not complete() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for task in listeners:
        task.cancel()
    out.write("\nnode      received  expected\n")
    ok = True
    for n in nodes:
        expected = sum(1 for origin, _ in sent if origin != n.node_id)
        got = sum(1 for origin, mid in sent if origin != n.node_id and mid in received[n.node_id])
        ok &= got == expected
        out.write(f"{names[n.node_id]:<9} {got:>8}  {expected:>8}\n")
    out.write(
        "\n"
        + (
            "every node received every broadcast exactly once\n"
            if ok
            else "some broadcasts were not delivered\n"
        )
    )
    await asyncio.gather(*(n.stop() for n in nodes))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(_demo(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(_demo(args))
