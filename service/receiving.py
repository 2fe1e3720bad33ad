"""The receive budget: how many bytes of requests the worker may hold while they arrive, all transports and
connections together (`receive_memory_mb`).

Each transport bounds one request (`max_request_bytes`) and the connections (`max_connections`,
`grpc_max_connections`, `grpc_max_streams`), not their product: clients each sending most of a large body, or
most of a large gRPC message (grpc's core widens a stream's window to the size its message declares once a
handler asks for it), took the worker to gigabytes in seconds (docs/BENCHMARKS.md). So a request reserves room
here before its bytes are read and keeps it until it ends: an HTTP body its Content-Length
(`max_request_bytes` when chunked or compressed, which say nothing of the size read), a gRPC message
`max_request_bytes` until it has arrived (its size is known only then), then its size. A request that does not
fit waits until its deadline: Overloaded (503 with Retry-After, RESOURCE_EXHAUSTED). Waiters that fit go
first, in arrival order, whatever waits before them: a client that holds large bodies open would otherwise
keep every small request behind its next one. One client may hold no more than its share
(`client_share`, a quarter by default) so that it cannot take all the room from the others: a client
is its address, an IPv6 /64 network (what one host is given), as the transports see it; behind a proxy that
all clients come through, the proxy is one client and the share should be 1. Its bytes meanwhile stay where
the transport's flow control keeps them: HTTP's read ahead (`body_read_ahead_bytes`) and the socket's buffer;
a gRPC stream's initial window.

The budget is asyncio's, for the one event loop of a worker; waiters on other loops (tests run servers on
loops of their own) are woken on theirs.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import Overloaded, RequestTooLarge
from service.turns import turn


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g}"


def client_of(address: str) -> str:
    """The client an address belongs to: an IPv4 address, an IPv6 /64 network, else the address as given.
    Takes HTTP's client host and gRPC's peer (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`)."""
    host = address
    for scheme in ("ipv4:", "ipv6:"):
        if host.startswith(scheme):
            host = host[len(scheme) :].rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    client: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class ReceiveBudget:
    """A byte-counting semaphore for coroutines, with a cap for each client: each waiter that fits is served,
    in arrival order. `used` and `peak` for tests and the metrics' gauge (`observe`)."""

    def __init__(
        self, capacity: int, client_capacity: int | None = None, observe: Callable[[int], None] | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError("a receive budget needs at least one byte")
        self.capacity = capacity
        self.client_capacity = min(capacity, client_capacity or capacity)
        self._observe = observe or (lambda _used: None)
        self.used = 0
        self.peak = 0
        self.by_client: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._waiting: list[_Waiter] = []  # in arrival order

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    async def acquire(self, nbytes: int, deadline: float, client: str = "") -> None:
        """Room for `nbytes` for `client`, as soon as it fits; Overloaded at `deadline`
        (`time.monotonic()`)."""
        if nbytes > self.client_capacity:
            raise RequestTooLarge(
                f"a request of {_mib(nbytes)} MiB exceeds a client's share of receive_memory_mb "
                f"({_mib(self.client_capacity)} MiB)"
            )
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._fits(nbytes, client):
                self._grant(nbytes, client)
                return
            waiter = _Waiter(nbytes, client, loop, loop.create_future())
            self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, deadline - time.monotonic()))
        except BaseException as err:
            with self._lock:
                granted = waiter not in self._waiting  # `_wake` counts a grant before the future hears of it
                if not granted:
                    self._waiting.remove(waiter)
                    own = self.by_client[client] + nbytes > self.client_capacity  # whose room it lacked
            if granted:  # granted as the wait ended: kept if the deadline ended it, else given back
                if isinstance(err, TimeoutError):
                    return
                self.release(nbytes, client)
                raise
            if isinstance(err, TimeoutError):
                # Requests that waited together time out together: their refusals take turns.
                await turn()
                raise Overloaded(
                    f"this client holds as many request bytes as its share of receive_memory_mb "
                    f"({_mib(self.client_capacity)} MiB, client_share) allows"
                    if own
                    else f"the server holds as many request bytes as receive_memory_mb "
                    f"({_mib(self.capacity)} MiB) allows",
                ) from None
            raise

    def release(self, nbytes: int, client: str = "") -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self._take_back(nbytes, client)
            self._wake()

    def _fits(self, nbytes: int, client: str) -> bool:
        return self.used + nbytes <= self.capacity and self.by_client[client] + nbytes <= self.client_capacity

    def _grant(self, nbytes: int, client: str) -> None:
        self.used += nbytes
        self.by_client[client] += nbytes
        self.peak = max(self.peak, self.used)
        self._observe(self.used)

    def _take_back(self, nbytes: int, client: str) -> None:
        self.used -= nbytes
        self.by_client[client] -= nbytes
        if self.by_client[client] <= 0:
            del self.by_client[client]
        self._observe(self.used)

    def _wake(self) -> None:
        """Grant the waiters that fit now, in arrival order (under the lock)."""
        for waiter in list(self._waiting):
            if self.used >= self.capacity:
                break
            if not self._fits(waiter.nbytes, waiter.client):
                continue
            self._waiting.remove(waiter)
            self._grant(waiter.nbytes, waiter.client)
            try:
                waiter.loop.call_soon_threadsafe(_settle, waiter.future)
            except RuntimeError:  # its loop has closed: nobody waits on it any more
                self._take_back(waiter.nbytes, waiter.client)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Reservation:
    """One request's share of a budget, changed as the transport learns its size and given back at its end."""

    def __init__(self, budget: ReceiveBudget | None, client: str = "") -> None:
        self._budget = budget
        self.client = client
        self.nbytes = 0

    async def reserve(self, nbytes: int, deadline: float) -> None:
        """Room for `nbytes` more."""
        if self._budget is None or nbytes <= 0:
            return
        await self._budget.acquire(nbytes, deadline, self.client)
        self.nbytes += nbytes

    def keep(self, nbytes: int) -> None:
        """Give back all but `nbytes` (what has arrived, once it is known)."""
        if self._budget is not None and self.nbytes > nbytes:
            self._budget.release(self.nbytes - nbytes, self.client)
            self.nbytes = nbytes

    def close(self) -> None:
        self.keep(0)
