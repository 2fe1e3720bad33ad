"""ASGI middleware around every HTTP route (BentoML's and ours): request id, bearer token, access log.

Pure ASGI (no BaseHTTPMiddleware) so that streaming bodies and graceful shutdown are untouched. The request id
comes from `x-request-id` when the client sent a sane one, else it is made here; it is echoed in every answer
and written in the JSON access log line, one per request, on the `cnn_serve.access` logger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from service import logs
from service.auth import REALM, check_bearer
from service.config import Settings
from service.errors import Overloaded, Unauthenticated
from service.receiving import Reservation, client_of

from .admission import HeaderHolds, body_bytes, request_deadline
from .api import open_rule
from .responses import error_response, internal_message, plain_error

ASGIApp = Any
SCRAPE_ATTEMPTS, SCRAPE_RETRY_S = 3, 0.02
log = logging.getLogger("cnn_serve.http")


class RequestContextMiddleware:
    """Request id, optional bearer token (`service.auth`, the rule gRPC applies too) and the structured access
    log."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        metrics: Callable[[], Any] = lambda: None,
        core: Callable[[], Any] = lambda: None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics  # the worker's `Metrics` once it has started (None before)
        self.core = core  # the worker's `InferenceCore` once it has started (None before)
        self.token = settings.auth_token
        # The routes that need no token, from the routes' table (`api.OPERATIONS`, where the document says
        # the same): probes and scrapers (Kubernetes' probes and Prometheus must work with auth on), a model's
        # readiness (open as gRPC's ModelReady is), and the pages' files (a browser's navigation sends none).
        self.is_open = open_rule(settings)
        self.holds = HeaderHolds(settings)
        self.log = logs.access_logger()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = logs.request_id(headers.get("x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        arrived = state["arrived"] = time.monotonic()  # deadlines count from here, whatever it waited for
        start = time.perf_counter()
        status = {"code": 500, "bytes": 0, "sent": 0}
        hold = None
        core = self.core()
        client = client_of((scope.get("client") or ("", 0))[0])
        reservation = Reservation(core.receive_memory if core is not None else None, client)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = 1
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": raw}
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            path = scope.get("path", "")
            try:
                if not self.is_open(path):
                    check_bearer(headers.get("authorization"), self.token, "the Authorization header")
            except Unauthenticated as refused:
                challenge = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
                await error_response(refused, request_id, challenge)(scope, receive, send_with_id)
                metrics = self.metrics()
                if metrics is not None:  # refused before any route: counted here, with no model or endpoint
                    metrics.request("-", "-", "http", "401", time.perf_counter() - start)
                return
            if "\n" in path:
                # BentoML mounts our app with a pattern whose `.` stops at a line break: such a path would
                # get BentoML's plain-text 404. No route has one; it gets ours, in the one error body.
                await plain_error(404, "not_found", "no route for a path with a line break", request_id)(
                    scope, receive, send_with_id
                )
                metrics = self.metrics()
                if metrics is not None:
                    metrics.request("-", "-", "http", "404", time.perf_counter() - start)
                return
            try:
                # Room for the body before a byte of it is read (`service/receiving.py`), then its place in
                # the queue (`admission.py`): a request still waiting for room holds none.
                await reservation.reserve(
                    body_bytes(headers, self.settings), request_deadline(headers, self.settings, arrived)
                )
                hold = self.holds.take(core, scope, headers, client, arrived)
            except Overloaded as refused:  # answered from the headers, the body left unread
                await error_response(refused, request_id)(scope, receive, send_with_id)
                metrics = self.metrics()
                if metrics is not None:
                    metrics.request("-", "-", "http", "503", time.perf_counter() - start)
                return
            try:
                if path == "/metrics" and scope.get("method") in ("GET", "HEAD"):
                    await self._scrape(scope, receive, send_with_id, status)
                else:
                    await self.app(scope, receive, send_with_id)
            except Exception:
                # A route that fails before answering gets a 500 here. Raised further, it would never be
                # answered: BentoML's timeout middleware waits for a first message until its timeout.
                if status["sent"]:
                    raise
                log.exception("HTTP %s %s failed (request id %s)", scope.get("method"), path, request_id)
                status["code"] = 500
                message = internal_message(request_id)
                await plain_error(500, "internal", message, request_id)(scope, receive, send_with_id)
        finally:
            reservation.close()
            if hold is not None:  # given back, if the request ended before its admission took it
                self.holds.end(self.core(), hold, client)
            content_length = headers.get("content-length", "")
            logs.access(
                self.log,
                protocol="http",
                request_id=request_id,
                method=scope.get("method"),
                path=scope.get("path"),
                status=status["code"],
                duration_ms=round((time.perf_counter() - start) * 1000, 2),
                bytes_out=status["bytes"],
                bytes_in=int(content_length)
                if content_length.isascii() and content_length.isdigit()
                else None,
                client=(scope.get("client") or ("", 0))[0],
                model=state.get("model"),
            )

    async def _scrape(self, scope: dict, receive: Any, send: Any, status: dict) -> None:
        """BentoML's `/metrics`, tried again when it fails before answering. It reads every process's
        Prometheus file, and a file that another thread is just creating is briefly empty: the read then
        raises (`struct.error`). A scrape reads only, so trying again is safe."""
        for attempt in range(1, SCRAPE_ATTEMPTS + 1):
            try:
                await self.app(scope, receive, send)
                return
            except Exception:
                if status["sent"] or attempt == SCRAPE_ATTEMPTS:
                    raise
                log.warning("GET /metrics failed (attempt %d), reading again", attempt, exc_info=True)
                await asyncio.sleep(SCRAPE_RETRY_S)
