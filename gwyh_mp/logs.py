"""What a running node tells its operator on stderr: logging setup (text or one JSON
object a line), and the watcher that turns what the library API reports into log
lines: membership changes at INFO, and rate-limited WARNINGs for handshakes that fail
on a wrong key or an expired timestamp and for bootstrap peers that never answer.

Everything here reads the public ``Node`` API (member events, ``members()``,
``stats()``), so it sees what any application would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any

import orjson

from gwyh_mp.api import MemberEvent, Node, StreamOverflow
from gwyh_mp.protocol.events import (
    EXPIRED,
    WRONG_KEY,
    Member,
    MemberLeft,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
)
from gwyh_mp.protocol.membership import newer_incarnation

log = logging.getLogger("gwyh_mp.cli")
LEVELS = ("debug", "info", "warning", "error")
WARN_EVERY_S = 60.0
WATCH_INTERVAL_S = 1.0
SOURCES_PER_WARNING = 8  # addresses named in one warning line; the rest are summed
REJECT_TEXT = {
    WRONG_KEY: "rejected for a wrong key (the source holds none of this node's keys)",
    EXPIRED: "rejected as expired (clocks more than handshake_window_s apart, or a replay)",
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, msg, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper()))


def member_fields(member: Member) -> dict[str, Any]:
    """The fields that identify a member in logs and on the control socket."""
    return {
        "node_id": member.node_id.hex(),
        "name": member.name,
        "addr": f"{member.host}:{member.port}",
        "zone": member.zone or "",
        "state": member.state.name,
        "incarnation": member.incarnation,
        "tags": member.tag_dict,
    }


class NodeWatcher:
    """Logs membership changes and rate-limited warnings for one running node."""

    def __init__(self, node: Node, *, now: float | None = None) -> None:
        self.node = node
        self._known: dict[bytes, Member] = {m.node_id: m for m in node.members()}
        self._last_warned: dict[str, float] = {}
        self._rejects_due = 0.0  # the core keeps (bounded) what arrives meanwhile
        self._own_incarnation = node.local_member().incarnation
        start = time.monotonic() if now is None else now
        config = node.config
        # A bootstrap peer is "unreachable" once a handshake with it had every chance.
        self._bootstrap_due = start + config.handshake_timeout_s + config.handshake_retry_s
        self._events = node.member_events()

    async def run(self) -> None:
        await asyncio.gather(self._log_events(), self._poll())

    # -------------------------------------------------------------- membership

    async def _log_events(self) -> None:
        while True:
            try:
                event = await anext(self._events)
            except StreamOverflow as exc:
                log.warning("membership log fell behind: %d member events not logged", exc.lost)
                continue
            self.log_member_event(event)

    def log_member_event(self, event: MemberEvent) -> None:
        member = event.member
        before = self._known.get(member.node_id)
        self._known[member.node_id] = member
        if isinstance(event, MemberSuspect):
            change = "suspect"  # a probe failed; DOWN follows unless it refutes
        elif isinstance(event, MemberUpdated):
            change = "updated"  # its name or tags arrived (a handshake carries none)
        elif isinstance(event, MemberUp):
            if before is None:
                change = "joined"
            elif newer_incarnation(member.incarnation, before.incarnation):
                change = "refuted"  # it contradicted a DOWN with a newer incarnation
            else:
                change = "up"
        else:
            change = "left" if isinstance(event, MemberLeft) else "failed"
        fields = member_fields(member)
        log.info(
            "member %s: %s %s at %s",
            change,
            fields["name"] or "-",
            fields["node_id"],
            fields["addr"],
            extra={"fields": {"event": "member", "change": change, **fields}},
        )

    # -------------------------------------------------------------- warnings

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            with contextlib.suppress(Exception):
                self.check(time.monotonic())

    def check(self, now: float) -> None:
        if now >= self._rejects_due:
            self._warn_rejected(now)
        incarnation = self.node.local_member().incarnation
        if incarnation != self._own_incarnation:  # only a refutation changes it
            self._own_incarnation = incarnation
            log.info(
                "this node refuted a report that it is DOWN (incarnation now %d)",
                incarnation,
                extra={"fields": {"event": "refuted", "incarnation": incarnation}},
            )
        if now >= self._bootstrap_due:
            self._check_bootstrap(now)

    def _warn_rejected(self, now: float) -> None:
        """At most one WARNING per reason a minute, naming the busiest sources."""
        by_reason: dict[str, list[tuple[int, str]]] = {}
        for rejected in self.node.rejected_handshakes():
            addr = "other" if rejected.addr is None else "{}:{}".format(*rejected.addr)
            by_reason.setdefault(rejected.reason, []).append((rejected.count, addr))
        if not by_reason:
            return
        self._rejects_due = now + WARN_EVERY_S
        for reason, sources in by_reason.items():
            sources.sort(key=lambda pair: (-pair[0], pair[1]))
            total = sum(count for count, _ in sources)
            named = [f"{addr} ({count})" for count, addr in sources[:SOURCES_PER_WARNING]]
            rest = len(sources) - len(named)
            listed = ", ".join(named) + (f" and {rest} more" if rest > 0 else "")
            log.warning(
                "%d handshake(s) %s, from %s",
                total,
                REJECT_TEXT.get(reason, reason),
                listed,
                extra={
                    "fields": {
                        "event": reason,
                        "count": total,
                        "sources": {addr: count for count, addr in sources},
                    }
                },
            )

    def _check_bootstrap(self, now: float) -> None:
        up = {m.addr for m in self.node.members() if m.is_up}
        own = self.node.config.advertised
        for addr in self.node.config.bootstrap:
            if addr in up or addr == own:
                continue
            key = f"bootstrap {addr[0]}:{addr[1]}"
            last = self._last_warned.get(key)
            if last is None or now - last >= WARN_EVERY_S:
                self._last_warned[key] = now
                log.warning(
                    "bootstrap peer %s:%d unreachable: no session with it "
                    "(down, filtered, or holding none of this node's keys)",
                    *addr,
                    extra={
                        "fields": {"event": "bootstrap_unreachable", "addr": f"{addr[0]}:{addr[1]}"}
                    },
                )
