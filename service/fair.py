"""Fair shares of the decode pool and the batcher between requests.

Both used to serve in arrival order: one request of 48 multiscale images (1,440 views) queued ahead of a
one-image request made that one wait for all of them. Here work is ordered by start-time fair queueing
(Goyal et al. 1996): each piece of work gets a tag, the later of the clock and the end of its owner's
previous piece, and the owner's end moves on by the piece's cost (its views). Work is served in tag order,
so requests take turns, each piece of a large request after one piece of every other request waiting; a
request alone is served at full speed. Serving a piece advances the clock to its tag.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Hashable
from typing import Any

from service.priority import lift_steps, lower_this_thread


class FairClock:
    """Tags for start-time fair queueing. Not thread-safe: its owner's lock guards it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._ends: dict[Hashable, float] = {}  # each owner's end tag, while it is ahead of the clock
        self._seq = itertools.count()

    def tag(self, owner: Hashable | None, cost: float) -> tuple[float, int]:
        """(tag, sequence) of a new piece of work; owner None is an owner of its own."""
        start = max(self.now, self._ends.get(owner, 0.0)) if owner is not None else self.now
        if owner is not None:
            self._ends[owner] = start + max(cost, 1e-9)
        return start, next(self._seq)

    def served(self, tag: float) -> None:
        """A piece with this tag is being served: the clock moves to it; owners behind it are forgotten."""
        if tag > self.now:
            self.now = tag
            if len(self._ends) > 64:
                self._ends = {k: v for k, v in self._ends.items() if v > self.now}


READY_POLL_S = 0.01  # how often a pool whose waiting owners are all held back looks again


class FairPool:
    """A fixed set of threads that run submitted calls in fair-queueing order between owners (requests).

    `ready(owner)` holds an owner's calls back while it is False: the core holds back a request whose views
    already wait in the batcher, so that decoding does not run far ahead of inference (taking the cores that
    inference and other requests need). With two threads or more, one owner runs on all but one of them at
    once: a request that comes finds a thread free instead of waiting for a large image's decode. Like
    `ThreadPoolExecutor`, `submit` after `shutdown` raises RuntimeError, and `shutdown(wait=True)` lets what
    was submitted run first."""

    def __init__(
        self,
        threads: int,
        name: str,
        ready: Callable[[Hashable], bool] | None = None,
        niceness: int = 0,
        steps: bool = False,
    ) -> None:
        self.niceness = niceness  # of its threads (`service.priority`)
        self.steps = steps  # its calls only take short steps: beside a real-time loop, lifted (`lift_steps`)
        self._cond = threading.Condition()
        self._clock = FairClock()
        self._ready = ready
        self._running: dict[Hashable, int] = {}  # calls running now, per owner
        self._tasks: list[tuple[float, int, Hashable, Callable[..., Any], tuple[Any, ...]]] = []  # sorted
        self._closed = False
        count = max(1, threads)
        self._per_owner = max(1, count - 1)
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}_{i}", daemon=True) for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def submit(self, owner: Hashable | None, cost: float, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            tag, seq = self._clock.tag(owner, cost)
            bisect.insort(self._tasks, (tag, seq, owner, fn, args), key=lambda t: (t[0], t[1]))
            self._cond.notify()

    def wake(self) -> None:
        """An owner held back may be ready now."""
        with self._cond:
            self._cond.notify_all()

    def shutdown(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def _next(self) -> int | None:
        """Index of the first task in turn whose owner is ready (the lock held)."""
        for i, (_, _, owner, _, _) in enumerate(self._tasks):
            if self._closed or owner is None:
                return i
            if self._running.get(owner, 0) >= self._per_owner:
                continue
            if self._ready is None or self._ready(owner):
                return i
        return None

    def _loop(self) -> None:
        if not (self.steps and lift_steps()):
            lower_this_thread(self.niceness)
        while True:
            with self._cond:
                while True:
                    if not self._tasks:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    i = self._next()
                    if i is not None:
                        break
                    self._cond.wait(READY_POLL_S)
                tag, _, owner, fn, args = self._tasks.pop(i)
                self._clock.served(tag)
                if owner is not None:
                    self._running[owner] = self._running.get(owner, 0) + 1
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - the callers settle their own futures; the thread lives on
                pass
            finally:
                del fn, args  # the call's image bytes are not kept alive until the next one
                if owner is not None:
                    with self._cond:
                        left = self._running.pop(owner) - 1
                        if left:
                            self._running[owner] = left
                        self._cond.notify_all()
