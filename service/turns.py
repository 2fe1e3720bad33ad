"""Work that falls due together, done a batch a pass of the event loop.

Timers that fall due together all run in one pass of the loop, on uvloop as on asyncio's: 500 idle
connections opened at once time out at once, and a hundred requests that waited together for room in the
receive budget reach their deadline at once. Ending each is a socket call and a write or two; hundreds in one
pass kept every other connection, and the lag monitor, waiting for all of them. So they take turns:
`in_turn` queues a callback on its loop's `Turns`, which calls `BATCH` of them a pass, in the order they fell
due (`service/http/connections.py` closes connections so, `service/receiving.py` answers refusals so).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Callable

BATCH = 32  # callbacks per pass of the event loop
log = logging.getLogger("service.turns")


class Turns:
    """One loop's callbacks waiting for their turn."""

    def __init__(self) -> None:
        self.due: collections.deque[Callable[[], None]] = collections.deque()

    def add(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        if not self.due:
            loop.call_soon(self._run_some, loop)
        self.due.append(callback)

    def _run_some(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(min(BATCH, len(self.due))):
            callback = self.due.popleft()
            try:
                callback()
            except Exception:  # one's fault must not leave the others waiting
                log.exception("a callback run in its turn failed")
        if self.due:
            loop.call_soon(self._run_some, loop)


# One per event loop; it holds no reference to its loop, so a loop's entry goes with the loop.
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


def in_turn(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Have `loop` call `callback` in its turn."""
    found = _turns.get(loop)
    if found is None:
        found = _turns[loop] = Turns()
    found.add(loop, callback)


async def turn() -> None:
    """Wait for this coroutine's turn on its loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    in_turn(loop, lambda: ready.done() or ready.set_result(None))
    await ready
