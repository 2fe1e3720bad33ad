"""JPEG parts decoded alone (`service.jpeg_region`): Pillow's pixels where they are read, the same answers as
the whole decode, and Pillow's errors wherever the part decoder is not sure."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import decoding, jpeg_region
from service.augmentation import plan_views
from service.card import Preprocessing
from service.decoding import decode, source_geometry
from service.errors import InvalidImage
from service.pipeline import Pipeline
from service.preprocessing import PartMissed, Preprocessor
from tests.conftest import encode
from tests.test_preprocessing import CARDS

pytestmark = pytest.mark.skipif(
    not jpeg_region.available(), reason="service/native/jpeg_region.so not built (make jpeg-region)"
)

LAYOUTS = {  # Pillow's subsampling numbers: 0 is 4:4:4, 1 is 4:2:2, 2 is 4:2:0
    "444": {"subsampling": 0},
    "422": {"subsampling": 1},
    "420": {"subsampling": 2},
    "420-progressive": {"subsampling": 2, "progressive": True},
    "422-progressive": {"subsampling": 1, "progressive": True},
    "420-restarts": {"subsampling": 2, "restart_marker_rows": 1},
}


@pytest.fixture(scope="module")
def camera() -> Image.Image:
    """A grey photo (scikit-image's cameraman)."""
    from skimage import data

    return Image.fromarray(data.camera())


def whole(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_pixels_read_are_pillows(layout: str, mode: str, astronaut: Image.Image) -> None:
    """Random boxes of JPEGs of every chroma layout, baseline and progressive, of sizes that are no multiple
    of the block size: inside the box, every pixel is the whole decode's."""
    rng = np.random.default_rng(5)
    for size in ((1021, 767), (333, 517), (48, 40)):
        data = encode(astronaut.convert(mode).resize(size), "JPEG", quality=85, **LAYOUTS[layout])
        expected = whole(data)
        w, h = size
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1)))
            decoded = jpeg_region.decode(data, mode, size, box)
            assert decoded is not None, (size, box)
            img, (left, top) = decoded
            assert left <= box[0] and top <= box[1]
            assert box[2] <= left + img.width <= w and box[3] <= top + img.height <= h
            assert left % jpeg_region.ALIGN == 0
            got = np.asarray(img)[box[1] - top : box[3] - top, box[0] - left : box[2] - left]
            np.testing.assert_array_equal(got, expected[box[1] : box[3], box[0] : box[2]], err_msg=str(box))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_part_is_placed_in_the_upright_image(orientation: int, chelsea: Image.Image) -> None:
    """The box asked for is upright (after the EXIF rotation); the image returned is the upright part, and
    `source_geometry` says where the whole upright image lies in it."""
    data = encode(chelsea.resize((640, 480)), "JPEG", quality=90, exif=exif(orientation))
    upright = decode(data, draft=False)
    sizes = []
    box = (150, 40, 300, 200) if upright.width > upright.height else (40, 150, 200, 300)
    part = decode(data, draft=False, part=lambda size: sizes.append(size) or box)
    assert sizes == [upright.size]
    full, (bx, by, bx1, by1) = source_geometry(part)
    assert full == upright.size and (bx1 - bx, by1 - by) == full
    assert part.size[0] * part.size[1] < full[0] * full[1] / 2  # a part, not the whole
    left, top = -int(bx), -int(by)
    got = np.asarray(part)[box[1] - top : box[3] - top, box[0] - left : box[2] - left]
    np.testing.assert_array_equal(got, np.asarray(upright)[box[1] : box[3], box[0] : box[2]])


@pytest.mark.parametrize("card", sorted(CARDS))
def test_answers_are_the_whole_decodes(card: str, astronaut: Image.Image, camera: Image.Image) -> None:
    """Every card's views, for every test-time augmentation, orientations that swap the axes or not,
    colour and grey JPEGs into colour and grey models: the tensors are the whole decode's, bit for bit."""
    spec = Preprocessing.from_dict(CARDS[card])
    pipeline = Pipeline(spec, decoding.Limits(), "exact")
    preprocessor = Preprocessor(spec, "exact")
    rng = np.random.default_rng(2)
    for photo in (astronaut, camera):
        for size, orientation in (((1200, 900), 1), ((700, 1100), 6), ((300, 257), 3), ((520, 900), 8)):
            layout = LAYOUTS[sorted(LAYOUTS)[int(rng.integers(0, len(LAYOUTS)))]]
            data = encode(photo.resize(size), "JPEG", quality=88, exif=exif(orientation), **layout)
            img = decode(data, channels=spec.channels, draft=False)
            for tta in ("none", "flip", "ten_crop", "multiscale"):
                expected = preprocessor(img, plan_views(spec, tta, img.size))
                np.testing.assert_array_equal(pipeline.prepare(data, tta), expected, err_msg=f"{size} {tta}")


