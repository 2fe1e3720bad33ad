"""Full garbage collections on the event loop's thread, when Python's own rule says one is due.

Python runs a full collection (generation 2) on whichever thread allocates when one falls due, and holds the
interpreter lock for as long as it walks every live object, tens of milliseconds with a thousand connections
open. On a work thread (at `worker_niceness`, or ordinary beside a real-time loop) that thread can lose its
core partway, and the loop waits for the lock until it gets one back (`looplag`, cause `gc`).

`LoopCollector` takes full collections off Python's schedule (generation 2's threshold out of reach) and
runs them on the loop, between its callbacks and at its priority, when Python's own rule says one is due:
ten young collections since the last, and more objects moved to generation 2 since then than a quarter of
what it held after it (CPython's `long_lived_pending > long_lived_total / 4`). The collector's callbacks
count what each generation-1 collection moves: the young generations' objects at its start, less what it
freed. So full collections run as often as before, on the loop's thread (an explicit `gc.collect()`, such
as the idle trim's, runs where it is called). Young collections stay Python's: they walk only new objects.

CPython 3.14 collects the old generation a piece at a time with each young collection, which no threshold
turns off: there the collector leaves Python's schedule as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from typing import Any

CHECK_S = 0.5  # how long a due full collection may wait for the loop's next look
OUT_OF_REACH = 1 << 30  # generation 2's threshold while the loop runs full collections
SUPPORTED = sys.implementation.name == "cpython" and sys.version_info < (3, 14)


class LoopCollector:
    """Started on the loop whose thread runs full collections (`start`), stopped at shutdown (`stop`)."""

    def __init__(self, check_s: float = CHECK_S) -> None:
        self.check_s = check_s
        self.collections = 0  # full collections this collector ran
        self._threshold: tuple[int, int, int] | None = None
        self._pending = 0  # objects moved to generation 2 since the last full collection
        self._total = 0  # objects in generation 2 after it
        self._young = 0  # objects in generations 0 and 1 when the generation-1 collection under way began
        self._recount = False  # a full collection ran since `_total` was counted
        self._task: asyncio.Task | None = None

    def start(self) -> bool:
        """Take over full collections; False (Python keeps them) where its collector works otherwise."""
        if not SUPPORTED or self._threshold is not None:
            return False
        self._threshold = gc.get_threshold()
        self._total, self._pending = len(gc.get_objects(generation=2)), 0
        gc.callbacks.append(self._count)
        gc.set_threshold(self._threshold[0], self._threshold[1], OUT_OF_REACH)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="full-collections")
        return True

    async def stop(self) -> None:
        """Full collections back on Python's schedule."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._threshold is not None:
            gc.set_threshold(*self._threshold)
            self._threshold = None
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._count)

    def due(self) -> bool:
        """Whether Python's own rule would run a full collection now."""
        if self._threshold is None or not gc.isenabled():
            return False
        return gc.get_count()[2] > self._threshold[2] and self._pending > self._total / 4

    def collect(self) -> None:
        gc.collect(2)
        self.collections += 1

    def _count(self, phase: str, info: dict[str, Any]) -> None:
        """On whichever thread collects, with the interpreter lock held: counting the young generations'
        lists takes microseconds."""
        generation = info.get("generation")
        if generation == 1:
            if phase == "start":
                self._young = len(gc.get_objects(generation=0)) + len(gc.get_objects(generation=1))
            else:
                self._pending += max(0, self._young - info.get("collected", 0))
        elif generation == 2 and phase == "stop":  # ours, or anyone's `gc.collect()`
            self._pending, self._recount = 0, True

    def recount(self) -> None:
        """What generation 2 holds after a full collection, counted at the loop's next look: walking its
        list takes a fraction of that pass, which the loop then need not wait for on top of it."""
        self._total, self._recount = len(gc.get_objects(generation=2)), False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            if self._recount:
                self.recount()
            elif self.due():
                self.collect()
