"""Classifiers as users bring them, imported with `python -m export import-onnx` and served over HTTP: each
graph is one base classifier rewrapped the way converters write it (NHWC input, [N, C, 1, 1] scores, a final
Softmax, a background class, a fixed batch of 1, opset 7, several inputs and outputs), and each must classify
real photos as the base graph does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter
from skimage import data as skdata

from export.__main__ import main
from service import decoding
from service.card import read_card
from service.config import Settings
from service.pipeline import Pipeline
from service.postprocessing import softmax
from tests.http_server import Server, jpeg, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")

PHOTOS = ("chelsea", "coffee", "astronaut")
CLASSES = 1000


def _core(flatten: str = "Flatten") -> tuple[list, list]:
    """Nodes x -> logits of a small seeded conv net with well separated scores, and its initializers.
    `flatten` "Reshape1" hard-codes a batch of one ([1, -1]) as some old exporters did."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.15, (16, 3, 7, 7)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.25, (CLASSES, 32)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.normal(0, 0.1, (CLASSES,)).astype(np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[4, 4], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
    ]
    if flatten == "Reshape1":
        inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "one_row"))
        nodes.append(helper.make_node("Reshape", ["g", "one_row"], ["f"]))
    else:
        nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1))
    return nodes, inits


def _model(
    inputs: list,
    outputs: list,
    before: list | None = None,
    after: list | None = None,
    inits: list | None = None,
    flatten: str = "Flatten",
    opset: int = 13,
) -> onnx.ModelProto:
    core, core_inits = _core(flatten)
    graph = helper.make_graph(
        [*(before or []), *core, *(after or [])], "variant", inputs, outputs, [*core_inits, *(inits or [])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


NCHW = ["N", 3, 224, 224]
NHWC = ["N", 224, 224, 3]
TO_NCHW = helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2])
# [N, C] -> [N, C, 1, 1], as a final 1x1 convolution or a global pooling without flatten leaves it
COLUMN = numpy_helper.from_array(np.array([0, -1, 1, 1], np.int64), "column")
# A background class first: its logit is the mean of the others (any value would do, it is dropped)
BACKGROUND = [
    helper.make_node("ReduceMean", ["logits"], ["bg"], axes=[1], keepdims=1),
    helper.make_node("Concat", ["bg", "logits"], ["with_bg"], axis=1),
]


def variants() -> dict[str, tuple[onnx.ModelProto, list[str], dict]]:
    """name -> (graph, extra import-onnx flags, card fields expected)."""
    out: dict[str, tuple[onnx.ModelProto, list[str], dict]] = {}
    out["base"] = (_model([_vi("x", NCHW)], [_vi("logits", ["N", CLASSES])]), [], {})
    out["caffe"] = (
        _model(
            [_vi("x", NCHW)],
            [_vi("score", ["N", CLASSES, 1, 1])],
            after=[helper.make_node("Reshape", ["logits", "column"], ["score"])],
            inits=[COLUMN],
        ),
        [],
        {"output_shape": [-1, CLASSES, 1, 1]},
    )
    out["softmax"] = (
        _model(
            [_vi("x", NCHW)],
            [_vi("prob", ["N", CLASSES])],
            after=[helper.make_node("Softmax", ["logits"], ["prob"], axis=1)],
        ),
        [],
        {"kind": "probabilities"},
    )
    out["keras"] = (
        _model([_vi("image", NHWC)], [_vi("logits", ["N", CLASSES])], before=[TO_NCHW]),
        [],
        {"layout": "NHWC", "input_shape": [-1, 224, 224, 3]},
    )
    # TensorFlow-slim as converted: NHWC, batch fixed at 1, a background class, Softmax, [1, C, 1, 1]
    out["slim"] = (
        _model(
            [_vi("image", [1, 224, 224, 3])],
            [_vi("predictions", [1, CLASSES + 1, 1, 1])],
            before=[TO_NCHW],
            after=[
                *BACKGROUND,
                helper.make_node("Softmax", ["with_bg"], ["p"], axis=1),
                helper.make_node("Reshape", ["p", "column"], ["predictions"]),
            ],
            inits=[COLUMN],
        ),
        [],
        {"layout": "NHWC", "kind": "probabilities", "label_offset": 1, "input_shape": [-1, 224, 224, 3]},
    )
    out["background_logits"] = (
        _model([_vi("x", NCHW)], [_vi("with_bg", ["N", CLASSES + 1])], after=BACKGROUND),
        [],
        {"label_offset": 1},
    )
    out["batch1"] = (
        _model([_vi("x", [1, 3, 224, 224])], [_vi("logits", [1, CLASSES])], flatten="Reshape1"),
        [],
        {"input_shape": [1, 3, 224, 224]},
    )
    out["batch1_dynamic"] = (
        _model([_vi("x", [1, 3, 224, 224])], [_vi("logits", [1, CLASSES])]),
        [],
        {"input_shape": [-1, 3, 224, 224]},
    )
    opset7 = version_converter.convert_version(
        _model([_vi("x", NCHW)], [_vi("logits", ["N", CLASSES])], opset=9), 7
    )
    opset7.ir_version = 3
    out["opset7"] = (opset7, [], {"opset": 7})
    # Two inputs (a threshold only a second output reads) and two outputs: the flags choose.
    out["two_heads"] = (
        _model(
            [_vi("x", NCHW), _vi("threshold", [1])],
            [_vi("logits", ["N", CLASSES]), _vi("mask", ["N", CLASSES])],
            after=[
                helper.make_node("Greater", ["logits", "threshold"], ["above"]),
                helper.make_node("Cast", ["above"], ["mask"], to=TensorProto.FLOAT),
            ],
        ),
        ["--input", "x", "--output", "logits"],
        {"rewritten": True},
    )
    return out


