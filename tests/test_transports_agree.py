"""The same photos through every way in: HTTP (/classify, /classify_batch), gRPC (Classify, ClassifyBatch),
the Open Inference Protocol over REST and gRPC, and batch scoring (`python -m service.score`) give the same
top-k with the same probabilities (within 1e-6), for the trained EfficientNet-Lite0 and for the same network
as a TensorFlow-slim conversion leaves it (NHWC input, a background class, a final Softmax, [N, 1001, 1, 1]
scores), imported with `python -m export import-onnx`, with and without test-time augmentation; the imported
one also classifies as the original does."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from skimage import data as skdata

from export.__main__ import main as export_main
from proto import classifier_pb2, classifier_pb2_grpc
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.score import main as score_main
from service.scoring.results import ResultStore
from tests.http_server import Server, jpeg, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")

PHOTOS = ("chelsea", "coffee", "astronaut")
K = 5
TOLERANCE = 1e-6
BASE = "efficientnet_lite0"
SLIM = "efficientnet_slim"


def slim_graph(base: Path, out: Path) -> Path:
    """The base graph rewrapped as a TensorFlow-slim conversion: NHWC image in, a background logit first (the
    mean of the others: any value would do), Softmax, and scores shaped [N, 1001, 1, 1]."""
    model = onnx.load(str(base))
    g = model.graph
    (inp,) = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    (logits,) = g.output
    nodes = [
        helper.make_node("Transpose", ["images"], [inp.name], perm=[0, 3, 1, 2]),
        *g.node,
        helper.make_node("ReduceMax", [logits.name], ["background"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["background", logits.name], ["with_background"], axis=1),
        helper.make_node("Softmax", ["with_background"], ["probabilities"], axis=1),
        helper.make_node("Reshape", ["probabilities", "as_map"], ["predictions"]),
    ]
    as_map = numpy_helper.from_array(np.array([0, -1, 1, 1], np.int64), "as_map")
    graph = helper.make_graph(
        nodes,
        "slim",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["N", 1001, 1, 1])],
        [*g.initializer, as_map],
    )
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
        axes = numpy_helper.from_array(np.array([1], np.int64), "background_axes")
        graph.initializer.append(axes)
        graph.node[-4].CopyFrom(
            helper.make_node("ReduceMax", [logits.name, "background_axes"], ["background"], keepdims=1)
        )
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import))
    wrapped.ir_version = model.ir_version
    onnx.checker.check_model(wrapped)
    onnx.save(wrapped, str(out))
    return out


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("agree")
    repo = tmp / "models"
    shutil.copytree(model_repo / BASE / "1", repo / BASE / "1")
    src = slim_graph(repo / BASE / "1" / "model.onnx", tmp / "slim.onnx")
    pre = json.dumps(json.loads((repo / BASE / "1" / "model.json").read_text())["preprocessing"])
    args = ["import-onnx", str(src), "--name", SLIM, "--repository", str(repo), "--preprocessing", pre]
    assert export_main(args) == 0
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ("--repository", str(repo), "--max-batch-size", "4")
    with running_server(tmp_path_factory.mktemp("agree-serve"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {p: jpeg(getattr(skdata, p)()) for p in PHOTOS}


Answer = list[tuple[int, str, float]]  # (index, id, probability), best first


def http_answers(
    server: Server, model: str, images: dict[str, bytes], tta: str = "none"
) -> dict[str, dict[str, Answer]]:
    out: dict[str, dict[str, Answer]] = {"http /classify": {}, "http /classify_batch": {}}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for photo, data in images.items():
            r = c.post("/classify", params={"model": model, "top_k": K, "tta": tta}, content=data)
            assert r.status_code == 200, r.text
            out["http /classify"][photo] = [
                (p["index"], p["id"], p["probability"]) for p in r.json()["predictions"]
            ]
        files = [("files", (f"{p}.jpg", d, "image/jpeg")) for p, d in images.items()]
        r = c.post("/classify_batch", params={"model": model, "top_k": K, "tta": tta}, files=files)
        assert r.status_code == 200, r.text
        for photo, result in zip(images, r.json()["results"], strict=True):
            out["http /classify_batch"][photo] = [
                (p["index"], p["id"], p["probability"]) for p in result["predictions"]
            ]
        encoded = [base64.b64encode(d).decode() for d in images.values()]
        body = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}],
            "parameters": {"top_k": K, "tta": tta},
        }
        r = c.post(f"/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text
        out["oip rest"] = oip_answers(r.json()["outputs"], images, model)
    return out


def oip_answers(outputs: list[dict], images: dict[str, bytes], model: str) -> dict[str, Answer]:
    """Rows of the `top_k` output ("probability:index:label"), with ids from the full probabilities (which
    must agree with them)."""
    by_name = {o["name"]: o for o in outputs}
    probabilities = np.asarray(by_name["probabilities"]["data"], np.float32).reshape(
        by_name["probabilities"]["shape"]
    )
    rows = np.asarray(by_name["top_k"]["data"], dtype=object).reshape(by_name["top_k"]["shape"])
    answers = {}
    for photo, p, row in zip(images, probabilities, rows, strict=True):
        entries = [str(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        indices = [int(e[1]) for e in entries]
        np.testing.assert_allclose([float(e[0]) for e in entries], p[indices], atol=TOLERANCE)
        answers[photo] = [(i, "", float(p[i])) for i in indices]
    return answers


def grpc_answers(
    server: Server, model: str, images: dict[str, bytes], tta: str
) -> dict[str, dict[str, Answer]]:
    out: dict[str, dict[str, Answer]] = {"grpc Classify": {}, "grpc ClassifyBatch": {}}
    limit = 64 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)
        for photo, data in images.items():
            result = stub.Classify(
                classifier_pb2.ClassifyRequest(image=data, model=model, top_k=K, tta=tta), timeout=120
            )
            out["grpc Classify"][photo] = [(p.index, p.id, p.probability) for p in result.result.predictions]
        batch = stub.ClassifyBatch(
            classifier_pb2.ClassifyBatchRequest(images=list(images.values()), model=model, top_k=K, tta=tta),
            timeout=120,
        )
        for photo, result in zip(images, batch.results, strict=True):
            out["grpc ClassifyBatch"][photo] = [
                (p.index, p.id, p.probability) for p in result.result.predictions
            ]
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(images)])
        tensor.contents.bytes_contents.extend(images.values())
        request = pb.ModelInferRequest(model_name=model, inputs=[tensor])
        request.parameters["top_k"].int64_param = K
        request.parameters["tta"].string_param = tta
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
        outputs = [
            {
                "name": o.name,
                "shape": list(o.shape),
                "data": list(o.contents.fp32_contents)
                if o.datatype == "FP32"
                else list(o.contents.bytes_contents),
            }
            for o in response.outputs
        ]
        out["oip grpc"] = oip_answers(outputs, images, model)
    return out


def scoring_answers(
    repo: Path, model: str, images: dict[str, bytes], tmp: Path, tta: str
) -> dict[str, dict[str, Answer]]:
    folder = tmp / "in"
    folder.mkdir()
    for photo, data in images.items():
        (folder / f"{photo}.jpg").write_bytes(data)
    out = tmp / "scores.jsonl"
    args = [str(folder), "--model", model, "--repository", str(repo), "--out", str(out), "--top-k", str(K)]
    assert score_main([*args, "--tta", tta, "--workers", "0", "--no-progress"]) == 0
    rows = {Path(r["path"]).stem: r for r in ResultStore(str(out)).read_all()}
    return {
        "batch scoring": {
            photo: list(
                zip(
                    rows[photo]["top_k_indices"],
                    rows[photo]["top_k_ids"],
                    rows[photo]["top_k_probabilities"],
                    strict=True,
                )
            )
            for photo in images
        }
    }


def every_answer(
    server: Server, repo: Path, model: str, images: dict[str, bytes], tmp: Path, tta: str
) -> dict[str, dict[str, Answer]]:
    return {
        **http_answers(server, model, images, tta),
        **grpc_answers(server, model, images, tta),
        **scoring_answers(repo, model, images, tmp, tta),
    }


def assert_same(reference: dict[str, Answer], other: dict[str, Answer], what: str) -> None:
    for photo, expected in reference.items():
        got = other[photo]
        assert [i for i, _, _ in got] == [i for i, _, _ in expected], (what, photo, got, expected)
        ids = [i for _, i, _ in got]
        assert all(i == "" for i in ids) or ids == [i for _, i, _ in expected], (what, photo)
        np.testing.assert_allclose(
            [q for _, _, q in got],
            [q for _, _, q in expected],
            rtol=0,
            atol=TOLERANCE,
            err_msg=f"{what} {photo}",
        )


@pytest.mark.parametrize(
    ("model", "tta"), [(BASE, "none"), (BASE, "flip"), (SLIM, "none"), (SLIM, "five_crop")]
)
def test_every_transport_and_batch_scoring_give_the_same_top_k(
    model: str, tta: str, server: Server, repo: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    """For each test-time augmentation mode too: the views are made, run and averaged alike everywhere."""
    answers = every_answer(server, repo, model, images, tmp_path, tta)
    assert len(answers) == 7
    reference = answers.pop("http /classify")
    for what, other in answers.items():
        assert_same(reference, other, what)
    assert reference["chelsea"][0][1] in {"n02123045", "n02123159", "n02124075"}, reference["chelsea"]  # cats


def test_the_imported_slim_graph_classifies_as_the_original(
    server: Server, repo: Path, images: dict[str, bytes]
) -> None:
    card = json.loads((repo / SLIM / "1" / "model.json").read_text())
    assert card["input"]["layout"] == "NHWC" and card["input"]["shape"] == [-1, 224, 224, 3]
    assert card["output"]["kind"] == "probabilities" and card["output"]["label_offset"] == 1
    assert card["output"]["shape"] == [-1, 1001, 1, 1]
    base = http_answers(server, BASE, images)["http /classify"]
    slim = http_answers(server, SLIM, images)["http /classify"]
    for photo in PHOTOS:  # the graph's own Softmax against the service's: float32 rounding apart
        assert [i for i, _, _ in slim[photo]] == [i for i, _, _ in base[photo]], photo
        np.testing.assert_allclose([q for *_, q in slim[photo]], [q for *_, q in base[photo]], atol=1e-5)
