"""The core on the default repository (`make models`): real photos, every input kind that must classify."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.core import InferenceCore, Prediction
from tests.conftest import classify_now, encode

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def core(model_repo: Path) -> InferenceCore:
    c = InferenceCore(Settings(repository=str(model_repo), max_batch_size=8))
    c.load()
    yield c
    c.close()


def _top1(core: InferenceCore, data: bytes, **kw: object) -> Prediction:
    (p,) = classify_now(core, [data], **kw)
    assert isinstance(p, Prediction), p
    return p


def test_default_models_ready(core: InferenceCore) -> None:
    states = {m.name: m.state for m in core.models()}
    assert states.get("efficientnet_lite0") == "READY" and states.get("lenet5") == "READY"
    info = core.model_info("efficientnet_lite0")
    assert info.provider and info.card is not None and info.card.labels[281].id.startswith("n")


def test_chelsea_is_a_cat_in_every_tta_mode(core: InferenceCore, chelsea: Image.Image) -> None:
    data = encode(chelsea, "JPEG", quality=90)
    for tta in ("none", "flip", "five_crop", "ten_crop", "multiscale"):
        p = _top1(core, data, model="efficientnet_lite0", top_k=5, tta=tta)
        assert p.top_k[0].index in CAT_CLASSES, (tta, p.to_dict())
        assert p.top_k[0].id.startswith("n0") and p.version


def test_exif_rotated_jpeg_classified_upright(core: InferenceCore, chelsea: Image.Image) -> None:
    upright = _top1(core, encode(chelsea, "JPEG", quality=92), model="efficientnet_lite0")
    for orientation, stored in (
        (6, chelsea.rotate(90, expand=True)),
        (8, chelsea.rotate(270, expand=True)),
        (3, chelsea.rotate(180)),
    ):
        exif = Image.Exif()
        exif[0x0112] = orientation
        p = _top1(core, encode(stored, "JPEG", quality=92, exif=exif.tobytes()), model="efficientnet_lite0")
        assert p.top_k[0].index == upright.top_k[0].index
    # without the tag the sideways cat is seen sideways: the EXIF handling is what made the difference
    sideways = _top1(
        core, encode(chelsea.rotate(90, expand=True), "JPEG", quality=92), model="efficientnet_lite0"
    )
    assert not np.allclose(sideways.probabilities, upright.probabilities, atol=1e-3)


def _inputs(chelsea: Image.Image) -> dict[str, bytes]:
    small = chelsea.resize((300, 225))
    out: dict[str, bytes] = {}
    grey16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    out["png16"] = encode(Image.fromarray(grey16), "PNG")
    out["cmyk_jpeg"] = encode(small.convert("CMYK"), "JPEG", quality=92)
    out["grayscale"] = encode(small.convert("L"), "JPEG", quality=92)
    out["palette_transparency"] = encode(
        small.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0
    )
    rgba = small.convert("RGBA")
    rgba.putalpha(200)
    out["rgba"] = encode(rgba, "PNG")
    frames = [small.convert("P", palette=Image.Palette.ADAPTIVE), Image.new("P", small.size, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated_gif"] = buf.getvalue()
    out["one_pixel"] = encode(Image.new("RGB", (1, 1), (120, 80, 40)), "PNG")
    out["webp"] = encode(small, "WEBP", quality=90)
    out["tiff"] = encode(small, "TIFF")
    out["bmp"] = encode(small, "BMP")
    return out


@pytest.mark.parametrize(
    "kind",
    [
        "png16",
        "cmyk_jpeg",
        "grayscale",
        "palette_transparency",
        "rgba",
        "animated_gif",
        "one_pixel",
        "webp",
        "tiff",
        "bmp",
    ],
)
def test_inputs_that_must_classify(core: InferenceCore, chelsea: Image.Image, kind: str) -> None:
    data = _inputs(chelsea)[kind]
    for model in ("efficientnet_lite0", "lenet5"):
        p = _top1(core, data, model=model, top_k=3)
        assert len(p.top_k) == 3 and abs(float(p.probabilities.sum()) - 1) < 1e-4
    if kind in ("cmyk_jpeg", "rgba", "animated_gif", "webp", "tiff", "bmp", "palette_transparency"):
        assert _top1(core, data, model="efficientnet_lite0").top_k[0].index in CAT_CLASSES


def test_lenet_reads_digits(core: InferenceCore) -> None:
    from sklearn.datasets import load_digits

    # the card says whether the network wants light ink on dark (the data set) or inverts dark ink on paper
    card = core.model_info("lenet5").card
    invert = card is not None and card.preprocessing.invert
    digits = load_digits()
    correct, n = 0, 60
    for img, label in zip(digits.images[-n:], digits.target[-n:], strict=True):
        ink = (img / 16.0 * 255).astype(np.uint8)
        page = Image.fromarray(255 - ink if invert else ink).resize((64, 64), Image.Resampling.BILINEAR)
        correct += _top1(core, encode(page, "PNG"), model="lenet5", top_k=1).top_k[0].index == label
    assert correct / n >= 0.8, f"{correct}/{n}"
