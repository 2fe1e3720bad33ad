"""Decoding: every format and mode we accept becomes an upright RGB/L image; every bad input a typed error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service import decoding
from service.decoding import Limits, decode
from service.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from tests.conftest import encode


def _small(img: Image.Image) -> Image.Image:
    return img.resize((96, 64))


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("JPEG", {"quality": 90}),
        ("PNG", {}),
        ("WEBP", {"quality": 90}),
        ("BMP", {}),
        ("GIF", {}),
        ("TIFF", {}),
    ],
)
def test_formats_decode_to_rgb(chelsea: Image.Image, fmt: str, kw: dict) -> None:
    img = decode(encode(_small(chelsea), fmt, **kw), channels=3)
    assert img.mode == "RGB" and img.size == (96, 64)
    ref = np.asarray(_small(chelsea), dtype=np.float32)
    # lossy formats and GIF's 256-colour palette stay close to the original
    assert np.abs(np.asarray(img, dtype=np.float32) - ref).mean() < 12


def test_channels_one_gives_grayscale(chelsea: Image.Image) -> None:
    img = decode(encode(_small(chelsea), "PNG"), channels=1)
    assert img.mode == "L" and img.size == (96, 64)


def test_sixteen_bit_png_scales_full_range() -> None:
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    img16 = Image.fromarray(arr)
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode(data, channels=3))
    assert out.shape == (16, 64, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 120 < out[0, 32, 0] < 136


def test_cmyk_jpeg(chelsea: Image.Image) -> None:
    cmyk = _small(chelsea).convert("CMYK")
    img = decode(encode(cmyk, "JPEG", quality=95), channels=3)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, np.float32) - np.asarray(_small(chelsea), np.float32)).mean() < 20


def test_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(decode(encode(rgba, "PNG"), channels=3))
    assert tuple(out[4, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(decode(encode(la, "PNG"), channels=1)).min() == 255


def test_palette_with_transparency() -> None:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    data = encode(p, "PNG", transparency=0)
    out = np.asarray(decode(data, channels=3))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (0, 255, 0)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = np.asarray(decode(buf.getvalue(), channels=3))
    assert out[5, 5, 0] > 200 and out[5, 5, 2] < 50


def test_multipage_tiff_first_page() -> None:
    pages = [Image.new("L", (6, 6), v) for v in (10, 200)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    assert np.asarray(decode(buf.getvalue(), channels=1)).max() == 10


def test_one_pixel() -> None:
    assert decode(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")).size == (1, 1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(chelsea: Image.Image, orientation: int) -> None:
    upright = _small(chelsea)
    # store the pixels as a camera would, with the tag that undoes it
    stored = {
        3: upright.rotate(180),
        6: upright.rotate(90, expand=True),
        8: upright.rotate(270, expand=True),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data, channels=3)
    assert out.size == upright.size
    assert np.abs(np.asarray(out, np.float32) - np.asarray(upright, np.float32)).mean() < 8


def test_jpeg_draft_downscales_but_not_below_request(chelsea: Image.Image) -> None:
    big = chelsea.resize((1200, 900))
    data = encode(big, "JPEG", quality=90)
    img = decode(data, min_short_side=224)
    assert min(img.size) >= 224 and img.size[0] < 1200  # 1/2 scale: 600x450 is >= 224
    img = decode(data, min_short_side=224, draft=False)
    assert img.size == (1200, 900)
    # rotated by EXIF: the shorter side is still honoured
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode(encode(big, "JPEG", quality=90, exif=exif.tobytes()), min_short_side=300)
    assert rotated.size[0] < rotated.size[1] and min(rotated.size) >= 300


# ---- rejections -------------------------------------------------------------------------------------------


def test_zero_bytes() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        decode(b"")


def test_random_bytes() -> None:
    with pytest.raises(InvalidImage):
        decode(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_truncated_jpeg(chelsea: Image.Image) -> None:
    data = encode(chelsea, "JPEG", quality=90)
    with pytest.raises(InvalidImage, match="JPEG"):
        decode(data[: len(data) // 2])


def test_truncated_png(chelsea: Image.Image) -> None:
    data = encode(_small(chelsea), "PNG")
    with pytest.raises(InvalidImage, match="PNG"):
        decode(data[: len(data) // 2])


def test_text() -> None:
    with pytest.raises(UnsupportedFormat, match="text"):
        decode(b"hello, this is certainly not an image\n")


def test_svg() -> None:
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(UnsupportedFormat, match="SVG"):
        decode(svg)


def test_pdf() -> None:
    with pytest.raises(UnsupportedFormat, match="PDF"):
        decode(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF")


def _png_bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height zeros: a few KB that would inflate to width*height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    raw = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header() -> None:
    data = _png_bomb(30000, 30000)
    assert len(data) < 1_000_000
    with pytest.raises(ImageTooLarge):
        decode(data)


def test_our_pixel_limit_is_not_pillows() -> None:
    # 3000x3000 is far below Pillow's bomb threshold; our configured limit refuses it before decoding
    data = _png_bomb(3000, 3000)
    with pytest.raises(ImageTooLarge, match="limit is 1000000"):
        decode(data, limits=Limits(max_pixels=1_000_000))
    assert decode(data, channels=1).size == (3000, 3000)


def test_aspect_ratio_beyond_limit() -> None:
    with pytest.raises(ImageTooLarge, match="aspect ratio"):
        decode(encode(Image.new("RGB", (1000, 10)), "PNG"), limits=Limits(max_aspect_ratio=20))


def test_pixels_after_resizing_checked() -> None:
    # 1x100 passes the header limits but resized to a 256 shorter side would be 256 x 25600 pixels
    with pytest.raises(ImageTooLarge, match="after resizing"):
        decoding.check_size(1, 100, Limits(max_pixels=1_000_000, max_aspect_ratio=1000), resize_to=256)


def test_a_pixel_limit_above_pillows_own_is_honoured() -> None:
    # 9500x9500 = 90.25 MP is past Pillow's 89.5 MP bomb threshold; a configured 100 MP limit must win
    data = _png_bomb(9500, 9500)
    assert decode(data, channels=1, limits=Limits(max_pixels=100_000_000), min_short_side=32).size == (
        9500,
        9500,
    )


def _tiff(pages: list[list[tuple[int, int, int, int]]]) -> bytes:
    """A little-endian TIFF of 1x1 8-bit grey pages, each IFD given as (tag, type, count, value) entries;
    StripOffsets (273) is filled in to point at the one pixel (value 0x80)."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    pixel_at = 8 + sum(2 + 12 * len(p) + 4 for p in pages)
    for i, entries in enumerate(pages):
        nxt = len(out) + 2 + 12 * len(entries) + 4 if i < len(pages) - 1 else 0
        out += struct.pack("<H", len(entries))
        for tag, typ, count, value in entries:
            value = pixel_at if tag == 273 else value
            out += (
                struct.pack("<HHIHH", tag, typ, count, value, 0)
                if typ == 3
                else struct.pack("<HHII", tag, typ, count, value)
            )
        out += struct.pack("<I", nxt)
    return bytes(out + b"\x80")


