"""`service.grpc.messages.count_fields`: a request's fields counted from its wire format, as the parser would
meet them, refused past the limit and where the bytes break the format, before anything is parsed."""

from __future__ import annotations

import numpy as np
import pytest

from proto import classifier_pb2
from proto import grpc_predict_v2_pb2 as pb
from service.errors import RequestTooLarge
from service.grpc.messages import NotWireFormat, count_fields

INFER = pb.ModelInferRequest.DESCRIPTOR


def test_fields_are_counted_nested_repeated_and_packed_as_the_wire_has_them() -> None:
    request = pb.ModelInferRequest(model_name="m", id="r")
    assert count_fields(request.SerializeToString(), INFER, 100) == 2
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])  # shape: packed
    tensor.contents.fp32_contents.extend(np.zeros(3 * 224 * 224, np.float32).tolist())  # packed: once
    # the input, its name, datatype and shape, its contents and their one packed array
    assert count_fields(request.SerializeToString(), INFER, 100) == 2 + 6
    images = request.inputs.add(name="image", datatype="BYTES", shape=[3])
    images.contents.bytes_contents.extend([b"jpeg"] * 3)  # each element a field
    assert count_fields(request.SerializeToString(), INFER, 100) == 2 + 6 + 4 + 1 + 3
    request.parameters["top_k"].int64_param = 5  # an entry: its key, its value and the value's field
    request.raw_input_contents.extend([b"\0" * 10, b"\0" * 10])
    assert count_fields(request.SerializeToString(), INFER, 100) == 2 + 6 + 4 + 1 + 3 + 4 + 2
    batch = classifier_pb2.ClassifyBatchRequest(images=[b"a", b"b"], model="m")
    assert count_fields(batch.SerializeToString(), classifier_pb2.ClassifyBatchRequest.DESCRIPTOR, 100) == 3


def test_fields_the_schema_does_not_know_are_counted_and_skipped() -> None:
    known = pb.ModelInferRequest(model_name="m").SerializeToString()
    unknown = b"\xa0\x06\x01" + b"\xaa\x06\x03abc"  # field 100 as a varint, field 101 as three bytes
    assert count_fields(known + unknown, INFER, 100) == 3


def test_more_fields_than_the_limit_are_refused_before_the_rest_is_read() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.raw_input_contents.extend([b""] * 99)
    raw = request.SerializeToString()
    assert count_fields(raw, INFER, 100) == 100
    with pytest.raises(RequestTooLarge, match="more than 99 fields .*max_message_fields"):
        count_fields(raw, INFER, 99)
    # A million map entries: refused within the first few thousand bytes, whatever follows them.
    bomb = pb.ModelInferRequest(model_name="m")
    for i in range(1000):
        bomb.parameters[str(i)].bool_param = True
    entries = bomb.SerializeToString()
    cut = entries[: entries.index(b"\x22", 3)]  # the model name, then the first entry's tag
    tail = entries[len(cut) :]
    with pytest.raises(RequestTooLarge):
        count_fields(cut + tail * 1000 + b"\xff", INFER, 10_000)  # the last byte would break the format


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x0a", "varint runs past"),  # a tag and no length
        (b"\xff" * 64, "varint runs past"),
        (b"\x0a\x05ab", "runs past its message"),  # a 5-byte name with 2 bytes
        (b"\x2a\x03\x0a\x05abcde", "runs past its message"),  # an input's name runs past the input
        (b"\x0b", "wire type 3"),  # a group, which proto3 has not
        (b"\x09\x00", "runs past its message"),  # 8 bytes announced, 1 there
        (b"\x00\x00", "number 0"),
    ],
)
def test_bytes_that_break_the_wire_format_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(NotWireFormat, match=why):
        count_fields(raw, INFER, 100)
