"""The HTTP transport end to end: a real server on loopback, real photos, every error, OIP JSON and binary."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from tests.http_server import Server, jpeg, png, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")

CAT_WORDS = ("cat", "tabby", "lynx", "tiger")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("http")
    with running_server(
        tmp, "--max-request-bytes", str(3 * 1024 * 1024), "--max-images-per-request", "4"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def chelsea() -> bytes:
    return jpeg(photos.chelsea())


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return png(photos.coffee())


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id", "error"}, body
    assert body["error"] == body["message"]  # the Open Inference Protocol's field
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text and "/work/" not in r.text
    if code is not None:
        assert body["code"] == code, body
    return body


def test_classify_multipart_photo(client: httpx.Client, chelsea: bytes) -> None:
    r = client.post(
        "/classify",
        files={"file": ("chelsea.jpg", chelsea, "image/jpeg")},
        headers={"x-request-id": "test-chelsea-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == "test-chelsea-1" == body["request_id"]
    assert body["model"] == "efficientnet_lite0" and body["version"]
    preds = body["predictions"]
    assert len(preds) == 5
    assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    assert any(w in preds[0]["label"].lower() for w in CAT_WORDS), preds


def test_classify_raw_body_with_parameters(client: httpx.Client, coffee: bytes) -> None:
    r = client.post(
        "/classify",
        params={"top_k": 3, "model": "efficientnet_lite0", "version": "1"},
        content=coffee,
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    assert any(w in " ".join(p["label"].lower() for p in preds) for w in ("espresso", "cup", "coffee"))
    assert len(r.headers["x-request-id"]) >= 16  # made by the server when the client sends none


def test_classify_json_base64_and_tta(client: httpx.Client, chelsea: bytes) -> None:
    r = client.post(
        "/classify", json={"image": base64.b64encode(chelsea).decode(), "top_k": 2, "tta": "flip"}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


def test_classify_lenet_digits(client: httpx.Client) -> None:
    """scikit-learn's digits drawn dark on light, as a photo of a written digit would be; LeNet reads them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    picks = list(range(len(digits.images) - 20, len(digits.images)))
    files = []
    for i in picks:
        ink = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        image = Image.fromarray(255 - ink).resize((32, 32), Image.Resampling.BILINEAR)
        files.append(("files", (f"{i}.png", png(np.asarray(image)), "image/png")))
    r = client.post("/classify_batch", params={"model": "lenet5", "top_k": 10}, files=files[:4])
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]["predictions"]
    assert sorted(p["id"] for p in first) == [str(i) for i in range(10)]
    assert abs(sum(p["probability"] for p in first) - 1.0) < 1e-3
    correct = 0
    for chunk in range(0, len(files), 4):
        r = client.post(
            "/classify_batch", params={"model": "lenet5", "top_k": 1}, files=files[chunk : chunk + 4]
        )
        for entry, i in zip(r.json()["results"], picks[chunk : chunk + 4], strict=True):
            correct += entry["predictions"][0]["id"] == str(digits.target[i])
    assert correct >= 17, f"{correct}/20 digits read correctly"


