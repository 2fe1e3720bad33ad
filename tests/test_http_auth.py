"""Bearer token and overload on a real server: 401 without the token, open probes, 503 + Retry-After."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from skimage import data as photos

from tests.http_server import Server, jpeg, running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    # A queue of one ten_crop request (10 views) and single-view batches make overload easy to reach with a
    # few clients.
    with running_server(
        tmp,
        "--auth-token",
        TOKEN,
        "--queue-size",
        "10",
        "--max-batch-size",
        "1",
        "--models",
        "efficientnet_lite0",
    ) as s:
        yield s


def test_token_required_on_api_routes(server: Server) -> None:
    image = jpeg(photos.chelsea())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.post("/classify", content=image, headers=headers)
            assert r.status_code == 401, r.text
            body = r.json()
            assert body["code"] == "unauthenticated" and body["request_id"] == r.headers["x-request-id"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/models").status_code == 401
        assert c.get("/v2/models/efficientnet_lite0").status_code == 401
        ok = c.post("/classify", content=image, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        assert c.get("/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        # Refusals are counted (no model, no endpoint: the request never reached a route).
        metrics = c.get("/metrics").text
        refused = [
            line
            for line in metrics.splitlines()
            if line.startswith("cnn_serve_requests_total{") and 'status="401"' in line
        ]
        assert refused and 'model="-"' in refused[0] and float(refused[0].split()[-1]) >= 5, refused


def test_probes_and_metrics_need_no_token(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
        # A model's readiness is a probe too (as gRPC's ModelReady), its metadata and inference are not.
        for path in ("/v2/models/efficientnet_lite0/ready", "/v2/models/efficientnet_lite0/versions/1/ready"):
            assert c.get(path).status_code == 200, path
        assert c.get("/v2/models/nope/ready").status_code == 404
        for path in ("/v2/models/efficientnet_lite0", "/v2/models/efficientnet_lite0/ready/x"):
            assert c.get(path).status_code == 401, path


def test_probes_tell_nothing_of_the_repository_and_echoes_are_cut_short(server: Server) -> None:
    """The open model-readiness probe answers ready or 404 and lists no model; a 10 KB name comes back cut
    short, on the open routes and behind the token alike."""
    long_name = "m" * 10_240
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path in (
            "/v2/models/nope/ready",
            "/v2/models/nope/versions/1/ready",
            f"/v2/models/{long_name}/ready",
        ):
            r = c.get(path)
            assert r.status_code == 404, r.text[:300]
            assert "efficientnet_lite0" not in r.text and "available" not in r.text, r.text[:300]
        r = c.get("/v2/models/efficientnet_lite0/versions/7/ready")
        assert r.status_code == 404 and r.json()["message"] == "model 'efficientnet_lite0' has no version '7'"
        answers = [
            c.get(f"/v2/models/{long_name}/ready"),
            c.get(f"/v2/models/{long_name}", headers=auth),
            c.post("/classify", params={"model": long_name}, content=b"\x89PNG", headers=auth),
            c.get(f"/{long_name}", headers=auth),
        ]
        for r in answers:
            assert r.status_code == 404, r.text[:300]
            assert len(r.content) < 600, r.text[:600]
            assert "(10240 characters)" in r.json()["message"] or "characters)" in r.json()["message"]


def test_overload_answers_503_with_retry_after(server: Server) -> None:
    image = jpeg(photos.astronaut())

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as c:
            return await asyncio.gather(
                *(c.post("/classify", content=image, params={"tta": "ten_crop"}) for _ in range(24))
            )

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    overloaded = [r for r in responses if r.status_code == 503]
    assert overloaded and 200 in statuses, statuses
    for r in overloaded:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["code"] == "overloaded"
