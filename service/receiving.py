"""The receive budget: how many bytes of requests the worker may hold while they arrive, all transports and
connections together (`receive_memory_mb`).

Each transport bounds one request (`max_request_bytes`) and the connections (`max_connections`,
`grpc_max_connections`, `grpc_max_streams`), not their product: clients each sending most of a large body,
or most of a large gRPC message (grpc's core widens a stream's window to the size its message declares once
a handler asks for it), took the worker to gigabytes in seconds (docs/BENCHMARKS.md). So a request
reserves room here before its bytes are read and keeps it until it ends: an HTTP body its Content-Length
(`max_request_bytes` when chunked or compressed, which say nothing of the size read), a gRPC message
`max_request_bytes` until it has arrived (its size is known only then), then its size. A request that does not
fit waits until its deadline: Overloaded (503 with Retry-After, RESOURCE_EXHAUSTED). Waiters that fit go
first, in arrival order, whatever waits before them: a client that holds large bodies open would otherwise
keep every small request behind its next one. Its bytes meanwhile stay where the transport's flow control
keeps them: HTTP's read ahead (`body_read_ahead_bytes`) and the socket's buffer; a gRPC stream's initial
window.

The budget is asyncio's, for the one event loop of a worker; waiters on other loops (tests run servers on
loops of their own) are woken on theirs.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

from service.errors import Overloaded, RequestTooLarge


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g}"


class ReceiveBudget:
    """A byte-counting semaphore for coroutines, each waiter that fits served in arrival order; `used` and
    `peak` for tests and the metrics' gauge (`observe`)."""

    def __init__(self, capacity: int, observe: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("a receive budget needs at least one byte")
        self.capacity = capacity
        self._observe = observe or (lambda _used: None)
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()
        # Each waiter: (bytes, its loop, its future), in arrival order.
        self._waiting: collections.deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    async def acquire(self, nbytes: int, deadline: float) -> None:
        """Room for `nbytes`, as soon as it fits; Overloaded at `deadline` (`time.monotonic()`)."""
        if nbytes > self.capacity:
            raise RequestTooLarge(
                f"a request of {_mib(nbytes)} MiB exceeds receive_memory_mb ({_mib(self.capacity)} MiB)"
            )
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.used + nbytes <= self.capacity:
                self._grant(nbytes)
                return
            future: asyncio.Future[None] = loop.create_future()
            entry = (nbytes, loop, future)
            self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except BaseException as err:
            with self._lock:
                granted = entry not in self._waiting  # `_wake` counts a grant before the future hears of it
                if not granted:
                    self._waiting.remove(entry)
            if granted:  # granted as the wait ended: give it back
                self.release(nbytes)
            if isinstance(err, TimeoutError):
                raise Overloaded(
                    f"the server holds as many request bytes as receive_memory_mb ({_mib(self.capacity)} "
                    "MiB) allows, and none came free before the request's deadline"
                ) from None
            raise

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self.used -= nbytes
            self._observe(self.used)
            self._wake()

    def _grant(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self._observe(self.used)

    def _wake(self) -> None:
        """Grant the waiters that fit now, in arrival order (under the lock)."""
        for entry in list(self._waiting):
            nbytes, loop, future = entry
            if self.used + nbytes > self.capacity:
                continue
            self._waiting.remove(entry)
            self._grant(nbytes)
            try:
                loop.call_soon_threadsafe(_settle, future)
            except RuntimeError:  # its loop has closed: nobody waits on it any more
                self.used -= nbytes
                self._observe(self.used)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Reservation:
    """One request's share of a budget, changed as the transport learns its size and given back at its end."""

    def __init__(self, budget: ReceiveBudget | None) -> None:
        self._budget = budget
        self.nbytes = 0

    async def reserve(self, nbytes: int, deadline: float) -> None:
        """Room for `nbytes` more."""
        if self._budget is None or nbytes <= 0:
            return
        await self._budget.acquire(nbytes, deadline)
        self.nbytes += nbytes

    def keep(self, nbytes: int) -> None:
        """Give back all but `nbytes` (what has arrived, once it is known)."""
        if self._budget is not None and self.nbytes > nbytes:
            self._budget.release(self.nbytes - nbytes)
            self.nbytes = nbytes

    def close(self) -> None:
        self.keep(0)
