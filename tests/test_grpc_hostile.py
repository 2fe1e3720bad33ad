"""What hostile clients send over gRPC, against a real server with a bearer token on loopback: a 10 KB model
name, probes that must not list the repository, and bytes that are no protobuf message at all."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proto import classifier_pb2, classifier_pb2_grpc
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.errors import SHOWN_CHARS
from tests.test_grpc import Served, fails, need_models, settings_for, trailing

TOKEN = "hostile-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LONG_NAME = "m" * 10_240
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(settings_for(need_models(), models=("lenet5",), default_model="lenet5", auth_token=TOKEN))
    yield s
    s.close()


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as ch:  # grpc's default 8 KB metadata
        yield ch


@pytest.fixture()
def access_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("cnn_serve.access").addHandler(keep)
    try:
        yield lines
    finally:
        logging.getLogger("cnn_serve.access").removeHandler(keep)


def _entries(lines: list[str], request_id: str, timeout: float = 10) -> list[dict]:
    """The access-log entries of one request id (the line is written after the answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in map(json.loads, list(lines)) if e.get("request_id") == request_id]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.01)


def _requests_total(served: Served) -> dict[tuple[str, str, str], float]:
    text = generate_latest(served.metrics.registry).decode()
    return {
        (s.labels["model"], s.labels["endpoint"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cnn_serve_requests_total" and s.labels["protocol"] == "grpc"
    }


def test_a_ten_kilobyte_model_name_is_not_found_with_a_short_message(channel: grpc.Channel) -> None:
    """Echoed whole, the name would make trailing metadata past the client's 8 KB limit: the client would
    see RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    oip = pb_grpc.GRPCInferenceServiceStub(channel)
    classifier = classifier_pb2_grpc.ImageClassifierStub(channel)
    calls = [
        (oip.ModelReady, pb.ModelReadyRequest(name=LONG_NAME), ()),
        (oip.ModelMetadata, pb.ModelMetadataRequest(name=LONG_NAME), AUTH),
        (oip.ModelInfer, pb.ModelInferRequest(model_name=LONG_NAME), AUTH),
        (classifier.Classify, classifier_pb2.ClassifyRequest(image=b"\x89PNG", model=LONG_NAME), AUTH),
        (oip.ModelReady, pb.ModelReadyRequest(name="lenet5", version="9" * 10_000), ()),
    ]
    for method, request, metadata in calls:
        err = fails(method, request, grpc.StatusCode.NOT_FOUND, metadata=metadata)
        details = err.details()
        assert len(details) < 2 * SHOWN_CHARS + 100, details[:300]
        assert "m" * (SHOWN_CHARS - 1) in details or "9" * (SHOWN_CHARS - 1) in details, details[:300]
        assert "(10240 characters)" in details or "(10000 characters)" in details, details[:300]
        assert trailing(err)["x-error-code"] == "not_found"


def test_model_ready_without_a_token_says_only_ready_or_not_found(channel: grpc.Channel) -> None:
    oip = pb_grpc.GRPCInferenceServiceStub(channel)
    assert oip.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=10).ready
    for request in (pb.ModelReadyRequest(name="nope"), pb.ModelReadyRequest(name="lenet5", version="7")):
        err = fails(oip.ModelReady, request, grpc.StatusCode.NOT_FOUND)
        # Nothing of the repository: no model list, no version list.
        assert "lenet5" not in err.details().replace("model 'lenet5' has no version", ""), err.details()
        assert "available" not in err.details() and "[" not in err.details(), err.details()


def test_bytes_that_are_no_message_are_invalid_argument_logged_and_counted(
    served: Served, channel: grpc.Channel, access_lines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
    before = _requests_total(served).get(("-", "ModelInfer", "INVALID_ARGUMENT"), 0.0)
    with caplog.at_level(logging.DEBUG):
        for i in range(3):
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff" * 64, timeout=10, metadata=(*AUTH, ("x-request-id", f"garbage-{i}")))
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            assert "not a valid inference.ModelInferRequest message" in err.details()
            assert "DecodeError" not in err.details() and "Exception" not in err.details()
            assert trailing(err)["x-request-id"] == f"garbage-{i}"
            assert trailing(err)["x-error-code"] == "invalid_argument"
            (entry,) = _entries(access_lines, f"garbage-{i}")
            assert entry["status"] == "INVALID_ARGUMENT" and entry["method"] == "ModelInfer"
    assert _requests_total(served)[("-", "ModelInfer", "INVALID_ARGUMENT")] == before + 3
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged for a client's bytes"
    # Without the token, the same bytes are refused before they are looked at.
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff" * 64, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # And the server serves on.
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert (
        stub.ModelMetadata(pb.ModelMetadataRequest(name="lenet5"), timeout=10, metadata=AUTH).name == "lenet5"
    )


def test_a_stream_of_bad_bytes_is_invalid_argument_too(channel: grpc.Channel) -> None:
    """Request streams (reflection's) are decoded message by message, by the same rule."""
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\xff" * 64]), timeout=10, metadata=AUTH))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "ServerReflectionRequest" in info.value.details()


def test_a_message_of_too_many_fields_is_refused_before_it_is_parsed(
    served: Served, channel: grpc.Channel, access_lines: list[str]
) -> None:
    """300,000 `parameters` entries in 4 MB: protobuf's parser would hold the interpreter lock, and so the
    event loop, for a fraction of a second (1.5 million, for 36 s). Counted from the wire format first
    (`service.grpc.messages`), the message is refused at the 10,001st field."""
    thousand = pb.ModelInferRequest()
    for i in range(1000):
        thousand.parameters[f"p{i}"].bool_param = True
    bomb = pb.ModelInferRequest(model_name="lenet5").SerializeToString() + thousand.SerializeToString() * 300
    raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw(bomb, timeout=30, metadata=(*AUTH, ("x-request-id", "fields-bomb")))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "more than 10000 fields" in err.details() and "max_message_fields" in err.details()
    assert trailing(err)["x-error-code"] == "request_too_large"
    (entry,) = _entries(access_lines, "fields-bomb")
    assert entry["status"] == "INVALID_ARGUMENT"
    # A stream's messages are counted one by one (reflection's: one string field 20,000 times).
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\x1a\x01a" * 20_000]), timeout=10, metadata=AUTH))
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_message_fields" in info.value.details()
    )
    # A request past the size that is parsed on the loop (a 32x32 FP32 tensor, 4 KiB) is answered as before.
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    tensor.contents.fp32_contents.extend([0.5] * 1024)
    request = pb.ModelInferRequest(model_name="lenet5", inputs=[tensor])
    assert request.ByteSize() > 4096
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    reply = stub.ModelInfer(request, timeout=30, metadata=AUTH)
    assert reply.model_name == "lenet5" and reply.outputs
