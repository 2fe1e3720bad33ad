"""`inference.GRPCInferenceService`: the Open Inference Protocol v2 over gRPC (KServe / Triton clients).

Wire details only: tensors come from `raw_input_contents` (what Triton's client sends) or from typed
`contents` (what KServe's typed clients send) and go to `service.oip`; outputs are answered in the same form
as the inputs came (raw in, raw out), which is what each kind of client reads. The token, request id,
metrics and error statuses are the interceptor's (`service/grpc/interceptor.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np

from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service import oip
from service.config import Settings
from service.core import InferenceCore
from service.errors import InvalidArgument, shown
from service.grpc.interceptor import deadline_from
from service.priority import as_work

# Which repeated field of InferTensorContents holds each datatype (FP16/BF16 only travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_of(mapping: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in mapping.items()}


def decode_inputs(request: pb.ModelInferRequest, max_items: int) -> list[oip.Tensor]:
    """The request's input tensors, from raw_input_contents or typed contents (never both); `max_items`:
    images or samples per request, checked on the declared shape before any data is decoded."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        shape = [int(d) for d in tensor.shape]
        if not tensor.datatype:
            raise InvalidArgument(f"input {shown(tensor.name)} has no datatype")
        oip.check_declared(tensor.name, tensor.datatype, shape, max_items)
        has_typed = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if raw:
            if has_typed:
                raise InvalidArgument(
                    f"input {shown(tensor.name)} has both typed contents and raw_input_contents"
                )
            data = oip.decode_raw(tensor.datatype, shape, raw[i])
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                name = shown(tensor.name)
                raise InvalidArgument(
                    f"input {name}: datatype {tensor.datatype} must be sent in raw_input_contents"
                    if tensor.datatype in ("FP16", "BF16")
                    else f"input {name}: unknown datatype {shown(tensor.datatype)}"
                )
            contents = getattr(tensor.contents, field)
            if len(contents) != oip.element_count(shape):  # before copying millions of values out
                raise InvalidArgument(
                    f"input {shown(tensor.name)} of shape {shape} needs {oip.element_count(shape)} elements, "
                    f"got {len(contents)} in {field}"
                )
            data = oip.from_list(tensor.datatype, shape, list(contents))
        tensors.append(
            oip.Tensor(tensor.name, tensor.datatype, shape, data, parameters_of(tensor.parameters))
        )
    return tensors


def encode_outputs(result: oip.InferResult, raw: bool, response: pb.ModelInferResponse) -> None:
    for tensor in result.outputs:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            response.raw_output_contents.append(oip.encode_raw(tensor))
        elif tensor.datatype == "BYTES":
            out.contents.bytes_contents.extend(tensor.data)  # type: ignore[arg-type]
        else:
            field = CONTENTS_FIELD[tensor.datatype]
            getattr(out.contents, field).extend(np.asarray(tensor.data).ravel().tolist())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, settings: Settings) -> None:
        self.core = core
        self.settings = settings
        self.protocol = oip.OpenInference(core)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.protocol.server_live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.protocol.server_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.protocol.model_ready(request.name, request.version or None))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        meta = self.protocol.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        meta = self.protocol.model_metadata(request.name, request.version or None)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]],
            outputs=[tensors(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        # In a worker thread: typed contents of millions of values take tenths of a second to copy out, which
        # on the event loop (shared with HTTP) would hold up every other call.
        limit = self.settings.max_images_per_request
        inputs = await asyncio.to_thread(as_work(decode_inputs), request, limit)
        result = await self.protocol.infer(
            request.model_name,
            request.model_version or None,
            inputs,
            [oip.RequestedOutput.parse(o.name, parameters_of(o.parameters)) for o in request.outputs] or None,
            parameters_of(request.parameters),
            deadline=deadline_from(context, self.settings.request_timeout_s),
        )
        response = pb.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=request.id
        )
        encode_outputs(result, raw=bool(request.raw_input_contents), response=response)
        return response

    # -- Triton's model repository extension; the admin token of load and unload is the interceptor's

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._one_repository(request.repository_name)
        rows = self.protocol.repository_index(bool(request.ready))
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._one_repository(request.repository_name)
        await self.protocol.repository_load(request.model_name, repository_parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._one_repository(request.repository_name)
        await self.protocol.repository_unload(request.model_name, repository_parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _one_repository(name: str) -> None:
        """This server has one repository: a client naming another is told so (Triton's clients send "")."""
        if name:
            raise InvalidArgument("this server has one model repository; leave repository_name empty")


def repository_parameters(mapping: Any) -> dict[str, Any]:
    """The values of a repository call's `ModelRepositoryParameter` map."""
    out = {}
    for key, value in mapping.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(value, choice)
    return out
