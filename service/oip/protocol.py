"""`OpenInference`: the Open Inference Protocol v2 endpoints (metadata, readiness, inference) on the core.

An inference goes through four steps, each in one place:
- parse: the request's parameters and requested outputs, checked without the model (`InferRequest.parse`);
- resolve: model and version to the core's typed `ModelInfo` and its card; a model that is not ready is
  `ModelUnavailable`; then each output's form is planned against the card's class count (`plan`);
- run: images through `core.classify`, or an already-preprocessed FP32 tensor through `core.infer_tensor`;
- encode: the probabilities as the planned output tensors (`encode`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from service import limits
from service.card import Label, ModelCard
from service.errors import InvalidArgument, ModelUnavailable, ServiceError, shown
from service.postprocessing import check_top_k, top_k

from .codecs import Tensor

if TYPE_CHECKING:
    from service.config import Settings
    from service.core import InferenceCore, ModelInfo

SERVER_NAME = "cnn-serve"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "parameters")
# The repository calls' parameters: Triton's clients may send `unload_dependents` (no model here has any);
# a `config` or file override (loading a model from what the request carries) is not supported.
UNLOAD_PARAMETERS = ("unload_dependents",)
PLATFORM = "onnxruntime_onnx"

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"
TOP_K_OUTPUT = "top_k"
OUTPUT_NAMES = (PROBABILITIES_OUTPUT, TOP_K_OUTPUT)
CLASSIFICATION = "classification"
REQUEST_PARAMETERS = ("top_k", "tta")
# Request parameters that Triton's and KServe's clients add on their own; accepted and ignored here (the
# transports handle binary output themselves, and the deadline comes from the transport).
IGNORED_PARAMETERS = ("binary_data_output", "priority", "timeout", "headers")
# What the metadata says of a model whose card could not be read (it is unavailable, and says why).
UNKNOWN_INPUT_SHAPE = (-1, 3, 224, 224)


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
                f"unknown parameters {shown(sorted(unknown))} for output {shown(name)}; outputs take "
                f"{CLASSIFICATION!r}"
            )
        value = parameters.get(CLASSIFICATION, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"output {shown(name)}: {CLASSIFICATION!r} must be a non-negative integer")
        return cls(name, value)


@dataclass(frozen=True)
class InferRequest:
    """What an inference request asks, checked as far as it can be without its model: `top_k` stays as sent
    (None: not asked) until `OpenInference.plan` bounds it by the model's class count."""

    top_k: Any
    tta: str
    outputs: tuple[RequestedOutput, ...]

    @classmethod
    def parse(
        cls,
        model: str,
        parameters: Mapping[str, Any] | None,
        requested_outputs: Sequence[RequestedOutput] | None,
    ) -> InferRequest:
        parameters = dict(parameters or {})
        for key in REQUEST_PARAMETERS:
            if key in parameters and parameters[key] is None:
                raise InvalidArgument(f"parameter {key!r} has no value")
        tta = parameters.get("tta", "none")
        if not isinstance(tta, str):
            raise InvalidArgument("parameter 'tta' must be a string")
        unknown = set(parameters) - set(REQUEST_PARAMETERS) - set(IGNORED_PARAMETERS)
        if unknown:
            raise InvalidArgument(
                f"unknown parameters {shown(sorted(unknown))}; this model takes 'top_k' and 'tta'"
            )
        outputs = tuple(requested_outputs or [RequestedOutput(n) for n in OUTPUT_NAMES])
        for out in outputs:
            if out.name not in OUTPUT_NAMES:
                raise InvalidArgument(
                    f"unknown output {shown(out.name)}; model {shown(model)} has {list(OUTPUT_NAMES)}"
                )
            if out.classification and out.name != PROBABILITIES_OUTPUT:
                raise InvalidArgument(
                    f"output {out.name!r} is already classes; {CLASSIFICATION!r} applies to "
                    f"{PROBABILITIES_OUTPUT!r}"
                )
        return cls(parameters.get("top_k"), tta, outputs)


@dataclass(frozen=True)
class OutputPlan:
    """One output to answer: its values (`k` 0), or its `k` best classes as BYTES `[N, k]`."""

    name: str
    k: int = 0


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


