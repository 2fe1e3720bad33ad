"""The compiled crop-only resize gives Pillow's bytes, and exact preprocessing gives the same tensors with it
as without it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from service import preprocessing, resample
from service.augmentation import plan_views
from service.card import Preprocessing
from service.decoding import decode
from service.preprocessing import Preprocessor, center_box, resized_size
from tests.conftest import encode

pytestmark = pytest.mark.skipif(
    not resample.available(), reason="service/native/resample.so is not built (make resample)"
)

FILTERS = sorted(resample.FILTERS)
CARD = {
    "input_size": [3, 224, 224],
    "resize": 256,
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def pillow(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], f: int) -> np.ndarray:
    return np.asarray(img.resize(size, f).crop(box))


def random_image(rng: np.random.Generator, mode: str, w: int, h: int) -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(params=["vectors", "portable"])
def passes(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test twice: with the CPU's vector instructions (where it has them) and with the portable C."""
    before = resample.use_vectors(request.param == "vectors")
    yield request.param
    resample.use_vectors(before)


def test_random_sizes_crops_and_filters_match_pillow(passes: str) -> None:
    """Shrinking, enlarging, one side each way, tall images (Pillow's vertical pass first), every filter."""
    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(600):
        mode = ("RGB", "L")[trial % 2]
        w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
        if trial % 7 == 0:
            w = max(1, h // 5)  # tall: the height shrinks by more than twice what the width does
        ow, oh = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        x0 = int(rng.integers(0, ow))
        y0 = int(rng.integers(0, oh))
        box = (x0, y0, int(rng.integers(x0 + 1, ow + 1)), int(rng.integers(y0 + 1, oh + 1)))
        f = FILTERS[trial % len(FILTERS)]
        img = random_image(rng, mode, w, h)
        ours = resample.crop_resize(img, (ow, oh), box, f)
        if (ow, oh) == (w, h):
            assert ours is None  # Pillow copies: nothing to compute
            continue
        assert ours is not None, (mode, w, h, ow, oh, box, f)
        where = str((mode, w, h, ow, oh, box, f))
        np.testing.assert_array_equal(ours, pillow(img, (ow, oh), box, f), err_msg=where)
        compared += 1
    assert compared > 590


def test_a_part_of_the_image_gives_the_bytes_of_the_whole(passes: str) -> None:
    """`crop_resize` on the part of an image that `reads` names (a JPEG part decoded alone) gives the bytes
    of the whole image's resize, and refuses a part that lacks a pixel it would read."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        mode = ("RGB", "L")[trial % 2]
        w, h = int(rng.integers(2, 400)), int(rng.integers(2, 400))
        ow, oh = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        if (ow, oh) == (w, h):
            continue
        x0, y0 = int(rng.integers(0, ow)), int(rng.integers(0, oh))
        box = (x0, y0, int(rng.integers(x0 + 1, ow + 1)), int(rng.integers(y0 + 1, oh + 1)))
        f = FILTERS[trial % len(FILTERS)]
        img = random_image(rng, mode, w, h)
        read = resample.reads((w, h), (ow, oh), box, f)
        assert read is not None
        left, top, right, bottom = read
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        # the part read, and a margin where the image has one (as a decoded part has)
        part = (max(0, left - 2), max(0, top - 2), min(w, right + 3), min(h, bottom + 1))
        ours = resample.crop_resize(img.crop(part), (ow, oh), box, f, full=(w, h), origin=part[:2])
        where = str((mode, w, h, ow, oh, box, f, part))
        assert ours is not None, where
        np.testing.assert_array_equal(ours, pillow(img, (ow, oh), box, f), err_msg=where)
        if right - left > 1:  # one column short
            short = img.crop((left + 1, top, right, bottom))
            lacking = resample.crop_resize(short, (ow, oh), box, f, full=(w, h), origin=(left + 1, top))
            assert lacking is None, where


@pytest.mark.parametrize("f", FILTERS)
@pytest.mark.parametrize("size", [(2000, 1500), (1280, 1920), (700, 3000)])
def test_center_crop_of_a_photo_matches_pillow(
    passes: str, coffee: Image.Image, size: tuple[int, int], f: int
) -> None:
    """A photo at camera-like sizes, landscape, portrait and very tall, cut to the card's center crop."""
    img = coffee.resize(size, Image.Resampling.LANCZOS)
    out = resized_size(*size, 256)
    left, top = center_box(*out, 224, 224)
    box = (left, top, left + 224, top + 224)
    np.testing.assert_array_equal(resample.crop_resize(img, out, box, f), pillow(img, out, box, f))


@pytest.mark.parametrize("f", FILTERS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_extreme_pixels_and_long_filters_match_pillow(passes: str, mode: str, f: int) -> None:
    """Stripes of 0 and 255 drive the sums to both ends (the negative lobes of bicubic and Lanczos past 0 and
    255, clipped); shrinking 20000 columns or 12000 rows to 40 gives windows of up to 3,000 taps."""
    stripes = np.zeros((60, 20000), dtype=np.uint8)
    stripes[:, ::2] = 255
    stripes[::3, :] = 255 - stripes[::3, :]
    cases = [
        (stripes, (40, 60), (3, 5, 37, 60)),  # the width shrinks 500 times
        (stripes[:, :240].T.copy(), (60, 40), (0, 1, 60, 39)),  # the height shrinks 4 times: vertical first
        (np.ascontiguousarray(np.tile(stripes[:, :20].T, (600, 1))), (20, 40), (2, 0, 18, 40)),  # 12000 rows
        (stripes[:7, :9], (300, 200), (17, 3, 290, 199)),  # enlarged 33 times and 28 times
    ]
    for pixels, size, box in cases:
        img = Image.fromarray(pixels if mode == "L" else np.stack([pixels, 255 - pixels, pixels], axis=-1))
        where = str((mode, img.size, size, box, f, passes))
        ours = resample.crop_resize(img, size, box, f)
        np.testing.assert_array_equal(ours, pillow(img, size, box, f), err_msg=where)


def test_what_it_does_not_do_is_left_to_pillow(chelsea: Image.Image) -> None:
    size, box = (300, 200), (10, 10, 50, 50)
    assert resample.crop_resize(chelsea.convert("RGBA"), size, box, Image.Resampling.BICUBIC) is None
    assert resample.crop_resize(chelsea, size, box, Image.Resampling.NEAREST) is None
    bicubic = Image.Resampling.BICUBIC
    assert resample.crop_resize(chelsea, size, (0, 0, 301, 200), bicubic) is None  # leaves the image
    assert resample.crop_resize(chelsea, size, (20, 10, 20, 50), bicubic) is None  # empty


def test_an_image_in_several_blocks_is_left_to_pillow(chelsea: Image.Image) -> None:
    """Pillow's pixels are read in place only when they lie in one block of memory."""
    Image.core.set_use_block_allocator(0)
    block_size = Image.core.get_block_size()
    try:
        Image.core.set_block_size(4096)  # a few rows a block
        img = chelsea.copy()
    finally:
        Image.core.set_block_size(block_size)
        Image.core.set_use_block_allocator(1)
    assert resample.crop_resize(img, (300, 200), (10, 10, 50, 50), Image.Resampling.BICUBIC) is None


def exact_tensors(spec: Preprocessing, img: Image.Image, tta: str) -> np.ndarray:
    pre = Preprocessor(spec, "exact")
    return pre(img, plan_views(spec, tta, img.size))


@pytest.mark.parametrize("tta", ["none", "flip", "ten_crop", "multiscale"])
@pytest.mark.parametrize("channels", [3, 1])
def test_exact_preprocessing_is_the_same_with_and_without_it(
    tta: str, channels: int, coffee: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = dict(CARD, input_size=[channels, 224, 224], channels=channels)
    if channels == 1:
        card.update(mean=[0.5], std=[0.25])
    spec = Preprocessing.from_dict(card)
    photo = coffee.resize((1500, 1000), Image.Resampling.LANCZOS)
    img = decode(encode(photo, "JPEG", quality=90), channels=channels, draft=False)
    with_it = exact_tensors(spec, img, tta)
    monkeypatch.setattr(preprocessing.resample, "crop_resize", lambda *args: None)
    without = exact_tensors(spec, img, tta)
    assert with_it.shape == without.shape
    np.testing.assert_array_equal(with_it, without)


def test_a_crop_larger_than_the_resized_image_is_padded_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A card whose crop exceeds its resize (torchvision pads the crop with zeros)."""
    spec = Preprocessing.from_dict(dict(CARD, resize=200))
    img = random_image(np.random.default_rng(3), "RGB", 640, 300)
    with_it = Preprocessor(spec, "exact")(img)
    monkeypatch.setattr(preprocessing.resample, "crop_resize", lambda *args: None)
    np.testing.assert_array_equal(with_it, Preprocessor(spec, "exact")(img))
