"""NVIDIA's Triton client (`tritonclient`, HTTP and gRPC) against the real service: the interoperability that
the Open Inference Protocol promises, checked with the client users actually run, not our own stubs.

The client lives in build/tritonclient (`make tritonclient`): it pins protobuf < 7, which the service's
generated stubs outgrow, so it runs as a subprocess (tests/clients/triton_oip.py) that reports as JSON.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from service.card import Preprocessing
from service.preprocessing import Preprocessor
from tests.http_server import MODELS, ROOT, jpeg, png, running_server

PYTHON = ROOT / "build" / "tritonclient" / "bin" / "python"
SCRIPT = ROOT / "tests" / "clients" / "triton_oip.py"
MODEL = "efficientnet_lite0"
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
TRANSPORTS = ("http", "grpc")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    assert PYTHON.exists(), f"{PYTHON} is missing: run `make tritonclient` (`make test` does)"
    tmp = tmp_path_factory.mktemp("triton")
    cat, coffee = tmp / "cat.jpg", tmp / "coffee.png"
    cat.write_bytes(jpeg(photos.chelsea()))
    coffee.write_bytes(png(photos.coffee()))
    card = json.loads((MODELS / MODEL / "1" / "model.json").read_text())
    photo = Image.fromarray(photos.chelsea()).resize((256, 256))
    tensor = Preprocessor(Preprocessing.from_dict(card["preprocessing"]), mode="fast")(photo)
    np.save(tmp / "tensor.npy", tensor)
    with running_server(tmp) as server:
        done = subprocess.run(
            [str(PYTHON), str(SCRIPT), "--http", server.url.removeprefix("http://"), "--grpc",
             f"127.0.0.1:{server.grpc_port}", "--model", MODEL, "--image", str(cat), "--image", str(coffee),
             "--tensor", str(tmp / "tensor.npy")],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        yield json.loads(done.stdout)
        assert server.proc.poll() is None, "the server died"


def error(entry: Any) -> str:
    assert isinstance(entry, dict) and "error" in entry, f"expected the client to raise, got {entry}"
    return str(entry["error"])


def classes(elements: list[str]) -> list[tuple[float, int, str]]:
    """Triton's classification strings, "<probability>:<index>:<label>", parsed."""
    out = []
    for e in elements:
        p, index, label = e.split(":", 2)
        out.append((float(p), int(index), label))
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_and_metadata(report: dict[str, Any], transport: str) -> None:
    r = report[transport]
    assert r["live"] is True and r["ready"] is True
    assert r["model_ready"] is True and r["model_ready_v1"] is True
    assert r["server_metadata"]["name"] == "cnn-serve"
    assert {"binary_tensor_data", "classification"} <= set(r["server_metadata"]["extensions"])
    meta = r["model_metadata"]
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("image", "BYTES"), ("input", "FP32")]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32"),
        ("top_k", "BYTES"),
    ]
    assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, 1000]
    assert "no_such_model" in error(r["unknown_model_metadata"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_images_classified_in_every_form(report: dict[str, Any], transport: str) -> None:
    r = report[transport]
    forms = ["images_binary", "images_all_outputs"]
    forms += (
        ["images_json", "compressed_gzip", "compressed_deflate"]
        if transport == "http"
        else ["compressed_gzip"]
    )
    for key in forms:
        answer = r[key]
        assert answer["model_name"] == MODEL and answer["model_version"] == "1", (key, answer)
        probs = answer["probabilities"]
        assert probs["shape"] == [2, 1000] and probs["dtype"] == "float32"
        assert probs["argmax"][0] in CATS and probs["argmax"][1] == ESPRESSO, (key, probs)
        top = answer["top_k"]
        assert top["shape"] == [2, 5]
        parsed = classes(top["data"])
        assert [index for _, index, _ in parsed[:1] + parsed[5:6]] == probs["argmax"]
        assert parsed[5][2] == "espresso"
        assert [p for p, _, _ in parsed[:5]] == sorted((p for p, _, _ in parsed[:5]), reverse=True)
    assert r["images_binary"]["id"] == "r-1"  # the request id comes back
    assert r["images_version_1"]["top_k"]["shape"] == [2, 5]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_request_parameters(report: dict[str, Any], transport: str) -> None:
    top = report[transport]["images_top3_tta_flip"]["top_k"]
    assert top["shape"] == [2, 3]
    parsed = classes(top["data"])
    assert parsed[0][1] in CATS and parsed[3][1] == ESPRESSO


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_classification_extension(report: dict[str, Any], transport: str) -> None:
    """tritonclient's `class_count=3` on the FP32 output: its three best classes as BYTES, not 1000 floats."""
    r = report[transport]
    keys = ["classification_extension"] + (["classification_extension_json"] if transport == "http" else [])
    for key in keys:
        out = r[key]["probabilities"]
        assert out["shape"] == [2, 3], (key, out)
        parsed = classes(out["data"])
        assert parsed[:3] == classes(r["images_binary"]["top_k"]["data"][:3])
        assert parsed[3][1] == ESPRESSO
    assert "already classes" in error(r["classification_of_top_k"])
    # as in Triton: a class_count above the class count answers every class
    every = r["classification_over_class_count"]["probabilities"]
    assert every["shape"] == [2, 1000] and classes(every["data"])[:3] == parsed[:3]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_preprocessed_tensor(report: dict[str, Any], transport: str) -> None:
    out = report[transport]["tensor"]["probabilities"]
    assert out["shape"] == [1, 1000] and out["argmax"][0] in CATS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_reach_the_client_with_the_servers_message(report: dict[str, Any], transport: str) -> None:
    """The client raises with our message (HTTP: it reads the protocol's `error` field; without it, it only
    says it could not decode the answer), and the model keeps serving."""
    r = report[transport]
    assert "unknown model 'no_such_model'" in error(r["unknown_model"])
    assert "'top_k' must be between 1 and 1000, got 0" in error(r["bad_top_k"])
    assert "unknown tta 'sideways'" in error(r["unknown_tta"])
    assert "not an image" in error(r["not_an_image"])
    statuses = [r[k]["status"] for k in ("unknown_model", "bad_top_k", "not_an_image")]
    if transport == "http":
        assert statuses == ["404", "400", "400"]
        assert r["unknown_model_ready"] is False
    else:
        assert statuses == ["StatusCode.NOT_FOUND"] + ["StatusCode.INVALID_ARGUMENT"] * 2
        assert "no_such_model" in error(r["unknown_model_ready"])
    assert r["ready_after_errors"] is True