def _import(repo: Path, name: str, model: onnx.ModelProto, flags: list[str], tmp: Path) -> int:
    src = tmp / f"{name}.onnx"
    onnx.save(model, str(src))
    return main(["import-onnx", str(src), "--name", name, "--repository", str(repo), *flags])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("byo")
    repo = tmp / "models"
    for name, (model, flags, _) in variants().items():
        assert _import(repo, name, model, flags, tmp) == 0, name
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ("--repository", str(repo), "--max-batch-size", "4", "--default-model", "base")
    with running_server(tmp_path_factory.mktemp("byo-serve"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def expected(repo: Path) -> dict[str, list[tuple[int, float]]]:
    """The base graph's own top 5 for each photo, run here in ONNX Runtime on the service's preprocessing."""
    card = read_card(repo / "base" / "1")
    settings = Settings()
    pipeline = Pipeline.for_card(card, decoding.Limits.from_settings(settings), settings.preprocess_mode)
    sess = ort.InferenceSession(str(repo / "base" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = {}
    for photo in PHOTOS:
        x = pipeline.prepare(jpeg(getattr(skdata, photo)()))
        p = softmax(sess.run(None, {"x": x})[0])[0]
        order = np.argsort(-p, kind="stable")[:6]
        assert np.diff(-p[order]).min() > 1e-4, "the base's top 5 must be clear of near-ties"
        order = order[:5]
        out[photo] = [(int(i), float(p[i])) for i in order]
    return out


@pytest.mark.parametrize("name", list(variants()))
def test_each_kind_is_imported_as_it_is_and_classifies_photos_as_the_base_graph(
    name: str, repo: Path, server: Server, expected: dict
) -> None:
    card = json.loads((repo / name / "1" / "model.json").read_text())
    facts = variants()[name][2]
    assert card["input"]["layout"] == facts.get("layout", "NCHW")
    assert card["input"]["shape"] == facts.get("input_shape", [-1, 3, 224, 224])
    assert card["output"]["kind"] == facts.get("kind", "logits")
    assert card["output"].get("label_offset", 0) == facts.get("label_offset", 0)
    assert card["opset"] == facts.get("opset", 13)
    if "output_shape" in facts:
        assert card["output"]["shape"] == facts["output_shape"]
    if "rewritten" in facts:
        assert card["import"]["rewritten"] is True
    assert len(card["labels"]) == CLASSES and card["labels"][0]["id"] == "n01440764"

    files = [("files", (f"{p}.jpg", jpeg(getattr(skdata, p)()), "image/jpeg")) for p in PHOTOS]
    r = httpx.post(
        server.url + "/classify_batch", params={"model": name, "top_k": 5}, files=files, timeout=120
    )
    assert r.status_code == 200, r.text
    for photo, result in zip(PHOTOS, r.json()["results"], strict=True):
        got = [(p["index"], p["probability"]) for p in result["predictions"]]
        assert [i for i, _ in got] == [i for i, _ in expected[photo]], (name, photo)
        np.testing.assert_allclose([q for _, q in got], [q for _, q in expected[photo]], atol=1e-5)
        assert result["predictions"][0]["id"] == card["labels"][got[0][0]]["id"]


def test_open_inference_tensors_are_in_the_graphs_own_layout_and_batch(
    repo: Path, server: Server, expected: dict
) -> None:
    """An FP32 tensor sent through the Open Inference Protocol is what the graph takes, as the metadata says:
    NHWC for a TensorFlow/Keras conversion; a fixed batch of 1 refuses two samples with the shape it needs."""
    card = read_card(repo / "keras" / "1")
    settings = Settings()
    pipeline = Pipeline.for_card(card, decoding.Limits.from_settings(settings), settings.preprocess_mode)
    nchw = pipeline.prepare(jpeg(skdata.chelsea()))
    nhwc = nchw.transpose(0, 2, 3, 1)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        meta = c.get("/v2/models/keras").json()
        fp32 = [i for i in meta["inputs"] if i["datatype"] == "FP32"]
        assert fp32 == [{"name": "image", "datatype": "FP32", "shape": [-1, 224, 224, 3]}]
        tensor = {
            "name": "image",
            "datatype": "FP32",
            "shape": list(nhwc.shape),
            "data": nhwc.ravel().tolist(),
        }
        r = c.post(
            "/v2/models/keras/infer", json={"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
        )
        assert r.status_code == 200, r.text
        p = np.asarray(r.json()["outputs"][0]["data"], np.float32)
        top = np.argsort(-p, kind="stable")[:5]
        assert [int(i) for i in top] == [i for i, _ in expected["chelsea"]]
        np.testing.assert_allclose(p[top], [q for _, q in expected["chelsea"]], atol=1e-5)
        wrong = {**tensor, "shape": list(nchw.shape)}
        r = c.post("/v2/models/keras/infer", json={"inputs": [wrong]})
        assert r.status_code == 400 and "must have shape [-1, 224, 224, 3]" in r.json()["message"]
        two = np.concatenate([nchw, nchw])
        tensor = {"name": "x", "datatype": "FP32", "shape": list(two.shape), "data": two.ravel().tolist()}
        r = c.post("/v2/models/batch1/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and "must have shape [1, 3, 224, 224], got [2, 3, 224, 224]" in r.text
        assert c.get("/readyz").status_code == 200
