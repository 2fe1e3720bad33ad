"""JSON answers and the mapping of typed service errors to HTTP statuses, shared by every route."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from service.errors import Overloaded, RequestTimeout, ServiceError

log = logging.getLogger("cnn_serve.http")


def request_id_of(scope_state: dict[str, Any]) -> str:
    return str(scope_state.get("request_id", ""))


def error_body(code: str, message: str, request_id: str) -> dict[str, str]:
    """`{code, message, request_id}`, and `error` (the same message): the Open Inference Protocol's error
    field, which KServe's and Triton's clients read and fail without."""
    return {"code": code, "message": message, "request_id": request_id, "error": message}


def error_response(
    error: ServiceError, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body (`error_body`); 503 overload answers carry Retry-After; after a 408 the connection
    is closed (the rest of a body that stopped arriving would otherwise be read as the next request)."""
    extra = dict(headers or {})
    if isinstance(error, Overloaded):
        extra["Retry-After"] = str(int(getattr(error, "retry_after_s", 1) or 1))
    if isinstance(error, RequestTimeout):
        extra["Connection"] = "close"
    return JSONResponse(
        error_body(error.code, error.message, request_id), status_code=error.http_status, headers=extra
    )


def internal_message(request_id: str) -> str:
    """What a client is told of a fault of the server: nothing but the id under which the log has it."""
    return f"internal error (request id {request_id})"


def internal_error(request_id: str) -> JSONResponse:
    """An unexpected failure: logged with its traceback here, never sent to the client."""
    log.exception("unhandled error in request %s", request_id)
    return JSONResponse(error_body("internal", internal_message(request_id), request_id), status_code=500)


def plain_error(
    status: int, code: str, message: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, request_id), status_code=status, headers=headers)
