"""What every gRPC call of this server shares, in one interceptor: bearer token, request id, metrics, access
log and error mapping.

Like KServe's single gRPC interceptor (and MLServer's decorator), `ServiceInterceptor` wraps the behavior of
every method handler, the servicers' and reflection's alike, so that the servicers only translate protobuf to
core calls and back:

- the bearer token (`service.auth`, HTTP's rule) is checked for every method but health and the probes
  (`ServerLive`, `ServerReady`, `ModelReady`), which Kubernetes calls without metadata;
- every answer, success or error, carries the request id (`x-request-id`: the client's if it is a plain
  token, `service.logs`' rule, else a new one) in its trailing metadata;
- every `ServiceError` becomes the status its `grpc_code` names, with a client-safe message, `x-error-code`
  and, for Overloaded, `retry-after`; anything else is INTERNAL with a generic message (the trace is logged);
- every method's requests come to the interceptor as a stream (`_rewrap`), so that a call is its own from its
  headers on: a unary method's one message must arrive by the call's deadline, capped by `request_timeout_s`,
  else DEADLINE_EXCEEDED (`request_timeout`), as an HTTP body that stops arriving is 408 (a stream's messages
  each within `request_timeout_s` of the last). grpc itself waited for ever for a message the client never
  sent, and held the call;
- past `grpc_max_calls` calls in progress, or its client's share of them (`client_share`), a call is
  RESOURCE_EXHAUSTED at once; and a call asks for each
  message only once it has room for `max_request_bytes` in the worker's receive budget, within its client's
  share (`service/receiving.py`, shared with HTTP): grpc's core takes in as much as a message declares once
  it is asked for, and without the budget a hundred calls took the worker to gigabytes;
- request messages are deserialized here, inside the call, not by grpc before it: bytes that are not the
  method's message are INVALID_ARGUMENT like any other bad request (answered with the request id, counted,
  logged), where grpc would answer UNKNOWN naming its own exception and log a traceback per call. Their
  fields are counted first (`messages.count_fields`, `max_message_fields`), and a large one is counted and
  parsed in a thread: protobuf's parser holds the interpreter lock, and some messages take it seconds;
- every call but health is counted in the Prometheus metrics (protocol="grpc", the `model` label from the
  request message), in the in-flight gauge and in `active` (what the drain waits for), and written to the JSON
  access log. Health is left out: probes would swamp both, and a `Watch` stream would hold the drain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from proto import classifier_pb2, grpc_predict_v2_pb2
from service import auth, logs
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    ServiceError,
    forget_traceback,
)
from service.grpc import messages
from service.metrics import Metrics
from service.priority import as_work
from service.receiving import ReceiveBudget, Reservation, client_of

log = logging.getLogger("service.grpc")
access_log = logs.access_logger()

REQUEST_ID_KEY = "x-request-id"
ERROR_CODE_KEY = "x-error-code"
RETRY_AFTER_KEY = "retry-after"
AUTHORIZATION_KEY = "authorization"

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name
INFERENCE_SERVICE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Probes send no metadata: these answer without the token, as health does (HTTP's open paths likewise).
PROBE_METHODS = frozenset(f"/{INFERENCE_SERVICE}/{m}" for m in ("ServerLive", "ServerReady", "ModelReady"))
# The repository's changes take the admin token instead of the inference token (`auth.check_admin`).
ADMIN_METHODS = frozenset(
    f"/{INFERENCE_SERVICE}/{m}" for m in ("RepositoryModelLoad", "RepositoryModelUnload")
)
# The request field that names the model, per method (the `model` label and the access log's `model`); an
# empty one is the default model where the API says so (ImageClassifier's).
MODEL_FIELDS: dict[str, tuple[str, bool]] = {
    f"/{CLASSIFIER_SERVICE}/Classify": ("model", True),
    f"/{CLASSIFIER_SERVICE}/ClassifyBatch": ("model", True),
    f"/{INFERENCE_SERVICE}/ModelReady": ("name", False),
    f"/{INFERENCE_SERVICE}/ModelMetadata": ("name", False),
    f"/{INFERENCE_SERVICE}/ModelInfer": ("model_name", False),
    f"/{INFERENCE_SERVICE}/RepositoryModelLoad": ("model_name", False),
    f"/{INFERENCE_SERVICE}/RepositoryModelUnload": ("model_name", False),
}

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Decoder = Callable[[bytes], Any]
AsyncDecoder = Callable[[bytes], Awaitable[Any]]


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of `key` in the call's metadata (keys are lower case on the wire)."""
    for item in context.invocation_metadata() or ():
        if item.key.lower() == key:
            value = item.value
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def deadline_from(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """The call's deadline as an absolute `time.monotonic()`: the client's, capped by the server default."""
    remaining = context.time_remaining()
    budget = default_s if remaining is None else min(remaining, default_s)
    if budget <= 0:
        raise DeadlineExceeded("the call's deadline has already passed")
    return time.monotonic() + budget


@dataclass(frozen=True)
class _Method:
    """What the interceptor does for one method, decided once per call from its path."""

    path: str
    endpoint: str  # the metrics' and access log's name: the method's short name
    authenticate: bool
    observe: bool  # metrics, access log, in flight, `active`


@dataclass
class _Call:
    """One call in progress: its request message once decoded (None before, or for a stream of them)."""

    request_id: str
    reservation: Reservation
    request: Any = field(default=None)
    version: str = ""  # the version that answered, from the response (Classify's, ModelInfer's)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, request ids, metrics, access log and error mapping for every call of one server.

    `active` counts the calls inside a handler now (health aside): the drain stops the server once it has
    stayed at 0 for a moment. `calls` counts them all, health included, against `grpc_max_calls`. `receive`
    is the worker's receive budget (`service/receiving.py`), shared with HTTP."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, receive: ReceiveBudget | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.receive = receive
        self.active = 0
        self.calls = 0
        self.calls_by_client: collections.Counter[str] = collections.Counter()
        self.client_calls = max(1, int(settings.grpc_max_calls * settings.client_share))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        service = details.method.lstrip("/").partition("/")[0]
        method = _Method(
            path=details.method,
            endpoint=details.method.rpartition("/")[2],
            authenticate=service != HEALTH_SERVICE and details.method not in PROBE_METHODS,
            observe=service != HEALTH_SERVICE,
        )
        return _rewrap(handler, self._wrap(method, handler))

    def _wrap(self, method: _Method, handler: grpc.RpcMethodHandler) -> Behavior:
        """The handler's behavior run inside `_call`, in the same form so that grpc drives it the same way:
        an async generator yields the answers, a coroutine returns the answer or writes them with
        `context.write` (every handler here is one or the other, grpc's health and reflection included)."""
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        decode = _decoder(handler.request_deserializer, self.settings.max_message_fields)
        streams_requests = handler.request_streaming

        async def requests(raw: AsyncIterator[bytes], call: _Call, context: grpc.aio.ServicerContext) -> Any:
            """The behavior's argument: the decoded message, or the stream of them decoded one by one. Each
            message is waited for with `max_request_bytes` reserved from the receive budget (grpc's core takes
            in as much as the message declares once it is asked for), by the call's deadline."""
            timeout_s = self.settings.request_timeout_s
            if streams_requests:
                return _decoded(raw, decode, call.reservation, self.settings.max_request_bytes, timeout_s)
            deadline = deadline_from(context, timeout_s)
            await call.reservation.reserve(self.settings.max_request_bytes, deadline)
            message = await _first(raw, deadline)
            call.reservation.keep(len(message))  # held with the request until the call ends
            call.request = await decode(message)
            return call.request

        if inspect.isasyncgenfunction(behavior):

            async def stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._call(method, context) as call:
                    self._admit(call)
                    self._authorize(method, context)
                    async for response in behavior(await requests(raw, call, context), context):
                        yield response

            return stream

        async def coroutine(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(method, context) as call:
                self._admit(call)
                self._authorize(method, context)
                result = behavior(await requests(raw, call, context), context)
                response = await result if inspect.isawaitable(result) else result
                call.version = _answered_version(response)
                return response

        return coroutine

    def _admit(self, call: _Call) -> None:
        """Past `grpc_max_calls`, or past its client's share of them (this call counted), the call is refused
        at once, before its message: a client that opens calls and never sends their messages must not take
        every call the server allows."""
        if self.calls > self.settings.grpc_max_calls:
            raise Overloaded(
                f"the server has {self.calls - 1} gRPC calls in progress, its limit (grpc_max_calls)"
            )
        if self.calls_by_client[call.reservation.client] > self.client_calls:
            raise Overloaded(
                f"this client has {self.client_calls} gRPC calls in progress, its share of grpc_max_calls "
                "(client_share)"
            )

    def _authorize(self, method: _Method, context: grpc.aio.ServicerContext) -> None:
        """The call's token, checked first in `_call`'s body, before the request is decoded: a client without
        it learns nothing, not even whether its bytes were a message."""
        if method.path in ADMIN_METHODS:
            auth.check_admin(
                metadata_value(context, AUTHORIZATION_KEY),
                self.settings.admin_token,
                f"'{AUTHORIZATION_KEY}' metadata",
            )
        elif method.authenticate:
            auth.check_bearer(
                metadata_value(context, AUTHORIZATION_KEY),
                self.settings.auth_token,
                f"'{AUTHORIZATION_KEY}' metadata",
            )

    @contextlib.asynccontextmanager
    async def _call(self, method: _Method, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        """Around one call's behavior (whose first step is `_authorize`): request id, error mapping; metrics
        and log if observed.

        An error ends the call with its status set on the context, and the body's exception is not raised
        further (see `_fail`): the behavior's wrapper returns nothing, which grpc does not send."""
        request_id = logs.request_id(metadata_value(context, REQUEST_ID_KEY))
        call = _Call(request_id, Reservation(self.receive, client_of(context.peer() or "")))
        # Set first, so that an abort from inside a servicer (health's NOT_FOUND) carries it as well.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        start = time.perf_counter()
        status = "OK"
        in_flight: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if method.observe:
            self.active += 1
            if self.metrics is not None:
                in_flight = self.metrics.in_flight("grpc")
        self.calls += 1
        self.calls_by_client[call.reservation.client] += 1
        try:
            with in_flight:
                try:
                    yield call
                except ServiceError as err:
                    status = err.grpc_code
                    _fail(context, err, request_id)
                    forget_traceback(err)
                except asyncio.CancelledError:
                    status = "CANCELLED"
                    raise
                except (grpc.aio.AbortError, grpc.RpcError):  # the servicer aborted itself
                    status = _code_name(context) or "UNKNOWN"
                    raise
                except Exception as err:  # noqa: BLE001 - the client gets a safe message, the log the trace
                    status = "INTERNAL"
                    log.exception("gRPC %s failed (request id %s)", method.endpoint, request_id)
                    _fail(context, ServiceError("internal error"), request_id)
                    forget_traceback(err)
        finally:
            self.calls -= 1
            self.calls_by_client[call.reservation.client] -= 1
            if not self.calls_by_client[call.reservation.client]:
                del self.calls_by_client[call.reservation.client]
            call.reservation.close()
            if method.observe:
                self.active -= 1
                seconds = time.perf_counter() - start
                self._record(method, call.request, context, request_id, status, seconds, call.version)

    def _record(
        self,
        method: _Method,
        request: Any,
        context: grpc.aio.ServicerContext,
        request_id: str,
        status: str,
        seconds: float,
        version: str = "",
    ) -> None:
        model = self._model(method.path, request)
        if self.metrics is not None:
            self.metrics.request(model, method.endpoint, "grpc", status, seconds, version)
        logs.access(
            access_log,
            protocol="grpc",
            request_id=request_id,
            method=method.endpoint,
            status=status,
            duration_ms=round(seconds * 1000, 2),
            client=context.peer(),
            model=model or None,
        )

    def _model(self, path: str, request: Any) -> str:
        """The model the request names ("" for none, or for a stream of requests)."""
        field, defaults = MODEL_FIELDS.get(path, ("", False))
        if not field or request is None:
            return ""
        name = str(getattr(request, field, "") or "")
        return name or (self.settings.default_model if defaults else "")


def _answered_version(response: Any) -> str:
    """The version a response names: ModelInfer's `model_version`, Classify's `result.version`, or the first
    answered entry of ClassifyBatch; "" for other calls."""
    for path in (("model_version",), ("result", "version")):
        value: Any = response
        for part in path:
            value = getattr(value, part, None)
        if isinstance(value, str) and value:
            return value
    for entry in getattr(response, "results", ()) or ():
        version = getattr(getattr(entry, "result", None), "version", "")
        if version:
            return str(version)
    return ""


def _fail(context: grpc.aio.ServicerContext, err: ServiceError, request_id: str) -> None:
    """End the call with the error's status, code and request id, and no answer.

    Set on the context rather than raised with `context.abort`: grpc keeps the AbortError that raises on the
    call's state, which the frames in its traceback refer to, a reference cycle per refused call left to the
    collector's next full pass (on the event loop's time)."""
    trailing = [(REQUEST_ID_KEY, request_id), (ERROR_CODE_KEY, err.code)]
    if isinstance(err, Overloaded):
        trailing.append((RETRY_AFTER_KEY, str(err.retry_after_s)))
    context.set_trailing_metadata(tuple(trailing))
    context.set_code(getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL))
    context.set_details(f"{err.message} (request id {request_id})")


def _decoder(deserializer: Decoder | None, max_fields: int) -> AsyncDecoder:
    """The handler's request deserializer, run inside the call once `messages.count_fields` has counted the
    message's fields (in a thread for a large message): bytes that are not the method's message are the
    client's error, InvalidArgument, never a traceback of ours."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request"

    def decode(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            if descriptor is not None:
                messages.count_fields(raw, descriptor, max_fields)
            return deserializer(raw)
        except RequestTooLarge:
            raise
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, NotWireFormat, whatever these bytes provoke
            raise InvalidArgument(f"the request ({len(raw)} bytes) is not a valid {name} message") from None

    async def decode_off_loop(raw: bytes) -> Any:
        if deserializer is None or len(raw) < messages.INLINE_BYTES:
            return decode(raw)
        return await asyncio.to_thread(as_work(decode), raw)

    return decode_off_loop


async def _first(raw: AsyncIterator[bytes], deadline: float) -> bytes:
    """A unary method's one request message (`_next`)."""
    message = await _next(raw, deadline)
    if message is None:
        raise InvalidArgument("the call ended without its request message")
    return message


async def _next(raw: AsyncIterator[bytes], deadline: float) -> bytes | None:
    """The next request message of the stream grpc hands the interceptor (`_rewrap`), None once the client
    has sent its last, by `deadline` (`time.monotonic()`): a client that opens a call and never sends it,
    or sends it slowly, holds the call and its stream no longer."""
    remaining = max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(anext(aiter(raw)), remaining)
    except TimeoutError:
        raise RequestTimeout(
            f"the request message did not arrive within {remaining:.3g} s (the call's deadline, at most "
            "request_timeout_s)"
        ) from None
    except StopAsyncIteration:
        return None


async def _decoded(
    raw: AsyncIterator[bytes], decode: AsyncDecoder, reservation: Reservation, reserve: int, timeout_s: float
) -> AsyncIterator[Any]:
    """A stream of requests, each decoded as it arrives. Each is waited for with `reserve` bytes held from
    the receive budget, given back once it is in, and must arrive within `timeout_s` of the last: a stream
    left waiting would hold its reservation."""
    stream = aiter(raw)
    while True:
        deadline = time.monotonic() + timeout_s
        await reservation.reserve(reserve, deadline)
        try:
            message = await _next(stream, deadline)
        finally:
            reservation.keep(0)
        if message is None:
            return
        yield await decode(message)


def _rewrap(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s responses (one or a stream, the same serializer) that runs `behavior` on a
    stream of the request's bytes, whatever the method: grpc starts it once the call's headers are in, not
    once a unary request's message is, and `behavior` takes that message (`_first`) and deserializes it
    itself (`_decoder`). On the wire a unary request is a stream of one message."""
    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    else:
        make = grpc.stream_unary_rpc_method_handler
    return make(behavior, None, handler.response_serializer)


def _code_name(context: grpc.aio.ServicerContext) -> str | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio has no code() on aio contexts
        return None
    if code is None:
        return None
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


__all__ = ["ServiceInterceptor", "deadline_from", "metadata_value"]
