"""The Open Inference Protocol codecs shared by REST and gRPC, on real image bytes and real arrays."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image
from skimage import data

from service import oip
from service.errors import InvalidArgument


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
    labels = [{"name": "zero"}, {"name": "one"}, {"name": "two"}]
    elements = oip.top_k_elements(probabilities, 2, labels)
    assert elements == [b"0.600000:1:one", b"0.300000:2:two", b"0.500000:0:zero", b"0.300000:2:two"]


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
