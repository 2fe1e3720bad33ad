"""One table of the HTTP routes: the router is built from it, and so are the OpenAPI 3.1 document at
`/openapi.json` and the middleware's list of routes that need no token.

Each `Operation` names its path, method, handler, parameters, body and answers. BentoML serves a few routes
itself (the probes, `/metrics`, its `/schema.json`): they are described here too, without a handler.
`tests/test_openapi.py` compares the table with the routes of the real BentoML app, so that a route without a
description, or a description without a route, fails a test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.config import Settings
from service.oip.protocol import server_version

from . import routes, schemas, web
from .routes import Runtime, endpoint

JSON = dict[str, Any]
TITLE = "cnn-serve"
# Every answer of ours can be these: a fault of the server, and (before start-up has made the core) 503.
ALWAYS = {500: "InternalError", 503: "ServiceUnavailable"}
TAGS = [
    {"name": "classify", "description": "Images in, classes out."},
    {"name": "models", "description": "What the model repository holds."},
    {
        "name": "open inference protocol",
        "description": "The Open Inference Protocol v2 over REST (KServe, "
        "Triton), with Triton's binary tensor data and classification extensions.",
    },
    {"name": "probes", "description": "Liveness, readiness and metrics: open with a token configured."},
    {
        "name": "pages",
        "description": "The web page, Swagger UI and this document. The pages' files hold no "
        "data and are open; what they fetch needs the token.",
    },
]


@dataclass(frozen=True)
class Operation:
    """A route and its description: what it takes (parameters, body) and what it answers, by status.

    `responses` maps a status to a name of components/responses; `open`: no bearer token needed (probes,
    scrapers, the pages' files); `web`: one of the pages, off with `web_ui=0`; `handler` None: BentoML's own.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    responses: dict[int, str]
    handler: Callable[[Request], Any] | None = None
    parameters: tuple[str, ...] = ()
    body: str | None = None
    open: bool = False
    web: bool = False
    admin: bool = False  # the admin token instead of the inference token (the repository's load, unload)
    description: str = ""
    headers: tuple[str, ...] = field(default=("request_id",))

    def describe(self, settings: Settings) -> JSON:
        """The OpenAPI operation object."""
        answers = dict(self.responses)
        if self.handler is not None:
            for status, name in ALWAYS.items():
                answers.setdefault(status, name)
        else:
            answers.setdefault(500, "InternalError")  # the middleware's answer to a failing BentoML route
        if settings.auth_token and not self.open:
            answers[401] = "Unauthorized"
        if self.admin:
            answers.update({401: "Unauthorized", 403: "Forbidden"})
        out: JSON = {
            "operationId": self.operation_id,
            "summary": self.summary,
            "tags": [self.tag],
            "parameters": [schemas_ref("parameters", p) for p in (*self.parameters, *self.headers)],
            "responses": {str(s): schemas_ref("responses", answers[s]) for s in sorted(answers)},
        }
        if self.description:
            out["description"] = self.description
        if self.body is not None:
            out["requestBody"] = schemas_ref("requestBodies", self.body)
        if settings.auth_token and self.open:
            out["security"] = []
        if self.admin:
            out["security"] = [{"admin": []}]
        return out


def schemas_ref(kind: str, name: str) -> JSON:
    return {"$ref": f"#/components/{kind}/{name}"}


@endpoint("openapi")
async def openapi_json(request: Request, runtime: Runtime) -> Response:
    models = [m.name for m in runtime.core.models()]
    return JSONResponse(document(runtime.settings, models))


CLASSIFY_ERRORS = {
    400: "BadRequest",
    404: "NotFound",
    408: "RequestTimeout",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    499: "ClientClosedRequest",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
OPTIONS = ("model", "version", "top_k", "tta")
BODY_HEADERS = ("request_id", "request_timeout", "content_encoding")
V2 = "/v2/models/{name}"
V2_VERSION = V2 + "/versions/{version}"

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/classify",
        "classify",
        "Classify one image",
        "classify",
        {200: "ClassifyResult", **CLASSIFY_ERRORS},
        routes.classify,
        parameters=OPTIONS,
        body="ClassifyBody",
        headers=BODY_HEADERS,
        description="The image as a multipart file (`file`), a raw body (`image/*`, "
        "`application/octet-stream`) or JSON base64 (`image`). A URL in its place is refused "
        "(`url_not_allowed`), never fetched.",
    ),
    Operation(
        "POST",
        "/classify_batch",
        "classify_batch",
        "Classify several images",
        "classify",
        {200: "BatchResult", **CLASSIFY_ERRORS},
        routes.classify_batch,
        parameters=OPTIONS,
        body="ClassifyBatchBody",
        headers=BODY_HEADERS,
        description="A bad image fails only its own entry (`results[i].error`); the others are answered.",
    ),
    Operation(
        "GET",
        "/models",
        "models",
        "Every model, its card and state",
        "models",
        {200: "Models"},
        routes.models,
    ),
    Operation(
        "GET",
        "/v2/health/live",
        "v2_live",
        "Server live",
        "open inference protocol",
        {200: "Live", 503: "NotLive"},
        routes.v2_live,
        open=True,
    ),
    Operation(
        "GET",
        "/v2/health/ready",
        "v2_ready",
        "Server ready",
        "open inference protocol",
        {200: "Ready", 503: "NotReady"},
        routes.v2_ready,
        open=True,
    ),
    Operation(
        "GET",
        "/v2",
        "v2_metadata",
        "Server metadata",
        "open inference protocol",
        {200: "ServerMetadata"},
        routes.v2_metadata,
    ),
    Operation(
        "GET",
        V2,
        "v2_model_metadata",
        "Model metadata",
        "open inference protocol",
        {200: "ModelMetadata", 404: "NotFound"},
        routes.v2_model_metadata,
        parameters=("name",),
    ),
    Operation(
        "GET",
        V2_VERSION,
        "v2_model_version_metadata",
        "Model version metadata",
        "open inference protocol",
        {200: "ModelMetadata", 404: "NotFound"},
        routes.v2_model_metadata,
        parameters=("name", "path_version"),
    ),
    Operation(
        "GET",
        V2 + "/ready",
        "v2_model_ready",
        "Model ready",
        "open inference protocol",
        {200: "ModelReady", 404: "NotFound", 503: "ModelNotReady"},
        routes.v2_model_ready,
        parameters=("name",),
        open=True,
    ),
    Operation(
        "GET",
        V2_VERSION + "/ready",
        "v2_model_version_ready",
        "Model version ready",
        "open inference protocol",
        {200: "ModelReady", 404: "NotFound", 503: "ModelNotReady"},
        routes.v2_model_ready,
        parameters=("name", "path_version"),
        open=True,
    ),
    Operation(
        "POST",
        V2 + "/infer",
        "v2_infer",
        "Inference",
        "open inference protocol",
        {200: "InferResponse", **CLASSIFY_ERRORS},
        routes.v2_infer,
        parameters=("name",),
        body="InferBody",
        headers=(*BODY_HEADERS, "header_length"),
    ),
    Operation(
        "POST",
        V2_VERSION + "/infer",
        "v2_model_version_infer",
        "Inference on a model version",
        "open inference protocol",
        {200: "InferResponse", **CLASSIFY_ERRORS},
        routes.v2_infer,
        parameters=("name", "path_version"),
        body="InferBody",
        headers=(*BODY_HEADERS, "header_length"),
    ),
    Operation(
        "POST",
        "/v2/repository/index",
        "repository_index",
        "Every model of the repository and every version with its state",
        "models",
        {200: "RepositoryIndex", 400: "BadRequest", 408: "RequestTimeout", 413: "PayloadTooLarge"},
        routes.repository_index,
        body="RepositoryIndexBody",
        description="Triton's model repository extension: `state` is READY, LOADING, UNLOADING or "
        "UNAVAILABLE (with the `reason`); a model that is not loaded has no version and no state.",
    ),
    Operation(
        "POST",
        "/v2/repository/models/{name}/load",
        "repository_load",
        "Load a model by its version policy",
        "models",
        {200: "RepositoryChanged", **CLASSIFY_ERRORS},
        routes.repository_load,
        parameters=("repository_model",),
        body="RepositoryChangeBody",
        admin=True,
        description="With `--model-control explicit` and the admin token (`--admin-token`; none "
        "configured: 403). A new version takes traffic once warmed up; one that fails is UNAVAILABLE with "
        "its reason (503) and what served before still serves.",
    ),
    Operation(
        "POST",
        "/v2/repository/models/{name}/unload",
        "repository_unload",
        "Unload a model",
        "models",
        {200: "RepositoryChanged", **CLASSIFY_ERRORS},
        routes.repository_unload,
        parameters=("repository_model",),
        body="RepositoryChangeBody",
        admin=True,
        description="With `--model-control explicit` and the admin token. Requests already admitted "
        "finish on the model; later ones are 404.",
    ),
    # BentoML's own routes.
    Operation(
        "GET",
        "/livez",
        "livez",
        "Liveness (Kubernetes' probe)",
        "probes",
        {200: "Probe", 503: "ProbeFailed"},
        open=True,
        description="503 only when the core failed to start: a restart is the cure.",
    ),
    Operation(
        "GET",
        "/healthz",
        "healthz",
        "Liveness (another name)",
        "probes",
        {200: "Probe", 503: "ProbeFailed"},
        open=True,
    ),
    Operation(
        "GET",
        "/readyz",
        "readyz",
        "Readiness (Kubernetes' probe)",
        "probes",
        {200: "Probe", 503: "ProbeFailed"},
        open=True,
        description="503 until every model is loaded and warmed up (or, with `strict_readiness=0`, "
        "any model).",
    ),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics", "probes", {200: "Metrics"}, open=True),
    Operation(
        "GET",
        "/schema.json",
        "bento_schema",
        "BentoML's own description of the service",
        "pages",
        {200: "BentoSchema"},
        description="BentoML's listing of its API routes (this service "
        "declares none: all its routes are described here).",
    ),
    # The pages.
    Operation(
        "GET",
        "/openapi.json",
        "openapi",
        "This document",
        "pages",
        {200: "OpenAPI"},
        openapi_json,
        description="OpenAPI 3.1, with the limits of the settings in force and the models loaded.",
    ),
    Operation(
        "GET",
        "/",
        "page",
        "The web page: classify a picture in the browser",
        "pages",
        {200: "Html"},
        web.page,
        open=True,
        web=True,
    ),
    Operation(
        "GET",
        "/static/{file}",
        "page_asset",
        "The web page's scripts and styles",
        "pages",
        {200: "Asset", 404: "NotFound"},
        web.page_asset,
        parameters=("page_file",),
        open=True,
        web=True,
    ),
    Operation(
        "GET",
        "/docs",
        "docs",
        "Swagger UI on this document",
        "pages",
        {200: "Html"},
        web.docs,
        open=True,
        web=True,
    ),
    Operation(
        "GET",
        "/docs/{file}",
        "docs_asset",
        "Swagger UI's script and styles",
        "pages",
        {200: "Asset", 404: "NotFound"},
        web.docs_asset,
        parameters=("docs_file",),
        open=True,
        web=True,
    ),
)
REPOSITORY_ROW: JSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "state": {"type": "string", "enum": ["", "READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
        "reason": {"type": "string"},
    },
    "required": ["name", "version", "state", "reason"],
    "additionalProperties": False,
}
REPOSITORY_BODIES: JSON = {
    "RepositoryIndexBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"ready": {"type": "boolean", "description": "Only the READY versions."}},
                    "additionalProperties": False,
                }
            }
        },
    },
    "RepositoryChangeBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "properties": {"unload_dependents": {"type": "boolean"}},
                            "additionalProperties": False,
                        }
                    },
                    "additionalProperties": False,
                }
            }
        },
    },
}
# The router's last route, not an operation: anything else is a JSON 404, a wrong method a JSON 405.
FALLBACK = "/{path:path}"


