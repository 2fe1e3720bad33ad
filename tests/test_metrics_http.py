"""`/metrics` of a real server, parsed with prometheus_client: HTTP and gRPC requests, batching, models."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as photos

from proto import classifier_pb2, classifier_pb2_grpc
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.http_server import Server, jpeg, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("metrics")) as s:
        yield s


def scrape(server: Server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_count_http_and_grpc(server: Server) -> None:
    image = jpeg(photos.chelsea())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for _ in range(3):
            assert c.post("/classify", content=image).status_code == 200
        assert c.post("/classify", content=b"junk").status_code == 400
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)
        reply = stub.Classify(classifier_pb2.ClassifyRequest(image=image, top_k=2), timeout=60)
        assert reply is not None

    fams = scrape(server)
    samples = [s for s in fams["cnn_serve_requests"].samples if s.name == "cnn_serve_requests_total"]
    http_ok = [
        s
        for s in samples
        if s.labels["protocol"] == "http"
        and s.labels["endpoint"] == "classify"
        and s.labels["status"] == "200"
    ]
    assert http_ok and http_ok[0].value >= 3 and http_ok[0].labels["model"] == "efficientnet_lite0"
    assert any(s.labels["protocol"] == "http" and s.labels["status"] == "400" for s in samples)
    grpc_samples = [s for s in samples if s.labels["protocol"] == "grpc"]
    assert grpc_samples and sum(s.value for s in grpc_samples) >= 1, samples

    def count(name: str) -> float:
        return sum(s.value for s in fams[name].samples if s.name == name + "_count")

    assert count("cnn_serve_request_duration_seconds") >= 5
    assert count("cnn_serve_inference_seconds") >= 1
    assert count("cnn_serve_batch_size") >= 1
    assert count("cnn_serve_queue_wait_seconds") >= 1
    assert count("cnn_serve_preprocess_seconds") >= 1
    assert "cnn_serve_queue_depth" in fams
    # every decode gave its reservation back: the worker's gauge is back to 0 once the requests are answered
    assert [s.value for s in fams["cnn_serve_decode_memory_bytes"].samples] == [0.0]
    in_flight = {s.labels["protocol"]: s.value for s in fams["cnn_serve_in_flight_requests"].samples}
    assert in_flight.get("http") == 0.0
    info = {
        (s.labels["name"], s.labels["provider"]) for s in fams["cnn_serve_model_info"].samples if s.value == 1
    }
    assert ("efficientnet_lite0", "CPUExecutionProvider") in info and any(n == "lenet5" for n, _ in info)


def test_client_chosen_names_never_become_labels(server: Server) -> None:
    """Every name a client invents would otherwise be a new series, kept for the process's life."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for i in range(3):
            assert c.post(f"/classify?model=invented-{i}", content=b"x").status_code == 404
            assert c.get(f"/v2/models/invented-{i}/ready").status_code == 404
            assert c.get(f"/no/such/route/{i}").status_code == 404
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.Classify(classifier_pb2.ClassifyRequest(image=b"x", model="invented-grpc"), timeout=60)
    samples = [
        s for s in scrape(server)["cnn_serve_requests"].samples if s.name == "cnn_serve_requests_total"
    ]
    assert not [s for s in samples if "invented" in s.labels["model"]]
    unknown = {
        (s.labels["endpoint"], s.labels["protocol"]): s.value for s in samples if s.labels["model"] == "-"
    }
    assert unknown[("classify", "http")] >= 3 and unknown[("v2_model_ready", "http")] >= 3
    assert unknown[("-", "http")] >= 3  # the catch-all 404s are counted too
    assert unknown[("Classify", "grpc")] >= 1


def test_request_metrics_name_the_version_that_answered(server: Server) -> None:
    """Every transport's answers are counted under the version that produced them; refusals under "-"."""
    image = jpeg(photos.coffee())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/classify?model=lenet5", content=image).json()["version"] == "1"
        assert c.post("/classify_batch", files=[("images", ("a.jpg", image))]).status_code == 200
        encoded = base64.b64encode(image).decode()
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}
        assert c.post("/v2/models/lenet5/infer", json={"inputs": [tensor]}).json()["model_version"] == "1"
        assert c.post("/v2/models/lenet5/infer", content=b"{").status_code == 400
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)
        assert stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=60).result.version == "1"
        batch = stub.ClassifyBatch(classifier_pb2.ClassifyBatchRequest(images=[b"junk", image]), timeout=60)
        assert batch.results[1].result.version == "1"
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(image)
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="lenet5", inputs=[tensor]), timeout=60
        )
        assert infer.model_version == "1"
    samples = [
        s for s in scrape(server)["cnn_serve_requests"].samples if s.name == "cnn_serve_requests_total"
    ]
    by = {(s.labels["endpoint"], s.labels["protocol"], s.labels["status"]): s.labels for s in samples}
    assert by[("classify", "http", "200")]["version"] == "1"
    assert by[("classify_batch", "http", "200")]["version"] == "1"
    assert by[("v2_infer", "http", "200")]["version"] == "1"
    assert by[("v2_infer", "http", "400")]["version"] == "-"  # refused before any version answered
    for endpoint in ("Classify", "ClassifyBatch", "ModelInfer"):
        assert by[(endpoint, "grpc", "OK")]["version"] == "1", endpoint
    durations = scrape(server)["cnn_serve_request_duration_seconds"].samples
    assert {s.labels["version"] for s in durations if s.labels.get("endpoint") == "classify"} >= {"1"}
