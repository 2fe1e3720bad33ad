"""`cnnserve.v1.ImageClassifier`: this project's own API (Classify, ClassifyBatch, ListModels)."""

from __future__ import annotations

from typing import Any

import grpc

from proto import classifier_pb2, classifier_pb2_grpc
from service.errors import InvalidArgument, ServiceError
from service.grpc.calls import Calls, deadline_from


def _classification(prediction: Any) -> classifier_pb2.Classification:
    return classifier_pb2.Classification(
        model=str(prediction.model),
        version=str(prediction.version),
        predictions=[
            classifier_pb2.ClassScore(
                index=int(s.index), id=str(s.id), label=str(s.label), probability=float(s.probability)
            )
            for s in prediction.top_k
        ],
    )


def _model_info(m: dict[str, Any]) -> classifier_pb2.ModelInfo:
    labels = m.get("labels")
    label_count = m.get("label_count", len(labels) if isinstance(labels, list) else 0)
    shape = (m.get("input") or {}).get("shape") or []
    return classifier_pb2.ModelInfo(
        name=str(m.get("name", "")),
        version=str(m.get("version", "")),
        architecture=str(m.get("architecture", "") or ""),
        input_shape=[int(d) for d in shape],
        label_count=int(label_count or 0),
        provider=str(m.get("provider", "") or ""),
        trained=bool(m.get("trained", False)),
        state=str(m.get("state", "") or ""),
        reason=str(m.get("reason", "") or ""),
        description=str(m.get("description", "") or ""),
    )


class ImageClassifierServicer(classifier_pb2_grpc.ImageClassifierServicer):
    def __init__(self, core: Any, settings: Any, calls: Calls) -> None:
        self.core = core
        self.settings = settings
        self.calls = calls

    def _model(self, name: str) -> str:
        return name or self.settings.default_model

    async def _classify(self, images: list[bytes], request: Any, context: grpc.aio.ServicerContext) -> list:
        if not images:
            raise InvalidArgument("no image in the request")
        if len(images) > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"{len(images)} images in one request; the limit is {self.settings.max_images_per_request}"
            )
        return await self.core.classify(
            images,
            model=request.model or None,
            version=request.version or None,
            top_k=request.top_k or None,  # 0, the proto default: not asked
            tta=request.tta or "none",
            deadline=deadline_from(context, self.settings.request_timeout_s),
        )

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(request_id: str) -> classifier_pb2.ClassifyResponse:
            if not request.image:
                raise InvalidArgument("the request's 'image' is empty")
            (result,) = await self._classify([request.image], request, context)
            if isinstance(result, ServiceError):
                raise result
            return classifier_pb2.ClassifyResponse(result=_classification(result))

        return await self.calls.run(context, "Classify", self._model(request.model), body)

    async def ClassifyBatch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(request_id: str) -> classifier_pb2.ClassifyBatchResponse:
            results = await self._classify(list(request.images), request, context)
            entries = []
            for result in results:
                if isinstance(result, ServiceError):
                    error = classifier_pb2.Error(
                        code=result.code, message=result.message, status=result.grpc_code
                    )
                    entries.append(classifier_pb2.BatchEntry(error=error))
                else:
                    entries.append(classifier_pb2.BatchEntry(result=_classification(result)))
            return classifier_pb2.ClassifyBatchResponse(results=entries)

        return await self.calls.run(context, "ClassifyBatch", self._model(request.model), body)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(request_id: str) -> classifier_pb2.ListModelsResponse:
            return classifier_pb2.ListModelsResponse(
                models=[_model_info(m) for m in self.core.models()], default_model=self.settings.default_model
            )

        return await self.calls.run(context, "ListModels", "", body)
