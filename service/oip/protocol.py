"""Open Inference Protocol v2 (KServe / Triton), independent of the transport.

REST (`service/http/`) and gRPC (`service/grpc/`) both decode their wire format into `Tensor`s, call
`OpenInference`, and encode the `Tensor`s it returns; the protocol's rules (tensor names, datatypes, shapes,
parameters, which outputs exist) live here once, so that both transports answer the same way.

Every model exposes two inputs, of which a request sends exactly one:
- `image` (BYTES, shape [-1]): encoded images (JPEG, PNG, ...), listed first so that generic clients that
  take the first input send images;
- the card's input name (FP32, e.g. [-1, 3, 224, 224]): a batch already preprocessed by the caller.
and two outputs: `probabilities` (FP32 [-1, classes]) and `top_k` (BYTES [-1, k], each element
`"<probability>:<index>:<label>"` as in Triton's classification extension).

Request parameters: `top_k` (int, default 5, or every class of a model with fewer) and `tta` (string,
default "none"). Output parameter: `classification` (int N), Triton's classification extension: that output
answers its N best classes as BYTES [-1, N] `"<probability>:<index>:<label>"` instead of its values (what
tritonclient's `class_count` asks for); as in Triton, an N above the class count answers every class.

Shared codecs also live here: Triton's binary BYTES encoding (each element prefixed by its length, 4 bytes
little-endian) and the datatype <-> NumPy mapping.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import numpy as np

from service.errors import InvalidArgument, ModelUnavailable, ServiceError
from service.postprocessing import DEFAULT_TOP_K, check_top_k

SERVER_NAME = "cnn-serve"
EXTENSIONS = ("binary_tensor_data", "classification", "parameters")
PLATFORM = "onnxruntime_onnx"

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"
TOP_K_OUTPUT = "top_k"
OUTPUT_NAMES = (PROBABILITIES_OUTPUT, TOP_K_OUTPUT)
CLASSIFICATION = "classification"
# Request parameters that Triton's and KServe's clients add on their own; accepted and ignored here (the
# transports handle binary output themselves, and the deadline comes from the transport).
IGNORED_PARAMETERS = ("binary_data_output", "priority", "timeout", "headers")

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

TensorData = np.ndarray | list[bytes]


@dataclass
class Tensor:
    """A decoded tensor: NumPy array for numeric types, a flat list of bytes for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: TensorData
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An output a request names; `classification` > 0 asks for its N best classes instead of its values."""

    name: str
    classification: int = 0

    @classmethod
    def parse(cls, name: str, parameters: Mapping[str, Any]) -> RequestedOutput:
        unknown = set(parameters) - {CLASSIFICATION}
        if unknown:
            raise InvalidArgument(
                f"unknown parameters {sorted(unknown)} for output {name!r}; outputs take {CLASSIFICATION!r}"
            )
        value = parameters.get(CLASSIFICATION, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"output {name!r}: {CLASSIFICATION!r} must be a non-negative integer")
        return cls(name, value)


@dataclass
class InferResult:
    model_name: str
    model_version: str
    outputs: list[Tensor]


def server_version() -> str:
    try:
        return metadata.version("cnn-serve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# ---------------------------------------------------------------------------------------------------------
# Codecs shared by the transports


def numpy_dtype(datatype: str) -> np.dtype:
    """The NumPy dtype of a protocol datatype; InvalidArgument for BYTES or an unknown name."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidArgument(f"datatype {datatype!r} has no numeric representation") from None


