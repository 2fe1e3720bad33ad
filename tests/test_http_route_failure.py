"""A route that fails before answering (here BentoML's own `/metrics`, on an unreadable metrics file) gets a
500 at once, and the service goes on serving. Raised further, the failure was never answered: BentoML's
timeout middleware waits for a first message until its timeout (request timeout + drain, minutes). It
happened for real: a scrape that read a Prometheus file another thread was just creating (still empty)."""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
from skimage import data as photos

from tests.http_server import jpeg, running_server


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
