"""Shared fixtures: the real model repository, a tiny generated repository, real photos and image bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import os
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.card import FileEntry, Label, ModelCard, Preprocessing, TensorSpec, write_card

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("CNN_SERVE_TEST_MODELS", ROOT / "models"))  # CI: `make models` builds it


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tiny_model(
    root: Path,
    name: str = "tiny",
    version: str = "1",
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
    seed: int = 0,
    kind: str = "logits",
) -> Path:
    """A small position-sensitive ONNX classifier (conv stride 2 -> flatten -> gemm) with a schema-1 card."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    feat = 4 * ((size - 3) // 2 + 1) ** 2
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, channels, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")
    fc = numpy_helper.from_array(rng.normal(0, 0.05, (feat, classes)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
    ]
    out_name = "logits"
    if kind == "probabilities":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out_name = "probs"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", classes])],
        [w, b, fc, fcb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    onnx_file = folder / "model.onnx"
    onnx.save(model, onnx_file)
    card = ModelCard(
        name=name,
        version=version,
        input=TensorSpec("input", (-1, channels, size, size), layout="NCHW"),
        output=TensorSpec(out_name, (-1, classes), kind=kind),
        preprocessing=Preprocessing(
            channels, size, size, int(size / 0.875), "bilinear", (0.5,) * channels, (0.25,) * channels
        ),
        files={
            "model.onnx": FileEntry(_sha256(onnx_file), onnx_file.stat().st_size, optimization="extended")
        },
        labels=tuple(Label(i, f"c{i}", f"class {i}") for i in range(classes)),
        architecture="imported",
        source="tests:onnx.helper",
        description="tiny test classifier",
        extra={"opset": 17, "weights": None, "accuracy": None},
    )
    write_card(folder, card)
    return folder


@pytest.fixture
def openapi_conformance(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every answer the test receives from a server of `tests.http_server.running_server` is checked against
    that server's own `/openapi.json`: status declared, content type, body schema, required headers."""
    import httpx

    from tests import http_server, openapi_check

    received: list[httpx.Response] = []
    send, send_async = httpx.Client.send, httpx.AsyncClient.send

    def recording_send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = send(self, request, **kwargs)
        received.append(response)
        return response

    async def recording_send_async(
        self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any
    ) -> httpx.Response:
        response = await send_async(self, request, **kwargs)
        received.append(response)
        return response

    monkeypatch.setattr(httpx.Client, "send", recording_send)
    monkeypatch.setattr(httpx.AsyncClient, "send", recording_send_async)
    yield
    problems: list[str] = []
    checked = 0
    for response in received:
        url = response.request.url
        doc = http_server.DOCUMENTS.get(f"{url.scheme}://{url.host}:{url.port}")
        if doc is None:
            continue
        try:
            body = response.content
        except httpx.ResponseNotRead:  # a streamed answer the test did not read
            continue
        checked += 1
        problems += openapi_check.check(
            doc, response.request.method, url.path, response.status_code, dict(response.headers), body
        )
    assert not problems, f"{len(problems)} of {checked} answers differ from the document:\n" + "\n".join(
        problems[:30]
    )


# The token of `token_server`.
WEB_TOKEN = "token-of-the-web-tests"


@pytest.fixture(scope="session")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The service with its default settings and both models, shared by tests/test_web_*.py (the suite's
    last files, so that it runs only while they do)."""
    from tests.http_server import running_server

    with running_server(tmp_path_factory.mktemp("web")) as server:
        yield server


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """lenet5 alone behind a bearer token (`WEB_TOKEN`), with a 1 MiB request limit: the pages' token and
    limit rules, shared by tests/test_web_*.py."""
    from tests.http_server import running_server

    flags = ("--models", "lenet5", "--default-model", "lenet5", "--auth-token", WEB_TOKEN)
    with running_server(tmp_path_factory.mktemp("web-token"), *flags, "--max-request-bytes", "1048576") as s:
        yield s


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated repository: `tiny` (RGB, versions 1 and 2), `tinygray` (1 channel), `tinyprob` (softmax)."""
    root = tmp_path_factory.mktemp("repo")
    write_tiny_model(root, "tiny", "1", seed=1)
    write_tiny_model(root, "tiny", "2", seed=2)
    (root / "tiny" / "version_policy.json").write_text('{"all": {}}')  # both versions answer
    write_tiny_model(root, "tinygray", "1", channels=1, seed=3)
    write_tiny_model(root, "tinyprob", "1", seed=4, kind="probabilities")
    return root


@pytest.fixture(scope="session")
def model_repo() -> Path:
    """The default repository built by `make models`; its absence is a build error, not a skip."""
    if not (MODELS / "efficientnet_lite0").is_dir() or not (MODELS / "lenet5").is_dir():
        pytest.fail(f"{MODELS} lacks efficientnet_lite0/lenet5: run `make models` first (make test does)")
    return MODELS


def decode_memory_released(core: Any, timeout: float = 5.0) -> bool:
    """Whether the core's decode memory budget is back to nothing held. An image's views are given back by a
    callback of its future, on the thread that answered it, just after the callback that wakes the caller:
    a caller holding its answer may find them still held for a moment."""
    until = time.monotonic() + timeout
    while core.decode_memory.used and time.monotonic() < until:
        time.sleep(0.01)
    return core.decode_memory.used == 0


def classify_now(core: Any, images: Any, **kwargs: Any) -> list:
    """`core.classify`, waited for, from a thread without an event loop."""
    return asyncio.run(core.classify(images, **kwargs))


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="session")
def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def chelsea_jpeg(chelsea: Image.Image) -> bytes:
    return encode(chelsea, "JPEG", quality=92)


@dataclass
class Garbage:
    """What the collector found unreachable: reference cycles only, reference counting frees the rest."""

    errors: list[str] = field(default_factory=list)  # exception types
    frames: list[str] = field(default_factory=list)  # "file:function" of the frames, each once

    def of_the_service(self) -> list[str]:
        return self.errors + [f for f in self.frames if f"{os.sep}service{os.sep}" in f]


@contextlib.contextmanager
def garbage_collected() -> Iterator[Garbage]:
    """The reference cycles the block leaves behind, read when it ends: what a full collection, which runs on
    the event loop's time, would have to find and free."""
    found = Garbage()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.errors = [type(o).__name__ for o in gc.garbage if isinstance(o, BaseException)]
        frames = [o for o in gc.garbage if isinstance(o, types.FrameType)]
        found.frames = sorted({f"{f.f_code.co_filename}:{f.f_code.co_name}" for f in frames})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