def datatype_of(array: np.ndarray) -> str:
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise InvalidArgument(f"NumPy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    """Elements in a tensor of `shape`; InvalidArgument for negative dimensions."""
    for dim in shape:
        if int(dim) < 0:
            raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    return math.prod(int(d) for d in shape)


def check_declared(name: str, datatype: str, shape: Sequence[int], max_items: int) -> None:
    """Refuse an input by its declared shape, before its data is decoded: images (BYTES elements) or samples
    (the first dimension) past `max_items` cost nothing to refuse, while decoding millions of elements first
    would hold up every other request on the event loop."""
    count = element_count(shape)
    items, what = (count, "images") if datatype == "BYTES" else (int(shape[0]) if shape else 1, "samples")
    if items > max_items:
        raise InvalidArgument(f"input {name!r} declares {items} {what}; the limit is {max_items} per request")


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
        flat = _flatten(values)
        if len(flat) != count:
            raise InvalidArgument(
                f"BYTES tensor of shape {list(shape)} needs {count} elements, got {len(flat)}"
            )
        return [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
    dtype = numpy_dtype(datatype)
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: -1 as UINT8, 1e400 as INT64
        raise InvalidArgument(f"tensor data is not {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidArgument(
            f"{datatype} tensor of shape {list(shape)} needs {count} elements, got {array.size}"
        )
    return array.reshape(shape)


def _flatten(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        out: list[Any] = []
        for v in values:
            out.extend(_flatten(v))
        return out
    return [values]


# ---------------------------------------------------------------------------------------------------------
# The protocol


class OpenInference:
    """The Open Inference Protocol v2 endpoints on top of an `InferenceCore`.

    Methods raise `ServiceError`s (ModelNotFound, InvalidArgument, ...) that the transport maps to its status.
    """

    def __init__(self, core: Any) -> None:
        self.core = core

    # -- health and metadata

    def server_live(self) -> bool:
        return bool(self.core.live)

    def server_ready(self) -> bool:
        return bool(self.core.ready)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Raises ModelNotFound for an unknown model: the protocol answers 404 there, not "not ready"."""
        info = self.core.model_info(name, version or None)
        return info.get("state") == "ready"

    def model_versions(self, name: str) -> list[str]:
        versions = {str(m.get("version")) for m in self.core.models() if m.get("name") == name}
        return sorted(versions, key=lambda v: (len(v), v))

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        info = self.core.model_info(name, version or None)
        versions = self.model_versions(name) or [str(info.get("version"))]
        card_input = info.get("input") or {}
        classes = _class_count(info)
        return {
            "name": info.get("name", name),
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {
                    "name": card_input.get("name", "input"),
                    "datatype": "FP32",
                    "shape": [int(d) for d in card_input.get("shape", [-1, 3, 224, 224])],
                },
            ],
            "outputs": [
                {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
                {"name": TOP_K_OUTPUT, "datatype": "BYTES", "shape": [-1, -1]},
            ],
        }

    # -- inference

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Sequence[Tensor],
        requested_outputs: Sequence[RequestedOutput] | None = None,
        parameters: Mapping[str, Any] | None = None,
        deadline: float | None = None,
    ) -> InferResult:
        """Classify a BYTES tensor of images or run an FP32 tensor; answer the requested outputs.

        `deadline` is passed to the core unchanged (absolute `time.monotonic()` seconds).
        """
        info = self.core.model_info(model, version or None)
        if info.get("state") not in (None, "ready"):
            reason = info.get("reason") or "not loaded"
            raise ModelUnavailable(f"model {model!r} is {info.get('state')}: {reason}")
        name, resolved_version = str(info.get("name", model)), str(info.get("version", version or ""))
        labels = info.get("labels") or []
        card_input = info.get("input") or {}
        fp32_name = card_input.get("name", "input")
        parameters = dict(parameters or {})
        for key in ("top_k", "tta"):
            if key in parameters and parameters[key] is None:
                raise InvalidArgument(f"parameter {key!r} has no value")
        top_k = self._top_k(parameters.get("top_k"), len(labels))
        tta = parameters.get("tta", "none")
        if not isinstance(tta, str):
            raise InvalidArgument("parameter 'tta' must be a string")
        unknown = set(parameters) - {"top_k", "tta"} - set(IGNORED_PARAMETERS)
        if unknown:
            raise InvalidArgument(f"unknown parameters {sorted(unknown)}; this model takes 'top_k' and 'tta'")
        outputs = list(requested_outputs or [RequestedOutput(n) for n in OUTPUT_NAMES])
        classes = max(0, _class_count(info))
        for i, out in enumerate(outputs):
            if out.name not in OUTPUT_NAMES:
                raise InvalidArgument(f"unknown output {out.name!r}; model {name!r} has {list(OUTPUT_NAMES)}")
            if out.classification and out.name != PROBABILITIES_OUTPUT:
                raise InvalidArgument(
                    f"output {out.name!r} is already classes; {CLASSIFICATION!r} applies to "
                    f"{PROBABILITIES_OUTPUT!r}"
                )
            if out.classification:  # Triton caps a class_count above the class count; so do we
                outputs[i] = replace(
                    out,
                    classification=self._top_k(
                        out.classification, classes, f"output {out.name!r}: {CLASSIFICATION!r}", cap=True
                    ),
                )

        if len(inputs) != 1:
            raise InvalidArgument(
                f"send exactly one input tensor ({IMAGE_INPUT!r} BYTES or {fp32_name!r} FP32), "
                f"got {len(inputs)}"
            )
        tensor = inputs[0]
        if tensor.name == IMAGE_INPUT:
            probabilities = await self._classify_images(tensor, name, resolved_version, tta, deadline)
        elif tensor.name == fp32_name:
            probabilities = await self._run_tensor(tensor, name, resolved_version, card_input, deadline)
        else:
            raise InvalidArgument(
                f"unknown input {tensor.name!r}; model {name!r} takes {IMAGE_INPUT!r} (BYTES) "
                f"or {fp32_name!r} (FP32)"
            )

        result: list[Tensor] = []
        for out in outputs:
            if out.name == PROBABILITIES_OUTPUT and not out.classification:
                result.append(Tensor(out.name, "FP32", list(probabilities.shape), probabilities))
            else:
                k = out.classification or top_k
                elements = top_k_elements(probabilities, k, labels)
                result.append(Tensor(out.name, "BYTES", [probabilities.shape[0], k], elements))
        return InferResult(name, resolved_version, result)

    def _top_k(self, value: Any, classes: int, what: str = "parameter 'top_k'", cap: bool = False) -> int:
        """The k to answer; None (not asked) is the core's default, 5 or every class of a smaller model."""
        max_top_k = getattr(getattr(self.core, "settings", None), "max_top_k", None)
        if value is None:  # a card without labels (classes 0) keeps the plain default
            return check_top_k(None, classes or DEFAULT_TOP_K, max_top_k)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidArgument(f"{what} must be an integer")
        try:
            k = int(value)
        except ValueError:
            raise InvalidArgument(f"{what} must be an integer, not {value!r}") from None
        limit = min(classes or k, max_top_k or classes or k)
        if cap and k > limit:
            return limit
        if k < 1 or k > limit:
            raise InvalidArgument(f"{what} must be between 1 and {limit}, got {k}")
        return k

    async def _classify_images(
        self, tensor: Tensor, model: str, version: str, tta: str, deadline: float | None
    ) -> np.ndarray:
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"input {IMAGE_INPUT!r} must be BYTES, not {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidArgument(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], not {tensor.shape}")
        images = list(tensor.data)  # type: ignore[arg-type]
        if not images:
            raise InvalidArgument(f"input {IMAGE_INPUT!r} holds no image")
        limit = getattr(getattr(self.core, "settings", None), "max_images_per_request", None)
        if limit is not None and len(images) > limit:
            raise InvalidArgument(f"{len(images)} images in one request; the limit is {limit}")
        predictions = await self.core.classify(
            images, model=model, version=version, top_k=1, tta=tta, deadline=deadline
        )
        rows = []
        for i, prediction in enumerate(predictions):
            if isinstance(prediction, ServiceError):
                # The protocol has no per-element errors: the first bad image fails the request, named.
                prediction.message = f"image {i}: {prediction.message}"
                prediction.args = (prediction.message,)
                raise prediction
            rows.append(np.asarray(prediction.probabilities, dtype=np.float32))
        return np.stack(rows)

    async def _run_tensor(
        self, tensor: Tensor, model: str, version: str, card_input: Mapping[str, Any], deadline: float | None
    ) -> np.ndarray:
        if tensor.datatype != "FP32":
            raise InvalidArgument(f"input {tensor.name!r} must be FP32, not {tensor.datatype}")
        expected = [int(d) for d in card_input.get("shape", [])]
        array = np.asarray(tensor.data, dtype=np.float32)
        if expected and (
            array.ndim != len(expected)
            or any(e > 0 and e != a for e, a in zip(expected, array.shape, strict=True))
        ):
            raise InvalidArgument(
                f"input {tensor.name!r} must have shape {expected}, got {list(array.shape)}"
            )
        if array.shape[0] < 1:
            raise InvalidArgument(f"input {tensor.name!r} holds no sample")
        limit = getattr(getattr(self.core, "settings", None), "max_images_per_request", None)
        if limit is not None and array.shape[0] > limit:
            raise InvalidArgument(f"{array.shape[0]} samples in one request; the limit is {limit}")
        if not np.isfinite(array).all():
            raise InvalidArgument(f"input {tensor.name!r} holds NaN or infinite values")
        probabilities = await self.core.infer_tensor(model, version, np.ascontiguousarray(array), deadline)
        return np.asarray(probabilities, dtype=np.float32)


def _class_count(info: Mapping[str, Any]) -> int:
    """From the labels, else the card's output shape (-1 when neither says)."""
    return len(info.get("labels") or []) or int((info.get("output") or {}).get("shape", [-1, -1])[-1])


def top_k_elements(probabilities: np.ndarray, k: int, labels: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """Row-major `"<probability>:<index>:<label>"` strings, best first (Triton's classification format)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    elements = []
    for row, indices in enumerate(order):
        for index in indices:
            label = labels[index].get("name", str(index)) if index < len(labels) else str(index)
            elements.append(f"{probabilities[row, index]:.6f}:{int(index)}:{label}".encode())
    return elements
