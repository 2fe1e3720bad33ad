"""Default limits on a real server: a 10 MB JPEG classifies over HTTP and over gRPC (same size limit)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from proto import classifier_pb2, classifier_pb2_grpc
from tests.http_server import Server, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("limits"), "--models", "efficientnet_lite0") as s:
        yield s


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """Noise compresses badly: a ~3000x2000 JPEG at quality 100 weighs over 10 MB."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2000, 3000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100)
    data = buf.getvalue()
    assert len(data) > 10 * 1024 * 1024
    return data


def test_ten_megabyte_jpeg_over_http(server: Server, big_jpeg: bytes) -> None:
    r = httpx.post(server.url + "/classify", content=big_jpeg, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 5
    r = httpx.post(server.url + "/classify", files={"file": ("big.jpg", big_jpeg, "image/jpeg")}, timeout=120)
    assert r.status_code == 200, r.text


def test_ten_megabyte_jpeg_over_grpc(server: Server, big_jpeg: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)
        reply = stub.Classify(classifier_pb2.ClassifyRequest(image=big_jpeg, top_k=3), timeout=120)
    assert reply.ByteSize() > 0
