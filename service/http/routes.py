"""The handlers of our own routes: classify, models and the Open Inference Protocol REST routes.

BentoML's `@bentoml.api` routes are POST-only and its file inputs download URLs, so these are plain Starlette
handlers, routed by the table of `api.py` into one app that the BentoML service mounts at `/`; BentoML itself
serves `/livez`, `/readyz` (through the service's `__is_ready__`) and `/metrics`. Each handler is wrapped by
`endpoint()`, which maps typed errors to JSON answers and records the request metrics.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from service.auth import check_admin
from service.config import Settings
from service.core import InferenceCore, ModelInfo, Prediction
from service.errors import ClientGone, InvalidArgument, ServiceError, forget_traceback, shown
from service.metrics import Metrics
from service.models import check_name
from service.oip import OpenInference
from service.postprocessing import check_top_k

from . import oip_rest
from .parsing import BodyParser, parse_json
from .requests import ImageRequest, deadline_of, json_budget, off_loop, read_body, read_images
from .responses import error_response, internal_error, plain_error


@dataclass
class Runtime:
    """What the routes share, attached to the app's state by the BentoML service at start-up."""

    settings: Settings
    core: InferenceCore
    metrics: Metrics
    oip: OpenInference
    parser: BodyParser | None = None  # large JSON bodies' parsing processes; None: parsed in threads


Handler = Callable[[Request, Runtime], Awaitable[Response]]
T = TypeVar("T")


