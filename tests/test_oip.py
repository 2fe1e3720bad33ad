"""The Open Inference Protocol shared by REST and gRPC: its codecs on real image bytes and real arrays, and
`OpenInference` itself on a real core serving a generated model (no transport in between)."""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data

from service import limits, oip
from service.card import Label
from service.config import Settings
from service.core import InferenceCore
from service.errors import InvalidArgument, ModelNotFound
from service.postprocessing import check_top_k


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_bytes_elements_round_trip_real_images() -> None:
    images = [_jpeg(data.chelsea()), _jpeg(data.coffee()), b""]
    encoded = oip.encode_bytes_elements(images)
    # Triton's layout: 4-byte little-endian length, then the bytes, for each element.
    assert struct.unpack_from("<I", encoded, 0)[0] == len(images[0])
    assert encoded[4 : 4 + len(images[0])] == images[0]
    assert len(encoded) == sum(4 + len(i) for i in images)
    assert oip.decode_bytes_elements(encoded, 3) == images


@pytest.mark.parametrize(
    ("buffer", "count", "message"),
    [
        (b"\x05\x00\x00\x00abc", None, "declares 5 bytes"),
        (b"\x01\x00", None, "inside a 4-byte length prefix"),
        (struct.pack("<I", 1) + b"a", 2, "holds 1 elements, its shape says 2"),
    ],
)
def test_bytes_elements_reject_malformed(buffer: bytes, count: int | None, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        oip.decode_bytes_elements(buffer, count)


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "BOOL"])
def test_raw_round_trip_every_numeric_datatype(datatype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((2, 3, 4)) * 10).astype(oip.numpy_dtype(datatype))
    tensor = oip.Tensor("x", datatype, [2, 3, 4], array)
    raw = oip.encode_raw(tensor)
    assert len(raw) == array.size * array.dtype.itemsize
    decoded = oip.decode_raw(datatype, [2, 3, 4], raw)
    np.testing.assert_array_equal(decoded, array)
    assert oip.datatype_of(decoded) == datatype


def test_raw_size_mismatch_and_bad_shapes_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="needs 24 bytes"):
        oip.decode_raw("FP32", [2, 3], b"\x00" * 20)
    with pytest.raises(InvalidArgument, match="negative dimension"):
        oip.decode_raw("FP32", [-1, 3], b"")
    with pytest.raises(InvalidArgument, match="no numeric representation"):
        oip.decode_raw("COMPLEX", [1], b"\x00" * 8)


def test_from_list_typed_contents() -> None:
    values = np.arange(6, dtype=np.float32).tolist()
    np.testing.assert_array_equal(oip.from_list("FP32", [2, 3], values), np.arange(6).reshape(2, 3))
    assert oip.from_list("BYTES", [2], ["a", b"b"]) == [b"a", b"b"]
    with pytest.raises(InvalidArgument, match="needs 4 elements"):
        oip.from_list("FP32", [2, 2], values)
    with pytest.raises(InvalidArgument, match="not FP32"):
        oip.from_list("FP32", [1], ["cat"])


def test_top_k_elements_follow_triton_classification_format() -> None:
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    labels = (Label(0, "n0", "zero"), Label(1, "n1", "one"), Label(2, "n2", "two"))
    elements = oip.top_k_elements(probabilities, 2, labels)
    assert elements == [b"0.600000:1:one", b"0.300000:2:two", b"0.500000:0:zero", b"0.300000:2:two"]


def test_top_k_elements_rank_and_name_as_every_other_answer() -> None:
    """`postprocessing.top_k`'s order (equal probabilities by ascending index) and its label fallback (a
    class the card names no label for is its index)."""
    probabilities = np.array([[0.25, 0.25, 0.5, 0.0]], dtype=np.float32)
    labels = (Label(0, "n0", "zero"), Label(1, "n1", "one"))
    elements = oip.top_k_elements(probabilities, 4, labels)
    assert elements == [b"0.500000:2:2", b"0.250000:0:zero", b"0.250000:1:one", b"0.000000:3:3"]


def test_declared_counts_are_refused_before_decoding() -> None:
    oip.check_declared("image", "BYTES", [64], 64)
    oip.check_declared("input", "FP32", [64, 3, 224, 224], 64)
    with pytest.raises(InvalidArgument, match="declares 65 images; the limit is 64"):
        oip.check_declared("image", "BYTES", [65, 1], 64)
    with pytest.raises(InvalidArgument, match="declares 65 samples"):
        oip.check_declared("input", "FP32", [65, 3, 224, 224], 64)
    with pytest.raises(InvalidArgument, match="negative dimension"):
        oip.check_declared("image", "BYTES", [-1], 64)
    # Decoding stops at the first element past the declared count, not at the end of the buffer.
    with pytest.raises(InvalidArgument, match="more than the 2 elements"):
        oip.decode_bytes_elements(oip.encode_bytes_elements([b"a"] * 100_000), 2)
    with pytest.raises(InvalidArgument, match="not UINT8"):
        oip.from_list("UINT8", [1], [-1])


