"""The event loop's lag: how late a timer fires, measured all the time by a small task on the loop.

HTTP and gRPC share one event loop per worker. Anything that runs on it without yielding (a large JSON parse,
a tensor copied out of a message) delays every connection by as long; the lag is how such a stall shows from
outside. The monitor sleeps `interval_s` again and again and reports each sleep's overshoot to an observer
(`service.metrics.Metrics.event_loop_lag`), which keeps a histogram and the largest lag of the last minutes.

A late sample (`LATE_S` or more) also gets a cause, so that an operator can tell a service that blocks its
own loop from one that is starved of CPU. Linux counts, for each thread, the time it ran and the time it was
ready to run but waited for a core (`/proc/thread-self/schedstat`: other busy threads or processes on the
same cores, or a container's CPU limit throttling it). The loop's thread reads both before and after each
sleep. Over that window the lag is what the thread ran, plus what it waited for a core, plus what it was
blocked beyond its sleep; the cause is the part that explains it:

- `gc`: Python's garbage collector ran for at least half of the lag. It holds the interpreter lock, on
  whichever thread allocated when a collection fell due, so the loop waits for it either way. The
  collector's passes are timed all the time (`CollectorClock`) and reported by generation;
- `core_wait`: otherwise, the loop's thread waited for a core for at least half of the lag;
- `callbacks`: otherwise, if it ran at least as long as it was blocked beyond its sleep: the loop's own
  callbacks held it;
- `lock`: otherwise: it was blocked, which on the loop's thread means waiting for the interpreter lock that
  another of the worker's threads held. That thread runs at the work's raised nice value, so it may itself
  have stood ready without a core, lock in hand, while other work of the host ran;
- `unknown`: the kernel does not say (not Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from pathlib import Path
from typing import Any, Protocol

INTERVAL_S = 0.05
LATE_S = 0.025  # half the lag the service aims to stay under: late samples are counted with their cause
SCHEDSTAT = Path("/proc/thread-self/schedstat")


class LagObserver(Protocol):
    def event_loop_lag(self, seconds: float, late_cause: str | None = None) -> None: ...

    def event_loop_core_wait(self, seconds: float) -> None: ...

    def garbage_collected(self, generation: int, collections: int, seconds: float) -> None: ...


class CollectorClock:
    """The garbage collector's passes, counted and timed by generation since `install`, from any thread.

    Python calls the callback at the start and the end of every collection, on the thread that runs it, with
    the interpreter lock held: no other thread runs meanwhile, so one start time is enough. The end's callback
    is Python code, and a thread waiting for the lock (the loop's) may take it before that code has counted
    the pass: `spent_s` counts the pass under way too, so a window that ends inside it still sees it."""

    GENERATIONS = 3

    def __init__(self) -> None:
        self.collections = [0] * self.GENERATIONS
        self.seconds = [0.0] * self.GENERATIONS
        # (seconds of all finished passes, start of the pass under way or None): one tuple, read at once
        self._state: tuple[float, float | None] = (0.0, None)

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def spent_s(self, now: float) -> float:
        """The collector's time since `install`, up to `now` (`time.perf_counter()`) in a pass under way."""
        finished, started = self._state
        return finished + (max(0.0, now - started) if started is not None else 0.0)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        finished, started = self._state
        if phase == "start":
            self._state = (finished, now)
            return
        took = now - started if started is not None else 0.0
        self._state = (finished + took, None)
        generation = info.get("generation", 0)
        self.collections[generation] += 1
        self.seconds[generation] += took


def sched_s() -> tuple[float, float] | None:
    """The calling thread's time on a core and its time ready to run but waiting for one, since it started;
    None if unknown.

    The file is the kernel's: three numbers, the first two those times in nanoseconds. Reading it takes
    microseconds and never blocks."""
    try:
        ran, waited = SCHEDSTAT.read_text().split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9
    except (OSError, ValueError):
        return None


def late_cause(lag: float, ran: float | None, waited: float | None, collecting: float = 0.0) -> str:
    """Why a late sample was late, from how long the garbage collector ran and the loop's thread ran and
    waited for a core meanwhile (the window of one sleep): the rest of the lag it was blocked."""
    if collecting >= lag / 2:
        return "gc"
    if ran is None or waited is None:
        return "unknown"
    if waited >= lag / 2:
        return "core_wait"
    blocked = lag - ran - waited
    return "callbacks" if ran >= blocked else "lock"


class LoopLagMonitor:
    """Started on the loop it watches (`start`), stopped at shutdown (`stop`); `max_lag`: the largest seen."""

    def __init__(self, observer: LagObserver, interval_s: float = INTERVAL_S) -> None:
        self.observer = observer
        self.interval_s = interval_s
        self.max_lag = 0.0
        self.collector = CollectorClock()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.collector.install()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.collector.remove()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock = self.collector
        before = sched_s()
        collections, collected_s = list(clock.collections), list(clock.seconds)
        spent = clock.spent_s(time.perf_counter())
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - start - self.interval_s)
            after = sched_s()
            ran = waited = None
            if before is not None and after is not None:
                ran, waited = after[0] - before[0], after[1] - before[1]
                self.observer.event_loop_core_wait(waited)
            before = after
            now_spent = clock.spent_s(time.perf_counter())
            collecting, spent = now_spent - spent, now_spent
            for generation in range(clock.GENERATIONS):
                count = clock.collections[generation] - collections[generation]
                if count:
                    seconds = clock.seconds[generation] - collected_s[generation]
                    self.observer.garbage_collected(generation, count, seconds)
            collections, collected_s = list(clock.collections), list(clock.seconds)
            self.max_lag = max(self.max_lag, lag)
            cause = late_cause(lag, ran, waited, collecting) if lag >= LATE_S else None
            self.observer.event_loop_lag(lag, cause)
