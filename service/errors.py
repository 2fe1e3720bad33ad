"""Typed errors shared by the core and every transport.

The core raises (or returns, per image) these; HTTP maps `http_status`, gRPC maps `grpc_code` (a name of
`grpc.StatusCode`, kept as a string so that the core does not import grpc). Messages are meant for clients:
they never carry a stack trace or a server path, and quote what a client sent only through `shown`.
"""

from __future__ import annotations

# How much of a client's value an error message quotes: enough to recognise it. A 10 KB model name echoed
# whole would make a 20 KB error body, and over gRPC trailing metadata past the client's 8 KB limit, which
# the client reports as RESOURCE_EXHAUSTED instead of the error itself.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client's value as error messages quote it: its repr, cut to `limit` characters, with its length.

    Strings and bytes are cut before `repr`, so that quoting a 10 MB value costs no more than a short one."""
    sized = isinstance(value, (str, bytes, bytearray))
    text = repr(value[: limit + 1] if sized else value)  # type: ignore[index]
    if len(text) <= limit + 2:  # room for the quotes of a string of `limit` characters
        return text
    if sized:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{text[:limit]}... ({len(value)} {unit})"  # type: ignore[arg-type]
    return f"{text[:limit]}... ({len(text)} characters)"


def forget_traceback(error: BaseException) -> None:
    """Drop the tracebacks of an error that has been answered, and of the errors it was raised from.

    A traceback holds the frames it passed through, and one of them often holds the error itself (the list of
    per-image results it came from, the future it was set on): a reference cycle that only the collector's
    next full pass frees, with all those frames hold (the request, its body). Those passes run on the event
    loop's time, so the transports call this where they turn an error into an answer."""
    stack: list[BaseException] = [error]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)


class ServiceError(Exception):
    code = "internal"
    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidArgument(ServiceError):
    code = "invalid_argument"
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class InvalidImage(InvalidArgument):
    code = "invalid_image"


class UnsupportedFormat(InvalidArgument):
    code = "unsupported_format"


class UrlNotAllowed(InvalidArgument):
    """A URL where image bytes belong: this service never fetches one."""

    code = "url_not_allowed"


class ImageTooLarge(InvalidArgument):
    code = "image_too_large"


class RequestTooLarge(InvalidArgument):
    code = "request_too_large"
    http_status = 413


class ModelNotFound(ServiceError):
    code = "not_found"
    http_status = 404
    grpc_code = "NOT_FOUND"

    @classmethod
    def of(cls, name: str, version: str | None = None) -> ModelNotFound:
        """The one message for a model or version not served: what was asked (cut short by `shown`), and
        nothing of what is served. Readiness probes answer it without a token; `/models` (`ListModels`)
        is where a client with the token sees the models."""
        if version is None:
            return cls(f"unknown model {shown(name)}")
        return cls(f"model {shown(name)} has no version {shown(version)}")


class FileNotFound(ServiceError):
    """A file the web pages do not have (`/static/...`, `/docs/...`)."""

    code = "not_found"
    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelUnavailable(ServiceError):
    code = "model_unavailable"
    http_status = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(ServiceError):
    """Refused at once for want of room or time; `retry_after_s` (whole seconds, at least 1) is when the work
    admitted now should be done: HTTP's Retry-After, gRPC's `retry-after` trailing metadata."""

    code = "overloaded"
    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class RequestTimeout(ServiceError):
    """The request body stopped arriving (or came too slowly): the connection is closed after the answer."""

    code = "request_timeout"
    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class ClientGone(ServiceError):
    """The client disconnected before its answer: the work left is dropped (nginx's 499 in logs/metrics)."""

    code = "cancelled"
    http_status = 499
    grpc_code = "CANCELLED"


class Unauthenticated(ServiceError):
    code = "unauthenticated"
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """A call this server has switched off (the repository's load and unload without an admin token)."""

    code = "permission_denied"
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