def _rid(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def endpoint(name: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Errors as JSON, metrics counted, and a 503 while the service is still starting.

    Only the service's own typed errors (`ServiceError`) are the client's: anything else a handler raises is
    a fault of the server, answered 500 with the request id and logged with its traceback."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            runtime: Runtime | None = getattr(request.app.state, "runtime", None)
            rid = _rid(request)
            if runtime is None:
                return plain_error(503, "unavailable", "the service is starting", rid, {"Retry-After": "1"})
            start = time.perf_counter()
            state = request.scope.setdefault("state", {})
            with runtime.metrics.in_flight("http"):
                try:
                    response = await handler(request, runtime)
                except ServiceError as exc:
                    response = error_response(exc, rid)
                    forget_traceback(exc)
                except Exception as exc:
                    response = internal_error(rid)
                    forget_traceback(exc)
            runtime.metrics.request(
                str(state.get("model") or "-"),
                name,
                "http",
                str(response.status_code),
                time.perf_counter() - start,
                str(state.get("version") or ""),
            )
            return response

        return route

    return wrap


def _top_k(raw: str | None, model: str, version: str | None, runtime: Runtime) -> int | None:
    """The `top_k` asked for (None: the core's default), by the rule and with the message of the Open
    Inference Protocol's parameter (`postprocessing.check_top_k`), bounded by the model's class count."""
    if not raw:  # absent, or an empty field
        return None
    limit = runtime.settings.max_top_k
    card = runtime.core.model_info(model, version).card
    classes = card.num_classes if card is not None else limit  # no card: classify answers ModelUnavailable
    return check_top_k(raw, classes, limit, what="parameter 'top_k'")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client disconnects first (its queued images are then dropped by the core).

    `work` runs in this task, at once: its admission answers in the same step of the event loop, not a turn
    later. A second task waits for the disconnect, the next ASGI message once the body has been read, and
    cancels this one if it comes. (Polling for it instead cost the loop a call and a tracing span per
    waiting request several times a second: with a hundred requests queued, most of its time.)"""
    this = asyncio.current_task()
    assert this is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        try:
            await _disconnect(request)
        except asyncio.CancelledError:
            # Ended by this handler once `work` is done. Finished so rather than cancelled, this task keeps no
            # CancelledError, whose traceback would hold this frame and so the handler's task in a cycle.
            return
        gone = True
        this.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # this handler itself was cancelled
            raise
        this.uncancel()
        raise ClientGone("the client disconnected before the answer") from None
    finally:
        watcher.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone: what `receive` gives once the body has been read."""
    while (await request.receive()).get("type") != "http.disconnect":
        pass


async def _classify(
    request: Request, runtime: Runtime, many: bool
) -> tuple[ImageRequest, list[Prediction | ServiceError]]:
    """Read the images and parameters of /classify or /classify_batch, and classify them."""
    req = await read_images(request, runtime.settings, runtime.core.decode_memory, runtime.parser, many=many)
    model = req.params.get("model") or runtime.settings.default_model
    version = req.params.get("version") or None
    request.scope["state"]["model"] = model
    top_k = _top_k(req.params.get("top_k"), model, version, runtime)
    results = await _unless_disconnected(
        request,
        runtime.core.classify(
            req.images,
            model=model,
            version=version,
            top_k=top_k,
            tta=req.params.get("tta") or "none",
            deadline=deadline_of(request, runtime.settings),
        ),
    )
    return req, results


@endpoint("classify")
async def classify(request: Request, runtime: Runtime) -> Response:
    _, results = await _classify(request, runtime, many=False)
    result = results[0]
    if isinstance(result, ServiceError):
        raise result
    request.scope["state"]["version"] = result.version
    return JSONResponse({**result.to_dict(), "request_id": _rid(request)})


@endpoint("classify_batch")
async def classify_batch(request: Request, runtime: Runtime) -> Response:
    req, results = await _classify(request, runtime, many=True)
    entries = []
    for i, (name, result) in enumerate(zip(req.names, results, strict=True)):
        if isinstance(result, ServiceError):
            entries.append({"index": i, "filename": name, "error": result.to_dict()})
        else:
            entries.append({"index": i, "filename": name, **result.to_dict()})
    failed = sum(1 for e in entries if "error" in e)
    answered = [r.version for r in results if not isinstance(r, ServiceError)]
    request.scope["state"]["version"] = answered[0] if answered else ""
    return JSONResponse(
        {
            "results": entries,
            "succeeded": len(entries) - failed,
            "failed": failed,
            "request_id": _rid(request),
        }
    )


def _public(info: ModelInfo) -> dict[str, Any]:
    """A model's JSON (`ModelInfo.to_dict`) without its 1000-entry label list (the count is kept)."""
    out = info.to_dict()
    out.pop("labels", None)
    out["label_count"] = len(info.card.labels) if info.card is not None else 0
    return out


@endpoint("models")
async def models(request: Request, runtime: Runtime) -> Response:
    return JSONResponse(
        {
            "models": [_public(m) for m in runtime.core.models()],
            "default_model": runtime.settings.default_model,
        }
    )


@endpoint("v2_live")
async def v2_live(request: Request, runtime: Runtime) -> Response:
    live = runtime.oip.server_live()
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@endpoint("v2_ready")
async def v2_ready(request: Request, runtime: Runtime) -> Response:
    ready = runtime.oip.server_ready()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@endpoint("v2_metadata")
async def v2_metadata(request: Request, runtime: Runtime) -> Response:
    return JSONResponse(runtime.oip.server_metadata())


def _name_version(request: Request) -> tuple[str, str | None]:
    name = request.path_params["name"]
    request.scope["state"]["model"] = name
    return name, request.path_params.get("version") or None


@endpoint("v2_model_metadata")
async def v2_model_metadata(request: Request, runtime: Runtime) -> Response:
    name, version = _name_version(request)
    return JSONResponse(runtime.oip.model_metadata(name, version))


@endpoint("v2_model_ready")
async def v2_model_ready(request: Request, runtime: Runtime) -> Response:
    name, version = _name_version(request)
    ready = runtime.oip.model_ready(name, version)
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@endpoint("v2_infer")
async def v2_infer(request: Request, runtime: Runtime) -> Response:
    name, version = _name_version(request)
    settings = runtime.settings
    body = await read_body(request, settings.max_request_bytes, settings)
    parsed = await oip_rest.parse_infer_request(
        body,
        request.headers.get(oip_rest.HEADER_LENGTH),
        settings.max_images_per_request,
        json_budget(request, settings, runtime.core.decode_memory),
        runtime.parser,
    )
    del body
    result = await _unless_disconnected(
        request,
        runtime.oip.infer(
            name,
            version,
            parsed.tensors,
            parsed.outputs,
            parsed.parameters,
            deadline=deadline_of(request, settings),
        ),
    )
    request.scope["state"]["version"] = result.model_version
    return await off_loop(oip_rest.infer_response, result, parsed.request_id, parsed.binary, {})


# Triton's model repository extension. The index follows the inference token (the middleware's); load and
# unload take the admin token instead (`auth.check_admin`: off, 403, while none is configured).
REPOSITORY_BODY_BYTES = 64 * 1024
# A name with an encoded '/' (`..%2Fx`, `%2Fetc`) matches no route: the fallback refuses it as a name, 400.
REPOSITORY_CALL = re.compile("/v2/repository/models/(.+)/(?:load|unload)")


async def _repository_body(request: Request, runtime: Runtime, *keys: str) -> dict[str, Any]:
    """The optional JSON object of a repository call, with only `keys` in it."""
    body = await read_body(request, REPOSITORY_BODY_BYTES, runtime.settings)
    doc = parse_json(body, "request body") if body.strip() else {}
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object")
    unknown = set(doc) - set(keys)
    if unknown:
        raise InvalidArgument(f"unknown fields {shown(sorted(unknown))}; this call takes {list(keys)}")
    return doc


def _admin(request: Request, runtime: Runtime) -> str:
    """The admin token checked, and the model name of the path (never a path itself: `models.check_name`)."""
    header = request.headers.get("authorization")
    check_admin(header, runtime.settings.admin_token, "the Authorization header")
    name = request.path_params["name"]
    request.scope["state"]["model"] = name
    return name


def _parameters(doc: dict[str, Any]) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    return params


@endpoint("repository_index")
async def repository_index(request: Request, runtime: Runtime) -> Response:
    doc = await _repository_body(request, runtime, "ready")
    return JSONResponse(runtime.oip.repository_index(doc.get("ready", False)))


async def _repository_change(request: Request, runtime: Runtime, change: str) -> Response:
    """Load or unload (`change`) the model the path names, after the admin token."""
    name = _admin(request, runtime)
    doc = await _repository_body(request, runtime, "parameters")
    await getattr(runtime.oip, f"repository_{change}")(name, _parameters(doc))
    return JSONResponse({})


@endpoint("repository_load")
async def repository_load(request: Request, runtime: Runtime) -> Response:
    return await _repository_change(request, runtime, "load")


@endpoint("repository_unload")
async def repository_unload(request: Request, runtime: Runtime) -> Response:
    return await _repository_change(request, runtime, "unload")


@endpoint("-")
async def not_found(request: Request, runtime: Runtime) -> Response:
    """404, or 405 when the path exists for another method (this catch-all would otherwise shadow that)."""
    repository_call = REPOSITORY_CALL.fullmatch(request.scope.get("path", ""))
    if repository_call and request.method == "POST":
        check_name(repository_call.group(1))
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if route.endpoint is not not_found and route.matches(request.scope)[0] == Match.PARTIAL:
            allowed |= set(route.methods or ())
    if allowed:
        return plain_error(
            405,
            "method_not_allowed",
            f"{shown(request.method)} is not allowed on {shown(request.url.path)}",
            _rid(request),
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    return plain_error(404, "not_found", f"no route {shown(request.url.path)}", _rid(request))


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (e.g. 405) in our JSON form."""
    status = getattr(exc, "status_code", 500)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_argument")
    return plain_error(
        status,
        code,
        str(getattr(exc, "detail", "")) or "error",
        _rid(request),
        headers=getattr(exc, "headers", None),
    )
