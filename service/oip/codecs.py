"""Tensors of the Open Inference Protocol and their codecs, shared by the REST and gRPC transports.

The protocol's datatype names and their NumPy element types, raw (binary) tensor contents, Triton's binary
BYTES encoding (each element prefixed by its length, 4 bytes little-endian), and typed contents (JSON or
protobuf lists). Every malformed tensor a client can send is refused here as `InvalidArgument`, so that no
NumPy error escapes as a server fault.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import limits
from service.errors import InvalidArgument, shown

# Datatype names of the protocol and their NumPy element types (BYTES has none: a list of bytes).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}

# Shapes NumPy cannot hold are refused before it is asked to: a dimension count past its limit, or an
# extent (the product of the non-zero dimensions) past what any request body could fill, even with a zero
# dimension that makes the element count 0.
MAX_DIMS = 32
MAX_EXTENT = 2**40

TensorData = np.ndarray | list[bytes]


@dataclass
class Tensor:
    """A decoded tensor: NumPy array for numeric types, a flat list of bytes for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: TensorData
    parameters: dict[str, Any] = field(default_factory=dict)


def numpy_dtype(datatype: str) -> np.dtype:
    """The NumPy dtype of a protocol datatype; InvalidArgument for BYTES or an unknown name."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidArgument(f"datatype {shown(datatype)} has no numeric representation") from None


def datatype_of(array: np.ndarray) -> str:
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise InvalidArgument(f"NumPy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    """Elements in a tensor of `shape`; InvalidArgument for a shape no tensor can have (negative dimensions,
    too many of them, or too large)."""
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"tensor shape {dims} has a negative dimension")
    if math.prod(d or 1 for d in dims) > MAX_EXTENT:
        raise InvalidArgument(f"tensor shape {dims} is too large")
    return math.prod(dims)


def check_declared(name: str, datatype: str, shape: Sequence[int], max_items: int) -> None:
    """Refuse an input by its declared shape, before its data is decoded: images (BYTES elements) or samples
    (the first dimension) past `max_items` cost nothing to refuse, while decoding millions of elements first
    would hold up every other request on the event loop. The rule is `service.limits.check_count`; an input
    that declares none is left to the protocol, which says which input holds nothing."""
    count = element_count(shape)
    items, what = (count, "images") if datatype == "BYTES" else (int(shape[0]) if shape else 1, "samples")
    if items < 1:
        return
    try:
        limits.check_count(items, max_items, what)
    except InvalidArgument:  # named after the input and its declaration: no element has been read yet
        raise InvalidArgument(
            f"input {shown(name)} declares {items} {what}; the limit is {max_items} per request"
        ) from None


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """Triton's binary BYTES form: each element preceded by its length as a 4-byte little-endian uint."""
    parts = []
    for element in elements:
        parts.append(struct.pack("<I", len(element)))
        parts.append(bytes(element))
    return b"".join(parts)


def decode_bytes_elements(buffer: bytes | memoryview, count: int | None = None) -> list[bytes]:
    """The inverse of `encode_bytes_elements`; checks that the buffer holds exactly `count` elements."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if count is not None and len(elements) == count:  # stop at once: a count is all it takes to refuse
            raise InvalidArgument(f"BYTES tensor data holds more than the {count} elements its shape says")
        if offset + 4 > len(view):
            raise InvalidArgument("BYTES tensor data ends inside a 4-byte length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(
                f"BYTES element {len(elements)} declares {length} bytes but only {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(elements) != count:
        raise InvalidArgument(f"BYTES tensor data holds {len(elements)} elements, its shape says {count}")
    return elements


def decode_raw(datatype: str, shape: Sequence[int], buffer: bytes | memoryview) -> TensorData:
    """Raw (binary) tensor contents to a NumPy array of `shape`, or a list of bytes for BYTES."""
    count = element_count(shape)
    if datatype == "BYTES":
        return decode_bytes_elements(buffer, count)
    dtype = numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidArgument(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes of raw data, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def encode_raw(tensor: Tensor) -> bytes:
    """A tensor's data in raw (binary) form: little-endian, row-major; BYTES length-prefixed."""
    if tensor.datatype == "BYTES":
        return encode_bytes_elements(tensor.data)  # type: ignore[arg-type]
    array = np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype).newbyteorder("<"))
    return array.tobytes()


def from_list(datatype: str, shape: Sequence[int], values: Sequence[Any]) -> TensorData:
    """Typed contents (a flat or nested list, e.g. from JSON or protobuf) to a tensor of `shape`."""
    count = element_count(shape)
    if datatype == "BYTES":
        flat = flatten(values)
        if len(flat) != count:
            raise InvalidArgument(
                f"BYTES tensor of shape {list(shape)} needs {count} elements, got {len(flat)}"
            )
        if not all(isinstance(v, (str, bytes, bytearray, memoryview)) for v in flat):
            raise InvalidArgument("BYTES tensor elements must be strings or bytes")
        return [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
    dtype = numpy_dtype(datatype)
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: -1 as UINT8, 1e400 as INT64
        raise InvalidArgument(f"tensor data is not {datatype}: {shown(str(exc))}") from None
    if array.size != count:
        raise InvalidArgument(
            f"{datatype} tensor of shape {list(shape)} needs {count} elements, got {array.size}"
        )
    return array.reshape(shape)


def flatten(values: Any) -> list[Any]:
    """A nested list's elements in row-major order; anything else is one element."""
    if isinstance(values, (list, tuple)):
        out: list[Any] = []
        for v in values:
            out.extend(flatten(v))
        return out
    return [values]
