"""The gwyh_mp protocol as sans-IO state machines.

Everything in this package takes bytes and time (``now``, seconds on a monotonic
clock) and returns bytes, events and timer deadlines. Nothing here opens a socket,
reads a clock, starts a process or imports asyncio: the runtime (``gwyh_mp.runtime``)
is a thin adapter around it, and tests and ``bench sim`` drive thousands of nodes
on a fake clock with the very same code.
"""
