"""Model-card preprocessing: resize the shorter side, center-crop, scale to [0, 1], normalize, NCHW float32.

Two modes (`Settings.preprocess_mode`):

- `exact` (default) reproduces torchvision's PIL evaluation transform `Resize(resize, interp) +
  CenterCrop(crop) + ToTensor() + Normalize(mean, std)` step by step (same size rounding, same crop offsets,
  float32 arithmetic), on an image decoded at full size: the model's own answer, every time. Only the
  resized pixels that the views keep are computed (`service.resample`: the same bytes as Pillow's whole
  resize), and of a JPEG only the part those read is decoded (`reads`, `service.jpeg_region`: the same
  pixels as Pillow's whole decode).
- `fast` asks the decoder for a JPEG DCT-downscaled image no smaller than `FAST_DRAFT_MARGIN` times the
  resize target, places each view by the full-size image (`decoding.source_geometry`: where it lies in the
  downscaled pixels), resizes only the region the view keeps with the card's filter (`Image.resize(box=...)`)
  and normalizes with one multiply-add. It gives another top-1 class than `exact` on about 1
  photo in 80; `bench/bench_fidelity.py` measures it, docs/CORE.md has the trade-off.

Both modes normalize by table: a normalized value depends on its byte and channel only, so each mode's
float32 arithmetic runs once on the 256 bytes and rendering looks values up, bit for bit the same.

The parameters are the model card's (`service.card.Preprocessing`). A *view* is (shorter side S, crop box in
the S-resized image, mirror); test-time augmentation (`service/augmentation.py`) is a list of views, and this
module renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service import resample
from service.card import Preprocessing
from service.decoding import source_geometry

INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
MODES = ("exact", "fast")
# fast mode's JPEG draft: decode at no less than this multiple of the resize target, so that the card's filter
# makes the last reduction (docs/CORE.md, "Preprocessing", has the measured trade-off)
FAST_DRAFT_MARGIN = 2.0


@dataclass(frozen=True)
class View:
    """One network input cut from an image: resize shorter side to `short`, crop at (left, top), mirror."""

    short: int
    left: int
    top: int
    width: int
    height: int
    mirror: bool = False


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` output size: shorter side = `short`, longer side truncated (int())."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """torchvision's `CenterCrop` offsets (round half to even, like Python's round)."""
    return int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))


def center_view(spec: Preprocessing) -> View:
    """The one view of tta=none, expressed for a nominal square; `plan_views` fits it to an image."""
    return View(spec.resize, -1, -1, spec.width, spec.height)


class Preprocessor:
    """Renders views of a decoded image into a float32 (V, C, H, W) array, normalized per the card."""

    def __init__(self, spec: Preprocessing, mode: str = "exact") -> None:
        if mode not in MODES:
            raise ValueError(f"preprocess mode must be one of {MODES}, not {mode!r}")
        self.spec = spec
        self.mode = mode
        self.resample = INTERPOLATION[spec.interpolation]
        std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._mean, self._std = mean, std
        # fast: x/255 then normalize == x * scale + offset; (C, 1, 1) each
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)
        # A pixel's normalized value depends on its byte and channel only, so each mode's arithmetic is done
        # once, on the 256 bytes, into a (C, 256) table that rendering then looks up: the same float32
        # operations on the same values give the same bits, several times faster than doing them per pixel.
        byte = np.arange(256, dtype=np.uint8)[None, None, :]
        # exact: torchvision's ToTensor (x / 255), invert, then Normalize ((x - mean) / std), in float32
        x = byte.astype(np.float32) / np.float32(255.0)
        if spec.invert:
            x = np.float32(1.0) - x
        self._exact_table = ((x - mean) / std)[:, 0]
        # fast: the multiply-add, invert (255 - x) first
        inverted = (255 - byte) if spec.invert else byte
        self._fast_table = (inverted.astype(np.float32) * self.scale + self.offset)[:, 0]

    @property
    def decode_draft(self) -> bool:
        return self.mode == "fast"

    @property
    def draft_margin(self) -> float:
        """JPEGs are DCT-downscaled to no less than this multiple of the resize target (fast mode)."""
        return FAST_DRAFT_MARGIN

    def __call__(self, img: Image.Image, views: Sequence[View] | None = None) -> np.ndarray:
        """`views` are planned on the image's source size (`decoding.source_geometry`: its size before DCT
        downscaling), as the reference transform sees the image."""
        size, _ = source_geometry(img)
        views = list(views) if views is not None else [self.fit(center_view(self.spec), size)]
        out = np.empty((len(views), self.spec.channels, self.spec.height, self.spec.width), dtype=np.float32)
        if self.mode == "exact":
            self._render_exact(img, views, out)
        else:
            self._render_fast(img, views, out)
        return out

    def fit(self, view: View, size: tuple[int, int]) -> View:
        """Resolve a center placeholder (left/top = -1) against the image's resized size."""
        if view.left >= 0:
            return view
        rw, rh = resized_size(size[0], size[1], view.short)
        left, top = center_box(rw, rh, view.width, view.height)
        return View(view.short, left, top, view.width, view.height, view.mirror)

    # -- exact: the torchvision pipeline ----
    def reads(self, views: Sequence[View], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """The pixels (left, top, right, bottom) of a `size` image that rendering `views` reads, for a decoder
        that can decode only those (`decoding.decode`'s `part`); None where that is not known (fast mode,
        a resize that `service.resample` does not compute)."""
        if self.mode != "exact":
            return None
        views = [self.fit(view, size) for view in views]
        boxes = []
        for short in {view.short for view in views}:
            resized = resized_size(*size, short)
            kept = _kept_box([v for v in views if v.short == short], resized)
            if kept is None:  # nothing of the image is kept: a view entirely in the padding
                continue
            box = resample.reads(size, resized, kept, self.resample)
            if box is None:
                return None
            boxes.append(box)
        if not boxes:
            return None
        (x0, y0, x1, y1) = zip(*boxes, strict=True)
        return min(x0), min(y0), max(x1), max(y1)

    def _render_exact(self, img: Image.Image, views: Sequence[View], out: np.ndarray) -> None:
        # the image is the whole one, or the part of it that `reads` asked the decoder for
        size, (bx, by, bx1, by1) = source_geometry(img)
        if (bx1 - bx, by1 - by) != size:
            raise ValueError("exact mode needs an image decoded at full size (decode with draft=False)")
        origin = (-int(bx), -int(by))  # where the image's top left pixel lies in the whole one
        views = [self.fit(view, size) for view in views]
        resized: dict[int, tuple[np.ndarray, int, int]] = {}  # short side -> pixels, and where they lie
        for i, view in enumerate(views):
            if view.short not in resized:
                same = [v for v in views if v.short == view.short]
                resized[view.short] = self._resize_kept(img, size, origin, view.short, same)
            arr = _crop_padded(*resized[view.short], view)
            _look_up(self._exact_table, arr[:, ::-1] if view.mirror else arr, out[i])

    def _resize_kept(
        self,
        img: Image.Image,
        full: tuple[int, int],
        origin: tuple[int, int],
        short: int,
        views: Sequence[View],
    ) -> tuple[np.ndarray, int, int]:
        """The pixels of the `full` sized image (`img`, or the part of it `img` holds from `origin` on)
        resized to shorter side `short` that `views` keep (their bounding box within the resized image), and
        the box's left and top: the same bytes as Pillow's whole resize (`service.resample`), or that resize
        itself where the compiled part does not apply."""
        size = resized_size(*full, short)
        kept = _kept_box(views, size)
        if kept is None:  # every view lies in the padding
            return np.zeros((0, 0, 3) if img.mode == "RGB" else (0, 0), dtype=np.uint8), 0, 0
        part = img.size != full
        if size == full and (not part or _holds(img, origin, kept)):  # no resize: the pixels as they are
            return np.asarray(img, dtype=np.uint8), origin[0], origin[1]
        pixels = resample.crop_resize(img, size, kept, self.resample, full, origin)
        if pixels is not None:
            return pixels, kept[0], kept[1]
        if part:
            raise PartMissed("the decoded part does not hold the pixels the views read")
        return np.asarray(img.resize(size, self.resample), dtype=np.uint8), 0, 0

    # -- fast: resize only what each view keeps ----
    def _render_fast(self, img: Image.Image, views: Sequence[View], out: np.ndarray) -> None:
        # the views' geometry is the full-size image's; a DCT-downscaled image holds it in `box`
        (w, h), (bx, by, bx1, by1) = source_geometry(img)
        ax, ay = (bx1 - bx) / w, (by1 - by) / h  # decoded pixels per source pixel (1/2, 1/4, 1/8 or 1)
        rendered: dict[tuple[int, int, int], int] = {}  # crop -> index in `out` of a view holding it
        for i, view in enumerate(views):
            view = self.fit(view, (w, h))
            key = (view.short, view.left, view.top)
            if key in rendered:
                j = rendered[key]
                out[i] = out[j][:, :, ::-1] if view.mirror != views[j].mirror else out[j]
                continue
            rw, rh = resized_size(w, h, view.short)
            sx, sy = ax * w / rw, ay * h / rh  # decoded pixels per resized pixel
            inside = 0 <= view.left and view.left + view.width <= rw and 0 <= view.top
            # an enlarged image is resized whole, as the reference does: cheap at that size, and Pillow's
            # box placement differs from it by a grey level or two on a fifth of the pixels when enlarging
            if inside and view.top + view.height <= rh and rw <= w:
                box = (
                    bx + view.left * sx,
                    by + view.top * sy,
                    bx + (view.left + view.width) * sx,
                    by + (view.top + view.height) * sy,
                )
                part = img.resize((view.width, view.height), self.resample, box=box)
                crop = np.asarray(part, dtype=np.uint8)
            else:  # enlarged, or a crop larger than the resized image (torchvision pads with zeros)
                whole = img.resize((rw, rh), self.resample, box=(bx, by, bx1, by1))
                crop = _crop_padded(np.asarray(whole, dtype=np.uint8), 0, 0, view)
            _look_up(self._fast_table, crop[:, ::-1] if view.mirror else crop, out[i])
            rendered[key] = i


class PartMissed(Exception):
    """A part decoded alone does not hold what rendering reads: the caller decodes the whole image."""


def _kept_box(views: Sequence[View], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The bounding box of the views' crops within a `size` resized image, or None where they keep none."""
    left = max(0, min(v.left for v in views))
    top = max(0, min(v.top for v in views))
    right = min(size[0], max(v.left + v.width for v in views))
    bottom = min(size[1], max(v.top + v.height for v in views))
    return (left, top, right, bottom) if left < right and top < bottom else None


def _holds(img: Image.Image, origin: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    x0, y0 = origin
    return x0 <= box[0] and y0 <= box[1] and box[2] <= x0 + img.width and box[3] <= y0 + img.height


def _look_up(table: np.ndarray, pixels: np.ndarray, out: np.ndarray) -> None:
    """out (C, H, W) float32 = table[c][pixels (H, W) or (H, W, C) uint8], channel by channel."""
    planes = pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    for c, plane in enumerate(planes):
        np.take(table[c], plane, out=out[c], mode="clip")  # bytes index 256 values: never out of range


def _crop_padded(pixels: np.ndarray, left: int, top: int, view: View) -> np.ndarray:
    """The view's crop of resized pixels that start at (left, top), with zeros where the crop leaves the
    resized image (torchvision's CenterCrop pads the same way)."""
    x0, y0 = view.left - left, view.top - top
    h, w = pixels.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + view.width <= w and y0 + view.height <= h:
        return pixels[y0 : y0 + view.height, x0 : x0 + view.width]
    canvas = np.zeros((view.height, view.width, *pixels.shape[2:]), dtype=np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + view.width), min(h, y0 + view.height)
    if sx0 < sx1 and sy0 < sy1:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return canvas