def test_classify_batch_bad_image_fails_only_itself(
    client: httpx.Client, chelsea: bytes, coffee: bytes
) -> None:
    files = [
        ("files", ("a.jpg", chelsea, "image/jpeg")),
        ("files", ("bad.jpg", b"not an image", "image/jpeg")),
        ("files", ("c.png", coffee, "image/png")),
    ]
    r = client.post("/classify_batch", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["succeeded"] == 2 and body["failed"] == 1
    ok, bad, ok2 = body["results"]
    assert ok["filename"] == "a.jpg" and len(ok["predictions"]) == 2
    assert bad["filename"] == "bad.jpg" and bad["error"]["code"] in ("invalid_image", "unsupported_format")
    assert len(ok2["predictions"]) == 2


def test_models_lists_metadata(client: httpx.Client) -> None:
    r = client.get("/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert {"efficientnet_lite0", "lenet5"} <= set(models)
    eff = models["efficientnet_lite0"]
    assert eff["label_count"] == 1000 and eff["state"] == "READY" and "provider" in eff
    assert "labels" not in eff and eff["input"]["shape"][1:] == [3, 224, 224]
    assert models["lenet5"]["label_count"] == 10


def test_health_and_readiness(client: httpx.Client) -> None:
    for path in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers.get("x-request-id")
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_errors_bad_input(client: httpx.Client) -> None:
    assert_error(client.post("/classify", content=b"\x89PNG garbage"), 400)
    assert_error(client.post("/classify", content=b""), 400, "invalid_argument")
    assert_error(client.post("/classify", params={"top_k": 0}, content=b"x"), 400, "invalid_argument")
    assert_error(client.post("/classify", params={"top_k": "many"}, content=b"x"), 400, "invalid_argument")
    assert_error(client.post("/classify", json={"image": "***"}), 400, "invalid_argument")
    assert_error(client.post("/classify", content=b"{", headers={"content-type": "application/json"}), 400)
    body = assert_error(
        client.post(
            "/classify", params={"model": "no_such_model"}, content=png(np.zeros((8, 8, 3), np.uint8))
        ),
        404,
        "not_found",
    )
    assert "no_such_model" in body["message"]


def test_json_images_must_be_base64_strings(client: httpx.Client) -> None:
    """/classify, /classify_batch and OIP JSON share one rule: a base64 string, named in the error."""
    oip_url = "/v2/models/efficientnet_lite0/infer"

    def oip(element: object) -> httpx.Response:
        return client.post(
            oip_url,
            json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [element]}]},
        )

    for r, where, why in [
        (client.post("/classify", json={"image": 12345}), "image 0", "must be a base64 string"),
        (client.post("/classify_batch", json={"images": ["AAAA", "%%%"]}), "image 1", "not valid base64"),
        (client.post("/classify_batch", json={"images": [{"b64": "AAAA"}]}), "image 0", "base64 string"),
        (oip("not base64!"), "input 'image' element 0", "not valid base64"),
        (oip(7), "input 'image' element 0", "must be a base64 string"),
    ]:
        message = assert_error(r, 400, "invalid_argument")["message"]
        assert where in message and why in message, message
    assert client.post("/classify", json={"image": "AAAA"}).status_code == 400  # decodes, but no image
    assert client.get("/readyz").status_code == 200


def test_errors_limits(client: httpx.Client, chelsea: bytes) -> None:
    big = b"\xff\xd8" + bytes(3 * 1024 * 1024)
    assert_error(client.post("/classify", content=big), 413, "request_too_large")
    five = [("files", (f"{i}.jpg", chelsea, "image/jpeg")) for i in range(5)]
    body = assert_error(client.post("/classify_batch", files=five), 400, "invalid_argument")
    assert "limit is 4" in body["message"]
    two = five[:2]
    assert_error(client.post("/classify", files=two), 400, "invalid_argument")


def test_images_per_request_is_one_rule_for_every_body(client: httpx.Client, chelsea: bytes) -> None:
    """Multipart files and JSON images are counted by `service.limits.check_count`, with its one message; the
    Open Inference Protocol refuses the same count on the declared shape, before any element is decoded."""
    expected = "5 images in one request; the limit is 4"
    encoded = base64.b64encode(chelsea).decode()
    five = [("files", (f"{i}.jpg", chelsea, "image/jpeg")) for i in range(5)]
    multipart = assert_error(client.post("/classify_batch", files=five), 400, "invalid_argument")
    as_json = assert_error(client.post("/classify_batch", json={"images": [encoded] * 5}), 400)
    assert multipart["message"] == as_json["message"] == expected
    image = {"name": "image", "datatype": "BYTES", "shape": [5], "data": [encoded] * 5}
    declared = assert_error(client.post("/v2/models/lenet5/infer", json={"inputs": [image]}), 400)
    assert declared["message"] == "input 'image' declares 5 images; the limit is 4 per request"
    image.update(shape=[4], data=[encoded] * 4)
    assert client.post("/v2/models/lenet5/infer", json={"inputs": [image]}).status_code == 200
    assert client.post("/classify_batch", json={"images": [encoded] * 4}).status_code == 200