class OpenInference:
    """The Open Inference Protocol v2 endpoints on top of an `InferenceCore`.

    Methods raise `ServiceError`s (ModelNotFound, InvalidArgument, ...) that the transport maps to its status;
    anything else is a fault of the server, never of the request.
    """

    def __init__(self, core: InferenceCore, settings: Settings | None = None) -> None:
        self.core = core
        self.settings: Settings = settings if settings is not None else core.settings

    # -- health and metadata

    def server_live(self) -> bool:
        return bool(self.core.live)

    def server_ready(self) -> bool:
        return bool(self.core.ready)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Raises ModelNotFound for an unknown model: the protocol answers 404 there, not "not ready"."""
        return self.core.model_info(name, version or None).ready

    def model_versions(self, name: str) -> list[str]:
        versions = {m.version for m in self.core.models() if m.name == name}
        return sorted(versions, key=lambda v: (len(v), v))

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        info = self.core.model_info(name, version or None)
        card = info.card
        fp32_name = card.input_name if card else "input"
        fp32_shape = card.input.shape if card else UNKNOWN_INPUT_SHAPE
        classes = (card.num_classes if card else 0) or -1  # -1: the card does not say
        return {
            "name": info.name,
            "versions": self.model_versions(name) or [info.version],
            "platform": PLATFORM,
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": fp32_name, "datatype": "FP32", "shape": [int(d) for d in fp32_shape]},
            ],
            "outputs": [
                {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
                {"name": TOP_K_OUTPUT, "datatype": "BYTES", "shape": [-1, -1]},
            ],
        }

    # -- the model repository extension (Triton's): the index is read-only; load and unload change the live
    # model set (explicit mode), their admin token checked by the transport

    def repository_index(self, ready: Any = False) -> list[dict[str, str]]:
        """Every model of the repository and every version known: `name`, `version`, `state`, `reason`."""
        if not isinstance(ready, bool):
            raise InvalidArgument(f"'ready' must be true or false, not {shown(ready)}")
        return self.core.repository_index(ready)

    async def repository_load(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        if parameters:
            raise InvalidArgument(
                f"load parameters {shown(sorted(parameters))} are not supported: models load from the "
                f"repository as their version policy says"
            )
        await self.core.load_model(name)

    async def repository_unload(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        unknown = set(parameters or {}) - set(UNLOAD_PARAMETERS)
        if unknown:
            raise InvalidArgument(
                f"unknown unload parameters {shown(sorted(unknown))}: unload takes unload_dependents only"
            )
        await self.core.unload_model(name)

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
        request = InferRequest.parse(model, parameters, requested_outputs)
        info, card = self.resolve(model, version)
        plans = self.plan(request, card)
        # Without a version asked, the core admits the request to the highest ready version then: a swap since
        # `resolve` is answered by the new version, and the answer names the version that produced it.
        probabilities, answered = await self.run(info, card, inputs, request.tta, deadline, version or None)
        return InferResult(info.name, answered, encode(plans, probabilities, card.labels))

    def resolve(self, model: str, version: str | None) -> tuple[ModelInfo, ModelCard]:
        """The model version that answers, with its card; ModelNotFound or ModelUnavailable otherwise."""
        info = self.core.model_info(model, version or None)
        if not info.ready or info.card is None:
            raise ModelUnavailable(f"model {info.name!r} is {info.state}: {info.reason or 'not loaded'}")
        return info, info.card

    def plan(self, request: InferRequest, card: ModelCard) -> list[OutputPlan]:
        """Each requested output's form. `top_k` and `classification` follow `postprocessing.check_top_k`,
        the rule of every transport; a `classification` above the class count is capped, as Triton does."""
        classes, max_top_k = card.num_classes, self.settings.max_top_k
        k = check_top_k(request.top_k, classes, max_top_k, what="parameter 'top_k'")
        plans = []
        for out in request.outputs:
            if out.classification:
                what = f"output {out.name!r}: {CLASSIFICATION!r}"
                n = check_top_k(out.classification, classes, max_top_k, what=what, cap=True)
                plans.append(OutputPlan(out.name, n))
            else:
                plans.append(OutputPlan(out.name, k if out.name == TOP_K_OUTPUT else 0))
        return plans

    async def run(
        self,
        info: ModelInfo,
        card: ModelCard,
        inputs: Sequence[Tensor],
        tta: str,
        deadline: float | None,
        version: str | None = None,
    ) -> tuple[np.ndarray, str]:
        """The probabilities (N, classes) of the one input tensor (images or an FP32 batch), and the version
        that produced them: `version`, or the highest ready one when the core admits the request."""
        fp32_name = card.input_name
        if len(inputs) != 1:
            raise InvalidArgument(
                f"send exactly one input tensor ({IMAGE_INPUT!r} BYTES or {fp32_name!r} FP32), "
                f"got {len(inputs)}"
            )
        tensor = inputs[0]
        # A graph whose own input is called "image" takes its FP32 tensor by that name: the datatype tells.
        if tensor.name == IMAGE_INPUT and (fp32_name != IMAGE_INPUT or tensor.datatype != "FP32"):
            return await self._classify_images(tensor, info, tta, deadline, version)
        if tensor.name == fp32_name:
            return await self._run_tensor(tensor, info, card, deadline, version)
        raise InvalidArgument(
            f"unknown input {shown(tensor.name)}; model {info.name!r} takes {IMAGE_INPUT!r} (BYTES) "
            f"or {fp32_name!r} (FP32)"
        )

    async def _classify_images(
        self, tensor: Tensor, info: ModelInfo, tta: str, deadline: float | None, version: str | None
    ) -> tuple[np.ndarray, str]:
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"input {IMAGE_INPUT!r} must be BYTES, not {shown(tensor.datatype)}")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidArgument(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], not {tensor.shape}")
        images = list(tensor.data)  # type: ignore[arg-type]
        if not images:
            raise InvalidArgument(f"input {IMAGE_INPUT!r} holds no image")
        limits.check_count(len(images), self.settings.max_images_per_request)
        predictions = await self.core.classify(
            images, model=info.name, version=version, top_k=1, tta=tta, deadline=deadline
        )
        rows = []
        for i, prediction in enumerate(predictions):
            if isinstance(prediction, ServiceError):
                # The protocol has no per-element errors: the first bad image fails the request, named.
                prediction.message = f"image {i}: {prediction.message}"
                prediction.args = (prediction.message,)
                raise prediction
            rows.append(np.asarray(prediction.probabilities, dtype=np.float32))
        return np.stack(rows), predictions[0].version

    async def _run_tensor(
        self, tensor: Tensor, info: ModelInfo, card: ModelCard, deadline: float | None, version: str | None
    ) -> tuple[np.ndarray, str]:
        if tensor.datatype != "FP32":
            raise InvalidArgument(f"input {tensor.name!r} must be FP32, not {shown(tensor.datatype)}")
        expected = [int(d) for d in card.input.shape]
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
        limits.check_count(array.shape[0], self.settings.max_images_per_request, "samples")
        if not np.isfinite(array).all():
            raise InvalidArgument(f"input {tensor.name!r} holds NaN or infinite values")
        if card.layout == "NHWC":  # sent as the graph takes it; the core takes the prepared NCHW tensor
            array = array.transpose(0, 3, 1, 2)
        probabilities, answered = await self.core.infer_tensor_versioned(
            info.name, version, np.ascontiguousarray(array), deadline
        )
        return np.asarray(probabilities, dtype=np.float32), answered


def encode(plans: Sequence[OutputPlan], probabilities: np.ndarray, labels: tuple[Label, ...]) -> list[Tensor]:
    """The output tensors of `plans`: FP32 probabilities, or BYTES `[N, k]` classes."""
    result = []
    for plan in plans:
        if plan.k:
            elements = top_k_elements(probabilities, plan.k, labels)
            result.append(Tensor(plan.name, "BYTES", [probabilities.shape[0], plan.k], elements))
        else:
            result.append(Tensor(plan.name, "FP32", list(probabilities.shape), probabilities))
    return result


def top_k_elements(probabilities: np.ndarray, k: int, labels: tuple[Label, ...]) -> list[bytes]:
    """Row-major `"<probability>:<index>:<label>"` strings, best first (Triton's classification format); the
    ranking and the labels are `postprocessing.top_k`'s, the same as every other answer's."""
    return [
        f"{score.probability:.6f}:{score.index}:{score.label}".encode()
        for row in probabilities
        for score in top_k(row, k, labels)
    ]
