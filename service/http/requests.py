"""Reading what HTTP clients send: capped bodies, images from multipart/raw/JSON bodies, query parameters.

This service never fetches a URL (BentoML's own file inputs would download one; our routes do not use them).
Image bytes that are a URL are refused by the decoder (`service.decoding.refuse_url`), on every transport;
here only what never reaches it is checked: a JSON string before base64 decoding, a text form field.

A body is read with two clocks (a pause between two pieces longer than `body_timeout_s`, and the request's
deadline for the whole): one that stops arriving is 408, one whose client goes away is 499 (`ClientGone`).
JSON bodies are parsed by `parsing.parse_json_body`: their memory bounded, never on the event loop; form
bodies are split by `forms.parse_form`, in a thread.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request

from service import limits
from service.config import Settings
from service.decoding import refuse_url
from service.errors import ClientGone, InvalidArgument, RequestTimeout, RequestTooLarge, shown
from service.memory import MemoryBudget

from . import forms
from .parsing import BodyParser, JsonBudget, off_loop, parse_json_body

T = TypeVar("T")
FILE_FIELDS = ("file", "image", "files", "images")


class UnsupportedEncoding(InvalidArgument):
    code = "unsupported_encoding"
    http_status = 415


# Content-Encoding -> zlib window bits ("deflate" is zlib-wrapped by the standard; raw deflate is tried next).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def inflate(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body a gzip or deflate `Content-Encoding` wraps (tritonclient's request compression), inflated
    never past `limit` bytes: a few kilobytes can inflate to gigabytes."""
    codings = [
        c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in _WBITS:
        raise UnsupportedEncoding(
            f"Content-Encoding {shown(content_encoding)} is not supported; send gzip, deflate or identity"
        )
    coding = codings[0]
    for wbits in (_WBITS[coding], -zlib.MAX_WBITS) if coding == "deflate" else (_WBITS[coding],):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise RequestTooLarge(f"request body inflates past the limit of {limit} bytes")
        if inflater.eof and not inflater.unused_data:
            return out
        break
    raise InvalidArgument(f"request body is not complete {coding} data")


def image_from_base64(item: object, where: str) -> bytes:
    """Image bytes from a JSON string: base64, never a URL (refused before decoding)."""
    if not isinstance(item, str):
        raise InvalidArgument(f"{where} must be a base64 string")
    refuse_url(item, where)
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where} is not valid base64") from None


async def read_body(request: Request, limit: int, settings: Settings) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (declared, streamed or inflated
    from a gzip/deflate `Content-Encoding`); 408 when it pauses longer than `body_timeout_s` or is not all
    there by the request's deadline, 499 (`ClientGone`) when the client disconnects first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidArgument("Content-Length is not a number")
        if int(declared) > limit:
            raise RequestTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    # The server's own timeout, not a client's shorter deadline: that one is the core's to enforce (504).
    deadline = arrival(request) + settings.request_timeout_s
    chunks: list[bytes] = []
    total = 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(settings.body_timeout_s, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            with anyio.fail_after(wait):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stopped arriving after {total} bytes (body_timeout_s "
                f"{settings.body_timeout_s:g}, request_timeout_s {settings.request_timeout_s:g})"
            ) from None
        except ClientDisconnect:
            raise ClientGone(f"the client disconnected after sending {total} bytes of the body") from None
        total += len(chunk)
        if total > limit:
            raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "")
    if encoding.strip():
        body = await off_loop(inflate, body, encoding, limit)
    return body


def json_budget(request: Request, settings: Settings, memory: MemoryBudget | None) -> JsonBudget:
    """The bound on a JSON body of this request: `json_memory_factor`, reserved from `memory`."""
    return JsonBudget(settings.json_memory_factor, memory, deadline_of(request, settings))


@dataclass
class ImageRequest:
    images: list[bytes]
    names: list[str]
    params: dict[str, str]


# The keys of /classify and /classify_batch JSON bodies (the document's schemas say the same).
IMAGE_KEYS = ("image", "images")
OPTION_KEYS = ("model", "version", "top_k", "tta")