@pytest.mark.parametrize(
    "shape", [[1] * 33, [0, 2**70], [0, 2**62], [0, 2**40, 2**40]], ids=["dims", "huge", "big", "extent"]
)
def test_shapes_numpy_cannot_hold_are_invalid_argument(shape: list[int]) -> None:
    """NumPy raises ValueError for these; a client's shape must never reach it as a server fault."""
    with pytest.raises(InvalidArgument, match="dimensions|too large"):
        oip.decode_raw("FP32", shape, b"")
    with pytest.raises(InvalidArgument, match="dimensions|too large"):
        oip.from_list("FP32", shape, [])
    with pytest.raises(InvalidArgument, match="dimensions|too large"):
        oip.check_declared("input", "FP32", shape, 64)


def test_check_top_k_is_one_rule_for_numbers_strings_and_capped_counts() -> None:
    """What the query string, a JSON or gRPC parameter and Triton's `classification` send, by one rule."""
    what = "parameter 'top_k'"
    assert check_top_k(None, 1000, 1000) == 5 and check_top_k(None, 3, 1000) == 3
    assert check_top_k(3, 10, 1000, what=what) == check_top_k("3", 10, 1000, what=what) == 3
    assert check_top_k(np.int64(2), 10) == 2 and check_top_k(" +4 ", 10) == 4
    for value in ("many", "2.5", "", "\u0663", "1_0", 2.0, True, [3]):
        with pytest.raises(InvalidArgument, match=f"^{what} must be an integer, not "):
            check_top_k(value, 10, 1000, what=what)
    for value, upper in ((0, 10), ("11", 10), (-1, 10), (20, 5)):
        with pytest.raises(InvalidArgument, match=f"^{what} must be between 1 and {upper}, got "):
            check_top_k(value, 10, 5 if upper == 5 else 1000, what=what)
    assert check_top_k(1001, 1000, 1000, cap=True) == 1000 and check_top_k(20, 10, 5, cap=True) == 5
    with pytest.raises(InvalidArgument, match="between 1 and 10, got 0"):
        check_top_k(0, 10, cap=True)


# ---------------------------------------------------------------------------------------------------------
# The protocol on a real core


@pytest.fixture(scope="module")
def protocol(tiny_repo: Path) -> Iterator[oip.OpenInference]:
    settings = Settings(repository=str(tiny_repo), default_model="tiny", max_images_per_request=4)
    core = InferenceCore(settings)
    core.load()
    yield oip.OpenInference(core)
    core.close()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def infer(protocol: oip.OpenInference, inputs: list[oip.Tensor], **kwargs: Any) -> oip.InferResult:
    return asyncio.run(protocol.infer(kwargs.pop("model", "tiny"), None, inputs, **kwargs))


def images(n: int) -> oip.Tensor:
    return oip.Tensor("image", "BYTES", [n], [_png(i) for i in range(n)])


def test_protocol_answers_typed_metadata_and_both_outputs(protocol: oip.OpenInference) -> None:
    meta = protocol.model_metadata("tiny")
    assert meta["versions"] == ["1", "2"] and meta["inputs"][1] == {
        "name": "input",
        "datatype": "FP32",
        "shape": [-1, 3, 32, 32],
    }
    assert meta["outputs"][0]["shape"] == [-1, 10] and protocol.model_ready("tiny", "1")
    with pytest.raises(ModelNotFound):
        protocol.model_ready("nope")
    result = infer(protocol, [images(2)], parameters={"top_k": "3"})
    assert (result.model_name, result.model_version) == ("tiny", "2")
    probabilities, top = result.outputs
    assert probabilities.shape == [2, 10] and top.shape == [2, 3]
    best = int(np.argmax(probabilities.data[0]))  # type: ignore[call-overload]
    assert top.data[0].decode().split(":")[1:] == [str(best), f"class {best}"]  # type: ignore[index]


def test_protocol_counts_images_and_samples_by_the_one_rule(protocol: oip.OpenInference) -> None:
    """Past the limit, the protocol says what `limits.check_count` says, for images and for samples alike,
    as multipart and JSON requests do (`tests/test_http.py`)."""
    with pytest.raises(InvalidArgument) as raised:
        infer(protocol, [images(5)])
    with pytest.raises(InvalidArgument) as expected:
        limits.check_count(5, 4)
    assert raised.value.message == expected.value.message == "5 images in one request; the limit is 4"
    samples = oip.Tensor("input", "FP32", [5, 3, 32, 32], np.zeros((5, 3, 32, 32), np.float32))
    with pytest.raises(InvalidArgument, match="^5 samples in one request; the limit is 4$"):
        infer(protocol, [samples])
    assert infer(protocol, [images(4)]).outputs[0].shape == [4, 10]


def test_protocol_top_k_and_classification_follow_check_top_k(protocol: oip.OpenInference) -> None:
    with pytest.raises(InvalidArgument, match="^parameter 'top_k' must be between 1 and 10, got 11$"):
        infer(protocol, [images(1)], parameters={"top_k": 11})
    with pytest.raises(InvalidArgument, match="^parameter 'top_k' must be an integer, not 2.0$"):
        infer(protocol, [images(1)], parameters={"top_k": 2.0})
    wanted = [oip.RequestedOutput("probabilities", classification=50), oip.RequestedOutput("top_k")]
    capped, top = infer(protocol, [images(1)], requested_outputs=wanted, parameters={"top_k": 2}).outputs
    assert (capped.datatype, capped.shape, top.shape) == ("BYTES", [1, 10], [1, 2])
    assert capped.data[:2] == top.data
