"""Image bytes -> an upright 8-bit PIL image in the model's channels, with limits checked before decoding.

Order matters for safety: the container is recognised from its magic bytes, the header is parsed (cheap) and
the pixel count and aspect ratio are checked against `Settings` *before* any pixel is decoded, so a few-KB
decompression bomb never allocates its gigabytes. Pillow's own `DecompressionBombError` is a second guard.

Alpha rule: transparent pixels (LA, RGBA, PA, P with a transparency entry, L and RGB with a colour key) are
composited onto WHITE, the background a browser shows and the one photos of objects are usually taken against;
a black background would turn transparent logos into dark blobs.

JPEG decode-time downscaling (fast preprocessing only): libjpeg can decode at 1/2, 1/4 or 1/8 scale (Pillow's
`draft`), choosing the smallest scale that is still no smaller than asked. We ask for the size whose *shorter
side* is `draft_margin` times the largest shorter side any requested view needs, computed in the stored
(pre-EXIF) orientation, since EXIF rotation by 90 degrees swaps width and height but never changes which side
is shorter. The decoded image records its full size and where the full-size image lies in its pixels
(`source_geometry`; the last row and column of blocks are only partly covered), so that views are placed
where the reference transform places them.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from service import containers, jpeg_region
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedFormat, UrlNotAllowed

# A truncated file is an error, not grey-filled. One exception Pillow cannot see: a JPEG cut short whose end
# still has an EOI marker (libjpeg fills the rest with grey and only warns).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Magic bytes of the containers we decode; Pillow is only asked to open these.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# `Image.info` keys `decode` sets: the upright size before DCT downscaling, and the box the full-size image
# covers in the decoded pixels (see `source_geometry`)
SOURCE_SIZE, SOURCE_BOX = "cnn_serve.source_size", "cnn_serve.source_box"
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Limits:
    """What a client image may be; built from `Settings` (max_image_pixels, max_aspect_ratio, max_jpeg_scans
    and max_image_segments)."""

    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 20.0
    # Each scan of a progressive JPEG is a pass over the whole image: a few hundred KB of repeated scans can
    # take a decoder tens of seconds. Photos have 1 (baseline) to about 10 (progressive).
    max_jpeg_scans: int = 256
    # JPEG marker segments before the image data, PNG chunks, GIF extension blocks: see service/containers.py
    max_segments: int = 65_536
    # Pillow decodes RLE-compressed BMPs in Python, slowly: a small file can take seconds (docs/CORE.md)
    max_rle_bmp_pixels: int = 4_000_000
    # What decoding one image may hold, by `decode_bytes`'s estimate (the whole decode memory budget)
    max_decode_bytes: int = 1 << 30

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            settings.max_image_pixels,
            settings.max_aspect_ratio,
            settings.max_jpeg_scans,
            settings.max_image_segments,
            max_decode_bytes=settings.decode_memory_mb << 20,
        )


_URL_PREFIXES = (b"http://", b"https://", b"ftp://", b"file://", b"s3://", b"gs://")


def refuse_url(data: bytes | str, where: str) -> None:
    """UrlNotAllowed for a URL sent in place of image bytes: nothing is ever fetched. Every transport reaches
    it through `sniff`; HTTP also calls it early, before base64 decoding."""
    head = (data.encode("latin-1", "replace") if isinstance(data, str) else bytes(data[:16])).strip()[:16]
    if head.lower().startswith(_URL_PREFIXES):
        raise UrlNotAllowed(
            f"{where} is a URL; this service never fetches URLs, send the image bytes instead"
        )


def sniff(data: bytes) -> str:
    """The container format from magic bytes; typed errors for everything we refuse."""
    if not data:
        raise InvalidImage("empty image (0 bytes)")
    refuse_url(data, "the image")
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"%PDF"):
        raise UnsupportedFormat("PDF documents are not images; send JPEG, PNG, WebP, BMP, GIF or TIFF")
    lowered = head.lower()
    if lowered.startswith(b"<?xml") or lowered.startswith(b"<svg") or b"<svg" in lowered:
        raise UnsupportedFormat("SVG (vector) images are not supported; send a raster image")
    if _looks_like_text(data[:1024]):
        raise UnsupportedFormat("the data is text, not an image; send JPEG, PNG, WebP, BMP, GIF or TIFF")
    raise InvalidImage("not a recognised image (JPEG, PNG, WebP, BMP, GIF or TIFF expected)")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def check_size(width: int, height: int, limits: Limits, resize_to: int | None = None) -> None:
    """Header-level limits: pixel count, aspect ratio and the size the image would have after resizing."""
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageTooLarge(
            f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds the limit {limits.max_aspect_ratio:g}"
        )
    if resize_to:
        scale = resize_to / min(width, height)
        resized = math.ceil(width * scale) * math.ceil(height * scale)
        if resized > limits.max_pixels:
            raise ImageTooLarge(
                f"image would be {resized} pixels after resizing; the limit is {limits.max_pixels}"
            )


def decode(
    data: bytes,
    *,
    channels: int = 3,
    limits: Limits | None = None,
    min_short_side: int | None = None,
    draft: bool = True,
    draft_margin: float = 1.0,
    reserve: Callable[[int], None] | None = None,
    part: Callable[[tuple[int, int]], tuple[int, int, int, int] | None] | None = None,
) -> Image.Image:
    """Decode to an upright image in mode RGB (channels=3) or L (channels=1).

    `min_short_side`: the largest shorter side any view will be resized to; JPEGs are then decoded at the
    smallest DCT scale that keeps the shorter side at least that big (when `draft` is True; exact mode turns
    it off to match torchvision, which decodes at full size).
    `draft_margin`: decode at no less than this multiple of `min_short_side`, so that the card's resampling
    filter, not the DCT scaling, makes the final reduction (see `service.preprocessing`, fast mode).
    `reserve`: called with the decode's memory estimate before any pixel is decoded (the caller's
    `memory.Hold.reserve`, which may wait for room); the caller keeps the image's memory until it is done.
    `part`: called with the upright size, returns the pixels (left, top, right, bottom) the caller will read
    (exact preprocessing's `Preprocessor.reads`); a JPEG is then decoded there only where it can be
    (`service.jpeg_region`), and `source_geometry` says where the whole image lies in the result.
    """
    limits = limits or Limits()
    fmt = sniff(data)
    layout = containers.check(fmt, data, limits.max_segments)
    # Our pixel limit is the authority (checked below, before decoding); Pillow's own bomb check, a second
    # guard, must not be tighter than it.
    if Image.MAX_IMAGE_PIXELS is not None and limits.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("image header declares too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"corrupt or unreadable {fmt} image") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types for malformed input
        raise InvalidImage(f"corrupt {fmt} image: {_short(e)}") from None
    source = img
    try:
        width, height = img.size
        check_size(width, height, limits, min_short_side)
        _check_layout(img, fmt, limits)
        multi_scan = fmt == "JPEG" and bool(layout.multi_scan if layout else img.info.get("progressive"))
        if multi_scan:
            _check_scans(data, limits)
        # Image.open stands on the first frame (GIF, APNG, WebP) or page (TIFF). Never ask for `n_frames`:
        # it walks every page, in time quadratic in their count for TIFF (see docs/CORE.md, "Decoding").
        # where the full-size image lies in the decoded one's pixels: (0, 0, W / a, H / a) at DCT scale 1/a
        source_box: tuple[float, float, float, float] = (0.0, 0.0, float(width), float(height))
        if draft and fmt == "JPEG" and min_short_side:
            scale = draft_margin * min_short_side / min(width, height)
            if scale < 1:
                drafted = img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                if drafted is not None and drafted[1] is not None:
                    source_box = tuple(float(v) for v in drafted[1])  # type: ignore[assignment]
        need = decode_bytes(img, fmt, data, channels, width * height, multi_scan)
        if need > limits.max_decode_bytes:
            raise ImageTooLarge(
                f"decoding this {width}x{height} {fmt} image needs about {need >> 20} MiB; the limit is "
                f"{limits.max_decode_bytes >> 20} MiB"
            )
        if reserve is not None:
            reserve(need)
        decoded = None
        if part is not None and fmt == "JPEG" and source_box == (0.0, 0.0, float(width), float(height)):
            decoded = _decode_part(img, data, part)
        if decoded is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        else:
            img, source_box = decoded
        exif_orientation = _orientation(source)
        if fmt == "PNG" and "transparency" in img.info and img.mode != "P":
            img = _png_colour_key(img, data)
        img = to_channels(img, channels)
        full_size = (width, height)
        if exif_orientation not in (None, 1):
            source_box, full_size = _orient_box(source_box, img.size, full_size, exif_orientation)
            img = _apply_orientation(img, exif_orientation)
        img.info[SOURCE_SIZE], img.info[SOURCE_BOX] = full_size, source_box
        return img
    except ServiceError:  # our own checks, and a reservation's deadline
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("image declares too many pixels (decompression bomb)") from None
    except MemoryError:
        raise ImageTooLarge("image is too large to decode") from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, TypeError, KeyError...: all malformed input
        raise InvalidImage(f"corrupt or truncated {fmt} image: {_short(e)}") from None
    finally:
        if img is not source:  # the decoded copy lives on; the file-backed original is done
            source.close()


# Bytes per pixel of Pillow's storage: 1 for 1, L and P, 2 for 16-bit grey, 4 for every other mode (RGB too)
def _storage_bpp(mode: str) -> int:
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


# Bytes per declared pixel a decoder holds beside the image: (while loading, after loading until closed).
# libwebp's animation decoder, which Pillow uses for every WebP, keeps two RGBA canvases and gives a copy.
_DECODER_BPP = {"WEBP": (12, 8)}


def decode_bytes(
    img: Image.Image,
    fmt: str,
    data: bytes,
    channels: int,
    declared: int,
    multi_scan: bool = False,
) -> int:
    """Peak memory of decoding `img` (opened, drafted, not loaded; `declared` pixels before drafting; a
    `multi_scan` JPEG, see `containers.JpegLayout.multi_scan`) through
    `decode`, from its header: the image at its decoded size, what the decoder holds beside it, and the copies
    `to_channels` and the EXIF rotation make. An upper bound within 2x of the measured peak for every format
    and mode (tests/test_decoding_memory.py measures it), so that the decode memory budget means what it
    says."""
    full = declared
    out = img.width * img.height
    source = _storage_bpp(img.mode) * out
    while_loading, kept = _DECODER_BPP.get(fmt, (0, 0))
    if multi_scan:
        # libjpeg buffers every component's DCT coefficients (2 bytes each) at full size, drafted or not
        factors = [(h, v) for _, h, v, _ in getattr(img, "layer", [])] or [(1, 1)] * len(img.getbands())
        hmax, vmax = max(h for h, _ in factors), max(v for _, v in factors)
        while_loading += sum(2 * h * v / (hmax * vmax) for h, v in factors) * 1.05  # whole 8x8 blocks
    converted = _convert_bpp(img.mode, "transparency" in img.info, channels) * out
    rotated = (4 if channels == 3 else 1) * out if _may_rotate(img, fmt, data) else 0
    peak = max(source + while_loading * full, source + kept * full + converted + rotated)
    return int(peak * 1.05) + _DECODE_OVERHEAD  # allocator slack; buffers of the resize and the views


_DECODE_OVERHEAD = 8 << 20


def _convert_bpp(mode: str, transparent: bool, channels: int) -> int:
    """Bytes per decoded pixel that `to_channels` holds beside the source at its peak."""
    if mode.startswith("I") and transparent:  # 16-bit colour key: an LA copy, then its background
        return 9 if channels == 3 else 8
    if mode.startswith("I") or mode == "F":  # see _high_depth_to_l; then the 8-bit grey to RGB
        return max(4 if mode.startswith("I;16") else 9, 5 if channels == 3 else 1)
    if (transparent and mode in ("P", "L", "RGB")) or mode in ("PA", "RGBa", "La"):
        return 8  # an RGBA copy, then the white background
    if mode == ("RGB" if channels == 3 else "L"):
        return 0
    if channels == 1:
        return 1 if mode == "RGB" else 5  # other modes reach grey through RGB
    return 5 if mode == "LA" else 4  # LA: its grey background, then RGB


def _may_rotate(img: Image.Image, fmt: str, data: bytes) -> bool:
    """Whether an EXIF orientation may make a rotated copy: JPEG, WebP and PNG eXIf chunks that come before
    the pixels are in `info` once opened; a PNG may also put its eXIf after them (the search over-counts,
    never misses); a TIFF has the tag in its header."""
    if "exif" in img.info or (fmt == "PNG" and b"eXIf" in data):
        return True
    return fmt == "TIFF" and 0x0112 in getattr(img, "tag_v2", {})


def _check_scans(data: bytes, limits: Limits) -> None:
    """Multi-scan JPEGs only (`containers.JpegLayout.multi_scan`; a baseline photo has one scan, and counting
    would cost it measurable time, see docs/CORE.md, "Decoding"). Every SOS marker starts a scan;
    entropy-coded data never holds FF DA (an FF there is stuffed with 00), so counting the pair only ever
    over-counts (a stray pair in an APP segment), never under."""
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise ImageTooLarge(f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans}")


def _check_layout(img: Image.Image, fmt: str, limits: Limits) -> None:
    """What the header says beyond the size: decoders whose cost is not bounded by the pixel count."""
    if fmt == "BMP" and img.info.get("compression") in (1, 2):  # BI_RLE8, BI_RLE4
        if img.width * img.height > limits.max_rle_bmp_pixels:
            raise ImageTooLarge(
                f"RLE-compressed BMP of {img.width * img.height} pixels; the limit for this slow decoder is "
                f"{limits.max_rle_bmp_pixels}"
            )
    if fmt == "TIFF":
        # libtiff allocates a whole tile, whatever the image size: a 16x16 image may declare a 32768^2 tile
        tag = getattr(img, "tag_v2", {})
        tile = (tag.get(322) or 0) * (tag.get(323) or 0)
        if tile > max(img.width * img.height, 1 << 20):
            raise ImageTooLarge(f"TIFF tiles of {tile} pixels for a {img.width}x{img.height} image")


def _short(e: Exception) -> str:
    return str(e).split("\n")[0][:200] or type(e).__name__


def _decode_part(
    img: Image.Image, data: bytes, part: Callable[[tuple[int, int]], tuple[int, int, int, int] | None]
) -> tuple[Image.Image, tuple[float, float, float, float]] | None:
    """The part of an opened JPEG that `part` asks for (in upright terms), decoded alone, and where the
    whole image lies in its pixels (stored orientation, like a drafted image's box); None where the whole
    image is to be decoded."""
    orientation = _orientation(img)
    size = img.size
    upright = (size[1], size[0]) if orientation in (5, 6, 7, 8) else size
    box = part(upright)
    if box is None:
        return None
    if orientation not in (None, 1):  # the box in the stored image: the inverse of each transpose, in turn
        for op in reversed(_TRANSPOSE[orientation]):
            box, upright = _move_box(box, upright, _INVERSE.get(op, op))
    decoded = jpeg_region.decode(data, img.mode, size, tuple(int(v) for v in box))  # type: ignore[arg-type]
    if decoded is None:
        return None
    pixels, (left, top) = decoded
    return pixels, (float(-left), float(-top), float(size[0] - left), float(size[1] - top))


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not reject an otherwise good photo
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


_SWAPS = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
)
_INVERSE = {
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}


def _orient_box(
    box: tuple[float, float, float, float], size: tuple[int, int], full: tuple[int, int], orientation: int
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The source box and full size of `_apply_orientation`'s result: each transpose moves the box as it
    moves the pixels (a drafted image's partial last row or column of blocks moves with it, and so does a
    part decoded alone)."""
    for op in _TRANSPOSE[orientation]:
        box, size = _move_box(box, size, op)
        if op in _SWAPS:
            full = (full[1], full[0])
    return box, full


def _move_box(
    box: tuple[float, ...], size: tuple[int, int], op: Image.Transpose
) -> tuple[Any, tuple[int, int]]:
    """A box of an image of `size` where `op` moves it, and the image's size after it."""
    (x0, y0, x1, y1), (w, h) = box, size
    if op == Image.Transpose.FLIP_LEFT_RIGHT:
        return (w - x1, y0, w - x0, y1), size
    if op == Image.Transpose.FLIP_TOP_BOTTOM:
        return (x0, h - y1, x1, h - y0), size
    if op == Image.Transpose.ROTATE_180:
        return (w - x1, h - y1, w - x0, h - y0), size
    swapped = {  # the four that swap the axes
        Image.Transpose.TRANSPOSE: (y0, x0, y1, x1),
        Image.Transpose.ROTATE_90: (y0, w - x1, y1, w - x0),
        Image.Transpose.ROTATE_270: (h - y1, x0, h - y0, x1),
        Image.Transpose.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0),
    }[op]
    return swapped, (h, w)


def source_geometry(img: Image.Image) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """The size the image had before DCT downscaling (upright) and where that full-size image lies in this
    one's pixel coordinates; an image `decode` did not downscale is its own source."""
    size = img.info.get(SOURCE_SIZE) or img.size
    box = img.info.get(SOURCE_BOX) or (0.0, 0.0, float(img.width), float(img.height))
    return (int(size[0]), int(size[1])), box


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """Same mapping as `ImageOps.exif_transpose`, applied after mode conversion (fewer bytes to move)."""
    for op in _TRANSPOSE[orientation]:
        img = img.transpose(op)
    return img


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB or L; alpha composited on white (see the module docstring)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
        mode = "L"
    if mode in ("P", "L", "RGB") and "transparency" in img.info:  # a palette entry or a colour key (tRNS)
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        img = img.convert("RGB")
        mode = "RGB"
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBa", "La"):  # premultiplied alpha: Pillow undoes it
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode in ("RGBA", "LA"):
        # Pasting through its own alpha onto white is the alpha composite (src * a + white * (1 - a)) in one
        # pass and one new image, where converting, alpha_composite and converting back take several passes
        # and copies (decode peaks per format: docs/BENCHMARKS.md, bench_decode_memory.py).
        target = "RGB" if mode == "RGBA" else "L"
        background = Image.new(target, img.size, WHITE if target == "RGB" else 255)
        background.paste(img, mask=img)
        img, mode = background, target
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if channels == 3:
        return img if img.mode == "RGB" else img.convert("RGB")
    raise ValueError(f"models take 1 or 3 channels, not {channels}")


def _png_colour_key(img: Image.Image, data: bytes) -> Image.Image:
    """A PNG colour key (tRNS) in the 8-bit terms `to_channels` composites by. Pillow keeps the key in the
    file's bit depth while it scales 1-, 2- and 4-bit grey to 0..255, truncates 16-bit RGB to its high bytes,
    and turns 16-bit grey into a mode whose key nothing reads. A 16-bit RGB key is compared by its high
    bytes too (Pillow has no 16-bit RGB mode): a pixel differing from it only in the low bytes is keyed."""
    if data[12:16] != b"IHDR" or len(data) < 26:
        return img
    depth, colour_type = data[24], data[25]
    key = img.info["transparency"]
    if colour_type == 0 and depth == 16 and isinstance(key, int) and img.mode.startswith("I"):
        alpha = np.where(np.asarray(img) == key, np.uint8(0), np.uint8(255))  # 8-bit from the start
        return Image.merge("LA", (_high_depth_to_l(img), Image.fromarray(alpha, "L")))
    if colour_type == 0 and depth < 8 and isinstance(key, int):
        img = img.convert("L") if img.mode == "1" else img  # the decoded image is ours: its info too
        img.info["transparency"] = (key & ((1 << depth) - 1)) * (255 // ((1 << depth) - 1))
    elif colour_type == 2 and depth == 16 and isinstance(key, tuple):
        img.info["transparency"] = tuple(int(k) >> 8 for k in key)
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grey -> 8 bit by scaling the full 16-bit range, not clipping.
    16-bit grey goes through a 64 K table (3 bytes a pixel beside the image, where float arithmetic took 14);
    the rare 32-bit modes are scaled in place."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray(_SIXTEEN_TO_EIGHT[arr], "L")
    arr = arr.astype(np.float32)  # the integer copy is dropped as the name moves on
    if img.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        np.nan_to_num(arr, copy=False)
        arr /= top
        arr *= 255.0
    else:
        arr *= 255.0 / (65535.0 if arr.size and arr.max() > 255 else 255.0)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(np.round(arr, out=arr).astype(np.uint8), "L")


# Each 16-bit value scaled as the float path scales it (float32 x 255/65535, rounded)
_SIXTEEN_TO_EIGHT = np.round(np.arange(65536, dtype=np.float32) * (255.0 / 65535.0)).astype(np.uint8)