GREY_1X1 = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0)]
GREY_1X1 += [(277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]


def test_tiff_pages_after_the_first_are_never_walked() -> None:
    """Counting pages walks them all, in quadratic time (40,000 1x1 pages took 16 s); a broken later page must
    not matter either, since only the first is read."""
    many = _tiff([GREY_1X1] * 3000)
    assert np.asarray(decode(many, channels=1)).tolist() == [[0x80]]
    broken_second = _tiff([GREY_1X1, []])
    assert decode(broken_second, channels=1).size == (1, 1)


def test_malformed_tiff_is_invalid_image_whatever_pillow_raises() -> None:
    # No width or height tags: Pillow raises TypeError("Missing dimensions"), not OSError
    no_size = _tiff([[e for e in GREY_1X1 if e[0] not in (256, 257)]])
    with pytest.raises(InvalidImage):
        decode(no_size)


def _repeat_a_scan(data: bytes, times: int) -> bytes:
    """A progressive JPEG with one of its scans (SOS header and entropy data) repeated `times` more times."""
    segments, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            segments.append(data[i : i + 2])
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not stuffing or a restart
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        segments.append(data[i:end])
        i = end
    scans = [s for s in segments if s[1] == 0xDA]
    repeated = min(scans[1:], key=len)
    out = bytearray(data[:2])
    for s in segments:
        out += s * (times + 1) if s is repeated else s
    return bytes(out)


def test_jpeg_with_too_many_scans_is_refused_before_decoding(chelsea: Image.Image) -> None:
    """Each scan is a pass over the whole image: 20,000 of them in 656 KB took 23 s to decode."""
    photo = encode(chelsea, "JPEG", quality=80, progressive=True)
    assert 1 < photo.count(b"\xff\xda") < 20  # a real progressive photo, well under the limit
    assert decode(photo).size == chelsea.size
    bomb = _repeat_a_scan(photo, 300)
    with pytest.raises(ImageTooLarge, match="scans; the limit is 256"):
        decode(bomb)
    assert decode(bomb, limits=Limits(max_jpeg_scans=1000)).size == chelsea.size  # the limit is the setting


def test_colour_key_transparency_is_composited_on_white() -> None:
    """tRNS in RGB and L PNGs (a colour meaning transparent) follows the same rule as alpha and palettes."""
    rgb = Image.new("RGB", (4, 4), (0, 0, 0))
    rgb.putpixel((0, 0), (10, 20, 30))
    out = np.asarray(decode(encode(rgb, "PNG", transparency=(0, 0, 0))))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [10, 20, 30]
    grey = Image.new("L", (4, 4), 0)
    out = np.asarray(decode(encode(grey, "PNG", transparency=0), channels=1))
    assert (out == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_compositing_equals_pillows_alpha_composite_on_white(mode: str) -> None:
    """One paste through the alpha (a fraction of the memory) gives alpha_composite's pixels exactly."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, len(mode)), dtype=np.uint8), mode)
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    reference = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB" if mode == "RGBA" else "L")
    channels = 3 if mode == "RGBA" else 1
    assert np.array_equal(np.asarray(decoding.to_channels(img, channels)), np.asarray(reference))
