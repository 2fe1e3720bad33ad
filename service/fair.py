"""Fair shares of the decode pool and the batcher between requests.

Both used to serve in arrival order: one request of 48 multiscale images (1,440 views) queued ahead of a
one-image request made that one wait for all of them. Here work is ordered by start-time fair queueing
(Goyal et al. 1996): each piece of work gets a tag, the later of the clock and the end of its owner's
previous piece, and the owner's end moves on by the piece's cost (its views). Work is served in tag order,
so requests take turns, each piece of a large request after one piece of every other request waiting; a
request alone is served at full speed. Serving a piece advances the clock to its tag.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Hashable
from typing import Any


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


class FairPool:
    """A fixed set of threads that run submitted calls in fair-queueing order between owners (requests).

    Like `ThreadPoolExecutor`, `submit` after `shutdown` raises RuntimeError, and `shutdown(wait=True)` lets
    what was submitted run first."""

    def __init__(self, threads: int, name: str) -> None:
        self._cond = threading.Condition()
        self._clock = FairClock()
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._closed = False
        count = max(1, threads)
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
            heapq.heappush(self._heap, (tag, seq, fn, args))
            self._cond.notify()

    def shutdown(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                tag, _, fn, args = heapq.heappop(self._heap)
                self._clock.served(tag)
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - the callers settle their own futures; the thread lives on
                pass
            del fn, args  # the call's image bytes are not kept alive until the next one
