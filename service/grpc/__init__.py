"""The grpc.aio server: this project's `ImageClassifier` and the Open Inference Protocol v2 service."""

from service.grpc.server import GrpcServer

__all__ = ["GrpcServer"]
