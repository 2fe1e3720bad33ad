"""Reading what HTTP clients send: capped bodies, images from multipart/raw/JSON bodies, query parameters.

This service never fetches a URL (BentoML's own file inputs would download one; our routes do not use them).
Image bytes that are a URL are refused by the decoder (`service.decoding.refuse_url`), on every transport;
here only what never reaches it is checked: a JSON string before base64 decoding, a text form field.

A body is read with two clocks (a pause between two pieces longer than `body_timeout_s`, and the request's
deadline for the whole): one that stops arriving is 408, one whose client goes away is 499 (`ClientGone`).
JSON costs more once parsed than as text (ten million `{}` take 30 bytes each), so a JSON body's cost is
estimated from its text before it is parsed (`json_cost`), refused past `json_memory_factor` times its size
and reserved from the decode memory budget while it is parsed; parsing, inflating and base64 decoding run in
a worker thread (`off_loop`), never on the event loop that every connection shares.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from service import limits
from service.config import Settings
from service.decoding import refuse_url
from service.errors import ClientGone, InvalidArgument, RequestTimeout, RequestTooLarge, shown
from service.memory import MemoryBudget

T = TypeVar("T")
# What parsing costs beyond the text, by the characters that make Python objects (CPython 3.10 to 3.13,
# measured with tracemalloc; tests/test_http_hostile.py checks the estimate against measured peaks): each
# object (a dict, its entries, a list and its slots, a string) and twice the text (the decoded str and the
# strings' contents). Counted anywhere, strings included: base64 holds none of them, and more is safer.
JSON_COSTS = {b"{": 200, b"[": 100, b",": 48, b":": 64, b'"': 28}
JSON_TEXT_COST = 2
# Bodies whose estimate is under this are never refused by `json_memory_factor`: a small request's objects
# cost more than its text does, and little in all.
JSON_FREE_BYTES = 64 * 1024

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


def parse_json(data: bytes, what: str) -> Any:
    """JSON, or InvalidArgument: malformed text, and nesting too deep for the parser (RecursionError)."""
    try:
        return json.loads(data or b"null")
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{what} is not valid JSON (or nests too deep)") from None


def json_cost(data: bytes | memoryview) -> int:
    """Bytes that parsing `data` may take at its peak, by estimate (an upper bound for what JSON can say),
    from counts that cost a pass over the text each and no object."""
    raw = bytes(data) if isinstance(data, memoryview) else data
    return JSON_TEXT_COST * len(raw) + sum(raw.count(char) * cost for char, cost in JSON_COSTS.items())


@dataclass(frozen=True)
class JsonBudget:
    """How much a JSON body may cost once parsed: `factor` times its size, reserved from `memory` (the decode
    memory budget, which bounds what every request being parsed or decoded holds at once) until `deadline`."""

    factor: float
    memory: MemoryBudget | None = None
    deadline: float | None = None

    def parse(self, data: bytes | memoryview, what: str, then: Callable[[Any], T]) -> T:
        """`then(parsed)`, with the parse's estimated cost reserved until it returns: `then` turns the parsed
        objects into compact ones (arrays, bytes) and drops the rest, so nothing big outlives it."""
        cost = json_cost(data)
        if cost > max(JSON_FREE_BYTES, self.factor * len(data)):
            raise RequestTooLarge(
                f"{what} would take about {_mib(cost)} MiB once parsed, more than {self.factor:g} times its "
                f"{len(data)} bytes (json_memory_factor): send tensors as binary data"
            )
        memory = self.memory
        if memory is not None and cost > memory.capacity:
            raise RequestTooLarge(
                f"{what} would take about {_mib(cost)} MiB once parsed; the limit is "
                f"{_mib(memory.capacity)} MiB (decode_memory_mb)"
            )
        if memory is not None:
            memory.acquire(cost, self.deadline)
        try:
            return then(parse_json(bytes(data), what))
        finally:
            if memory is not None:
                memory.release(cost)


def _mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f}"


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread: parsing and decoding a large body takes tenths of a second, which on
    the event loop would hold up every other connection, HTTP and gRPC alike."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


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
    deadline = deadline_of(request, settings)
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
    request._body = body  # Starlette's form parser reads the cached body instead of the spent stream.
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
    request: Request, settings: Settings, memory: MemoryBudget | None = None, *, many: bool
) -> ImageRequest:
    """Images and parameters from multipart form, a JSON body (base64 images) or a raw image body; a JSON
    body's parse is bounded by `json_memory_factor` and reserved from `memory`."""
    body = await read_body(request, settings.max_request_bytes, settings)
    params = {k: v for k, v in request.query_params.items()}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: list[bytes] = []
    names: list[str] = []
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(
                max_files=settings.max_images_per_request + 1, max_fields=64, max_part_size=1024 * 1024
            )
        except (HTTPException, MultiPartException) as exc:  # Starlette's answer to a malformed body
            raise InvalidArgument(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
                names.append(value.filename or key)
            elif key in FILE_FIELDS:
                refuse_url(value, f"field {key!r}")
                raise InvalidArgument(f"field {key!r} must be a file upload, not a text value")
            else:
                params[key] = value
    elif ctype == "application/json":
        budget = json_budget(request, settings, memory)
        then = functools.partial(_json_images, max_items=settings.max_images_per_request, many=many)
        images, options = await off_loop(budget.parse, body, "body", then)
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


def _json_images(doc: Any, max_items: int, many: bool) -> tuple[list[bytes], dict[str, str]]:
    """The images (base64-decoded) and options of a parsed JSON body; blocking (a worker thread's work)."""
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


def deadline_of(request: Request, settings: Settings) -> float:
    """Absolute `time.monotonic()` deadline: the configured timeout, or less if `x-request-timeout-ms` asks
    (a client may shorten its deadline, never lengthen it past the server's, as with gRPC's)."""
    raw = request.headers.get("x-request-timeout-ms")
    seconds = settings.request_timeout_s
    if raw is not None:
        try:
            asked = float(raw) / 1000.0
        except ValueError:
            raise InvalidArgument(f"x-request-timeout-ms must be a number, not {shown(raw)}") from None
        if not (math.isfinite(asked) and asked > 0):
            raise InvalidArgument(f"x-request-timeout-ms must be a positive number, not {shown(raw)}")
        seconds = min(seconds, asked)
    return time.monotonic() + seconds
