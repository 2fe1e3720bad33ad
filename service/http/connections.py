"""HTTP connections the service reaps: idle ones, slow request heads, and those past `max_connections`.

uvicorn, as BentoML runs it, arms its keep-alive timer only after a response: a connection that never sends
a byte, or sends a request head one byte a second (slowloris), is held open forever, and nothing caps how
many are. These rules apply before any request exists, so they live in the connection's protocol, a small
subclass of uvicorn's h11 one that `install` registers in place of uvicorn's default (BentoML builds
uvicorn's `Config` with `http="auto"` and `loop="auto"` after loading this service; `install` points the
latter at the loop `event_loop` names, uvloop by default, asyncio's selector loop otherwise):

- more than `max_connections` open: the new one is answered 503 (`Retry-After`) and closed at once;
- no byte of a request within `idle_timeout_s` (a new connection, or one between requests): closed;
- a request head not complete `header_timeout_s` after its first byte: 408 and closed; the same clock
  bounds bytes a client keeps sending after its request was answered.

asyncio's selector loop accepts up to the listen backlog (BentoML's: 2048) connections in one pass and
makes each one's protocol in the next: a flood of a thousand connections held the loop for 100 ms. `install`
caps that at `ACCEPT_BATCH` a pass (`accept_in_passes`), so the loop's other work runs between the batches;
the kernel's queue, the backlog, is unchanged, so a burst of connections is not dropped. uvloop accepts in
libuv's C code, which this cannot reach (docs/BENCHMARKS.md measures a flood on each loop). Timeouts fall
due together as well (500 idle connections opened at once time out at once, and both loops run every timer
due in one pass): the connections they end are closed `CLOSE_BATCH` a pass (`service/turns.py`).

A request body is the application's to read (`requests.read_body`: `body_timeout_s`, 408); the connection
reads up to `body_read_ahead_bytes` of it ahead (uvicorn's own 64 KiB paused a few images' body several
times, each resume a pass of the loop behind every other connection's work). The kernel's buffer behind it
is asked to hold `socket_receive_buffer_bytes` (`size_receive_buffer`): with Linux's first 128 KiB, the
client's kernel held the rest of a 150 KB body until the loop had read the first part, one more pass again.
Each refusal and timeout is counted (`Metrics.connection_refused`, `connection_timed_out`); a 408 is written
in the access log, refusals in one warning per `REFUSED_LOG_S` at most (a flood of connections must not
flood the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from asyncio import selector_events
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import logs, turns
from service.config import Settings

PROTOCOL = "service.http.connections:GuardedH11Protocol"
# What `event_loop` names, as uvicorn's own names load them (kept before `install` points "auto" elsewhere).
LOOP_FACTORIES = {
    "auto": "uvicorn.loops.auto:auto_loop_factory",
    "uvloop": "uvicorn.loops.uvloop:uvloop_loop_factory",
    "asyncio": "uvicorn.loops.asyncio:asyncio_loop_factory",
}
ACCEPT_BATCH = 32  # connections accepted per pass of the event loop
CLOSE_BATCH = turns.BATCH  # connections closed by their timeouts per pass of the event loop
REFUSED_LOG_S = 10.0
log = logging.getLogger("cnn_serve.http")


@dataclass
class Guard:
    """The limits and where refusals are counted; set once per worker by `install`."""

    max_connections: int = 1000
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    receive_buffer: int = 0  # SO_RCVBUF asked for each connection; 0: the kernel's
    metrics: Callable[[], Any] = lambda: None  # the worker's `Metrics` once it has started
    refused: int = 0  # connections refused since the last warning
    refused_logged: float = 0.0  # when the last warning was written (loop time)

    def refusal(self, now: float, open_connections: int) -> None:
        """Count one refused connection; warn at most once per `REFUSED_LOG_S`."""
        self.refused += 1
        if now - self.refused_logged >= REFUSED_LOG_S:
            log.warning(
                "refused %d HTTP connections: %d open, the limit (max_connections)",
                self.refused,
                open_connections,
            )
            self.refused, self.refused_logged = 0, now


GUARD = Guard()


def install(settings: Settings, metrics: Callable[[], Any]) -> None:
    """Make uvicorn serve this process's HTTP connections with `GuardedH11Protocol`, these settings and the
    event loop they name (`event_loop`; uvicorn's "auto", which BentoML asks for, means the same)."""
    from uvicorn import config

    GUARD.max_connections = settings.max_connections
    GUARD.idle_timeout_s = settings.idle_timeout_s
    GUARD.header_timeout_s = settings.header_timeout_s
    GUARD.receive_buffer = settings.socket_receive_buffer_bytes
    GUARD.metrics = metrics
    for name in ("auto", "h11"):
        config.HTTP_PROTOCOLS[name] = PROTOCOL
    config.LOOP_FACTORIES["auto"] = LOOP_FACTORIES[settings.event_loop]
    h11_impl.HIGH_WATER_LIMIT = settings.body_read_ahead_bytes  # where uvicorn pauses a body's reading
    accept_in_passes()
    size_listeners()


def accept_in_passes(batch: int = ACCEPT_BATCH) -> None:
    """Make asyncio's selector loops accept at most `batch` connections per pass (see the module's doc).
    uvloop accepts in libuv's C code, which this does not reach; a flood costs it less than the batches."""
    loop_class = selector_events.BaseSelectorEventLoop
    accept = getattr(loop_class._accept_connection, "unbatched", loop_class._accept_connection)

    def _accept_connection(
        self: Any,
        protocol_factory: Any,
        sock: Any,
        sslcontext: Any = None,
        server: Any = None,
        backlog: int = 100,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        return accept(self, protocol_factory, sock, sslcontext, server, min(backlog, batch), *args, **kwargs)

    _accept_connection.unbatched = accept  # type: ignore[attr-defined]
    loop_class._accept_connection = _accept_connection  # type: ignore[method-assign]


def size_listeners() -> None:
    """Size the receive buffer of the sockets uvicorn listens on once it has started, with either event loop:
    Linux gives a connection its listener's buffer when the connection is made, before it is accepted."""
    from uvicorn import server

    startup = getattr(server.Server.startup, "unsized", server.Server.startup)

    async def sized_startup(self: Any, sockets: list[socket.socket] | None = None) -> None:
        await startup(self, sockets)
        for listener in getattr(self, "servers", ()):
            for sock in listener.sockets:
                size_receive_buffer(sock, GUARD.receive_buffer)

    sized_startup.unsized = startup  # type: ignore[attr-defined]
    server.Server.startup = sized_startup  # type: ignore[method-assign]


def size_receive_buffer(sock: socket.socket | Any, size: int) -> None:
    """Ask the kernel to buffer at least `size` received bytes of `sock` (a listener: of the connections it
    accepts next). An explicit size turns off Linux's growing of the buffer with the transfer, so 0 leaves
    the kernel's own; the kernel doubles what it is asked (its bookkeeping) and caps it at `rmem_max`."""
    if size <= 0 or sock is None:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:  # not a socket the kernel sizes (a Unix one elsewhere): its own buffer stands
        pass


def _answer(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer in the service's error body, written to a connection that is then closed."""
    request_id = logs.request_id(None)
    body = json.dumps({"code": code, "message": message, "request_id": request_id, "error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


def release_transport(transport: asyncio.BaseTransport | None) -> None:
    """Let a closed connection's transport be freed when its last reference goes. asyncio's socket transport
    keeps a bound method of itself (`_read_ready_cb`), a reference cycle: every closed connection waited for
    a full garbage collection, which under a flood of connections freed some 1,800 transports and their
    sockets at once and held the event loop for 20 to 90 ms. Cut once the transport has stopped reading."""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[union-attr]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection limit and the idle and header timeouts of `GUARD`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = GUARD.idle_timeout_s  # uvicorn's keep-alive timer is the idle timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._received = 0  # pieces of data received: whether the client spoke after a timer fell due
        self._head_clock = 0  # header clocks stopped: whether the one that fell due was stopped since

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= GUARD.max_connections:
            self._refused = True
            self.transport = transport
            message = f"{len(self.connections)} connections are open, the limit (max_connections); retry"
            transport.write(_answer(503, "Service Unavailable", "overloaded", message, "retry-after: 1\r\n"))
            transport.close()
            GUARD.refusal(self.loop.time(), len(self.connections))
            metrics = GUARD.metrics()
            if metrics is not None:
                metrics.connection_refused()
                metrics.request("-", "-", "http", "503", 0.0)
            return
        super().connection_made(transport)
        # Connections made before uvicorn had started and sized its listeners have the kernel's buffer.
        size_receive_buffer(transport.get_extra_info("socket"), GUARD.receive_buffer)
        # uvicorn arms this only after a response; a connection that never sends a byte is idle too.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        release_transport(self.transport)
        if self._refused:
            return  # never counted among the connections, nor given a request
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += 1
        super().data_received(data)  # cancels the idle timer; handles whatever the bytes complete
        if self.transport.is_closing():
            self._cancel_head_timer()
        elif self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_timer()  # a request is being answered: its body is the application's to time
        elif self._head_timer is None:  # part of a head, or bytes after an answered request
            self._head_timer = self.loop.call_later(GUARD.header_timeout_s, self._head_timeout)

    def on_response_complete(self) -> None:
        self._cancel_head_timer()
        super().on_response_complete()

    def timeout_keep_alive_handler(self) -> None:
        received = self._received
        turns.in_turn(self.loop, lambda: self._idle_end(received))

    def _idle_end(self, received: int) -> None:
        if self.transport.is_closing() or self._received != received:
            return  # closed meanwhile, or a request began between the timer and its turn to close
        self._count_timeout("idle")
        super().timeout_keep_alive_handler()

    def _head_timeout(self) -> None:
        self._head_timer = None
        clock = self._head_clock
        turns.in_turn(self.loop, lambda: self._head_end(clock))

    def _head_end(self, clock: int) -> None:
        if clock != self._head_clock:
            return  # stopped between falling due and its turn: a request is being or was answered
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.our_state is h11.IDLE:  # nothing answered on this request yet: say why it ends
            message = f"the request's headers did not arrive within {GUARD.header_timeout_s:g} s"
            self.transport.write(_answer(408, "Request Timeout", "request_timeout", message))
            self._record(408, "headers", self.transport)
        else:
            self._count_timeout("headers")
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        self._head_clock += 1  # a clock that fell due and waits for its turn to close stops too
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _count_timeout(self, reason: str) -> None:
        metrics = GUARD.metrics()
        if metrics is not None:
            metrics.connection_timed_out(reason)

    def _record(self, status: int, reason: str, transport: asyncio.Transport) -> None:
        """Counted and written in the access log, as a request would be (it never became one)."""
        metrics = GUARD.metrics()
        if metrics is not None:
            metrics.connection_timed_out(reason)
            metrics.request("-", "-", "http", str(status), 0.0)
        peer = transport.get_extra_info("peername")
        logs.access(
            logs.access_logger(),
            protocol="http",
            request_id=None,
            method=None,
            path=None,
            status=status,
            duration_ms=None,
            bytes_out=None,
            bytes_in=None,
            client=peer[0] if isinstance(peer, tuple) else "",
            model=None,
            connection=reason,
        )
