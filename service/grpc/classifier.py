"""`cnnserve.v1.ImageClassifier`: this project's own API (Classify, ClassifyBatch, ListModels).

Protobuf to core calls and back only: the token, request id, metrics and error statuses are the
interceptor's (`service/grpc/interceptor.py`)."""

from __future__ import annotations

import grpc

from proto import classifier_pb2, classifier_pb2_grpc
from service import limits
from service.config import Settings
from service.core import InferenceCore, ModelInfo, Prediction
from service.errors import InvalidArgument, ServiceError
from service.grpc.interceptor import deadline_from

Request = classifier_pb2.ClassifyRequest | classifier_pb2.ClassifyBatchRequest


def _classification(prediction: Prediction) -> classifier_pb2.Classification:
    return classifier_pb2.Classification(
        model=prediction.model,
        version=prediction.version,
        predictions=[
            classifier_pb2.ClassScore(
                index=int(s.index), id=str(s.id), label=str(s.label), probability=float(s.probability)
            )
            for s in prediction.top_k
        ],
    )


def _model_info(m: ModelInfo) -> classifier_pb2.ModelInfo:
    """A model as ListModels lists it; the card's fields are empty for a model whose card is unreadable."""
    card = m.card
    return classifier_pb2.ModelInfo(
        name=m.name,
        version=m.version,
        architecture=card.architecture if card else "",
        input_shape=list(card.input.shape) if card else [],
        label_count=len(card.labels) if card else 0,
        provider=m.provider,
        trained=card.trained if card else False,
        state=m.state,
        reason=m.reason,
        description=card.description if card else "",
    )


class ImageClassifierServicer(classifier_pb2_grpc.ImageClassifierServicer):
    def __init__(self, core: InferenceCore, settings: Settings) -> None:
        self.core = core
        self.settings = settings

    async def _classify(
        self, images: list[bytes], request: Request, context: grpc.aio.ServicerContext
    ) -> list[Prediction | ServiceError]:
        # The core checks the count too; here it is refused before any image is handed over.
        limits.check_count(len(images), self.settings.max_images_per_request)
        return await self.core.classify(
            images,
            model=request.model or None,
            version=request.version or None,
            top_k=request.top_k or None,  # 0, the proto default: not asked
            tta=request.tta or "none",
            deadline=deadline_from(context, self.settings.request_timeout_s),
        )

    async def Classify(
        self, request: classifier_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyResponse:
        if not request.image:
            raise InvalidArgument("the request's 'image' is empty")
        (result,) = await self._classify([request.image], request, context)
        if isinstance(result, ServiceError):
            raise result
        return classifier_pb2.ClassifyResponse(result=_classification(result))

    async def ClassifyBatch(
        self, request: classifier_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyBatchResponse:
        entries = []
        for result in await self._classify(list(request.images), request, context):
            if isinstance(result, ServiceError):
                error = classifier_pb2.Error(
                    code=result.code, message=result.message, status=result.grpc_code
                )
                entries.append(classifier_pb2.BatchEntry(error=error))
            else:
                entries.append(classifier_pb2.BatchEntry(result=_classification(result)))
        return classifier_pb2.ClassifyBatchResponse(results=entries)

    async def ListModels(
        self, request: classifier_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ListModelsResponse:
        return classifier_pb2.ListModelsResponse(
            models=[_model_info(m) for m in self.core.models()], default_model=self.settings.default_model
        )
