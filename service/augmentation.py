"""Test-time augmentation: which views of an image the network sees, per request (`tta=`).

- `none`: the card's resize + center crop.
- `flip`: that view and the same crop of the mirrored image.
- `five_crop`: four corners and center of the resized image (torchvision's FiveCrop order).
- `ten_crop`: the five crops, then the five crops of the mirrored image (AlexNet's evaluation, Krizhevsky et
  al. 2012; torchvision's TenCrop, in its order).

- `multiscale`: VGG's evaluation (Simonyan & Zisserman 2014): shorter sides 256, 384 and 512 scaled by the
  model's `resize / 256` ratio, five crops and their mirrors at each scale (30 views).

A mirrored view is a crop of the mirrored image, as in torchvision's TenCrop, not the mirror of a crop: when
the margin around a center crop is odd, the crop sits half a pixel off center, and its mirror would be a
different patch. So on a mirror-symmetric image `flip` equals `none`, and `ten_crop` equals `five_crop`,
exactly.

The core averages the views' *softmax probabilities* (not logits): probabilities are on the same scale for
every view, so one over-confident view cannot dominate through a large logit, and the average is itself a
probability distribution that top-k and the Open Inference Protocol can return as is. This is what AlexNet and
VGG report.
"""

from __future__ import annotations

from service.card import Preprocessing
from service.errors import InvalidArgument, shown
from service.preprocessing import View, center_box, resized_size

MODES = ("none", "flip", "five_crop", "ten_crop", "multiscale")
MULTISCALE_SIDES = (256, 384, 512)


def check_mode(tta: str) -> str:
    if tta not in MODES:
        raise InvalidArgument(f"unknown tta {shown(tta)}; choose one of {', '.join(MODES)}")
    return tta


def scales(spec: Preprocessing, tta: str) -> list[int]:
    """The shorter sides a mode resizes to (the decoder needs the largest)."""
    if tta == "multiscale":
        ratio = spec.resize / 256.0
        return [max(spec.height, spec.width, round(s * ratio)) for s in MULTISCALE_SIDES]
    return [spec.resize]


def max_short_side(spec: Preprocessing, tta: str) -> int:
    return max(scales(spec, tta))


def five_crops(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """(left, top) of torchvision's FiveCrop: top-left, top-right, bottom-left, bottom-right, center."""
    cl, ct = center_box(width, height, crop_w, crop_h)
    return [(0, 0), (width - crop_w, 0), (0, height - crop_h), (width - crop_w, height - crop_h), (cl, ct)]


def plan_views(spec: Preprocessing, tta: str, size: tuple[int, int]) -> list[View]:
    """The views of mode `tta` for an image of (width, height) `size` (after decoding)."""
    check_mode(tta)
    w, h = size
    cw, ch = spec.width, spec.height
    if tta in ("none", "flip"):
        rw, rh = resized_size(w, h, spec.resize)
        left, top = center_box(rw, rh, cw, ch)
        view = View(spec.resize, left, top, cw, ch)
        return [view] if tta == "none" else [view, _mirrored(view, rw)]
    views: list[View] = []
    for short in scales(spec, tta):
        rw, rh = resized_size(w, h, short)
        crops = [View(short, left, top, cw, ch) for left, top in five_crops(rw, rh, cw, ch)]
        views.extend(crops)
        if tta in ("ten_crop", "multiscale"):
            views.extend(_mirrored(v, rw) for v in crops)
    return views


def _mirrored(view: View, resized_width: int) -> View:
    """The view at the same place in the mirrored image: in the image's own columns, the crop that starts
    as far from the right edge as `view` starts from the left, then mirrored."""
    left = resized_width - view.width - view.left
    return View(view.short, left, view.top, view.width, view.height, mirror=True)


def view_count(tta: str) -> int:
    return {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10, "multiscale": 30}[check_mode(tta)]
