"""The part of Pillow's resize that a crop keeps, computed alone, bit for bit the same (`service/resample.c`).

Exact preprocessing resizes the whole image and keeps a crop; for a camera photo most of its time is the
resize, and a third of that is spent on columns and rows the crop drops. `crop_resize(img, size, box, filter)`
returns `np.asarray(img.resize(size, filter).crop(box))` without computing the rest. Pillow's own
`resize(box=...)` cannot: it takes the box in single precision, and a few pixels then differ.

The compiled part is a plain C library, `service/native/resample.so` (`make resample`; a folder apart, so
that it is no module of the package), loaded with ctypes, which lets the interpreter lock go for the call as
Pillow does. It reads the image's pixels where Pillow keeps them, through the Arrow C data interface Pillow
exports; that needs an image in one block of memory, so importing this module asks Pillow to allocate new
images in one block each (`set_use_block_allocator`), and glibc to map such blocks apart
(`memory.map_large_allocations`).
Where the library is missing, the image's mode or the filter is one it does not do, or the crop leaves the
resized image, `crop_resize` returns None and the caller resizes with Pillow: the same answer, slower.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from service.memory import map_large_allocations

log = logging.getLogger(__name__)

LIBRARY = Path(__file__).parent / "native" / "resample.so"
# Pillow's filter numbers, which the C code takes; NEAREST resizes by another path
FILTERS = {
    Image.Resampling.LANCZOS: 1,
    Image.Resampling.BILINEAR: 2,
    Image.Resampling.BICUBIC: 3,
    Image.Resampling.BOX: 4,
    Image.Resampling.HAMMING: 5,
}
PIXEL_BYTES = {"L": 1, "RGB": 4}  # Pillow keeps RGB as RGBX


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [  # the Arrow C data interface's ArrowArray
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        log.info("%s not built (make resample): exact preprocessing resizes with Pillow", LIBRARY)
        return None
    if not hasattr(lib, "crop_span"):  # built from an older resample.c: `make resample` rebuilds it
        log.warning("%s is out of date (make resample): exact preprocessing resizes with Pillow", LIBRARY)
        return None
    fn = lib.crop_resize
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_int] * 14 + [ctypes.c_void_p]
    lib.crop_span.restype = ctypes.c_int
    lib.crop_span.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int)] * 2
    lib.resample_simd.restype = ctypes.c_int
    lib.resample_simd.argtypes = [ctypes.c_int]
    return lib


_lib = _load()
if _lib is not None and hasattr(Image.core, "set_use_block_allocator"):
    Image.core.set_use_block_allocator(1)
    map_large_allocations()  # a freed image block goes back to the system, not into the heap
_checked: bool | None = None


def available() -> bool:
    """Whether `crop_resize` computes: the library is built, Pillow exports its pixels, and Pillow's own
    resize gives the same bytes on a few probes (checked once: another Pillow may resample otherwise)."""
    global _checked
    if _checked is None:
        _checked = _lib is not None and hasattr(Image.Image, "__arrow_c_array__") and _agrees_with_pillow()
    return _checked


def use_vectors(on: bool) -> bool:
    """Let the passes use the CPU's vector instructions (AVX2 on x86-64, where the CPU has it; the default)
    or keep to the portable C. Both give Pillow's bytes; tests compare them. Returns whether the vectors were
    in use before."""
    return bool(_lib.resample_simd(int(on))) if _lib is not None else False


def _agrees_with_pillow() -> bool:
    rng = np.random.default_rng(7)
    probes = (("RGB", (61, 47), (23, 17)), ("RGB", (13, 90), (12, 21)), ("L", (40, 52), (57, 33)))
    for mode, size, out in probes:  # shrunk, shrunk mostly in height (the vertical pass first), enlarged
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for resample in FILTERS:
            box = (1, 2, out[0] - 1, out[1] - 3)
            ours = _compute(img, out, box, resample, img.size, (0, 0))
            if ours is None or not np.array_equal(ours, np.asarray(img.resize(out, resample).crop(box))):
                version = Image.__version__
                log.warning("Pillow %s resamples otherwise: exact preprocessing resizes with Pillow", version)
                return False
    return True


def pixels(img: Image.Image) -> tuple[int, object] | None:
    """The address of the image's pixels and the capsule that keeps them alive, or None where Pillow keeps
    them in more than one block. The address is trusted only with the length it comes with."""
    try:
        _, capsule = img.__arrow_c_array__()
    except Exception:  # noqa: BLE001 - more than one block, or a Pillow that exports otherwise: Pillow resizes
        return None
    array = ctypes.cast(_capsule_pointer(capsule, b"arrow_array"), ctypes.POINTER(_ArrowArray)).contents
    px = PIXEL_BYTES[img.mode]
    if array.n_children:  # RGB: a list of 4 bytes per pixel, the bytes in the child
        array = array.children[0].contents
    if array.n_buffers < 2 or array.offset != 0 or array.length != img.width * img.height * px:
        return None
    address = array.buffers[1]
    return (address, capsule) if address else None


def crop_resize(
    img: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: int,
    full: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray | None:
    """`np.asarray(whole.resize(size, resample).crop(box))` (H, W) or (H, W, 3) uint8, or None where this
    module does not do it (the caller then asks Pillow). `img` is the whole image, or the part of a `full`
    sized one whose top left pixel lies at `origin` in it (`service.jpeg_region`): it must hold every pixel
    the box reads (`reads`)."""
    if not available():
        return None
    return _compute(img, size, box, resample, full or img.size, origin)


def reads(
    size: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int], resample: int
) -> tuple[int, int, int, int] | None:
    """The pixels (left, top, right, bottom) of a `size` image that `crop_resize` reads to compute `box` of
    its resize to `resized` (where the size does not change, the box itself), or None where it would not
    compute it."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= resized[0] and 0 <= y0 < y1 <= resized[1]):
        return None
    span = []
    for axis, (first, last) in enumerate(((x0, x1), (y0, y1))):
        if resized[axis] == size[axis]:  # Pillow leaves this axis as it is
            span.append((first, last))
            continue
        if not available() or resample not in FILTERS:
            return None
        lo, hi = ctypes.c_int(), ctypes.c_int()
        if _lib.crop_span(size[axis], resized[axis], first, last - first, FILTERS[resample], lo, hi) != 0:
            return None
        span.append((lo.value, hi.value))
    return span[0][0], span[1][0], span[0][1], span[1][1]


def _compute(
    img: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: int,
    full: tuple[int, int],
    origin: tuple[int, int],
) -> np.ndarray | None:
    if img.mode not in PIXEL_BYTES or resample not in FILTERS:
        return None
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]) or size == full:
        return None
    found = pixels(img)
    if found is None:
        return None
    address, capsule = found
    px = PIXEL_BYTES[img.mode]
    out = np.empty((y1 - y0, x1 - x0, px), dtype=np.uint8)
    rc = _lib.crop_resize(
        address, img.width * px, px, full[0], full[1], origin[0], origin[1], img.width, img.height,
        size[0], size[1], x0, y0, x1 - x0, y1 - y0, FILTERS[resample], out.ctypes.data,
    )  # fmt: skip
    del capsule  # the pixels may go once the call has returned
    if rc != 0:
        return None
    return out[:, :, 0] if px == 1 else out[:, :, :3]
