"""Preprocessing from the card: `exact` equals torchvision's eval transform; `fast` stays close to it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.card import Preprocessing
from service.decoding import decode
from service.preprocessing import Preprocessor, _look_up, resized_size
from tests.conftest import encode

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CARDS = {
    "efficientnet": {"input_size": [3, 224, 224], "resize": 256, "interpolation": "bicubic", **IMAGENET},
    "resnet_bilinear": {"input_size": [3, 224, 224], "resize": 256, "interpolation": "bilinear", **IMAGENET},
    "inception": {
        "input_size": [3, 299, 299],
        "resize": 342,
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "lenet": {
        "input_size": [1, 32, 32],
        "resize": 32,
        "interpolation": "bilinear",
        "mean": [0.1307],
        "std": [0.3081],
        "channels": 1,
    },
}


def torchvision_eval(img: Image.Image, pre: dict) -> np.ndarray:
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    c, h, w = pre["input_size"]
    tf = T.Compose(
        [
            T.Resize(pre["resize"], interpolation=interp[pre["interpolation"]]),
            T.CenterCrop((h, w)),
            T.ToTensor(),
            T.Normalize(pre["mean"], pre["std"]),
        ]
    )
    return tf(img).numpy()


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut"])
def test_exact_mode_matches_torchvision(card: str, photo: str, request: pytest.FixtureRequest) -> None:
    pre = CARDS[card]
    spec = Preprocessing.from_dict(pre)
    data = encode(request.getfixturevalue(photo), "JPEG", quality=90)
    img = decode(data, channels=spec.channels, draft=False)
    ours = Preprocessor(spec, "exact")(img)
    ref = torchvision_eval(
        Image.open(__import__("io").BytesIO(data)).convert("L" if spec.channels == 1 else "RGB"), pre
    )
    assert ours.shape == (1, *ref.shape)
    np.testing.assert_array_equal(ours[0], ref)  # bit for bit: the same float32 operations on the same bytes


@pytest.mark.parametrize("card", sorted(CARDS))
def test_fast_mode_close_to_exact(card: str, chelsea: Image.Image) -> None:
    spec = Preprocessing.from_dict(CARDS[card])
    data = encode(chelsea, "JPEG", quality=90)
    grey_levels = 255.0 * np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    exact = Preprocessor(spec, "exact")(decode(data, channels=spec.channels, draft=False))
    # resizing only the cropped region (no DCT downscaling): within one grey level of resize-then-crop
    boxed = Preprocessor(spec, "fast")(decode(data, channels=spec.channels, draft=False))
    assert boxed.shape == exact.shape == (1, spec.channels, spec.height, spec.width)
    assert (np.abs(boxed - exact) * grey_levels).mean() < 1.0
    # with JPEG DCT downscaling (up to 1/8 for LeNet's 32 pixels): a few grey levels on average
    fast = Preprocessor(spec, "fast")(decode(data, channels=spec.channels, min_short_side=spec.resize))
    assert (np.abs(fast - exact) * grey_levels).mean() < 6.0


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("card", ["efficientnet", "lenet"])
def test_looked_up_values_are_the_per_pixel_arithmetic(card: str, invert: bool) -> None:
    """Both modes look normalized values up in a table of 256 per channel: they must be the bits that each
    mode's float32 arithmetic gives pixel by pixel, inverted cards included."""
    spec = Preprocessing.from_dict(dict(CARDS[card], invert=invert))
    rng = np.random.default_rng(5)
    planes = np.stack([rng.permutation(np.arange(512) % 256).reshape(16, 32) for _ in range(spec.channels)])
    pixels = planes[0] if spec.channels == 1 else planes.transpose(1, 2, 0)  # (H, W) or (H, W, C), uint8
    planes, pixels = planes.astype(np.uint8), pixels.astype(np.uint8)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    x = planes.astype(np.float32) / np.float32(255.0)  # torchvision: ToTensor, invert, Normalize
    exact = ((np.float32(1.0) - x if invert else x) - mean) / std
    fast_pre = Preprocessor(spec, "fast")
    fast = (255 - planes if invert else planes).astype(np.float32) * fast_pre.scale + fast_pre.offset
    for table, want in ((Preprocessor(spec, "exact")._exact_table, exact), (fast_pre._fast_table, fast)):
        got = np.empty(planes.shape, dtype=np.float32)
        _look_up(table, pixels, got)
        assert want.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_resize_sizes_follow_torchvision() -> None:
    assert resized_size(451, 300, 256) == (384, 256)  # int(256 * 451 / 300) = 384
    assert resized_size(300, 451, 256) == (256, 384)
    assert resized_size(1, 1, 256) == (256, 256)


def test_normalization_values() -> None:
    spec = Preprocessing.from_dict(
        {"input_size": [3, 4, 4], "resize": 4, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.25, 1.0]}
    )
    img = Image.new("RGB", (4, 4), (255, 0, 51))
    for mode in ("fast", "exact"):
        x = Preprocessor(spec, mode)(img)[0]
        np.testing.assert_allclose(x[:, 0, 0], [1.0, -2.0, -0.3], atol=1e-6)


def test_lenet_gray_and_invert() -> None:
    spec = Preprocessing.from_dict(
        {"input_size": [1, 32, 32], "resize": 32, "mean": [0.0], "std": [1.0], "channels": 1, "invert": True}
    )
    img = Image.new("L", (40, 40), 255)
    for mode in ("fast", "exact"):
        x = Preprocessor(spec, mode)(img)
        assert x.shape == (1, 1, 32, 32) and np.allclose(x, 0.0, atol=1e-6)


def test_tiny_image_is_upscaled_and_cropped() -> None:
    spec = Preprocessing.from_dict(CARDS["inception"])
    x = Preprocessor(spec, "fast")(Image.new("RGB", (1, 1), (255, 255, 255)))
    assert x.shape == (1, 3, 299, 299) and np.allclose(x, 1.0, atol=1e-5)
