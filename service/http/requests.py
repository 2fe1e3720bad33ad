"""Reading what HTTP clients send: capped bodies, images from multipart/raw/JSON bodies, query parameters.

This service never fetches a URL (BentoML's own file inputs would download one; our routes do not use them).
Image bytes that are a URL are refused by the decoder (`service.decoding.refuse_url`), on every transport;
here only what never reaches it is checked: a JSON string before base64 decoding, a text form field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service import limits
from service.config import Settings
from service.decoding import refuse_url
from service.errors import InvalidArgument, RequestTooLarge, shown

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


def image_from_base64(item: object, where: str) -> bytes:
    """Image bytes from a JSON string: base64, never a URL (refused before decoding)."""
    if not isinstance(item, str):
        raise InvalidArgument(f"{where} must be a base64 string")
    refuse_url(item, where)
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where} is not valid base64") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (declared, streamed or inflated
    from a gzip/deflate `Content-Encoding`)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidArgument("Content-Length is not a number")
        if int(declared) > limit:
            raise RequestTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = inflate(b"".join(chunks), request.headers.get("content-encoding", ""), limit)
    request._body = body  # Starlette's form parser reads the cached body instead of the spent stream.
    return body


@dataclass
class ImageRequest:
    images: list[bytes]
    names: list[str]
    params: dict[str, str]


async def read_images(request: Request, settings: Settings, *, many: bool) -> ImageRequest:
    """Images and parameters from multipart form, a JSON body (base64 images) or a raw image body."""
    body = await read_body(request, settings.max_request_bytes)
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
        doc = parse_json(body, "body")
        if not isinstance(doc, dict):
            raise InvalidArgument("JSON body must be an object with 'image' or 'images' (base64)")
        raw = doc.get("images") if many else doc.get("image")
        if raw is None:
            raw = doc.get("image") if many else None
        items = raw if isinstance(raw, list) else [raw] if raw is not None else []
        if items:  # counted before any of them is decoded; none is answered below
            limits.check_count(len(items), settings.max_images_per_request)
        for i, item in enumerate(items):
            images.append(image_from_base64(item, f"image {i}"))
            names.append(str(i))
        for key in ("model", "version", "top_k", "tta"):
            if key in doc and doc[key] is not None:
                params[key] = str(doc[key])
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