async def read_images(
    request: Request,
    settings: Settings,
    memory: MemoryBudget | None = None,
    parser: BodyParser | None = None,
    *,
    many: bool,
) -> ImageRequest:
    """Images and parameters from multipart form, a JSON body (base64 images) or a raw image body; a JSON
    body is parsed by `parsing.parse_json_body` (bounded by `json_memory_factor`, reserved from `memory`)."""
    body = await read_body(request, settings.max_request_bytes, settings)
    params = {k: v for k, v in request.query_params.items()}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: list[bytes] = []
    names: list[str] = []
    if ctype in forms.KINDS:
        # One file more than the limit: `limits.check_count` then refuses it as every transport does.
        parse = functools.partial(forms.parse_form, max_files=settings.max_images_per_request + 1)
        items = await off_loop(parse, body, request.headers.get("content-type", ""))
        for key, value in items:
            if isinstance(value, forms.FormFile):
                images.append(value.data)
                names.append(value.filename or key)
            elif key in FILE_FIELDS:
                refuse_url(value, f"field {key!r}")
                raise InvalidArgument(f"field {key!r} must be a file upload, not a text value")
            else:
                params[key] = value
    elif ctype == "application/json":
        budget = json_budget(request, settings, memory)
        then = functools.partial(_json_images, max_items=settings.max_images_per_request, many=many)
        images, options = await parse_json_body(body, len(body), "body", then, budget, parser)
        names = [str(i) for i in range(len(images))]
        params.update(options)
    else:
        if body:
            images.append(body)
            names.append("body")
    if not images:
        raise InvalidArgument(
            "no image in the request: send a multipart file, a raw image body or JSON base64"
        )
    if not many and len(images) > 1:
        raise InvalidArgument(f"/classify takes one image, got {len(images)}; use /classify_batch")
    limits.check_count(len(images), settings.max_images_per_request)
    return ImageRequest(images, names, params)


def _json_images(
    doc: Any, rest: memoryview, max_items: int, many: bool
) -> tuple[list[bytes], dict[str, str]]:
    """The images (base64-decoded) and options of a parsed JSON body (`rest`: nothing follows the JSON);
    blocking, in a thread or a parsing process."""
    if not isinstance(doc, dict):
        raise InvalidArgument("JSON body must be an object with 'image' or 'images' (base64)")
    unknown = set(doc) - {*IMAGE_KEYS, *OPTION_KEYS}
    if unknown:
        raise InvalidArgument(
            f"unknown keys {shown(sorted(unknown))} in the body; it takes {[*IMAGE_KEYS, *OPTION_KEYS]}"
        )
    raw = doc.get("images") if many else doc.get("image")
    if raw is None:
        raw = doc.get("image") if many else None
    items = raw if isinstance(raw, list) else [raw] if raw is not None else []
    if items:  # counted before any of them is decoded; none is answered below
        limits.check_count(len(items), max_items)
    images = [image_from_base64(item, f"image {i}") for i, item in enumerate(items)]
    options = {key: str(doc[key]) for key in OPTION_KEYS if key in doc and doc[key] is not None}
    return images, options


def arrival(request: Request) -> float:
    """When the request's headers were in (`time.monotonic()`, set by the middleware): its deadlines count
    from then, not from the end of its wait for room in the receive budget."""
    arrived = request.scope.get("state", {}).get("arrived")
    return float(arrived) if arrived is not None else time.monotonic()


def timeout_s(raw: str | None, settings: Settings) -> float:
    """A request's time in seconds: the configured timeout, or less if `x-request-timeout-ms` (`raw`) asks (a
    client may shorten its deadline, never lengthen it past the server's, as with gRPC's)."""
    if raw is None:
        return settings.request_timeout_s
    try:
        asked = float(raw) / 1000.0
    except ValueError:
        raise InvalidArgument(f"x-request-timeout-ms must be a number, not {shown(raw)}") from None
    if not (math.isfinite(asked) and asked > 0):
        raise InvalidArgument(f"x-request-timeout-ms must be a positive number, not {shown(raw)}")
    return min(settings.request_timeout_s, asked)


def deadline_of(request: Request, settings: Settings) -> float:
    """Absolute `time.monotonic()` deadline, from the request's arrival (`timeout_s`)."""
    return arrival(request) + timeout_s(request.headers.get("x-request-timeout-ms"), settings)