def operations(settings: Settings) -> list[Operation]:
    """The operations this server has with these settings (the pages only with `web_ui`)."""
    return [op for op in OPERATIONS if settings.web_ui or not op.web]


def build_app(settings: Settings) -> Starlette:
    """Our routes (every operation with a handler), then the JSON 404/405 for everything else."""
    table = [
        Route(op.path, op.handler, methods=[op.method], name=op.operation_id)
        for op in operations(settings)
        if op.handler is not None
    ]
    table.append(
        Route(FALLBACK, routes.not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"], name="fallback")
    )
    return Starlette(routes=table, exception_handlers={HTTPException: routes.http_exception})


def open_rule(settings: Settings) -> Callable[[str], bool]:
    """Whether a path needs no token: the open operations' paths, a `{parameter}` one path segment. The admin
    operations are among them: their handlers check the admin token, never the inference token."""
    patterns = [
        # An admin path's name may hold an encoded '/': its handler refuses it as a name (400), not as a path.
        re.sub(r"\\\{[a-z_]+\\\}", ".+" if op.admin else "[^/]+", re.escape(op.path))
        for op in operations(settings)
        if op.open or op.admin
    ]
    rule = re.compile("|".join(f"(?:{p})" for p in patterns))
    return lambda path: rule.fullmatch(path) is not None


def _success_responses(settings: Settings) -> JSON:
    def answer(description: str, content: JSON, **headers: JSON) -> JSON:
        return {
            "description": description,
            "headers": {"x-request-id": schemas_ref("headers", "RequestId"), **headers},
            "content": content,
        }

    def json_of(*names: str) -> JSON:
        if len(names) == 1:
            return {"application/json": {"schema": schemas.schema_ref(names[0])}}
        return {"application/json": {"schema": {"oneOf": [schemas.schema_ref(n) for n in names]}}}

    text = {"text/plain": {"schema": {"type": "string"}}}
    binary = {
        "schema": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    }
    return {
        "ClassifyResult": answer("The top-k classes, best first.", json_of("ClassifyResult")),
        "BatchResult": answer("One entry per image, in order.", json_of("BatchResult")),
        "Models": answer(
            "Every model with its card (labels left out: their count is given).", json_of("Models")
        ),
        "Live": answer("Live.", json_of("Live")),
        "NotLive": answer("Not live: the core failed to start.", json_of("Live", "Error")),
        "Ready": answer("Ready.", json_of("Ready")),
        "NotReady": answer("Not ready (yet).", json_of("Ready", "Error")),
        "ModelReady": answer("The model is ready.", json_of("ModelReady")),
        "ModelNotReady": answer("The model is not ready.", json_of("ModelReady", "Error")),
        "ServerMetadata": answer(
            "The server's name, version and protocol extensions.", json_of("ServerMetadata")
        ),
        "ModelMetadata": answer("The model's inputs and outputs.", json_of("ModelMetadata")),
        "InferResponse": answer(
            "The outputs: JSON, or (when any output is asked for in binary) a JSON header followed by the "
            "binary outputs.",
            {**json_of("InferResponse"), "application/octet-stream": binary},
            **{"Inference-Header-Content-Length": schemas_ref("headers", "InferenceHeaderContentLength")},
        ),
        "Probe": answer("OK.", text),
        "ProbeFailed": answer("Not live, or not ready.", text),
        "Metrics": answer("Prometheus' text format.", text),
        "BentoSchema": answer("BentoML's schema of the service.", json_of("BentoSchema")),
        "OpenAPI": answer("This document.", {"application/json": {"schema": {"type": "object"}}}),
        "Html": answer("The page.", {"text/html": {"schema": {"type": "string"}}}),
        "RepositoryIndex": answer(
            "The repository's models and versions.",
            {"application/json": {"schema": {"type": "array", "items": REPOSITORY_ROW}}},
        ),
        "RepositoryChanged": answer(
            "Done: the model serves (load) or has left (unload).",
            {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
        ),
        "Asset": answer(
            "The file.",
            {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}},
                "image/svg+xml": {"schema": {"type": "string"}},
            },
        ),
    }


