"""Free loopback ports for servers that the tests and benchmarks start.

A port the kernel hands out for `bind(0)` comes from its ephemeral range, the same range it draws every
outgoing connection's local port from. Between picking such a port and the server binding it, any client
(the tests' own, a server's internal sockets) can take it, and the server fails with "Address already in
use". Ports below that range are never taken that way, so they are picked there, each once per process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_GIVEN: set[int] = set()
_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 16384  # ports tried below the ephemeral range


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _candidates() -> range:
    low, high = _ephemeral()
    if low - 1024 >= 2048:
        return range(max(1024, low - _SPAN), low)
    if 65535 - high >= 2048:
        return range(high + 1, 65536)
    return range(0)  # no room outside the range: the kernel's pick it is


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port no one holds now, outside the ephemeral range, not given before in this process."""
    candidates = _candidates()
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _GIVEN.add(port)
    return port
