"""The JSON Schemas (2020-12, what OpenAPI 3.1 speaks) of what the HTTP routes take and answer.

Written by hand beside the routes, and checked against them: every response the HTTP tests receive is
validated against the document these build (`tests/test_openapi.py`), and Schemathesis fuzzes the routes from
it. The limits in them are the `Settings` in force, and the error codes come from the typed errors themselves
(`service.errors`), so that the document says what this server does, not what it once did.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from service import augmentation, oip
from service.card import PREPROCESS_MODES
from service.config import Settings
from service.errors import ServiceError
from service.logs import REQUEST_ID
from service.models import LOADING, READY, UNAVAILABLE, UNLOADING

from .requests import UnsupportedEncoding

JSON = dict[str, Any]
STATES = (LOADING, READY, UNLOADING, UNAVAILABLE)  # a model version's, as `GET /models` says it

# Codes answered by the router and the middleware rather than by a typed error: a path with no route, a
# method the path does not take, a fault of the server, a request that arrives before the core exists.
ROUTER_CODES: dict[int, tuple[str, ...]] = {
    404: ("not_found",),
    405: ("method_not_allowed",),
    500: ("internal",),
    503: ("unavailable",),
}

# The error responses of components/responses: status -> (name, what it means).
ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request is invalid: the message says what is wrong with it."),
    401: ("Unauthorized", "The bearer token is missing or wrong."),
    404: ("NotFound", "No such model or version (or no such route)."),
    405: ("MethodNotAllowed", "The path exists, not for this method; `Allow` names the methods it takes."),
    408: (
        "RequestTimeout",
        "The request body paused longer than `body_timeout_s`, or was not all there within the request's "
        "timeout; the connection is closed.",
    ),
    413: ("PayloadTooLarge", "The request body, as sent or once inflated, is over `max_request_bytes`."),
    415: ("UnsupportedMediaType", "A `Content-Encoding` other than gzip, deflate or identity."),
    499: (
        "ClientClosedRequest",
        "The client disconnected before its answer: never received, it is the status the access log and "
        "the metrics record, and the work left is dropped.",
    ),
    500: ("InternalError", "A fault of the server: the body has the request id under which the log has it."),
    503: (
        "ServiceUnavailable",
        "Overloaded (with `Retry-After`), the model could not be loaded, or the service is still starting.",
    ),
    504: ("GatewayTimeout", "The request's deadline passed before its answer."),
}


def error_codes() -> dict[int, tuple[str, ...]]:
    """Every error code the service answers, by HTTP status: the typed errors' own, and the router's."""
    codes: dict[int, set[str]] = {status: set(names) for status, names in ROUTER_CODES.items()}
    seen: list[type[ServiceError]] = [ServiceError, UnsupportedEncoding]
    while seen:
        cls = seen.pop()
        seen.extend(cls.__subclasses__())
        if cls is not ServiceError:
            codes.setdefault(cls.http_status, set()).add(cls.code)
    return {status: tuple(sorted(names)) for status, names in sorted(codes.items())}


def _ref(kind: str, name: str) -> JSON:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema_ref(name: str) -> JSON:
    return _ref("schemas", name)


def top_k_schema(settings: Settings) -> JSON:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": settings.max_top_k,
        "description": f"How many classes to answer: 1 to {settings.max_top_k} (`max_top_k`), and at most "
        "the model's class count. Default 5, or every class of a model with fewer.",
    }


def _top_k_field(settings: Settings) -> JSON:
    """`top_k` in a form field or a JSON body: a number, or its digits as a string."""
    return {
        "oneOf": [top_k_schema(settings), {"type": "string", "pattern": "^[0-9]{1,9}$"}],
        "description": top_k_schema(settings)["description"],
    }


def _model_schema(models: Sequence[str]) -> JSON:
    schema: JSON = {"type": "string", "description": "A model of the repository (`GET /models`)."}
    if models:
        schema["enum"] = sorted(set(models))
    return schema


# An 8x8 PNG, the example image of the JSON bodies (Swagger UI's "Try it out" sends it as it is).
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC"
)
BINARY: JSON = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
VERSION_SCHEMA: JSON = {
    "type": "string",
    "pattern": "^[1-9][0-9]*$",
    "description": "A version of the model (a positive integer); default: its latest.",
}
TTA_SCHEMA: JSON = {
    "type": "string",
    "enum": list(augmentation.MODES),
    "default": "none",
    "description": "Test-time augmentation: the views averaged (`flip` 2, `five_crop` 5, `ten_crop` 10, "
    "`multiscale` 30).",
}


def _option_fields(settings: Settings, models: Sequence[str]) -> JSON:
    return {
        "model": _model_schema(models),
        "version": VERSION_SCHEMA,
        "top_k": _top_k_field(settings),
        "tta": TTA_SCHEMA,
    }


def parameters(settings: Settings, models: Sequence[str]) -> JSON:
    """components/parameters: the query strings, path segments and headers the routes read."""

    def query(name: str, schema: JSON, description: str) -> JSON:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return {
        "model": query("model", _model_schema(models), f"The model; default `{settings.default_model}`."),
        "version": query("version", VERSION_SCHEMA, VERSION_SCHEMA["description"]),
        "top_k": query("top_k", top_k_schema(settings), top_k_schema(settings)["description"]),
        "tta": query("tta", TTA_SCHEMA, TTA_SCHEMA["description"]),
        "name": {
            "name": "name",
            "in": "path",
            "required": True,
            "schema": _model_schema(models),
            "description": "The model.",
        },
        "path_version": {
            "name": "version",
            "in": "path",
            "required": True,
            "schema": VERSION_SCHEMA,
            "description": "The model's version.",
        },
        "request_id": {
            "name": "x-request-id",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
            "description": "The client's request id, echoed in the answer's `x-request-id`, the error body "
            "and the access log; anything else is replaced by a new one.",
        },
        "request_timeout": {
            "name": "x-request-timeout-ms",
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "A shorter deadline than the server's `request_timeout_s` "
            f"({settings.request_timeout_s:g} s), in milliseconds; never a longer one.",
        },
        "content_encoding": {
            "name": "Content-Encoding",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "enum": ["gzip", "x-gzip", "deflate", "identity"]},
            "description": "A compressed body is inflated, never past `max_request_bytes` "
            f"({settings.max_request_bytes} bytes); another coding is 415.",
        },
        "header_length": {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Triton's binary tensor data extension: the size of the JSON header at the start "
            "of the body; the bytes after it hold the inputs that give `parameters.binary_data_size`.",
        },
    }


def _base64(settings: Settings, what: str) -> JSON:
    return {
        "type": "string",
        "contentEncoding": "base64",
        "maxLength": settings.max_request_bytes,
        "description": f"{what}, base64 (never a URL: this server fetches none).",
    }


def request_bodies(settings: Settings, models: Sequence[str]) -> JSON:
    """components/requestBodies: images as multipart files, a raw body or JSON base64; OIP tensors."""
    limit = settings.max_request_bytes
    n = settings.max_images_per_request
    binary = BINARY
    raw = {
        "schema": {**binary, "description": f"The image's bytes, at most {limit} bytes."},
    }
    options = _option_fields(settings, models)
    image_types = ", ".join(f"`{f}`" for f in ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF"))
    return {
        "ClassifyBody": {
            "required": True,
            "description": f"One image ({image_types}), of at most {limit} bytes with the rest of the "
            "request, and at most `max_image_pixels` "
            f"({settings.max_image_pixels}) pixels, `max_aspect_ratio` ({settings.max_aspect_ratio:g}). The "
            "options may come as query parameters, form fields or JSON keys.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {**binary, "description": "The image."}, **options},
                        "required": ["file"],
                    },
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": _base64(settings, "The image"), **options},
                        "required": ["image"],
                        "additionalProperties": False,
                    },
                    "example": {"image": EXAMPLE_PNG, "top_k": 3, "tta": "flip"},
                },
                "image/*": raw,
                "application/octet-stream": raw,
            },
        },
        "ClassifyBatchBody": {
            "required": True,
            "description": f"1 to {n} images (`max_images_per_request`), at most {limit} bytes in all; a bad "
            "image fails only its own entry of the answer.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": binary,
                                "minItems": 1,
                                "maxItems": n,
                                "description": "The images (one `files` part each).",
                            },
                            **options,
                        },
                        "required": ["files"],
                    },
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": _base64(settings, "An image"),
                                "minItems": 1,
                                "maxItems": n,
                            },
                            **options,
                        },
                        "required": ["images"],
                        "additionalProperties": False,
                    },
                    "example": {"images": [EXAMPLE_PNG, EXAMPLE_PNG], "top_k": 2},
                },
            },
        },
        "InferBody": {
            "required": True,
            "description": f"An Open Inference Protocol inference request, at most {limit} bytes. With "
            "`Inference-Header-Content-Length`, the body is that many bytes of JSON followed by the binary "
            "data of the inputs that give `parameters.binary_data_size`.",
            "content": {
                "application/json": {
                    "schema": schema_ref("InferRequest"),
                    "example": {
                        "id": "example-1",
                        "inputs": [
                            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG]}
                        ],
                        "parameters": {"top_k": 3},
                    },
                },
                "application/octet-stream": {
                    "schema": {**binary, "description": "JSON header, then binary tensor data."}
                },
            },
        },
    }


def _object(properties: JSON, required: Sequence[str] | None = None, closed: bool = True) -> JSON:
    out: JSON = {"type": "object", "properties": properties, "required": list(required or properties)}
    if closed:
        out["additionalProperties"] = False
    return out


def _tensor(with_data: bool) -> JSON:
    """An OIP tensor: its values as a flat or nested JSON list (BYTES elements as strings)."""
    properties: JSON = {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BYTES", *oip.DATATYPES]},
        "shape": {"type": "array", "items": {"type": "integer"}, "maxItems": 32},
        "parameters": {"type": "object"},
    }
    if with_data:
        properties["data"] = {"type": "array"}
    return properties


def schemas(settings: Settings) -> JSON:
    """components/schemas."""
    codes = [code for names in error_codes().values() for code in names]
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    class_score = _object(
        {
            "index": {"type": "integer", "minimum": 0},
            "id": {"type": "string"},
            "label": {"type": "string"},
            "probability": probability,
        }
    )
    predictions = {"type": "array", "items": schema_ref("ClassScore"), "minItems": 1}
    tensor_metadata = _object(
        {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        }
    )
    return {
        "Error": _object(
            {
                "code": {"type": "string", "enum": sorted(set(codes))},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
                "error": {
                    "type": "string",
                    "description": "The message again: the Open Inference "
                    "Protocol's field, which KServe's and Triton's clients read.",
                },
            }
        ),
        "ClassScore": class_score,
        "ClassifyResult": _object(
            {
                "model": {"type": "string"},
                "version": {"type": "string"},
                "predictions": predictions,
                "request_id": {"type": "string"},
            }
        ),
        "BatchEntry": {
            "oneOf": [
                _object(
                    {
                        "index": {"type": "integer", "minimum": 0},
                        "filename": {"type": "string"},
                        "model": {"type": "string"},
                        "version": {"type": "string"},
                        "predictions": predictions,
                    }
                ),
                _object(
                    {
                        "index": {"type": "integer", "minimum": 0},
                        "filename": {"type": "string"},
                        "error": _object(
                            {
                                "code": {"type": "string", "enum": sorted(set(codes))},
                                "message": {"type": "string"},
                            }
                        ),
                    }
                ),
            ]
        },
        "BatchResult": _object(
            {
                "results": {"type": "array", "items": schema_ref("BatchEntry")},
                "succeeded": {"type": "integer", "minimum": 0},
                "failed": {"type": "integer", "minimum": 0},
                "request_id": {"type": "string"},
            }
        ),
        "ModelInfo": _object(
            {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": list(STATES)},
                "reason": {"type": "string", "description": "Why the model is not ready; empty when it is."},
                "provider": {"type": "string", "description": "The ONNX Runtime provider it runs on."},
                "label_count": {"type": "integer", "minimum": 0},
                "in_flight": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Requests holding this version.",
                },
                "description": {"type": "string"},
                "input": {"type": "object"},
                "output": {"type": "object"},
                "preprocessing": {"type": "object"},
                "preprocessing_agreement": {
                    "oneOf": [
                        {"type": "null"},
                        _object(
                            {
                                "mode": {"type": "string", "enum": list(PREPROCESS_MODES)},
                                "top1": {"type": "number", "minimum": 0, "maximum": 1},
                                "top5": {"type": "number", "minimum": 0, "maximum": 1},
                                "inputs": {"type": "integer", "minimum": 1},
                                "reference": {"type": "string"},
                                "measured": {"type": "string"},
                            }
                        ),
                    ],
                    "description": "How often the default preprocessing mode gives the model's answer under "
                    "its reference transform: top-1 and top-5 agreement over `inputs` photos; null where not "
                    "measured.",
                },
            },
            required=["name", "version", "state", "reason", "provider", "label_count"],
            closed=False,
        ),
        "Models": _object(
            {
                "models": {"type": "array", "items": schema_ref("ModelInfo")},
                "default_model": {"type": "string"},
            }
        ),
        "Live": _object({"live": {"type": "boolean"}}),
        "Ready": _object({"ready": {"type": "boolean"}}),
        "ModelReady": _object({"name": {"type": "string"}, "ready": {"type": "boolean"}}),
        "ServerMetadata": _object(
            {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "TensorMetadata": tensor_metadata,
        "ModelMetadata": _object(
            {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": schema_ref("TensorMetadata")},
                "outputs": {"type": "array", "items": schema_ref("TensorMetadata")},
            }
        ),
        "InferRequest": _object(
            {
                "id": {"type": "string", "description": "Echoed in the answer."},
                "inputs": {
                    "type": "array",
                    "items": _object(_tensor(True), required=["name", "datatype", "shape"]),
                    "description": "`image` (BYTES: encoded images, base64 in JSON) or the model's FP32 "
                    f"input (preprocessed NCHW); at most {settings.max_images_per_request} images or "
                    "samples.",
                },
                "outputs": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": {"type": "string", "enum": list(oip.OUTPUT_NAMES)},
                            "parameters": {
                                "type": "object",
                                "properties": {
                                    "classification": {"type": "integer", "minimum": 0},
                                    "binary_data": {"type": "boolean"},
                                },
                                "additionalProperties": False,
                            },
                        },
                        required=["name"],
                    ),
                    "description": "The outputs wanted (absent or empty: every one).",
                },
                "parameters": {
                    "type": "object",
                    "properties": {
                        "top_k": {"oneOf": [top_k_schema(settings), {"type": "string"}]},
                        "tta": TTA_SCHEMA,
                        "binary_data_output": {"type": "boolean"},
                    },
                },
            },
            required=["inputs"],
        ),
        "InferResponse": _object(
            {
                "id": {"type": "string"},
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "outputs": {
                    "type": "array",
                    "items": _object(_tensor(True), required=["name", "datatype", "shape"]),
                },
            },
            required=["model_name", "model_version", "outputs"],
        ),
        "BentoSchema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
            "required": ["name"],
        },
    }


def headers() -> JSON:
    """components/headers: what answers carry besides their body."""
    return {
        "RequestId": {
            "required": True,
            "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
            "description": "The request id: the client's `x-request-id`, or one made by the server.",
        },
        "RetryAfter": {
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
            "description": "Seconds to wait before trying again (an overloaded or starting server).",
        },
        "WWWAuthenticate": {"required": True, "schema": {"type": "string"}, "description": "`Bearer`."},
        "Allow": {
            "required": True,
            "schema": {"type": "string"},
            "description": "The methods the path takes.",
        },
        "InferenceHeaderContentLength": {
            "schema": {"type": "integer", "minimum": 0},
            "description": "With a binary answer: the size of the JSON header before the binary outputs.",
        },
    }


def error_response_name(status: int) -> str:
    """The name of a status's error response in components/responses: `BadRequest`, `NotFound`..."""
    if status in ERROR_RESPONSES:
        return ERROR_RESPONSES[status][0]
    return "".join(word.capitalize() for word in HTTPStatus(status).phrase.replace("-", " ").split())


def error_responses() -> JSON:
    """components/responses of the errors, one per status a typed error has: the one error body, its code
    among those of the status."""
    codes = error_codes()
    out: JSON = {}
    for status in sorted(set(codes) | set(ERROR_RESPONSES)):
        name = error_response_name(status)
        description = (
            ERROR_RESPONSES[status][1] if status in ERROR_RESPONSES else f"{HTTPStatus(status).phrase}."
        )
        extra: JSON = {}
        if status == 401:
            extra["WWW-Authenticate"] = _ref("headers", "WWWAuthenticate")
        if status == 405:
            extra["Allow"] = _ref("headers", "Allow")
        if status == 503:
            extra["Retry-After"] = _ref("headers", "RetryAfter")
        names = codes.get(status, ())
        schema = {"allOf": [schema_ref("Error"), {"properties": {"code": {"enum": list(names)}}}]}
        out[name] = {
            "description": f"{description} Codes: {', '.join(f'`{c}`' for c in names)}.",
            "headers": {"x-request-id": _ref("headers", "RequestId"), **extra},
            "content": {"application/json": {"schema": schema}},
        }
    return out