def document(settings: Settings, models: Sequence[str] = ()) -> JSON:
    """The OpenAPI 3.1 document of this server's routes, with these settings and these models."""
    paths: JSON = {}
    for op in operations(settings):
        paths.setdefault(op.path, {})[op.method.lower()] = op.describe(settings)
    parameters = schemas.parameters(settings, models)
    parameters["page_file"] = {
        "name": "file",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": list(web.page_files())},
    }
    parameters["repository_model"] = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "A model of the repository: a plain folder name, never a path.",
    }
    parameters["docs_file"] = {
        "name": "file",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": list(web.SWAGGER_FILES)},
    }
    limits = {
        name: getattr(settings, name)
        for name in (
            "max_request_bytes",
            "max_images_per_request",
            "max_image_pixels",
            "max_aspect_ratio",
            "max_top_k",
            "request_timeout_s",
            "queue_size",
        )
    }
    components: JSON = {
        "schemas": schemas.schemas(settings),
        "parameters": parameters,
        "requestBodies": {**schemas.request_bodies(settings, models), **REPOSITORY_BODIES},
        "responses": {**_success_responses(settings), **schemas.error_responses()},
        "headers": schemas.headers(),
    }
    doc: JSON = {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": server_version(),
            "summary": "Image classification with ONNX Runtime: HTTP, and the Open Inference Protocol v2.",
            "description": "Every error answers `{code, message, request_id, error}` with the request id in "
            "`x-request-id`. Limits in force: " + ", ".join(f"`{k}` {v}" for k, v in limits.items()) + ".",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
            "x-limits": limits,
        },
        "tags": [t for t in TAGS if any(op.tag == t["name"] for op in operations(settings))],
        "paths": paths,
        "components": components,
    }
    if settings.auth_token:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>`: every route but the open ones.",
            }
        }
        doc["security"] = [{"bearer": []}]
    components.setdefault("securitySchemes", {})["admin"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <admin token>` (`--admin-token`): the repository's load and "
        "unload, and nothing else.",
    }
    return doc
