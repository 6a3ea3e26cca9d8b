"""gwyh_mp: a fast, encrypted UDP gossip node (public names only)."""

from gwyh_mp.api import MessageTooLarge, Node, NotRunning, SendQueueFull
from gwyh_mp.config import Config, ConfigError
from gwyh_mp.protocol.events import (
    Member,
    MemberDown,
    MemberLeft,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    Message,
)
from gwyh_mp.protocol.selection import Strategy
from gwyh_mp.protocol.wire import MemberState

__all__ = [
    "Config",
    "ConfigError",
    "Member",
    "MemberDown",
    "MemberLeft",
    "MemberState",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdated",
    "Message",
    "MessageTooLarge",
    "Node",
    "NotRunning",
    "SendQueueFull",
    "Strategy",
]
__version__ = "0.1.0"
