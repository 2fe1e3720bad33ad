"""Test-time augmentation: the views are the crops each mode names, and averaging behaves as it must."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.augmentation import MODES, check_mode, plan_views, scales
from service.card import Preprocessing
from service.config import Settings
from service.core import InferenceCore
from service.errors import InvalidArgument
from service.preprocessing import Preprocessor
from tests.conftest import classify_now, encode

SPEC = Preprocessing.from_dict(
    {"input_size": [3, 224, 224], "resize": 256, "mean": [0.5] * 3, "std": [0.25] * 3}
)


def test_views_are_the_named_crops() -> None:
    size = (384, 256)  # already at the 256 shorter side: resized size == size
    none = plan_views(SPEC, "none", size)
    assert [(v.short, v.left, v.top, v.mirror) for v in none] == [(256, 80, 16, False)]
    flip = plan_views(SPEC, "flip", size)
    assert [(v.left, v.top, v.mirror) for v in flip] == [(80, 16, False), (80, 16, True)]
    five = plan_views(SPEC, "five_crop", size)
    assert [(v.left, v.top) for v in five] == [(0, 0), (160, 0), (0, 32), (160, 32), (80, 16)]
    assert not any(v.mirror for v in five)
    ten = plan_views(SPEC, "ten_crop", size)
    # The five crops of the mirrored image, in its own order: its top-left is the original's top-right.
    assert [(v.left, v.top) for v in ten[5:]] == [(160, 0), (0, 0), (160, 32), (0, 32), (80, 16)]
    assert all(v.mirror for v in ten[5:])
    # An odd margin (385 - 224 = 161): the mirrored center crop starts one pixel further right.
    odd = plan_views(SPEC, "flip", (385, 256))
    assert [(v.left, v.mirror) for v in odd] == [(80, False), (81, True)]
    multi = plan_views(SPEC, "multiscale", size)
    assert len(multi) == 30 and sorted({v.short for v in multi}) == [256, 384, 512]
    at_512 = [v for v in multi if v.short == 512 and not v.mirror]
    assert [(v.left, v.top) for v in at_512] == [(0, 0), (544, 0), (0, 288), (544, 288), (272, 144)]


def test_multiscale_follows_the_models_size_ratio() -> None:
    lenet = Preprocessing.from_dict(
        {"input_size": [1, 32, 32], "resize": 32, "channels": 1, "mean": [0], "std": [1]}
    )
    assert scales(lenet, "multiscale") == [32, 48, 64]
    inception = Preprocessing.from_dict({"input_size": [3, 299, 299], "resize": 342})
    assert scales(inception, "multiscale") == [342, 513, 684]


def test_rendered_views_match_manual_crops(chelsea: Image.Image) -> None:
    img = chelsea.resize((384, 256))
    pre = Preprocessor(SPEC, "exact")
    arrays = pre(img, plan_views(SPEC, "ten_crop", img.size))
    ref_tr = (np.asarray(img.crop((160, 0, 384, 224)), np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(arrays[1], ref_tr.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_allclose(arrays[5], ref_tr.transpose(2, 0, 1)[:, :, ::-1], atol=1e-5)


@pytest.mark.parametrize("size", [(384, 256), (385, 256), (256, 301)])
def test_ten_crop_is_torchvisions(chelsea: Image.Image, size: tuple[int, int]) -> None:
    """Exact mode's views equal torchvision's TenCrop of the resized image, one by one, odd margins too."""
    from torchvision import transforms

    img = chelsea.resize(size)  # shorter side already 256: Resize(256) keeps it
    ours = Preprocessor(SPEC, "exact")(img, plan_views(SPEC, "ten_crop", img.size))
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)])
    theirs = np.stack([to_input(crop).numpy() for crop in transforms.TenCrop(224)(img)])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_unknown_mode() -> None:
    with pytest.raises(InvalidArgument, match="unknown tta"):
        check_mode("twenty_crop")


@pytest.fixture(scope="module")
def core(tiny_repo) -> InferenceCore:
    c = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", preprocess_mode="exact"))
    c.load()
    yield c
    c.close()


def _probs(core: InferenceCore, data: bytes, tta: str) -> np.ndarray:
    (pred,) = classify_now(core, [data], top_k=3, tta=tta)
    return pred.probabilities


@pytest.mark.parametrize("half_width", [36, 40])
def test_mirror_symmetric_image(core: InferenceCore, chelsea: Image.Image, half_width: int) -> None:
    # 72x64 is resized to 40x36 for the 32 crop: an even margin, the center crop is centred. 80x64 is
    # resized to 45x36: an odd margin (13), the center crop sits half a pixel left of center.
    half = np.asarray(chelsea.resize((half_width, 64)))
    img = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
    data = encode(img, "PNG")
    none, flip = _probs(core, data, "none"), _probs(core, data, "flip")
    assert (
        np.abs(
            none - _probs(core, encode(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"), "none")
        ).max()
        < 1e-5
    )
    np.testing.assert_allclose(flip, none, atol=1e-5)
    np.testing.assert_allclose(_probs(core, data, "ten_crop"), _probs(core, data, "five_crop"), atol=1e-5)
    # and the modes differ on it where they should (the test would be empty if the model ignored position)
    assert np.abs(_probs(core, data, "five_crop") - none).max() > 1e-3


@pytest.mark.parametrize("tta", MODES)
def test_constant_image_every_mode_equals_none(core: InferenceCore, tta: str) -> None:
    data = encode(Image.new("RGB", (90, 60), (30, 140, 200)), "PNG")
    np.testing.assert_allclose(_probs(core, data, tta), _probs(core, data, "none"), atol=1e-5)
