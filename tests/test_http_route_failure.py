"""A route that fails before answering (here BentoML's own `/metrics`, on an unreadable metrics file) gets a
500 at once, and the service goes on serving. Raised further, the failure was never answered: BentoML's
timeout middleware waits for a first message until its timeout (request timeout + drain, minutes). It
happened for real: a scrape that read a Prometheus file another thread was just creating (still empty).

And a fault of the server inside one of our routes is a 500 too, never a 400 that would blame the client."""

from __future__ import annotations

import base64
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from skimage import data as photos

from service.config import Settings
from service.core import InferenceCore
from service.http.api import build_app
from service.http.middleware import RequestContextMiddleware
from service.http.routes import Runtime
from service.metrics import Metrics
from service.oip import OpenInference
from tests.conftest import garbage_collected
from tests.http_server import free_port, jpeg, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")


def test_a_failing_route_is_answered_500_and_the_service_keeps_serving(tmp_path: Path) -> None:
    with running_server(tmp_path, "--models", "lenet5", "--request-timeout-s", "120") as server:
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
        files = tmp_path / "bentoml" / "prometheus_multiproc_dir"
        assert any(files.glob("*.db")), list(files.iterdir())
        # a Prometheus multiprocess file whose header promises entries that are not there
        (files / "counter_999999.db").write_bytes(struct.pack("i", 4096) + b"\xff" * 60)
        answer = httpx.get(server.url + "/metrics", timeout=10)  # was: no answer for 240 s
        assert answer.status_code == 500, answer.text
        body = answer.json()
        assert body["code"] == "internal" and body["request_id"] == answer.headers["x-request-id"]
        assert body["request_id"] in server.log()  # the log has the trace, under the same id
        # a scrape is read again before it fails: a file being created is briefly empty, as this one is
        assert server.log().count("GET /metrics failed (attempt") == 2
        ok = httpx.post(
            server.url + "/classify", content=jpeg(photos.camera()), params={"model": "lenet5"}, timeout=30
        )
        assert ok.status_code == 200 and ok.json()["predictions"]
        (files / "counter_999999.db").unlink()
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200


@contextmanager
def routes_in_process(settings: Settings, core: InferenceCore) -> Iterator[str]:
    """Our routes and middleware on a real uvicorn server on loopback, in this process: the same app the
    BentoML service mounts, so that a test can put a bug into the code it runs."""
    app = build_app(settings)
    app.state.runtime = Runtime(settings, core, Metrics(), OpenInference(core, settings))
    asgi = RequestContextMiddleware(app, settings, metrics=lambda: app.state.runtime.metrics)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(asgi, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_bug_is_a_500_not_a_client_error_and_the_server_keeps_serving(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the service's typed errors are the client's: a ValueError out of the protocol's run step (a bug)
    answers 500 `internal` with the request id and nothing of the error, the log has the traceback, and the
    next requests are answered as before."""
    settings = Settings(repository=str(tiny_repo), default_model="tiny")
    core = InferenceCore(settings)
    core.load()
    image = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(jpeg(photos.coffee())).decode()],
    }
    request = {"inputs": [image]}

    async def broken_run(self: OpenInference, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in the server, not the client's fault")

    try:
        with routes_in_process(settings, core) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v2/models/tiny/infer", json=request).status_code == 200
            monkeypatch.setattr(OpenInference, "run", broken_run)
            answer = client.post("/v2/models/tiny/infer", json=request, headers={"x-request-id": "bug-1"})
            assert answer.status_code == 500, answer.text
            body = answer.json()
            assert body["code"] == "internal" and body["request_id"] == "bug-1" and "bug-1" in body["message"]
            assert "ValueError" not in answer.text and "client's fault" not in answer.text
            assert "ValueError: a bug in the server" in caplog.text and "bug-1" in caplog.text
            # A client's own mistake is still its own, answered by the rule that owns it.
            bad = client.post("/v2/models/tiny/infer", json={**request, "parameters": {"top_k": 0}})
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
            assert client.post("/classify", content=jpeg(photos.coffee())).status_code == 200
            monkeypatch.undo()
            again = client.post("/v2/models/tiny/infer", json=request)
            assert again.status_code == 200 and again.json()["model_name"] == "tiny"
    finally:
        core.close()


def test_requests_answered_or_refused_leave_nothing_to_the_garbage_collector(tiny_repo: Path) -> None:
    """Each request's error, traceback, frames and request are freed once it is answered, not left in
    reference cycles for the collector's next full pass, which would walk them on the event loop's time: a
    stream of refusals made those passes long and frequent (docs/SERVING.md, "Garbage collection")."""
    settings = Settings(repository=str(tiny_repo), default_model="tiny", max_images_per_request=4)
    core = InferenceCore(settings)
    core.load()
    photo = jpeg(photos.coffee())
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(photo).decode()]}
    bomb = b'{"inputs": [], "x": [' + b"{}," * 100_000 + b"{}]}"
    calls: list[tuple[str, dict[str, Any], int]] = [
        ("/classify", {"content": photo}, 200),
        (
            "/classify_batch",
            {"files": [("images", ("a.jpg", photo)), ("images", ("b.jpg", b"not one"))]},
            200,
        ),
        ("/v2/models/tiny/infer", {"json": {"inputs": [image]}}, 200),
        ("/v2/models/tiny/infer", {"content": bomb, "headers": {"content-type": "application/json"}}, 413),
        ("/v2/models/tiny/infer", {"json": {"inputs": [image], "unknown": 1}}, 400),
        ("/v2/models/tiny/infer", {"json": {"inputs": [{**image, "data": ["bm90IGFuIGltYWdl"]}]}}, 400),
        ("/v2/models/nothing/infer", {"json": {"inputs": [image]}}, 404),
        ("/v2/models/tiny/infer", {"json": {"inputs": [{**image, "shape": [5], "data": ["x"] * 5}]}}, 400),
        (
            "/v2/models/tiny/infer",
            {"json": {"inputs": [{"name": "t", "datatype": "FP32", "shape": [1, 2], "data": [0.0, 1.0]}]}},
            400,
        ),
        ("/classify", {"content": b"not an image"}, 400),
        ("/classify", {"content": photo, "params": {"model": "nothing"}}, 404),
        ("/classify", {"content": photo, "params": {"top_k": "0"}}, 400),
        ("/classify", {"json": {"image": "http://example.com/x.jpg"}}, 400),
    ]
    try:
        with routes_in_process(settings, core) as url, httpx.Client(base_url=url, timeout=30) as client:
            for path, kwargs, _ in calls:  # once first: what a first request makes once is not in question
                client.post(path, **kwargs)
            with garbage_collected() as garbage:
                for path, kwargs, status in calls * 3:
                    answer = client.post(path, **kwargs)
                    assert answer.status_code == status, (path, answer.text)
    finally:
        core.close()
    assert not garbage.of_the_service(), garbage
