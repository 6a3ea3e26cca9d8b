"""Argument types and the parser class shared by every ``gwyh-node`` subcommand.

Both ``gwyh_mp.cli`` and ``gwyh_mp.demo`` build their parsers from these, so neither
imports the other. Every type rejects what would only fail later (inf, NaN, out of
range) with a message that names the value; argparse adds the flag.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from gwyh_mp.config import ConfigError, parse_addr
from gwyh_mp.protocol.selection import Strategy

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def float_at_least(minimum: float) -> Callable[[str], float]:
    """A finite float >= minimum: intervals shorter than that only spin the CPU."""

    def parse(text: str) -> float:
        value = _finite(text)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum:g}")
        return value

    parse.__name__ = "number"
    return parse


def seconds_0_to_1(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1 (seconds)")
    return value


def int_range(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An integer type bounded to [minimum, maximum]; the error states the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_range(1)


def addr(text: str) -> tuple[str, int]:
    try:
        return parse_addr(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def peer_addr(text: str) -> tuple[str, int]:
    """A peer's address: like ``addr``, but port 0 (bind to any) names no peer."""
    host, port = addr(text)
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: port 0 is not a peer's port")
    return host, port


def strategy(text: str) -> Strategy:
    try:
        return Strategy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tag_pair(text: str) -> tuple[str, str]:
    """``--tag KEY=VALUE``; the limits on keys and sizes are Config.validate's."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value
