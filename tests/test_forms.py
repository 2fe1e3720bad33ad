"""Form bodies split by `service.http.forms`: what common clients send, parsed as Starlette parses it, and
every malformed body and passed limit refused with its reason; the split runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import urllib3
from skimage import data as photos
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.config import Settings
from service.http import forms
from service.http.forms import FormFile, MalformedForm, parse_form
from service.http.requests import read_images
from tests.http_server import jpeg

PHOTO = jpeg(photos.astronaut())
# File contents that look like the format itself: line ends, dashes, a boundary-like line, a header.
TRICKY = b'\r\n--\r\n--x\r\nContent-Disposition: form-data; name="z"\r\n\r\n\r\n'


def httpx_body(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def requests_body(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/", files=files, data=data).prepare()
    assert isinstance(prepared.body, bytes)
    return prepared.body, prepared.headers["Content-Type"]


def urllib3_body(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, str]:
    fields: list[Any] = list(data.items()) + list(files)
    return urllib3.encode_multipart_formdata(fields)


def aiohttp_body(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, str]:
    async def build() -> tuple[bytes, str]:
        form = aiohttp.FormData()
        for name, value in data.items():
            form.add_field(name, value)
        for name, (filename, content, ctype) in files:
            form.add_field(name, content, filename=filename, content_type=ctype)
        payload = form()

        class Sink:
            def __init__(self) -> None:
                self.data = bytearray()

            async def write(self, chunk: bytes) -> None:
                self.data += chunk

        sink = Sink()
        await payload.write(sink)  # type: ignore[arg-type]
        return bytes(sink.data), payload.content_type

    return asyncio.run(build())


def starlette_items(body: bytes, content_type: str) -> list[tuple[str, Any]]:
    """What Starlette's own form parser makes of `body`, files as (filename, content type, bytes)."""

    async def parse() -> list[tuple[str, Any]]:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
        form = await Request(scope, receive).form(max_files=100)
        items: list[tuple[str, Any]] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((key, (value.filename, value.content_type or "", await value.read())))
            else:
                items.append((key, value))
        await form.close()
        return items

    return asyncio.run(parse())


def as_tuples(items: list[tuple[str, FormFile | str]]) -> list[tuple[str, Any]]:
    return [(k, (v.filename, v.content_type, v.data) if isinstance(v, FormFile) else v) for k, v in items]


@pytest.mark.parametrize("encoder", [httpx_body, requests_body, urllib3_body, aiohttp_body])
def test_what_clients_send_is_read_as_starlette_reads_it(encoder: Any) -> None:
    files = [
        ("files", ("astronaut.jpg", PHOTO, "image/jpeg")),
        ("files", ("tricky name; x=1.bin", TRICKY, "application/octet-stream")),
        ("files", ("empty.png", b"", "image/png")),
        ("file", ("ünïcode.jpg", PHOTO[:1000], "image/jpeg")),
    ]
    data = {"top_k": "3", "tta": "flip", "note": "line one\r\nline two é"}
    body, content_type = encoder(files, data)
    items = parse_form(body, content_type, max_files=10)
    assert as_tuples(items) == starlette_items(body, content_type)
    assert [k for k, v in items if isinstance(v, FormFile)] == ["files", "files", "files", "file"]
    assert dict((k, v) for k, v in items if isinstance(v, str)) == data


def test_preamble_epilogue_padding_and_folded_headers() -> None:
    body = (
        b"a preamble, ignored\r\n--b1\r\n"
        b'Content-Disposition: form-data;\r\n name="files"; filename="a.jpg"\r\n'
        b"content-type: image/jpeg\r\n\r\n" + PHOTO + b"\r\n--b1  \t\r\n"
        b'Content-Disposition: form-data; name="top_k"\r\n\r\n5\r\n--b1--\r\nan epilogue, ignored'
    )
    items = parse_form(body, 'multipart/form-data; boundary="b1"', max_files=2)
    assert as_tuples(items) == [("files", ("a.jpg", "image/jpeg", PHOTO)), ("top_k", "5")]


