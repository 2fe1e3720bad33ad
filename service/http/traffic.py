"""BentoML's traffic timeout, without what it kept alive.

BentoML puts a `TimeoutMiddleware` in front of every app (`traffic.timeout` must be a positive number): a
request not answered within it gets 504. Its timer is never cancelled, and it holds the request's context,
the tracing span BentoML opened for the request with its attributes, events and locks, until it fires: at
100 requests a second and the 60 s timeout, some 6,000 requests' objects alive at once. They do not leak,
but the garbage collector's full passes walk them all, on the event loop's time (more than 100 ms each on
a 2-vCPU host under load). `install` replaces it, before BentoML builds its app, with one that answers the
same, runs the request in the caller's task instead of a second one, and cancels its timer when the
request ends (a timer made with an empty context: a cancelled timer waits in the loop's heap for a while).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from starlette.responses import JSONResponse

ASGIApp = Any


class TimeoutMiddleware:
    """504 when the app has not begun its answer within `timeout` seconds (what BentoML's does)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        this = asyncio.current_task()
        assert this is not None
        state = {"started": False, "expired": False}

        def expire() -> None:
            if not state["started"]:
                state["expired"] = True
                this.cancel()

        async def started(message: dict) -> None:
            state["started"] = True
            await send(message)

        timer = loop.call_later(self.timeout, expire, context=contextvars.Context())
        try:
            await self.app(scope, receive, started)
        except asyncio.CancelledError:
            if not state["expired"]:
                raise
            this.uncancel()
            body = {"error": f"Not able to process the request in {self.timeout} seconds"}
            await JSONResponse(body, status_code=504)(scope, receive, send)
        finally:
            timer.cancel()


def install() -> None:
    """Make BentoML build its apps with this `TimeoutMiddleware` (looked up when it builds one)."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]
