"""The gRPC transport against real servers on loopback: a real InferenceCore on the model repository, the
real grpc.aio server, and clients using the generated stubs (no mocks anywhere)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from proto import classifier_pb2, classifier_pb2_grpc
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service import oip
from service.config import Settings
from tests.conftest import garbage_collected, write_tiny_model

# GRPC_TEST_MODELS: another repository with the same model names (e.g. while `models/` is being built).
REPOSITORY = Path(os.environ.get("GRPC_TEST_MODELS") or Path(__file__).resolve().parent.parent / "models")
STAND_IN = bool(os.environ.get("GRPC_TEST_MODELS"))  # random weights: labels are not checked
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx", "tiger", "cougar"}


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def need_models() -> Path:
    if not (REPOSITORY / "efficientnet_lite0").is_dir() or not (REPOSITORY / "lenet5").is_dir():
        pytest.skip("models/ is not built: run `make models`")
    return REPOSITORY


class Loop:
    """An asyncio loop in a thread: the servers live there while the tests call them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Served:
    """A core and the gRPC servers started on it (several servers can share one core)."""

    def __init__(self, settings: Settings) -> None:
        from service.core import InferenceCore
        from service.grpc import GrpcServer
        from service.metrics import Metrics

        self.loop = Loop()
        self.settings = settings
        self.metrics = Metrics()
        self.core = InferenceCore(settings, observer=self.metrics)
        self.loop.run(self.core.start())
        self.servers: list[Any] = []
        self._server_class = GrpcServer
        self.server = self.add(settings)

    def add(self, settings: Settings) -> Any:
        server = self._server_class(self.core, settings, self.metrics)
        self.loop.run(server.start())
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            self.loop.run(server.stop(1.0))
        self.loop.run(self.core.stop())
        self.loop.close()


def settings_for(repository: Path, **changes: Any) -> Settings:
    return Settings(repository=str(repository), host="127.0.0.1", grpc_port=0, http_port=0).replace(**changes)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(settings_for(need_models()))
    yield s
    s.close()


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    limit = 64 * 1024 * 1024
    with grpc.insecure_channel(
        f"127.0.0.1:{served.server.port}",
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
    ) as ch:
        yield ch


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> classifier_pb2_grpc.ImageClassifierStub:
    return classifier_pb2_grpc.ImageClassifierStub(channel)


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def trailing(call: Any) -> dict[str, str]:
    return {k: v for k, v in call.trailing_metadata() or ()}