def test_urlencoded_fields() -> None:
    body = b"top_k=3&tta=ten_crop&note=a+b%20%C3%A9&empty="
    items = parse_form(body, "application/x-www-form-urlencoded", max_files=1)
    assert items == [("top_k", "3"), ("tta", "ten_crop"), ("note", "a b é"), ("empty", "")]


GOOD = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\nJPEG\r\n--b--\r\n'


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (GOOD, "multipart/form-data", "boundary of 1 to 70"),
        (GOOD, "multipart/form-data; boundary=" + "b" * 71, "boundary of 1 to 70"),
        (b"", "multipart/form-data; boundary=b", "boundary is not in it"),
        (GOOD.replace(b"--b", b"--c"), "multipart/form-data; boundary=b", "boundary is not in it"),
        (GOOD[: GOOD.index(b"JPEG") + 4], "multipart/form-data; boundary=b", "ends before its closing"),
        (GOOD[:-8], "multipart/form-data; boundary=b", "ends before its closing"),
        (b"--b\r\n\r\nno headers\r\n--b--", "multipart/form-data; boundary=b", "no Content-Disposition"),
        (b"--bX\r\n" + GOOD[5:], "multipart/form-data; boundary=b", "not followed by a line end"),
        (GOOD.replace(b"form-data", b"attachment"), "multipart/form-data; boundary=b", "not form-data"),
        (GOOD.replace(b' name="files";', b""), "multipart/form-data; boundary=b", "not form-data"),
        (GOOD.replace(b"Content-Disposition:", b"no colon"), "multipart/form-data; boundary=b", "no name"),
        (
            b"--b\r\nX-Long: " + b"a" * forms.MAX_PART_HEADER_BYTES + GOOD[4:],
            "multipart/form-data; boundary=b",
            "headers do not end",
        ),
        (GOOD, "text/plain", "is not a form"),
    ],
)
def test_malformed_bodies_are_refused_with_their_reason(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(MalformedForm, match=reason) as caught:
        parse_form(body, content_type, max_files=5)
    assert caught.value.http_status == 400


def test_limits_are_kept() -> None:
    files = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(4)]
    body, content_type = httpx_body(files, {})
    assert len(parse_form(body, content_type, max_files=4)) == 4
    with pytest.raises(MalformedForm, match="more files than the limit of 3"):
        parse_form(body, content_type, max_files=3)
    one = [("files", ("a.jpg", b"x", "image/jpeg"))]  # a file makes httpx send multipart
    body, content_type = httpx_body(one, {f"f{i}": "v" for i in range(5)})
    with pytest.raises(MalformedForm, match="more text fields than the limit of 4"):
        parse_form(body, content_type, max_files=1, max_fields=4)
    body, content_type = httpx_body(one, {"note": "v" * 101})
    with pytest.raises(MalformedForm, match="'note' passes 100 bytes"):
        parse_form(body, content_type, max_files=1, max_field_bytes=100)
    with pytest.raises(MalformedForm, match="more fields than the limit of 4"):
        parse_form(b"a=1&b=2&c=3&d=4&e=5", "application/x-www-form-urlencoded", max_files=1, max_fields=4)
    with pytest.raises(MalformedForm, match="'a' passes 100 bytes"):
        parse_form(b"a=" + b"v" * 101, "application/x-www-form-urlencoded", max_files=1, max_field_bytes=100)


def test_a_form_is_split_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split runs in a worker thread: the loop's thread only awaits it."""
    threads: list[int] = []
    split = forms.parse_form

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return split(*args, **kwargs)

    monkeypatch.setattr(forms, "parse_form", recorded)
    files = [("files", (f"{i}.jpg", PHOTO, "image/jpeg")) for i in range(3)]
    body, content_type = httpx_body(files, {"top_k": "2"})

    async def read() -> tuple[Any, int]:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": "POST", "headers": headers, "query_string": b""}
        return await read_images(Request(scope, receive), Settings(), many=True), threading.get_ident()

    got, loop_thread = asyncio.run(read())
    assert got.images == [PHOTO] * 3 and got.names == ["0.jpg", "1.jpg", "2.jpg"]
    assert got.params == {"top_k": "2"}
    assert len(threads) == 1 and threads[0] != loop_thread