def test_form_bodies_that_break_their_format_are_400_and_the_server_keeps_serving(
    client: httpx.Client, chelsea: bytes
) -> None:
    """Form bodies are split in a thread (`service.http.forms`); every way one breaks its format is the
    client's error, with its reason."""
    part = b'Content-Disposition: form-data; name="file"; filename="c.jpg"\r\n\r\n' + chelsea
    cases = [
        (b"--b\r\n" + part + b"\r\n--b--\r\n", "multipart/form-data", "boundary of 1 to 70"),
        (b"--b\r\n" + part, "multipart/form-data; boundary=b", "ends before its closing boundary"),
        (b"no boundary here", "multipart/form-data; boundary=b", "its boundary is not in it"),
        (b"--b\r\nX: y\r\n\r\nz\r\n--b--", "multipart/form-data; boundary=b", "not form-data with a name"),
        (b"file=abc", "application/x-www-form-urlencoded", "must be a file upload"),
        (b"top_k=3", "application/x-www-form-urlencoded", "no image in the request"),
        (b"&".join(b"f%d=1" % i for i in range(65)), "application/x-www-form-urlencoded", "limit of 64"),
    ]
    for body, content_type, reason in cases:
        r = client.post("/classify_batch", content=body, headers={"content-type": content_type})
        message = assert_error(r, 400, "invalid_argument")["message"]
        assert reason in message, (content_type, message)
    r = client.post("/classify", files={"file": ("c.jpg", chelsea, "image/jpeg")}, data={"top_k": "2"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text


def test_top_k_is_one_rule_for_the_query_string_and_the_protocol(
    client: httpx.Client, chelsea: bytes
) -> None:
    """A query string, a form field, a JSON key and an OIP parameter are checked by `check_top_k`, with one
    message, bounded by the model's class count (lenet5 has 10) as well as by max_top_k."""
    encoded = base64.b64encode(chelsea).decode()

    def oip(model: str, top_k: object) -> httpx.Response:
        image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}
        return client.post(
            f"/v2/models/{model}/infer", json={"inputs": [image], "parameters": {"top_k": top_k}}
        )

    for model, value, message in (
        ("efficientnet_lite0", "0", "parameter 'top_k' must be between 1 and 1000, got 0"),
        ("lenet5", "11", "parameter 'top_k' must be between 1 and 10, got 11"),
        ("lenet5", "many", "parameter 'top_k' must be an integer, not 'many'"),
    ):
        answers = [
            client.post("/classify", params={"model": model, "top_k": value}, content=chelsea),
            client.post(
                "/classify", files={"file": ("c.jpg", chelsea)}, data={"model": model, "top_k": value}
            ),
            client.post("/classify", json={"image": encoded, "model": model, "top_k": value}),
            oip(model, value),
        ]
        if value.isdigit():
            answers.append(oip(model, int(value)))
        for r in answers:
            assert assert_error(r, 400, "invalid_argument")["message"] == message, r.request.url
    r = client.post("/classify", params={"model": "lenet5", "top_k": "10"}, content=chelsea)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 10
    assert oip("lenet5", "10").json()["outputs"][1]["shape"] == [1, 10]


def test_deadline_exceeded_is_504(client: httpx.Client, chelsea: bytes) -> None:
    r = client.post("/classify", content=chelsea, headers={"x-request-timeout-ms": "0.001"})
    assert_error(r, 504, "deadline_exceeded")
    for bad in ("nan", "inf", "-1", "0", "soon"):
        r = client.post("/classify", content=chelsea, headers={"x-request-timeout-ms": bad})
        assert bad in assert_error(r, 400, "invalid_argument")["message"]


def test_a_client_timeout_shortens_the_deadline_never_lengthens_it() -> None:
    from starlette.requests import Request

    from service.config import Settings
    from service.http.requests import deadline_of

    settings = Settings(request_timeout_s=0.5)

    def seconds_left(header: str) -> float:
        request = Request({"type": "http", "headers": [(b"x-request-timeout-ms", header.encode())]})
        return deadline_of(request, settings) - time.monotonic()

    assert seconds_left("60000") <= 0.5  # capped at the server's request_timeout_s, as gRPC caps
    assert 0.05 < seconds_left("100") <= 0.1


class Listener:
    """A local TCP listener that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def test_url_as_image_is_refused_and_never_fetched(client: httpx.Client) -> None:
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/cat.jpg"
    try:
        cases = [
            client.post("/classify", content=url.encode(), headers={"content-type": "text/plain"}),
            client.post("/classify", data={"file": url}),
            client.post("/classify", files={"file": ("cat.jpg", url.encode(), "image/jpeg")}),
            client.post("/classify", json={"image": url}),
            client.post("/classify_batch", json={"images": [url]}),
            client.post(
                "/v2/models/efficientnet_lite0/infer",
                json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [url]}]},
            ),
        ]
        for r in cases:
            body = assert_error(r, 400, "url_not_allowed")
            assert "never fetches" in body["message"]
    finally:
        listener.close()
    assert listener.connections == 0


def test_oip_metadata_routes(client: httpx.Client) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] and "binary_tensor_data" in meta["extensions"]
    model = client.get("/v2/models/efficientnet_lite0").json()
    assert model["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert model["outputs"][0]["shape"] == [-1, 1000]
    assert client.get("/v2/models/efficientnet_lite0/versions/1").status_code == 200
    assert client.get("/v2/models/efficientnet_lite0/ready").json()["ready"] is True
    assert client.get("/v2/models/lenet5/versions/1/ready").status_code == 200
    assert_error(client.get("/v2/models/nope"), 404, "not_found")
    assert_error(client.get("/v2/models/nope/ready"), 404, "not_found")
    assert_error(client.get("/v2/models/lenet5/versions/99"), 404, "not_found")


def test_oip_infer_json_images_and_fp32(client: httpx.Client, chelsea: bytes) -> None:
    req = {
        "id": "req-7",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(chelsea).decode()]}
        ],
        "parameters": {"top_k": 3},
    }
    r = client.post("/v2/models/efficientnet_lite0/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "efficientnet_lite0"
    outs = {o["name"]: o for o in body["outputs"]}
    probs = np.asarray(outs["probabilities"]["data"]).reshape(outs["probabilities"]["shape"])
    assert probs.shape == (1, 1000) and abs(probs.sum() - 1) < 1e-3
    top = outs["top_k"]["data"]
    assert len(top) == 3 and any(w in top[0].lower() for w in CAT_WORDS)
    assert int(top[0].split(":")[1]) == int(probs.argmax())

    meta = client.get("/v2/models/lenet5").json()
    fp32 = meta["inputs"][1]
    shape = [2 if d < 0 else d for d in fp32["shape"]]
    tensor = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    r = client.post(
        "/v2/models/lenet5/infer",
        json={
            "inputs": [
                {
                    "name": fp32["name"],
                    "datatype": "FP32",
                    "shape": shape,
                    "data": tensor.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": "probabilities"}],
        },
    )
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["probabilities"] and outs[0]["shape"] == [2, 10]


def _binary_request(doc: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head)),
        "content-type": "application/octet-stream",
    }


def _parse_binary_response(r: httpx.Response) -> dict[str, np.ndarray | list[bytes]]:
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    offset, out = n, {}
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw = r.content[offset : offset + size]
        offset += size
        if o["datatype"] == "BYTES":
            items, i = [], 0
            while i < len(raw):
                (length,) = struct.unpack_from("<I", raw, i)
                items.append(raw[i + 4 : i + 4 + length])
                i += 4 + length
            out[o["name"]] = items
        else:
            out[o["name"]] = np.frombuffer(raw, dtype="<f4").reshape(o["shape"])
    assert offset == len(r.content)
    return out


def test_oip_infer_binary_extension(client: httpx.Client, chelsea: bytes, coffee: bytes) -> None:
    elements = b"".join(struct.pack("<I", len(b)) + b for b in (chelsea, coffee))
    doc = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(elements)},
            }
        ],
        "parameters": {"binary_data_output": True, "top_k": 2},
    }
    body, headers = _binary_request(doc, [elements])
    r = client.post("/v2/models/efficientnet_lite0/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/octet-stream"
    out = _parse_binary_response(r)
    assert out["probabilities"].shape == (2, 1000)
    assert len(out["top_k"]) == 4 and any(w in out["top_k"][0].decode().lower() for w in CAT_WORDS)

    # Binary FP32 input, one output asked for in binary and the other in JSON.
    tensor = np.zeros((1, 3, 224, 224), dtype="<f4")
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 3, 224, 224],
                "parameters": {"binary_data_size": tensor.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "top_k"}],
    }
    meta_in = client.get("/v2/models/efficientnet_lite0").json()["inputs"][1]["name"]
    doc["inputs"][0]["name"] = meta_in
    body, headers = _binary_request(doc, [tensor.tobytes()])
    r = client.post("/v2/models/efficientnet_lite0/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text[:500]
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["outputs"][1]["name"] == "top_k" and len(head["outputs"][1]["data"]) == 5
    probs = np.frombuffer(r.content[n:], dtype="<f4")
    assert probs.shape == (1000,) and abs(probs.sum() - 1) < 1e-3


def test_oip_infer_errors(client: httpx.Client) -> None:
    url = "/v2/models/efficientnet_lite0/infer"
    assert_error(client.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"}), 400)
    assert_error(client.post(url, content=b"not json"), 400)
    assert_error(
        client.post(
            url,
            json={
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 10},
                    }
                ]
            },
        ),
        400,
    )
    assert_error(
        client.post(
            url, json={"inputs": [{"name": "bogus", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        ),
        400,
    )
    assert_error(
        client.post(
            url,
            json={
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(b"junk").decode()],
                    }
                ]
            },
        ),
        400,
    )
    assert_error(client.post("/v2/models/nope/infer", json={"inputs": []}), 404, "not_found")
    bad_len = struct.pack("<I", 1000) + b"abc"
    doc = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(bad_len)},
            }
        ]
    }
    body, headers = _binary_request(doc, [bad_len])
    assert_error(client.post(url, content=body, headers=headers), 400, "invalid_argument")
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0] * (3 * 224 * 224)}
    # the binary extension's flags are booleans: the string "false" once read as true
    r = client.post(url, json={"inputs": [tensor], "parameters": {"binary_data_output": "false"}})
    assert_error(r, 400, "invalid_argument")
    assert "binary_data_output" in r.json()["error"]
    r = client.post(
        url, json={"inputs": [tensor], "outputs": [{"name": "top_k", "parameters": {"binary_data": 1}}]}
    )
    assert_error(r, 400, "invalid_argument")
    # an id must come back as sent: one that is not a string is refused, not dropped
    r = client.post(url, json={"id": 42, "inputs": [tensor]})
    assert_error(r, 400, "invalid_argument")
    assert "'id' must be a string" in r.json()["error"]
    r = client.post(url, json={"id": "42", "inputs": [tensor], "parameters": {"binary_data_output": False}})
    assert r.status_code == 200 and r.json()["id"] == "42"


def test_oip_empty_outputs_list_means_every_output(client: httpx.Client, chelsea: bytes) -> None:
    """`"outputs": []` is every output, and binary_data_output then applies to all of them."""
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(chelsea).decode()]}
    doc = {"inputs": [image], "outputs": [], "parameters": {"binary_data_output": True}}
    r = client.post("/v2/models/efficientnet_lite0/infer", json=doc)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.text
    assert set(_parse_binary_response(r)) == {"probabilities", "top_k"}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"classification": 0.5}, "'classification' must be a non-negative integer"),
        ({"classification": True}, "'classification' must be a non-negative integer"),
        ({"classification": -1}, "'classification' must be a non-negative integer"),
        ({"colour": "red"}, "unknown parameters ['colour'] for output 'probabilities'"),
        ("3", "'parameters' must be an object"),
    ],
)
def test_oip_output_parameters_are_checked(
    client: httpx.Client, chelsea: bytes, parameters: object, message: str
) -> None:
    """Triton's classification extension takes a class count; anything else is a 400 naming it."""
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(chelsea).decode()]}
    doc = {"inputs": [image], "outputs": [{"name": "probabilities", "parameters": parameters}]}
    body = assert_error(client.post("/v2/models/efficientnet_lite0/infer", json=doc), 400, "invalid_argument")
    assert message in body["message"]
    # The same request with a class count answers the classes.
    doc["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    r = client.post("/v2/models/efficientnet_lite0/infer", json=doc)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    assert any(w in out["data"][0].lower() for w in CAT_WORDS), out


def test_access_log_is_json_with_request_id(server: Server, client: httpx.Client) -> None:
    client.get("/models", headers={"x-request-id": "access-log-probe"})
    deadline = time.monotonic() + 10  # the line is written once the answer is sent, maybe after we read it
    while True:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith('{"ts"')]
        mine = [entry for entry in lines if entry.get("request_id") == "access-log-probe"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert mine and mine[0]["path"] == "/models" and mine[0]["status"] == 200 and mine[0]["duration_ms"] >= 0


def test_unknown_route_and_wrong_method_are_json(client: httpx.Client) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/classify"), 405, "method_not_allowed")
    assert_error(client.post("/models"), 405, "method_not_allowed")
    assert client.get("/metrics").status_code == 200 and client.get("/livez").status_code == 200


def test_server_log_says_which_models_are_ready(server: Server) -> None:
    """The core's INFO lines reach the log at the default `log_level` (BentoML leaves the root at WARNING)."""
    log = server.log()
    assert "[INFO] [service.models] model efficientnet_lite0:1 ready on CPUExecutionProvider (fp32)" in log, (
        log[-3000:]
    )


# ---------------------------------------------------------------------------------------------------------
# Content-Encoding: what tritonclient's request compression sends


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_bodies_are_inflated(client: httpx.Client, chelsea: bytes, coding: str) -> None:
    if coding == "gzip":
        body, header = gzip.compress(chelsea), "gzip"
    elif coding == "deflate":
        body, header = zlib.compress(chelsea), "deflate"
    else:  # some clients send "deflate" without the zlib wrapper
        squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body, header = squeeze.compress(chelsea) + squeeze.flush(), "deflate"
    r = client.post("/classify", content=body, headers={"content-encoding": header})
    assert r.status_code == 200, r.text
    assert any(w in r.json()["predictions"][0]["label"].lower() for w in CAT_WORDS)
    doc = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(chelsea).decode()]}
        ]
    }
    packed = (
        gzip.compress(json.dumps(doc).encode())
        if header == "gzip"
        else zlib.compress(json.dumps(doc).encode())
    )
    r = client.post(
        "/v2/models/efficientnet_lite0/infer",
        content=packed,
        headers={"content-encoding": header, "content-type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_compressed_multipart_is_inflated(client: httpx.Client, chelsea: bytes) -> None:
    request = httpx.Request("POST", "http://x/classify", files={"file": ("c.jpg", chelsea, "image/jpeg")})
    body = request.read()
    r = client.post(
        "/classify",
        content=gzip.compress(body),
        headers={"content-type": request.headers["content-type"], "content-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text


def test_bad_content_encodings_are_refused_and_the_server_keeps_serving(
    client: httpx.Client, chelsea: bytes
) -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024))  # 64 MB of zeros in ~64 KB; the limit here is 3 MB
    assert len(bomb) < 3 * 1024 * 1024
    body = assert_error(
        client.post("/classify", content=bomb, headers={"content-encoding": "gzip"}), 413, "request_too_large"
    )
    assert "inflates past the limit" in body["message"]
    packed = gzip.compress(chelsea)
    for content, header, status, code in (
        (packed[: len(packed) // 2], "gzip", 400, "invalid_argument"),  # truncated
        (packed + b"trailing", "gzip", 400, "invalid_argument"),
        (chelsea, "gzip", 400, "invalid_argument"),  # says gzip, is not
        (packed, "br", 415, "unsupported_encoding"),
        (packed, "gzip, gzip", 415, "unsupported_encoding"),
    ):
        reply = client.post("/classify", content=content, headers={"content-encoding": header})
        assert_error(reply, status, code)
    r = client.post("/classify", content=chelsea, headers={"content-encoding": "identity"})
    assert r.status_code == 200, r.text


def test_hostile_requests_are_client_errors_and_the_server_keeps_serving(
    client: httpx.Client, chelsea: bytes
) -> None:
    """Each of these once answered 500 or held the event loop for seconds."""
    url = "/v2/models/efficientnet_lite0/infer"

    def tensor(datatype: str, data: list) -> dict:
        return {"inputs": [{"name": "input", "datatype": datatype, "shape": [1], "data": data}]}

    # Numbers out of their datatype's range (NumPy raises OverflowError, not ValueError).
    assert "not UINT8" in assert_error(client.post(url, json=tensor("UINT8", [-1])), 400)["message"]
    over = b'{"inputs":[{"name":"input","datatype":"INT64","shape":[1],"data":[1e400]}]}'
    assert_error(client.post(url, content=over, headers={"content-type": "application/json"}), 400)
    # JSON nested deeper than the parser goes (RecursionError), padded with blanks that cost nothing parsed
    # (without them its 100,000 lists would be refused by json_memory_factor before any parsing).
    deep = b"[" * 100_000 + b" " * 1_000_000 + b"]" * 100_000
    for path, body in ((url, b'{"inputs":' + deep + b"}"), ("/classify", b'{"image":' + deep + b"}")):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert "not valid JSON" in assert_error(r, 400, "invalid_argument")["message"]
    # A header length in non-ASCII digits: isdigit() says yes, int() says no.
    r = client.post(
        url, content=b"{}", headers={"Inference-Header-Content-Length": "\u00b2".encode("latin-1")}
    )
    assert_error(r, 400, "invalid_argument")
    # 700,000 empty BYTES elements in 2.8 MB (the limit here is 4 images): refused on the declared shape.
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "parameters": {}}]}
    doc["inputs"][0]["shape"] = [700_000]
    doc["inputs"][0]["parameters"]["binary_data_size"] = 4 * 700_000
    body, headers = _binary_request(doc, [bytes(4 * 700_000)])
    r = client.post("/v2/models/lenet5/infer", content=body, headers=headers)
    assert "declares 700000 images; the limit is 4" in assert_error(r, 400, "invalid_argument")["message"]
    samples = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 1, 32, 32], "data": [0.0] * 5120}]
    }
    r = client.post("/v2/models/lenet5/infer", json=samples)
    assert "declares 5 samples; the limit is 4" in assert_error(r, 400)["message"]
    # 700,000 empty strings in 2.8 MB: by estimate, more than json_memory_factor times that once parsed.
    r = client.post("/classify_batch", json={"images": [""] * 700_000})
    assert "json_memory_factor" in assert_error(r, 413, "request_too_large")["message"]
    r = client.post("/classify", content=chelsea)
    assert r.status_code == 200, r.text


def test_a_client_that_disconnects_stops_its_work(server: Server, client: httpx.Client) -> None:
    """The images of a request whose client went away are dropped, not classified for nobody: the access log
    says 499 and far fewer views than asked for reach the model."""

    def views_run() -> float:
        text = client.get("/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("cnn_serve_batch_size_sum{") and "efficientnet_lite0" in line
        )

    big = jpeg(photos.astronaut())
    before = views_run()
    files = [("files", (f"{i}.jpg", big, "image/jpeg")) for i in range(4)]  # 4 x 30 views
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server.url + "/classify_batch",
            files=files,
            params={"tta": "multiscale"},
            headers={"x-request-id": "goes-away"},
            timeout=0.3,
        )
    deadline = time.monotonic() + 20
    mine: list[dict] = []
    while not mine and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith('{"ts"')]
        mine = [entry for entry in lines if entry.get("request_id") == "goes-away"]
    assert mine and mine[0]["status"] == 499, mine
    time.sleep(1.0)  # anything still running would finish by now
    assert views_run() - before < 4 * 30
    assert client.post("/classify", content=big).status_code == 200