def fails(func: Any, request: Any, code: grpc.StatusCode, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        func(request, timeout=60, **kwargs)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    return err


# ---------------------------------------------------------------------------------------------------------
# ImageClassifier


def test_classify_chelsea(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    response, call = classifier.Classify.with_call(
        classifier_pb2.ClassifyRequest(image=jpeg(data.chelsea()), top_k=3),
        metadata=(("x-request-id", "cat-42"),),
        timeout=60,
    )
    result = response.result
    assert result.model == "efficientnet_lite0"
    assert result.version == "1"
    assert len(result.predictions) == 3
    assert STAND_IN or result.predictions[0].label in CATS, result.predictions
    probs = [p.probability for p in result.predictions]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert trailing(call)["x-request-id"] == "cat-42"


def test_classify_other_model_and_tta(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (12, 4, 16, 24))  # a vertical bar: a "1"
    response = classifier.Classify(
        classifier_pb2.ClassifyRequest(image=png(digit), model="lenet5", top_k=10, tta="flip"), timeout=60
    )
    assert response.result.model == "lenet5"
    assert len(response.result.predictions) == 10
    assert {p.id for p in response.result.predictions} == {str(d) for d in range(10)}
    assert sum(p.probability for p in response.result.predictions) == pytest.approx(1.0, abs=1e-3)


def test_classify_batch_bad_image_fails_only_its_entry(
    classifier: classifier_pb2_grpc.ImageClassifierStub,
) -> None:
    images = [jpeg(data.chelsea()), b"this is not an image", jpeg(data.coffee())]
    response = classifier.ClassifyBatch(
        classifier_pb2.ClassifyBatchRequest(images=images, top_k=5), timeout=60
    )
    assert len(response.results) == 3
    first, bad, third = response.results
    assert first.WhichOneof("outcome") == "result"
    assert STAND_IN or first.result.predictions[0].label in CATS
    assert bad.WhichOneof("outcome") == "error"
    assert bad.error.status == "INVALID_ARGUMENT" and bad.error.code and bad.error.message
    assert third.WhichOneof("outcome") == "result"
    assert STAND_IN or third.result.predictions[0].label != first.result.predictions[0].label


def test_list_models(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    response = classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=30)
    models = {m.name: m for m in response.models}
    assert {"efficientnet_lite0", "lenet5"} <= set(models)
    assert response.default_model == "efficientnet_lite0"
    eff, lenet = models["efficientnet_lite0"], models["lenet5"]
    assert list(eff.input_shape)[1:] == [3, 224, 224] and eff.label_count == 1000
    assert lenet.label_count == 10 and lenet.trained
    assert eff.state == "READY" and eff.provider == "CPUExecutionProvider" and eff.version == "1"


def test_ten_megabyte_jpeg(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    rng = np.random.default_rng(7)
    side = 1600
    noisy = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = jpeg(noisy, quality=100)
    while len(image) < 10 * 1024 * 1024:
        side += 300
        image = jpeg(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), quality=100)
    assert len(image) >= 10 * 1024 * 1024
    response = classifier.Classify(classifier_pb2.ClassifyRequest(image=image, top_k=1), timeout=120)
    assert len(response.result.predictions) == 1


# ---------------------------------------------------------------------------------------------------------
# Errors: every one a status code, a message and the request id


def test_invalid_image_is_invalid_argument(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    err = fails(
        classifier.Classify,
        classifier_pb2.ClassifyRequest(image=b"GIF89a-truncated"),
        grpc.StatusCode.INVALID_ARGUMENT,
        metadata=(("x-request-id", "bad-1"),),
    )
    assert "bad-1" in err.details()
    meta = trailing(err)
    assert meta["x-request-id"] == "bad-1" and meta["x-error-code"]
    assert "Traceback" not in err.details()


def test_empty_image_and_empty_batch_are_invalid_argument(
    classifier: classifier_pb2_grpc.ImageClassifierStub,
) -> None:
    fails(classifier.Classify, classifier_pb2.ClassifyRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT)
    fails(classifier.ClassifyBatch, classifier_pb2.ClassifyBatchRequest(), grpc.StatusCode.INVALID_ARGUMENT)


def test_refused_calls_leave_nothing_to_the_garbage_collector(
    classifier: classifier_pb2_grpc.ImageClassifierStub, inference: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """A refused call's error, traceback and frames are freed once it is answered, not left in reference
    cycles for the collector's next full pass, which would walk them on the event loop's time."""
    image = jpeg(data.chelsea())
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"not an image")
    refusals = [
        (classifier.Classify, classifier_pb2.ClassifyRequest(image=b"GIF89a-truncated")),
        (classifier.Classify, classifier_pb2.ClassifyRequest(image=image, top_k=5000)),
        (classifier.Classify, classifier_pb2.ClassifyRequest(image=image, model="nothing")),
        (inference.ModelInfer, pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[tensor])),
        (inference.ModelInfer, pb.ModelInferRequest(model_name="nothing", inputs=[tensor])),
    ]
    for call, request in refusals:  # once first: what a first call makes once is not in question
        with pytest.raises(grpc.RpcError):
            call(request, timeout=30)
    with garbage_collected() as garbage:
        for call, request in refusals * 3:
            with pytest.raises(grpc.RpcError):
                call(request, timeout=30)
    assert not garbage.of_the_service(), garbage


def test_bad_top_k_and_tta_are_invalid_argument(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    image = jpeg(data.chelsea())
    fails(
        classifier.Classify,
        classifier_pb2.ClassifyRequest(image=image, top_k=5000),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fails(
        classifier.Classify,
        classifier_pb2.ClassifyRequest(image=image, tta="sideways"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_too_many_images_is_invalid_argument(
    served: Served, classifier: classifier_pb2_grpc.ImageClassifierStub
) -> None:
    images = [b"x"] * (served.settings.max_images_per_request + 1)
    err = fails(
        classifier.ClassifyBatch,
        classifier_pb2.ClassifyBatchRequest(images=images),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "limit" in err.details()


def test_unknown_model_and_version_are_not_found(classifier: classifier_pb2_grpc.ImageClassifierStub) -> None:
    image = jpeg(data.chelsea())
    err = fails(
        classifier.Classify,
        classifier_pb2.ClassifyRequest(image=image, model="nope"),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "nope" in err.details() and trailing(err)["x-request-id"]
    fails(
        classifier.Classify,
        classifier_pb2.ClassifyRequest(image=image, model="lenet5", version="99"),
        grpc.StatusCode.NOT_FOUND,
    )


def test_request_over_the_size_limit_is_refused(served: Served) -> None:
    small = served.add(settings_for(need_models(), max_request_bytes=1024 * 1024))
    with grpc.insecure_channel(f"127.0.0.1:{small.port}") as ch:
        stub = classifier_pb2_grpc.ImageClassifierStub(ch)
        fails(
            stub.Classify,
            classifier_pb2.ClassifyRequest(image=b"\xff" * (2 * 1024 * 1024)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )


def test_second_server_on_the_same_port_fails_loudly(served: Served) -> None:
    from service.grpc import GrpcServer

    clash = GrpcServer(served.core, settings_for(need_models(), grpc_port=served.server.port), served.metrics)
    with pytest.raises(RuntimeError, match="cannot bind"):
        served.loop.run(clash.start())


# ---------------------------------------------------------------------------------------------------------
# Open Inference Protocol v2


def test_oip_server_calls(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert inference.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert inference.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    meta = inference.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert meta.name == oip.SERVER_NAME and "binary_tensor_data" in meta.extensions
    assert inference.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=10).ready
    assert inference.ModelReady(pb.ModelReadyRequest(name="lenet5", version="1"), timeout=10).ready
    fails(inference.ModelReady, pb.ModelReadyRequest(name="nope"), grpc.StatusCode.NOT_FOUND)


def test_oip_model_metadata(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = inference.ModelMetadata(pb.ModelMetadataRequest(name="efficientnet_lite0"), timeout=10)
    assert meta.name == "efficientnet_lite0" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    first, second = meta.inputs
    assert (first.name, first.datatype, list(first.shape)) == ("image", "BYTES", [-1])
    assert second.datatype == "FP32" and list(second.shape)[1:] == [3, 224, 224]
    outputs = {o.name: o for o in meta.outputs}
    assert list(outputs["probabilities"].shape) == [-1, 1000] and outputs["top_k"].datatype == "BYTES"
    fails(inference.ModelMetadata, pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND)


def _bytes_input(images: list[bytes]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(images)])


def test_oip_infer_bytes_in_typed_contents(
    inference: pb_grpc.GRPCInferenceServiceStub, classifier: classifier_pb2_grpc.ImageClassifierStub
) -> None:
    image = jpeg(data.chelsea())
    tensor = _bytes_input([image])
    tensor.contents.bytes_contents.append(image)
    request = pb.ModelInferRequest(model_name="efficientnet_lite0", id="req-7", inputs=[tensor])
    request.parameters["top_k"].int64_param = 3
    response = inference.ModelInfer(request, timeout=60)
    assert (
        response.model_name == "efficientnet_lite0"
        and response.model_version == "1"
        and response.id == "req-7"
    )
    assert not response.raw_output_contents  # typed in, typed out
    outputs = {o.name: o for o in response.outputs}
    probs = np.asarray(outputs["probabilities"].contents.fp32_contents, dtype=np.float32)
    assert list(outputs["probabilities"].shape) == [1, 1000] and probs.sum() == pytest.approx(1.0, abs=1e-3)
    top = [e.decode().split(":", 2) for e in outputs["top_k"].contents.bytes_contents]
    assert list(outputs["top_k"].shape) == [1, 3] and len(top) == 3
    assert int(top[0][1]) == int(probs.argmax())
    assert STAND_IN or top[0][2] in CATS
    # The same answer as the project's own API.
    own = classifier.Classify(classifier_pb2.ClassifyRequest(image=image, top_k=1), timeout=60).result
    assert own.predictions[0].index == int(probs.argmax())
    assert own.predictions[0].probability == pytest.approx(float(probs.max()), abs=1e-4)


def test_oip_infer_raw_input_contents_like_triton(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    images = [jpeg(data.chelsea()), jpeg(data.coffee())]
    request = pb.ModelInferRequest(
        model_name="efficientnet_lite0",
        inputs=[_bytes_input(images)],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        raw_input_contents=[oip.encode_bytes_elements(images)],
    )
    response = inference.ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert len(response.raw_output_contents) == 1
    probs = oip.decode_raw("FP32", list(response.outputs[0].shape), response.raw_output_contents[0])
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert STAND_IN or probs[0].argmax() != probs[1].argmax()


def test_oip_infer_fp32_preprocessed_tensor(
    served: Served, inference: pb_grpc.GRPCInferenceServiceStub
) -> None:
    from service.preprocessing import Preprocessor

    card = served.core.model_info("efficientnet_lite0").card
    assert card is not None
    photo = Image.fromarray(data.chelsea()).resize((256, 256))
    tensor = Preprocessor(card.preprocessing, mode="fast")(photo)
    assert tensor.shape == (1, 3, 224, 224)
    fp32 = pb.ModelInferRequest.InferInputTensor(name=card.input.name, datatype="FP32", shape=tensor.shape)
    raw = inference.ModelInfer(
        pb.ModelInferRequest(
            model_name="efficientnet_lite0", inputs=[fp32], raw_input_contents=[tensor.tobytes()]
        ),
        timeout=60,
    )
    from_tensor = oip.decode_raw("FP32", list(raw.outputs[0].shape), raw.raw_output_contents[0])
    # The same tensor in typed contents gives the same answer.
    fp32.contents.fp32_contents.extend(tensor.ravel().tolist())
    typed = inference.ModelInfer(
        pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[fp32]), timeout=60
    )
    np.testing.assert_allclose(
        np.asarray(typed.outputs[0].contents.fp32_contents), from_tensor.ravel(), atol=1e-6
    )
    # And the server's own preprocessing of the same pixels agrees.
    image = _bytes_input([png(photo)])
    image.contents.bytes_contents.append(png(photo))
    from_image = inference.ModelInfer(
        pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[image]), timeout=60
    )
    np.testing.assert_allclose(
        np.asarray(from_image.outputs[0].contents.fp32_contents), from_tensor.ravel(), atol=1e-3
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda r: r.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.append(
                b"x"
            ),
            "needs 2 elements",
        ),
        (
            lambda r: r.inputs.add(name="pixels", datatype="FP32", shape=[1]).contents.fp32_contents.append(
                1.0
            ),
            "unknown input",
        ),
        (
            lambda r: r.inputs.add(name="image", datatype="FP32", shape=[1]).contents.fp32_contents.append(
                1.0
            ),
            "must be BYTES",
        ),
        (lambda r: r.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]), "needs 192 elements"),
        (
            lambda r: (
                r.inputs.add(name="image", datatype="BYTES", shape=[1]),
                r.raw_input_contents.append(b"\x09"),
            ),
            "length prefix",
        ),
        (
            lambda r: (
                r.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x"),
                r.outputs.add(name="logits"),
            ),
            "unknown output",
        ),
        (
            lambda r: (
                r.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x"),
            ),
            "image 0",
        ),
        (lambda r: r.inputs.add(name="image", datatype="FP16", shape=[1]), "raw_input_contents"),
        (lambda r: None, "exactly one input"),
    ],
)
def test_oip_infer_bad_requests_are_invalid_argument(
    inference: pb_grpc.GRPCInferenceServiceStub, build: Any, message: str
) -> None:
    request = pb.ModelInferRequest(model_name="efficientnet_lite0")
    build(request)
    err = fails(inference.ModelInfer, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert message in err.details()


def test_oip_unknown_parameter_and_bad_top_k(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    image = jpeg(data.chelsea())
    for key, field, value, message in (
        ("colour", "string_param", "red", "unknown parameters"),
        ("top_k", "int64_param", 0, "top_k"),
    ):
        request = pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[_bytes_input([image])])
        request.inputs[0].contents.bytes_contents.append(image)
        setattr(request.parameters[key], field, value)
        err = fails(inference.ModelInfer, request, grpc.StatusCode.INVALID_ARGUMENT)
        assert message in err.details()


def test_oip_output_classification(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Triton's classification extension in typed contents: the class count is checked, then honoured."""
    image = jpeg(data.chelsea())

    def request(key: str, field: str, value: object) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[_bytes_input([image])])
        req.inputs[0].contents.bytes_contents.append(image)
        out = req.outputs.add(name="probabilities")
        setattr(out.parameters[key], field, value)
        return req

    for key, field, value, message in (
        ("classification", "int64_param", -1, "non-negative integer"),
        ("classification", "string_param", "3", "non-negative integer"),
        ("colour", "string_param", "red", "unknown parameters ['colour'] for output 'probabilities'"),
    ):
        err = fails(inference.ModelInfer, request(key, field, value), grpc.StatusCode.INVALID_ARGUMENT)
        assert message in err.details()
    reply = inference.ModelInfer(request("classification", "int64_param", 2), timeout=60)
    (out,) = reply.outputs
    assert out.datatype == "BYTES" and list(out.shape) == [1, 2]
    best = out.contents.bytes_contents[0].decode()
    assert int(best.split(":")[1]) in range(281, 286), best
    # above the class count: every class, best first (Triton caps it the same way)
    (every,) = inference.ModelInfer(request("classification", "uint64_param", 1001), timeout=60).outputs
    assert list(every.shape) == [1, 1000] and every.contents.bytes_contents[0].decode() == best


def test_oip_hostile_tensors_are_invalid_argument(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Values out of their datatype's range (once INTERNAL), and counts refused on the declared shape."""
    for datatype, field, values in (("INT8", "int_contents", [1000]), ("UINT8", "uint_contents", [300])):
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[1])
        getattr(tensor.contents, field).extend(values)
        err = fails(
            inference.ModelInfer,
            pb.ModelInferRequest(model_name="lenet5", inputs=[tensor]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert f"not {datatype}" in err.details()
    many = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1_000_000])
    err = fails(
        inference.ModelInfer,
        pb.ModelInferRequest(model_name="lenet5", inputs=[many], raw_input_contents=[bytes(4_000_000)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "declares 1000000 images; the limit is" in err.details()


def test_request_ids_and_names_cannot_forge_access_log_lines(
    classifier: classifier_pb2_grpc.ImageClassifierStub, inference: pb_grpc.GRPCInferenceServiceStub
) -> None:
    import json
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("cnn_serve.access").addHandler(keep)
    try:
        forged = "abc status=INTERNAL seconds=9.9 request_id=forged"
        call = classifier.ListModels.with_call(
            classifier_pb2.ListModelsRequest(), metadata=(("x-request-id", forged),), timeout=10
        )[1]
        assert trailing(call)["x-request-id"] != forged  # replaced by a fresh id, as over HTTP
        name = 'nope\n{"ts": 1, "type": "access", "status": "OK", "request_id": "FAKE"}'
        fails(inference.ModelReady, pb.ModelReadyRequest(name=name), grpc.StatusCode.NOT_FOUND)
        # the access line is written after the answer is sent: the client can be faster than the log (and
        # the previous test's last line can come in here: only this test's two calls are looked at)
        ours = ("ListModels", "ModelReady")
        deadline = time.monotonic() + 10
        while sum(f'"method": "{m}"' in line for line in lines for m in ours) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    finally:
        logging.getLogger("cnn_serve.access").removeHandler(keep)
    assert all("\n" not in line for line in lines)
    entries = [e for e in map(json.loads, lines) if e["method"] in ours]  # every line is one JSON object
    assert len(entries) == 2
    assert entries[1]["model"] == name and entries[1]["protocol"] == "grpc"
    assert entries[1]["status"] == "NOT_FOUND" and entries[1]["method"] == "ModelReady"
    assert not any(e.get("request_id") in (forged, "FAKE") for e in entries)


def test_a_url_for_an_image_is_url_not_allowed_over_grpc_too(
    classifier: classifier_pb2_grpc.ImageClassifierStub, inference: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The same code as over HTTP (and nothing fetched: the core never fetches; test_http checks the wire)."""
    url = b"http://127.0.0.1:9/cat.jpg"
    err = fails(
        classifier.Classify, classifier_pb2.ClassifyRequest(image=url), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert trailing(err)["x-error-code"] == "url_not_allowed" and "never fetches" in err.details()
    reply = classifier.ClassifyBatch(
        classifier_pb2.ClassifyBatchRequest(images=[url, jpeg(data.chelsea())]), timeout=60
    )
    assert reply.results[0].error.code == "url_not_allowed" and reply.results[1].result.predictions
    tensor = _bytes_input([url])
    tensor.contents.bytes_contents.append(url)
    err = fails(
        inference.ModelInfer,
        pb.ModelInferRequest(model_name="efficientnet_lite0", inputs=[tensor]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert trailing(err)["x-error-code"] == "url_not_allowed"


def test_oip_infer_unknown_model_is_not_found(inference: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="nope", inputs=[_bytes_input([b"x"])])
    request.inputs[0].contents.bytes_contents.append(b"x")
    fails(inference.ModelInfer, request, grpc.StatusCode.NOT_FOUND)


# ---------------------------------------------------------------------------------------------------------
# Health, reflection, metrics


def test_health_server_and_each_model(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "efficientnet_lite0", "lenet5", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == serving
    fails(stub.Check, health_pb2.HealthCheckRequest(service="nope"), grpc.StatusCode.NOT_FOUND)


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "cnnserve.v1.ImageClassifier",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
    (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert answer.file_descriptor_response.file_descriptor_proto


def test_grpc_requests_are_counted_in_metrics(
    served: Served, classifier: classifier_pb2_grpc.ImageClassifierStub
) -> None:
    from prometheus_client import generate_latest

    classifier.ListModels(classifier_pb2.ListModelsRequest(), timeout=10)
    fails(
        classifier.Classify, classifier_pb2.ClassifyRequest(image=b"junk"), grpc.StatusCode.INVALID_ARGUMENT
    )
    text = generate_latest(served.metrics.registry).decode()
    samples = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cnn_serve_requests_total"
    ]
    grpc_samples = {
        (s.labels["endpoint"], s.labels["status"]): s.value for s in samples if s.labels["protocol"] == "grpc"
    }
    assert grpc_samples[("ListModels", "OK")] >= 1
    assert grpc_samples[("Classify", "INVALID_ARGUMENT")] >= 1


# ---------------------------------------------------------------------------------------------------------
# A model that fails to load: UNAVAILABLE, and health NOT_SERVING for it while the others serve


def test_unavailable_model(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(need_models() / "lenet5", repo / "lenet5")
    shutil.copytree(need_models() / "lenet5", repo / "broken")
    card = repo / "broken" / "1" / "model.json"
    card.write_text(card.read_text().replace('"name": "lenet5"', '"name": "broken"'))
    for onnx_file in (repo / "broken" / "1").glob("*.onnx"):
        onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"corrupted!")
    s = Served(settings_for(repo, default_model="lenet5"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = classifier_pb2_grpc.ImageClassifierStub(ch)
            digit = png(Image.new("L", (28, 28), 0))
            assert (
                stub.Classify(classifier_pb2.ClassifyRequest(image=digit), timeout=30).result.model
                == "lenet5"
            )
            err = fails(
                stub.Classify,
                classifier_pb2.ClassifyRequest(image=digit, model="broken"),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert "broken" in err.details() or "sha256" in err.details()
            health = health_pb2_grpc.HealthStub(ch)
            check = health.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            check = health.Check(health_pb2.HealthCheckRequest(service="lenet5"), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            # strict readiness, the protocol's "all the models are ready": the server is not ready
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            inference = pb_grpc.GRPCInferenceServiceStub(ch)
            assert not inference.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert inference.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=10).ready
            assert not inference.ModelReady(pb.ModelReadyRequest(name="broken"), timeout=10).ready
    finally:
        s.close()


def test_small_models_parameters_of_every_kind_and_a_capped_class_count(tmp_path: Path) -> None:
    """A 3-class model: a request without parameters answers its 3 classes (a default top_k of 5 was an
    error); top_k arrives as int64, uint64 (the official proto's field 5) or a string; a double is refused
    by name; Triton's class_count above the class count answers every class, as Triton does."""
    write_tiny_model(tmp_path, "three", "1", classes=3)
    s = Served(settings_for(tmp_path, default_model="three"))
    image = png(Image.fromarray(data.chelsea()).resize((64, 48)))

    def request(**params: Any) -> pb.ModelInferRequest:
        tensor = _bytes_input([image])
        tensor.contents.bytes_contents.append(image)
        req = pb.ModelInferRequest(model_name="three", inputs=[tensor])
        for key, (kind, value) in params.items():
            setattr(req.parameters[key], kind, value)
        return req

    def shape_of(response: pb.ModelInferResponse, name: str) -> list[int]:
        return next(list(o.shape) for o in response.outputs if o.name == name)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            inference = pb_grpc.GRPCInferenceServiceStub(ch)
            assert shape_of(inference.ModelInfer(request(), timeout=60), "top_k") == [1, 3]
            for kind, value in (("int64_param", 2), ("uint64_param", 2), ("string_param", "2")):
                response = inference.ModelInfer(request(top_k=(kind, value)), timeout=60)
                assert shape_of(response, "top_k") == [1, 2], kind
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            err = fails(inference.ModelInfer, request(top_k=("double_param", 2.0)), invalid)
            assert "top_k" in err.details() and "integer" in err.details()
            fails(inference.ModelInfer, request(top_k=("uint64_param", 4)), invalid)
            req = request()
            wanted = req.outputs.add(name="probabilities")
            wanted.parameters["classification"].int64_param = 20
            response = inference.ModelInfer(req, timeout=60)
            assert shape_of(response, "probabilities") == [1, 3]
            classifier = classifier_pb2_grpc.ImageClassifierStub(ch)
            result = classifier.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=60).result
            assert sorted(p.index for p in result.predictions) == [0, 1, 2]
    finally:
        s.close()


def test_drain_answers_the_calls_in_flight_and_those_still_arriving_then_refuses() -> None:
    """SIGTERM's gRPC drain: NOT_SERVING at once, every call running or arriving meanwhile answered, the
    server stopped only once none has been in a handler for a moment. Stopping the server at once let the
    running calls finish but cancelled the calls it had taken in and not yet handed to a handler."""
    s = Served(settings_for(need_models()))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = classifier_pb2_grpc.ImageClassifierStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            request = classifier_pb2.ClassifyRequest(
                image=jpeg(data.astronaut()), model="efficientnet_lite0", tta="ten_crop"
            )
            running = [stub.Classify.future(request, timeout=120) for _ in range(8)]
            deadline = time.monotonic() + 30
            while s.server.interceptor.active < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert s.server.interceptor.active >= 2
            draining = asyncio.run_coroutine_threadsafe(s.server.stop(60), s.loop.loop)
            while time.monotonic() < deadline:  # the drain has begun once health says so
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.005)
            late = stub.Classify.future(request, timeout=120)  # sent during the drain
            replies = [call.result() for call in [*running, late]]
            assert len(replies) == 9 and all(reply.result.predictions for reply in replies)
            draining.result(60)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.servers.clear()  # stopped above
        s.close()


def test_the_model_in_the_access_log_comes_from_the_request(
    classifier: classifier_pb2_grpc.ImageClassifierStub, inference: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The interceptor names the model from the request message: the default one where ImageClassifier's
    request leaves it empty, the OIP request's model_name, none for a call about no model."""
    import json
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("cnn_serve.access").addHandler(keep)
    ids = {"model-1": "efficientnet_lite0", "model-2": "lenet5", "model-3": None}
    try:
        fails(
            classifier.Classify,
            classifier_pb2.ClassifyRequest(image=b"junk"),
            grpc.StatusCode.INVALID_ARGUMENT,
            metadata=(("x-request-id", "model-1"),),
        )
        fails(
            inference.ModelInfer,
            pb.ModelInferRequest(model_name="lenet5"),
            grpc.StatusCode.INVALID_ARGUMENT,
            metadata=(("x-request-id", "model-2"),),
        )
        classifier.ListModels(
            classifier_pb2.ListModelsRequest(), metadata=(("x-request-id", "model-3"),), timeout=10
        )
        deadline = time.monotonic() + 10
        while sum(f'"request_id": "{i}"' in line for line in lines for i in ids) < len(ids):
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    finally:
        logging.getLogger("cnn_serve.access").removeHandler(keep)
    entries = {e["request_id"]: e for e in map(json.loads, lines) if e["request_id"] in ids}
    assert {i: entries[i]["model"] for i in ids} == ids


def test_a_health_watch_is_not_a_call_the_drain_waits_for(served: Served, channel: grpc.Channel) -> None:
    """Health streams (Watch) stay open for as long as the client likes: they are not counted as active."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert served.server.interceptor.active == 0
    finally:
        watch.cancel()
