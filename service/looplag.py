"""The event loop's lag: how late a timer fires, measured all the time by a small task on the loop.

HTTP and gRPC share one event loop per worker. Anything that runs on it without yielding (a large JSON parse,
a tensor copied out of a message) delays every connection by as long; the lag is how such a stall shows from
outside. The monitor sleeps `interval_s` again and again and reports each sleep's overshoot to an observer
(`service.metrics.Metrics.event_loop_lag`), which keeps a histogram and the largest lag of the last minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

INTERVAL_S = 0.05


class LagObserver(Protocol):
    def event_loop_lag(self, seconds: float) -> None: ...


class LoopLagMonitor:
    """Started on the loop it watches (`start`), stopped at shutdown (`stop`); `max_lag`: the largest seen."""

    def __init__(self, observer: LagObserver, interval_s: float = INTERVAL_S) -> None:
        self.observer = observer
        self.interval_s = interval_s
        self.max_lag = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            self.max_lag = max(self.max_lag, lag)
            self.observer.event_loop_lag(lag)
