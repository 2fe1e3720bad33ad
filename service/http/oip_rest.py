"""Open Inference Protocol v2 over REST: JSON tensors and Triton's binary tensor data extension.

The protocol's rules live in `service.oip` (codecs in `service.oip.codecs`, the endpoints in
`service.oip.protocol`); this module only turns HTTP bodies into `Tensor`s and back.
Binary form (what tritonclient sends by default): the `Inference-Header-Content-Length` header gives the size
of the JSON header at the start of the body; inputs with `parameters.binary_data_size` take their data, in
order, from the bytes after it (BYTES elements length-prefixed). Outputs are binary when the request says
`parameters.binary_data_output: true` or the output's own `parameters.binary_data: true`.
In JSON form, BYTES image elements are base64 strings (raw image bytes are not valid JSON text).

`parse_infer_request` parses the JSON away from the event loop with its estimated cost reserved
(`parsing.parse_json_body`); what it returns is compact (arrays, bytes, a few small values): the parsed
document is dropped before it returns, and keys the protocol does not define are refused, so that nothing a
client adds is held during inference.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.responses import JSONResponse, Response

from service import oip
from service.errors import InvalidArgument, shown

from .parsing import BodyParser, JsonBudget, parse_json_body
from .requests import image_from_base64

HEADER_LENGTH = "inference-header-content-length"
_DIGITS = re.compile("[0-9]+")  # ASCII only: str.isdigit() also takes "²", which int() refuses
TRANSPORT_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size")
# The keys the protocol defines (the document's `InferRequest` schema says the same: no other is accepted).
REQUEST_KEYS = ("id", "inputs", "outputs", "parameters")
INPUT_KEYS = ("name", "datatype", "shape", "parameters", "data")


@dataclass
class InferBody:
    """What an inference request's body asks, with its inputs decoded."""

    request_id: str | None
    tensors: list[oip.Tensor]
    outputs: list[oip.RequestedOutput] | None
    binary: dict[str, bool]
    parameters: dict[str, Any]


async def parse_infer_request(
    body: bytes, header_length: str | None, max_items: int, budget: JsonBudget, parser: BodyParser | None
) -> InferBody:
    """The request's inputs decoded and its options checked (`max_items`: images or samples per request),
    its JSON parse bounded by `budget`."""
    if header_length is not None:
        if not _DIGITS.fullmatch(header_length.strip()):
            raise InvalidArgument("Inference-Header-Content-Length is not a number")
        n = int(header_length)
        if n > len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length {n} exceeds the body of {len(body)} bytes"
            )
    else:
        n = len(body)
    then = functools.partial(_infer_body, max_items=max_items)
    return await parse_json_body(body, n, "inference request header", then, budget, parser)


def _infer_body(doc: Any, binary: memoryview, max_items: int) -> InferBody:
    """What a parsed request says, its inputs decoded from it and from `binary` (the bytes after its JSON);
    blocking, in a thread or a parsing process."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidArgument("inference request must be a JSON object with an 'inputs' list")
    _known_keys(doc, REQUEST_KEYS, "inference request")
    tensors = _tensors(doc["inputs"], binary, max_items)
    del doc["inputs"]  # what is left is small: the tensors are arrays and bytes now
    outputs, wanted_binary = requested_outputs(doc)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):  # it must come back as sent: a string
        raise InvalidArgument(f"'id' must be a string, not {type(request_id).__name__}")
    return InferBody(request_id, tensors, outputs, wanted_binary, request_parameters(doc))


def _known_keys(doc: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    unknown = set(doc) - set(keys)
    if unknown:
        raise InvalidArgument(f"unknown keys {shown(sorted(unknown))} in the {what}; it takes {list(keys)}")


def _tensors(inputs: list[Any], binary: memoryview, max_items: int) -> list[oip.Tensor]:
    tensors: list[oip.Tensor] = []
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise InvalidArgument(f"input {i} must be an object")
        _known_keys(spec, INPUT_KEYS, f"input {i}")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if (
            not isinstance(name, str)
            or not isinstance(datatype, str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise InvalidArgument(
                f"input {i} needs a string 'name', a string 'datatype' and an integer 'shape'"
            )
        oip.check_declared(name, datatype, shape, max_items)
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument(f"input {shown(name)}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"input {shown(name)}: binary_data_size {shown(size)} does not fit the body"
                )
            data = oip.decode_raw(datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in spec:
            data = _json_data(name, datatype, shape, spec["data"])
        else:
            raise InvalidArgument(f"input {shown(name)} has neither 'data' nor parameters.binary_data_size")
        extra = {k: v for k, v in params.items() if k not in TRANSPORT_PARAMETERS}
        tensors.append(oip.Tensor(name, datatype, list(shape), data, extra))
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return tensors


def _json_data(name: str, datatype: str, shape: list[int], data: Any) -> oip.TensorData:
    if datatype != "BYTES":
        return oip.from_list(datatype, shape, data)
    flat = oip.flatten(data) if isinstance(data, list) else [data]
    decoded = [image_from_base64(e, f"input {shown(name)} element {j}") for j, e in enumerate(flat)]
    return oip.from_list("BYTES", shape, decoded)


def requested_outputs(doc: dict[str, Any]) -> tuple[list[oip.RequestedOutput] | None, dict[str, bool]]:
    """Names of the requested outputs (None: all) and which of them are wanted in binary form."""
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    all_binary = _flag(params.get("binary_data_output", False), "parameter 'binary_data_output'")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    if not outputs:  # absent or empty: every output, as the protocol says
        return None, {name: all_binary for name in oip.OUTPUT_NAMES}
    names, binary = [], {}
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument("each requested output needs a string 'name'")
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise InvalidArgument(f"output {shown(out['name'])}: 'parameters' must be an object")
        protocol = {k: v for k, v in out_params.items() if k not in TRANSPORT_PARAMETERS}
        names.append(oip.RequestedOutput.parse(out["name"], protocol))
        flag = out_params.get("binary_data", all_binary)
        binary[out["name"]] = _flag(flag, f"output {shown(out['name'])}: 'binary_data'")
    return names, binary


def _flag(value: Any, what: str) -> bool:
    """The binary extension's flags are JSON booleans: the string "false" must not read as true."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, not {shown(value)}")
    return value


def request_parameters(doc: dict[str, Any]) -> dict[str, Any]:
    """The parameters the protocol reads; those it accepts and ignores are dropped here, values and all."""
    params = doc.get("parameters") or {}
    ignored = (*TRANSPORT_PARAMETERS, *oip.IGNORED_PARAMETERS)
    return {k: v for k, v in params.items() if k not in ignored}


def infer_response(
    result: oip.InferResult, request_id: str | None, binary: dict[str, bool], headers: dict[str, str]
) -> Response:
    """JSON answer, or JSON header plus binary outputs when any output is wanted in binary."""
    outputs, blobs = [], []
    for tensor in result.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary.get(tensor.name):
            raw = oip.encode_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [e.decode("utf-8", "replace") for e in tensor.data]  # type: ignore[union-attr]
        else:
            entry["data"] = np.asarray(tensor.data).reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if request_id is not None:
        doc["id"] = request_id
    if not blobs:
        return JSONResponse(doc, headers=headers)
    head = json.dumps(doc, separators=(",", ":")).encode()
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={**headers, "Inference-Header-Content-Length": str(len(head))},
    )
