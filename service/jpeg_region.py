"""The part of a JPEG that exact preprocessing reads, decoded alone: the same pixels as Pillow's whole decode.

The center crop of a camera photo reads about 60% of its pixels, and most of a JPEG's decode time (the
inverse DCT, the chroma upsampling, the colour conversion) can be left out for the rest: libjpeg-turbo skips
the rows above the part and the columns beside it, and stops after its last row (`service/jpeg_region.c`). It
writes the pixels straight into a Pillow image backed by huge pages, so that even the whole image decodes
faster than through Pillow (docs/BENCHMARKS.md has the figures).

The pixels are Pillow's because the decoder is Pillow's: the compiled part is built without libjpeg, and
uses the copy of libjpeg-turbo that Pillow's own module has loaded (found in the process's memory map and
made visible to libraries loaded after it). The upsampling of a part sees an edge beside it that the whole
image does not have, so a margin of `MARGIN` pixels is decoded around what is read.

`decode` returns None, and the caller decodes the whole image with Pillow as before, wherever this does not
apply or is not sure: another system than Linux, the library not built (`make jpeg-region`), a JPEG that is
not YCbCr, RGB or grey, one that does not end with its end marker (Pillow refuses a truncated JPEG, which this
might decode where it cuts the part off), or any warning from libjpeg (corrupt data). Pillow's answers and its
errors thus stay what they were.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from service import resample
from service.memory import prefer_huge_pages

log = logging.getLogger(__name__)

LIBRARY = Path(__file__).parent / "native" / "jpeg_region.so"
# A part starts on a column of blocks: 8 pixels times the largest horizontal sampling factor, at most 4
ALIGN = 32
# Pixels decoded beyond what is read, on each side where the image goes on: the chroma upsampling at the
# part's edge differs from the whole image's on its first and last column (tests/test_jpeg_region.py)
MARGIN = 32
PIXEL_BYTES = {"RGB": 4, "L": 1}  # RGBX from libjpeg-turbo, as Pillow keeps RGB
END = b"\xff\xd9"


def _pillow_libjpeg() -> str | None:
    """The path of the libjpeg (the 6.2 interface, the headers') that Pillow's module has loaded, from this
    process's memory map: the copy in Pillow's wheel where there is one, else the system's. Other copies may
    be loaded as well (torchvision brings one of version 8)."""
    import PIL
    from PIL import _imaging  # noqa: F401 - loads Pillow's libjpeg, if it has one

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libjpeg" in line}
    except OSError:
        return None
    found = sorted(path for path in paths if ".so.62" in Path(path).name)
    wheel = Path(PIL.__file__).parent.parent / "pillow.libs"
    return next((path for path in found if Path(path).parent == wheel), found[0] if found else None)


def _load() -> ctypes.CDLL | None:
    path = _pillow_libjpeg()
    if path is None:
        log.info("no libjpeg found in this process: JPEGs are decoded whole, by Pillow")
        return None
    try:
        # made global, so that the library below binds to it (it is already loaded: nothing else happens)
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        log.info("%s not built (make jpeg-region): JPEGs are decoded whole, by Pillow", LIBRARY)
        return None
    lib.jpeg_region.restype = ctypes.c_int
    lib.jpeg_region.argtypes = [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5
    lib.jpeg_region.argtypes += [ctypes.c_void_p, ctypes.c_long]
    return lib


_lib = _load() if os.name == "posix" else None
_checked: bool | None = None


def available() -> bool:
    """Whether `decode` decodes: both libraries are there, and a few probes give Pillow's pixels (checked
    once: the probes are cheap, and a wrong pixel is not)."""
    global _checked
    if _checked is None:
        _checked = _lib is not None and resample.available() and _agrees_with_pillow()
    return _checked


def _agrees_with_pillow() -> bool:
    if all(_probe(mode, subsampling) for mode, subsampling in (("RGB", 2), ("RGB", 0), ("L", 0))):
        return True
    log.warning("JPEG parts decode otherwise than Pillow here: JPEGs are decoded whole, by Pillow")
    return False


def _probe(mode: str, subsampling: int) -> bool:
    """A smooth JPEG (4:2:0 or 4:4:4, or grey), whole and in part, against Pillow's whole decode."""
    base = np.random.default_rng(11).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(base).resize((301, 203), Image.Resampling.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    smooth.save(buffer, "JPEG", quality=90, subsampling=subsampling)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as whole:
        expected = np.asarray(whole)
    for box in ((0, 0, 301, 203), (100, 50, 180, 120)):
        part = _decode(data, mode, smooth.size, box)
        if part is None:
            return False
        img, (left, top) = part
        x0, y0, x1, y1 = box  # what is read: the margin around it may differ
        if not np.array_equal(
            np.asarray(img)[y0 - top : y1 - top, x0 - left : x1 - left], expected[y0:y1, x0:x1]
        ):
            return False
    return True


def decode(
    data: bytes, mode: str, size: tuple[int, int], box: tuple[int, int, int, int]
) -> tuple[Image.Image, tuple[int, int]] | None:
    """The pixels `box` (left, top, right, bottom) of a JPEG of `size` that Pillow opens in `mode` (RGB or
    L), and a margin around them, as an image in that mode, with where its top left pixel lies in the JPEG;
    or None where this does not decode it (the caller then decodes the whole image)."""
    if not available():
        return None
    return _decode(data, mode, size, box)


def _decode(
    data: bytes, mode: str, size: tuple[int, int], box: tuple[int, int, int, int]
) -> tuple[Image.Image, tuple[int, int]] | None:
    if mode not in PIXEL_BYTES or not data.endswith(END):
        return None
    width, height = size
    x0, y0, x1, y1 = box
    x0 = max(0, x0 - MARGIN) // ALIGN * ALIGN
    y0, x1, y1 = max(0, y0 - MARGIN), min(width, x1 + MARGIN), min(height, y1 + MARGIN)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        return None
    img = Image.new(mode, (x1 - x0, y1 - y0), None)  # not filled: every pixel is written below
    found = resample.pixels(img)
    if found is None:
        img.close()
        return None
    address, capsule = found
    px = PIXEL_BYTES[mode]
    prefer_huge_pages(address, img.width * img.height * px)
    rc = _lib.jpeg_region(data, len(data), px, x0, y0, x1 - x0, y1 - y0, address, (x1 - x0) * px)
    del capsule
    if rc != 0:
        img.close()
        return None
    return img, (x0, y0)
