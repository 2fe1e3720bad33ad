"""Inputs whose cost or result the pixel limit does not bound, each refused cheaply or decoded right.

Each was found by building it: a few KB or MB that made Pillow loop for seconds in Python or allocate up to
1.4 GB before any limit looked at the image, or a colour key that came out wrong. The limits are lowered here
so that the inputs stay small; the default limits refuse the full-size versions the same way.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from service import containers
from service.config import Settings
from service.decoding import Limits, decode
from service.errors import ImageTooLarge, InvalidImage
from tests.conftest import encode


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(body) + 2) + body


def sequential_jpeg(width: int, height: int, repeats: int) -> bytes:
    """A baseline (SOF0) JPEG with one component per scan, each scan written `repeats` times and empty:
    libjpeg buffers the whole image and reads every scan, like a progressive file, though Pillow does not
    call it progressive. 6000x6000 with 6,000 such scans (60 KB) took 10 s to decode."""
    bits = bytes([1] + [0] * 15)  # one 1-bit Huffman code
    out = bytearray(b"\xff\xd8")
    out += _segment(0xDB, b"\x00" + bytes([1] * 64))
    out += _segment(0xC4, b"\x00" + bits + b"\x00") + _segment(0xC4, b"\x10" + bits + b"\x00")
    components = b"".join(bytes([i + 1, 0x11, 0]) for i in range(3))
    out += _segment(0xC0, bytes([8]) + struct.pack(">HHB", height, width, 3) + components)
    for _ in range(repeats):
        for c in range(3):
            out += _segment(0xDA, bytes([1, c + 1, 0x00, 0, 63, 0]))
    return bytes(out + b"\xff\xd9")


def test_a_sequential_jpeg_of_many_scans_gets_the_scan_limit(chelsea: Image.Image) -> None:
    bomb = sequential_jpeg(64, 64, repeats=20)  # 60 scans
    layout = containers.jpeg_layout(bomb, 100)
    assert layout is not None and not layout.progressive and layout.multi_scan
    with pytest.raises(ImageTooLarge, match="JPEG has 60 scans; the limit is 50"):
        decode(bomb, limits=Limits(max_jpeg_scans=50))
    photo = encode(chelsea, "JPEG", quality=90)  # a baseline photo: one interleaved scan, never counted
    assert containers.jpeg_layout(photo, 100) == containers.JpegLayout(False, 3, 3)
    assert decode(photo, limits=Limits(max_jpeg_scans=1)).size == chelsea.size


def _after_soi(photo: bytes, insert: bytes) -> bytes:
    return photo[:2] + insert + photo[2:]


def test_jpeg_fill_and_stray_bytes_are_bounded(chelsea: Image.Image) -> None:
    """Pillow skips them one byte per Python loop: 31 MB of FF fill took 12 s in Image.open."""
    photo = encode(chelsea.resize((64, 48)), "JPEG")
    assert decode(_after_soi(photo, b"\xff" * 100)).size == (64, 48)  # fill bytes are legal
    assert decode(photo[:20] + b"\x00" * 100 + photo[20:]).size == (64, 48)  # so libjpeg takes some junk
    for stray in (b"\xff" * (containers.MAX_JPEG_STRAY + 10), b"\x00" * (containers.MAX_JPEG_STRAY + 10)):
        t0 = time.perf_counter()
        with pytest.raises(InvalidImage, match="fill or stray bytes"):
            decode(photo[:20] + stray + photo[20:])
        assert time.perf_counter() - t0 < 1.0


def test_jpeg_marker_segments_are_counted(chelsea: Image.Image) -> None:
    """Pillow keeps every APPn and COM segment: 5.4 M tiny ones (31 MB) took 4.9 s and 956 MB."""
    photo = encode(chelsea.resize((64, 48)), "JPEG")
    many = _after_soi(photo, _segment(0xFE, b"ab") * 200)
    assert decode(many).size == (64, 48)
    with pytest.raises(InvalidImage, match="over 100 marker segments"):
        decode(many, limits=Limits(max_segments=100))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_chunks_are_counted() -> None:
    """2.7 M empty private chunks (31 MB) on a 16x16 PNG took 4.5 s and 312 MB in Image.open."""
    png = encode(Image.new("L", (16, 16), 7), "PNG")
    many = png[:33] + _chunk(b"abCd", b"") * 200 + png[33:]  # after IHDR
    assert decode(many, channels=1).size == (16, 16)
    with pytest.raises(InvalidImage, match="PNG has over 100 chunks"):
        decode(many, channels=1, limits=Limits(max_segments=100))


def test_gif_extension_blocks_are_counted() -> None:
    """Pillow keeps every sub-block of a comment: 31 MB of 1-byte sub-blocks took 2.4 s and 1.4 GB."""
    gif = encode(Image.new("P", (8, 8), 1), "GIF")
    head = 13 + 3 * (2 << (gif[10] & 7))  # header, screen descriptor, global colour table
    commented = gif[:head] + b"\x21\xfe" + b"\x01a" * 200 + b"\x00" + gif[head:]
    assert decode(commented).size == (8, 8)
    with pytest.raises(InvalidImage, match="GIF has over 100 extension blocks"):
        decode(commented, limits=Limits(max_segments=100))


def rle8_bmp(width: int, height: int, rows: list[bytes] | None = None) -> bytes:
    """An 8-bit RLE BMP (BI_RLE8), bottom-up; `rows` are the encoded rows (default: one pixel of 5 each, the
    rest of the row left to the end-of-line padding, which Pillow writes a byte at a time)."""
    body = b"".join(r + b"\x00\x00" for r in (rows or [b"\x01\x05"] * height)) + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + 40 + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + header + palette + body


def test_rle_bmp_pixels_are_limited() -> None:
    """Pillow decodes RLE BMPs in Python: a 25 KB RLE8 file of 6000x6000 took 3 s."""
    small = rle8_bmp(4, 2, [b"\x04\x10", b"\x02\x20\x02\x30"])  # bottom row first
    assert np.asarray(decode(small, channels=1)).tolist() == [[0x20, 0x20, 0x30, 0x30], [0x10] * 4]
    with pytest.raises(ImageTooLarge, match="RLE-compressed BMP of 4410000 pixels"):
        decode(rle8_bmp(2100, 2100))
    assert decode(rle8_bmp(20, 20), limits=Limits(max_rle_bmp_pixels=400)).size == (20, 20)


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """A little-endian 8-bit grey TIFF whose one tile is `tile` x `tile` (deflate of zeros)."""
    pixels = zlib.compress(b"\x00" * (tile * tile), 9)
    entries = [(256, width), (257, height), (258, 8), (259, 8), (262, 1), (277, 1), (322, tile), (323, tile)]
    entries += [(324, 0), (325, len(pixels))]  # TileOffsets, filled in below; TileByteCounts
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, value in entries:
        value = 8 + ifd_size if tag == 324 else value
        out += struct.pack("<HHII", tag, 4, 1, value)  # LONG
    return bytes(out + struct.pack("<I", 0) + pixels)


def test_a_tiff_tile_may_not_dwarf_its_image() -> None:
    """libtiff allocates a whole tile: a 1 MB 16x16 TIFF with a 32768^2 tile took 1 GB."""
    assert np.asarray(decode(tiled_tiff(16, 16, 256), channels=1)).max() == 0  # 256^2 tiles are usual
    with pytest.raises(ImageTooLarge, match="TIFF tiles of 4194304 pixels for a 16x16 image"):
        decode(tiled_tiff(16, 16, 2048))


def _grey_png(depth: int, values: list[int], key: int) -> bytes:
    """A one-row grey PNG of the given bit depth with a tRNS colour key."""
    if depth == 16:
        row = b"".join(struct.pack(">H", v) for v in values)
    else:
        per = 8 // depth
        row = bytes(
            sum(v << (8 - depth * (j + 1)) for j, v in enumerate(values[i : i + per]))
            for i in range(0, len(values), per)
        )
    ihdr = struct.pack(">IIBBBBB", len(values), 1, depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"tRNS", struct.pack(">H", key))
        + _chunk(b"IDAT", zlib.compress(b"\x00" + row))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "depth, values, key, expected",
    [
        (1, [0, 1, 0, 1, 0, 1, 0, 1], 1, [0, 255] * 4),
        (1, [0, 1, 0, 1, 0, 1, 0, 1], 0, [255] * 8),
        (2, [0, 1, 2, 3], 1, [0, 255, 170, 255]),
        (4, [0, 3, 9, 15], 3, [0, 255, 153, 255]),
        (8, [0, 3, 9, 15], 9, [0, 3, 255, 15]),
        (16, [0, 257, 0x8000, 65535], 0x8000, [0, 1, 255, 255]),
    ],
)
def test_png_colour_keys_at_every_grey_depth(depth: int, values: list, key: int, expected: list) -> None:
    """Pillow kept the key in the file's depth (2 and 4 bits), ignored it (mode "1" and 16 bits): keyed
    pixels stayed dark. The rule is the module's: transparent is white."""
    assert np.asarray(decode(_grey_png(depth, values, key), channels=1))[0].tolist() == expected


