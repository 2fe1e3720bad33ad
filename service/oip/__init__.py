"""Open Inference Protocol v2 (KServe / Triton), independent of the transport.

REST (`service/http/`) and gRPC (`service/grpc/`) both decode their wire format into `Tensor`s
(`codecs`), call `OpenInference` (`protocol`), and encode the `Tensor`s it returns; the protocol's rules
(tensor names, datatypes, shapes, parameters, which outputs exist) live here once, so that both transports
answer the same way.

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
"""

from __future__ import annotations

from .codecs import (
    DATATYPES,
    MAX_DIMS,
    Tensor,
    TensorData,
    check_declared,
    datatype_of,
    decode_bytes_elements,
    decode_raw,
    element_count,
    encode_bytes_elements,
    encode_raw,
    flatten,
    from_list,
    numpy_dtype,
)
from .protocol import (
    CLASSIFICATION,
    EXTENSIONS,
    IGNORED_PARAMETERS,
    IMAGE_INPUT,
    OUTPUT_NAMES,
    PLATFORM,
    PROBABILITIES_OUTPUT,
    SERVER_NAME,
    TOP_K_OUTPUT,
    InferRequest,
    InferResult,
    OpenInference,
    OutputPlan,
    RequestedOutput,
    encode,
    server_version,
    top_k_elements,
)

__all__ = [
    "CLASSIFICATION",
    "DATATYPES",
    "EXTENSIONS",
    "IGNORED_PARAMETERS",
    "IMAGE_INPUT",
    "MAX_DIMS",
    "OUTPUT_NAMES",
    "PLATFORM",
    "PROBABILITIES_OUTPUT",
    "SERVER_NAME",
    "TOP_K_OUTPUT",
    "InferRequest",
    "InferResult",
    "OpenInference",
    "OutputPlan",
    "RequestedOutput",
    "Tensor",
    "TensorData",
    "check_declared",
    "datatype_of",
    "decode_bytes_elements",
    "decode_raw",
    "element_count",
    "encode",
    "encode_bytes_elements",
    "encode_raw",
    "flatten",
    "from_list",
    "numpy_dtype",
    "server_version",
    "top_k_elements",
]
