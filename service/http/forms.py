"""Form bodies (`multipart/form-data`, `application/x-www-form-urlencoded`), split from the whole body in a
worker thread.

Starlette parses a form on the event loop as its pieces arrive: Python callbacks for every piece and part, and
each file of more than 1 MiB spooled to a temporary file on disk, all on the loop's time, so a batch of large
photos held every connection (`bench/bench_hostile.py --abuse big_form`). Here the body is already in memory
and its size checked (`requests.read_body`): it is split with `bytes.find`, in C, in a thread
(`parsing.off_loop`), and each file costs one copy of its bytes. The limits are Starlette's: files, text
fields, a text field's size. The header parameters are read by python-multipart's parser, as Starlette reads
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from python_multipart.multipart import parse_options_header

from service.errors import InvalidArgument

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
KINDS = (MULTIPART, URLENCODED)

MAX_BOUNDARY = 70  # RFC 2046
MAX_PART_HEADER_BYTES = 16 * 1024  # the header lines of one part
MAX_PADDING = 64  # the spaces a sender may leave after a boundary, before its line end
MAX_TEXT_FIELDS = 64
MAX_FIELD_BYTES = 1024 * 1024  # one text field


class MalformedForm(InvalidArgument):
    """A form body that does not follow its format, or passes one of the limits."""


@dataclass(frozen=True)
class FormFile:
    filename: str
    content_type: str
    data: bytes


FormItem = tuple[str, "FormFile | str"]  # a field's name and its file or text, in the body's order


def parse_form(
    body: bytes,
    content_type: str,
    *,
    max_files: int,
    max_fields: int = MAX_TEXT_FIELDS,
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> list[FormItem]:
    """The fields of a form body, in order; MalformedForm if it is not one or passes a limit."""
    kind, options = parse_options_header(content_type)
    charset = _text(options.get(b"charset", b"utf-8"), "latin-1")
    if kind == MULTIPART.encode():
        return _multipart(
            body, options.get(b"boundary", b""), charset, max_files, max_fields, max_field_bytes
        )
    if kind == URLENCODED.encode():
        return _urlencoded(body, max_fields, max_field_bytes)
    raise MalformedForm(f"Content-Type {kind.decode('latin-1')[:64]!r} is not a form")


def _text(data: bytes, charset: str) -> str:
    """Text in the form's charset, or Latin-1 where it is not valid (Starlette's rule: never an error)."""
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")


def _multipart(
    body: bytes, boundary: bytes, charset: str, max_files: int, max_fields: int, max_field_bytes: int
) -> list[FormItem]:
    if not 0 < len(boundary) <= MAX_BOUNDARY:
        raise MalformedForm(
            f"malformed multipart body: the Content-Type needs a boundary of 1 to {MAX_BOUNDARY} characters"
        )
    delimiter = b"--" + boundary
    between = b"\r\n" + delimiter  # ends each part's content
    if body.startswith(delimiter):
        at = len(delimiter)
    else:  # a preamble, which is ignored
        found = body.find(between)
        if found < 0:
            raise MalformedForm("malformed multipart body: its boundary is not in it")
        at = found + len(between)
    items: list[FormItem] = []
    files = fields = 0
    while not body.startswith(b"--", at):  # "--" after a boundary closes the body; an epilogue is ignored
        line_end = body.find(b"\r\n", at, at + MAX_PADDING + 2)
        if line_end < 0 or body[at:line_end].strip(b" \t"):
            raise MalformedForm("malformed multipart body: a boundary is not followed by a line end")
        start = line_end + 2
        end = body.find(between, start)
        if end < 0:
            raise MalformedForm("malformed multipart body: it ends before its closing boundary")
        name, filename, part_type, content = _part(body, start, end, charset)
        if filename is not None:
            files += 1
            if files > max_files:
                raise MalformedForm(f"malformed multipart body: more files than the limit of {max_files}")
            items.append((name, FormFile(filename, part_type, body[content:end])))
        else:
            fields += 1
            if fields > max_fields:
                raise MalformedForm(
                    f"malformed multipart body: more text fields than the limit of {max_fields}"
                )
            if end - content > max_field_bytes:
                raise MalformedForm(
                    f"malformed multipart body: text field {name[:64]!r} passes {max_field_bytes} bytes"
                )
            items.append((name, _text(body[content:end], charset)))
        at = end + len(between)
    return items


def _part(body: bytes, start: int, end: int, charset: str) -> tuple[str, str | None, str, int]:
    """A part's field name, file name (None for a text field), content type and where its content starts."""
    if body.startswith(b"\r\n", start):  # no header at all: no field name either
        raise MalformedForm("malformed multipart body: a part has no Content-Disposition")
    head_end = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEADER_BYTES))
    if head_end < 0:
        raise MalformedForm(
            f"malformed multipart body: a part's headers do not end within {MAX_PART_HEADER_BYTES} bytes"
        )
    headers: dict[bytes, bytes] = {}
    last = b""
    for line in body[start:head_end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and last:  # a folded line continues the header before it
            headers[last] += b" " + line.strip()
            continue
        key, colon, value = line.partition(b":")
        if not colon or not key.strip():
            raise MalformedForm("malformed multipart body: a part's header line has no name")
        last = key.strip().lower()
        headers[last] = value.strip()
    disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
    if disposition != b"form-data" or b"name" not in options:
        raise MalformedForm(
            "malformed multipart body: a part's Content-Disposition is not form-data with a name"
        )
    filename = options.get(b"filename")
    return (
        _text(options[b"name"], charset),
        None if filename is None else _text(filename, charset),
        _text(headers.get(b"content-type", b""), "latin-1"),
        head_end + 4,
    )


def _urlencoded(body: bytes, max_fields: int, max_field_bytes: int) -> list[FormItem]:
    try:
        pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True, max_num_fields=max_fields)
    except ValueError:  # the only error parse_qsl raises here: more fields than max_num_fields
        raise MalformedForm(f"malformed form body: more fields than the limit of {max_fields}") from None
    for name, value in pairs:
        if len(value) > max_field_bytes:
            raise MalformedForm(f"malformed form body: field {name[:64]!r} passes {max_field_bytes} bytes")
    return list(pairs)