def test_sixteen_bit_rgb_colour_key_goes_by_the_high_bytes() -> None:
    """Pillow compared the 16-bit key with the 8-bit pixels: an opaque blue (0, 0, 65280) turned white."""
    pixels = [(0, 0, 255), (0, 0, 65280), (4096, 8192, 12288)]
    row = b"".join(struct.pack(">HHH", *p) for p in pixels)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 1, 16, 2, 0, 0, 0))
        + _chunk(b"tRNS", struct.pack(">HHH", 0, 0, 255))
        + _chunk(b"IDAT", zlib.compress(b"\x00" + row))
        + _chunk(b"IEND", b"")
    )
    assert np.asarray(decode(png))[0].tolist() == [[255, 255, 255], [0, 0, 255], [16, 32, 48]]


def test_the_segment_limit_is_a_setting() -> None:
    assert Limits.from_settings(Settings(max_image_segments=123)).max_segments == 123
    with pytest.raises(ValueError, match="max_image_segments"):
        Settings(max_image_segments=0).validate()


def test_real_files_pass_the_walks(chelsea: Image.Image) -> None:
    """Photos in every walked container, progressive and optimized JPEGs, interlaced PNGs, animated GIFs."""
    frames = [chelsea.resize((40, 30)).quantize(16), chelsea.resize((40, 30)).rotate(90).quantize(16)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], comment=b"a cat", loop=0)
    for data in (
        encode(chelsea, "JPEG", quality=95, progressive=True, optimize=True),
        encode(chelsea, "JPEG", quality=75, subsampling=0),
        encode(chelsea.convert("L"), "JPEG"),
        encode(chelsea, "PNG", optimize=True),
        gif.getvalue(),
    ):
        assert decode(data, limits=Limits(max_segments=64)).size in (chelsea.size, (40, 30))
