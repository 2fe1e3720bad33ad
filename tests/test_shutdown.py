"""SIGTERM with 32 HTTP requests in flight: every one of them is answered 200 and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as photos

from tests.test_http_server_helpers import jpeg, running_server

IN_FLIGHT = 32


def _http_in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "cnn_serve_in_flight_requests":
            return sum(s.value for s in family.samples if s.labels.get("protocol") == "http")
    return 0.0


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    image = jpeg(photos.astronaut())
    # Single-image batches: 32 requests take well over a second, so they are still in flight at SIGTERM.
    flags = ("--max-batch-size", "1", "--models", "efficientnet_lite0", "--drain-timeout-s", "60")
    with running_server(tmp_path, *flags) as server:

        async def scenario() -> tuple[list[httpx.Response], float]:
            limits = httpx.Limits(max_connections=IN_FLIGHT + 4)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
                tasks = [
                    asyncio.create_task(c.post("/classify", content=image, params={"tta": "flip"}))
                    for _ in range(IN_FLIGHT)
                ]
                deadline = time.monotonic() + 30
                seen = 0.0
                while time.monotonic() < deadline:
                    seen = await asyncio.to_thread(_http_in_flight, server.url)
                    if seen >= IN_FLIGHT:
                        break
                    await asyncio.sleep(0.02)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks), seen

        responses, seen = asyncio.run(scenario())
        assert seen >= IN_FLIGHT, f"only {seen} requests were in flight at SIGTERM"
        assert [r.status_code for r in responses] == [200] * IN_FLIGHT
        assert all(r.json()["predictions"] for r in responses)
        assert server.proc.wait(90) == 0, server.log()[-3000:]
        # And the server no longer accepts connections.
        try:
            httpx.get(server.url + "/livez", timeout=2)
            accepted = True
        except httpx.HTTPError:
            accepted = False
        assert not accepted
