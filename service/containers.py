"""Walks of the JPEG, PNG and GIF containers, before Pillow parses them.

Pillow's parsers take each JPEG marker segment, each PNG chunk, each GIF sub-block, and each fill or stray
byte between JPEG markers, in a Python loop (about 1 us apiece), and keep many of them as Python objects; they
do it in `Image.open`, before any limit of the service can look at the image. A request of a few MB made of
millions of tiny pieces then cost seconds and up to 1.4 GB of memory (a 31 MB GIF comment of 1-byte
sub-blocks: 2.4 s, +1.4 GB). These walks jump from length field to length field, find runs with C-speed
searches, and refuse a container of more than `max_segments` pieces or with more than `MAX_JPEG_STRAY`
bytes of fill and junk between JPEG markers: then Pillow's share is bounded (65,536 pieces: under 0.1 s).
Real files are far below: a photo has about 10 JPEG segments (255 ICC chunks at most), a PNG one IDAT chunk
per 8 to 64 KB, a GIF a few extension blocks before its first frame.

The JPEG walk also reads what the headers say about scans: libjpeg buffers the whole image and reads every
scan when the file is progressive *or* its first scan lacks some of the frame's components (a sequential file
with one component per scan); those files get the scan limit.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.errors import InvalidImage

MAX_JPEG_STRAY = 64 * 1024  # fill (FF) and junk bytes between JPEG markers, all told
_FILL = re.compile(rb"\xff+")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 have no length field
_PNG_CHUNK = struct.Struct(">I4s")


@dataclass(frozen=True)
class JpegLayout:
    progressive: bool
    components: int  # in the frame
    first_scan_components: int

    @property
    def multi_scan(self) -> bool:
        """Whether libjpeg reads scan after scan (a baseline file with all components in its first scan has
        one scan: a second one is an error for libjpeg)."""
        return self.progressive or self.first_scan_components < self.components


def check(fmt: str, data: bytes, max_segments: int) -> JpegLayout | None:
    """Refuse a container too fragmented to parse cheaply; for a JPEG, what its headers say about scans."""
    if fmt == "JPEG":
        return jpeg_layout(data, max_segments)
    if fmt == "PNG":
        check_png(data, max_segments)
    elif fmt == "GIF":
        check_gif(data, max_segments)
    return None


def jpeg_layout(data: bytes, max_segments: int) -> JpegLayout | None:
    """Marker segments from SOI to the first scan (SOS); None where the file ends or breaks first (Pillow and
    libjpeg then give the error)."""
    pos, n = 2, len(data)
    stray = segments = 0
    progressive, components = False, 0
    while True:
        ff = data.find(b"\xff", pos)
        if ff < 0:
            return None
        run = _FILL.match(data, ff, min(n, ff + MAX_JPEG_STRAY + 2))  # one FF is the marker's; the rest fill
        end = run.end() if run else ff + 1
        stray += (ff - pos) + (end - ff - 1)
        if stray > MAX_JPEG_STRAY:
            raise InvalidImage(f"JPEG has over {MAX_JPEG_STRAY} fill or stray bytes between its markers")
        if end >= n:
            return None
        marker, pos = data[end], end + 1
        if marker == 0x00:  # FF 00 is not a marker: more junk
            stray += 1
            continue
        segments += 1
        if segments > max_segments:
            raise InvalidImage(f"JPEG has over {max_segments} marker segments before its image data")
        if marker in _STANDALONE:
            continue
        if marker == 0xD9 or pos + 2 > n:  # EOI before any scan, or cut short
            return None
        if marker == 0xDA:
            return JpegLayout(progressive, components, data[pos + 2] if pos + 2 < n else 0)
        if marker in _SOF and pos + 7 < n:
            components, progressive = data[pos + 7], marker in _PROGRESSIVE_SOF
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return None
        pos += length


def check_png(data: bytes, max_segments: int) -> None:
    """Count chunks, IHDR to IEND: Pillow reads those after the image data too (`load_end`)."""
    pos, n, chunks = 8, len(data), 0
    while pos + 8 <= n:
        chunks += 1
        if chunks > max_segments:
            raise InvalidImage(f"PNG has over {max_segments} chunks")
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        if kind == b"IEND":
            return
        pos += 12 + length


def check_gif(data: bytes, max_segments: int) -> None:
    """Count extension sub-blocks up to the first image descriptor, where Pillow stops reading."""
    n = len(data)
    if n < 13:
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while pos < n and data[pos] == 0x21:  # an extension: introducer, label, sub-blocks to a zero length
        pos += 2
        while pos < n:
            size = data[pos]
            pos += 1 + size
            blocks += 1
            if blocks > max_segments:
                raise InvalidImage(f"GIF has over {max_segments} extension blocks before its first frame")
            if size == 0:
                break