def test_a_center_crop_decodes_a_part(coffee: Image.Image) -> None:
    """The center crop of a 16:10 photo reads about 55% of its columns and 88% of its rows: only those are
    decoded, and a margin."""
    spec = Preprocessing.from_dict(CARDS["efficientnet"])
    preprocessor = Preprocessor(spec, "exact")
    data = encode(coffee.resize((1600, 1000)), "JPEG", quality=90)
    part = decode(
        data, draft=False, part=lambda size: preprocessor.reads(plan_views(spec, "none", size), size)
    )
    assert source_geometry(part)[0] == (1600, 1000)
    assert 0.5 < part.width / 1600 < 0.65 and 0.85 < part.height / 1000 < 0.97
    assert preprocessor.reads(plan_views(spec, "none", (1600, 1000)), (1600, 1000)) is not None
    assert Preprocessor(spec, "fast").reads(plan_views(spec, "none", (1600, 1000)), (1600, 1000)) is None


def test_a_truncated_jpeg_is_still_refused(coffee: Image.Image) -> None:
    """Cut in its last rows, below the center crop: the part decoder could decode the crop, but the file is
    broken, and Pillow's refusal stands."""
    data = encode(coffee.resize((1600, 1000)), "JPEG", quality=90)
    pipeline = Pipeline(Preprocessing.from_dict(CARDS["efficientnet"]), decoding.Limits(), "exact")
    with pytest.raises(InvalidImage, match="truncated"):
        pipeline.prepare(data[: len(data) * 97 // 100])


def test_corrupt_data_gives_pillows_answer(coffee: Image.Image) -> None:
    """Bytes of the entropy-coded data overwritten (libjpeg warns and goes on, as Pillow does): the same
    tensor as Pillow's whole decode."""
    spec = Preprocessing.from_dict(CARDS["efficientnet"])
    pipeline = Pipeline(spec, decoding.Limits(), "exact")
    preprocessor = Preprocessor(spec, "exact")
    data = bytearray(encode(coffee.resize((900, 600)), "JPEG", quality=90))
    for at in (len(data) // 3, len(data) // 2, len(data) * 2 // 3):
        data[at : at + 40] = bytes(range(7, 47))
    img = decode(bytes(data), draft=False)
    np.testing.assert_array_equal(pipeline.prepare(bytes(data)), preprocessor(img))


def test_other_jpegs_are_decoded_whole(coffee: Image.Image) -> None:
    """CMYK, and bytes after the end marker: decoded whole, by Pillow, with the same answers."""
    spec = Preprocessing.from_dict(CARDS["efficientnet"])
    pipeline = Pipeline(spec, decoding.Limits(), "exact")
    preprocessor = Preprocessor(spec, "exact")
    photo = coffee.resize((900, 600))
    for data in (encode(photo.convert("CMYK"), "JPEG", quality=90), encode(photo, "JPEG") + b"trailer"):
        part = decode(data, draft=False, part=lambda size: (300, 100, 600, 400))
        assert part.size == (900, 600)
        np.testing.assert_array_equal(pipeline.prepare(data), preprocessor(decode(data, draft=False)))


def test_a_part_that_misses_pixels_is_decoded_again_whole(
    coffee: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the part asked for ever lack a pixel the views read, rendering says so and the image is
    decoded again, whole: the answer is right, only slower."""
    spec = Preprocessing.from_dict(CARDS["efficientnet"])
    preprocessor = Preprocessor(spec, "exact")
    data = encode(coffee.resize((900, 600)), "JPEG", quality=90)
    expected = preprocessor(decode(data, draft=False))
    monkeypatch.setattr(Preprocessor, "reads", lambda self, views, size: (400, 250, 500, 350))
    with pytest.raises(PartMissed):
        img = decode(data, draft=False, part=lambda size: (400, 250, 500, 350))
        preprocessor(img)
    pipeline = Pipeline(spec, decoding.Limits(), "exact")
    np.testing.assert_array_equal(pipeline.prepare(data), expected)
