"""What every gRPC call of this service shares: request id, bearer token, metrics and error mapping.

Each servicer method runs inside `Call`, so that every answer (success or error) carries the request id in
its trailing metadata, every `ServiceError` becomes the status its `grpc_code` names with a client-safe
message, and every request is counted in the Prometheus metrics with protocol="grpc".
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service import logs
from service.errors import DeadlineExceeded, Overloaded, ServiceError, Unauthenticated

log = logging.getLogger("service.grpc")
access_log = logs.access_logger()

REQUEST_ID_KEY = "x-request-id"
ERROR_CODE_KEY = "x-error-code"
RETRY_AFTER_KEY = "retry-after"

T = TypeVar("T")


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key.lower() == key:
            value = item.value
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    """The client's `x-request-id` if it is a plain token (HTTP's rule, `service.logs`), else a fresh one."""
    return logs.request_id(metadata_value(context, REQUEST_ID_KEY))


def token_matches(context: grpc.aio.ServicerContext, token: str) -> bool:
    """Whether the call carries `authorization: Bearer <token>` (compared in constant time)."""
    return bearer_ok(metadata_value(context, "authorization") or "", token)


def bearer_ok(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


class Calls:
    """Runs servicer bodies with authentication, request ids, metrics and error mapping."""

    def __init__(self, settings: Any, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.active = 0  # calls in our handlers now: the drain waits for none before stopping the server

    async def run(
        self,
        context: grpc.aio.ServicerContext,
        endpoint: str,
        model: str,
        body: Callable[[str], Awaitable[T]],
        authenticate: bool = True,
    ) -> T:
        """Answer one call: `body(request_id)` gives the response; errors become statuses."""
        request_id = request_id_from(context)
        start = time.perf_counter()
        status = "OK"
        in_flight = self.metrics.in_flight("grpc") if self.metrics is not None else _Nothing()
        self.active += 1
        try:
            with in_flight:
                try:
                    if (
                        authenticate
                        and self.settings.auth_token
                        and not token_matches(context, self.settings.auth_token)
                    ):
                        raise Unauthenticated("missing or wrong bearer token in 'authorization' metadata")
                    response = await body(request_id)
                except ServiceError as err:
                    status = err.grpc_code
                    await self._abort(context, err, request_id)
                    raise AssertionError("unreachable") from None
                except asyncio.CancelledError:
                    status = "CANCELLED"
                    raise
                except (grpc.aio.AbortError, grpc.RpcError):
                    status = _code_name(context) or "UNKNOWN"
                    raise
                except Exception:  # noqa: BLE001 - the client gets a safe message, the log the trace
                    status = "INTERNAL"
                    log.exception("gRPC %s failed (request id %s)", endpoint, request_id)
                    await context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"internal error (request id {request_id})",
                        trailing_metadata=((REQUEST_ID_KEY, request_id), (ERROR_CODE_KEY, "internal")),
                    )
                    raise AssertionError("unreachable") from None
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return response
        finally:
            self.active -= 1
            seconds = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.request(model, endpoint, "grpc", status, seconds)
            logs.access(
                access_log,
                protocol="grpc",
                request_id=request_id,
                method=endpoint,
                status=status,
                duration_ms=round(seconds * 1000, 2),
                client=context.peer() if hasattr(context, "peer") else None,
                model=model or None,
            )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, err: ServiceError, request_id: str) -> None:
        trailing = [(REQUEST_ID_KEY, request_id), (ERROR_CODE_KEY, err.code)]
        if isinstance(err, Overloaded):
            trailing.append((RETRY_AFTER_KEY, str(err.retry_after_s)))
        code = getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL)
        await context.abort(
            code, f"{err.message} (request id {request_id})", trailing_metadata=tuple(trailing)
        )


def deadline_from(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """The call's deadline as an absolute `time.monotonic()`: the client's, capped by the server default."""
    remaining = context.time_remaining()
    budget = default_s if remaining is None else min(remaining, default_s)
    if budget <= 0:
        raise DeadlineExceeded("the call's deadline has already passed")
    return time.monotonic() + budget


def _code_name(context: grpc.aio.ServicerContext) -> str | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio has no code() on aio contexts
        return None
    if code is None:
        return None
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
