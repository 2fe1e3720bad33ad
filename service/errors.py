"""Typed errors shared by the core and every transport.

The core raises (or returns, per image) these; HTTP maps `http_status`, gRPC maps `grpc_code` (a name of
`grpc.StatusCode`, kept as a string so that the core does not import grpc). Messages are meant for clients:
they never carry a stack trace or a server path.
"""

from __future__ import annotations


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


class ModelUnavailable(ServiceError):
    code = "model_unavailable"
    http_status = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(ServiceError):
    code = "overloaded"
    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    retry_after_s = 1


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"
    http_status = 504
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
