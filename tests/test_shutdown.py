"""SIGTERM with HTTP and gRPC requests in flight: every one is answered OK and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as photos

from proto import classifier_pb2, classifier_pb2_grpc
from tests.http_server import descendants, jpeg, running_server

IN_FLIGHT = 32
GRPC_IN_FLIGHT = 8
# SIGTERM is sent once this many are in flight at the same moment. Not all of them: on a loaded machine the
# first requests are answered before the last ones arrive, and waiting for all would never send it.
AT_SIGTERM_HTTP, AT_SIGTERM_GRPC = 16, 4


def _in_flight(url: str) -> dict[str, float]:
    answer = httpx.get(url + "/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    text = answer.text
    for family in text_string_to_metric_families(text):
        if family.name == "cnn_serve_in_flight_requests":
            return {s.labels["protocol"]: s.value for s in family.samples}
    return {}


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    image = jpeg(photos.astronaut())
    # Ten views per image, batches of one: the 40 requests take seconds and are in flight at SIGTERM.
    flags = (
        "--max-batch-size",
        "1",
        "--models",
        "efficientnet_lite0",
        "--drain-timeout-s",
        "120",
        "--request-timeout-s",
        "120",
    )
    with running_server(tmp_path, *flags) as server:
        workers = descendants(server)

        async def scenario() -> tuple[list[httpx.Response], list, dict[str, float]]:
            limits = httpx.Limits(max_connections=IN_FLIGHT + 4)
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            ):
                await channel.channel_ready()
                stub = classifier_pb2_grpc.ImageClassifierStub(channel)
                tasks = [
                    asyncio.create_task(c.post("/classify", content=image, params={"tta": "ten_crop"}))
                    for _ in range(IN_FLIGHT)
                ]

                async def classify_grpc() -> classifier_pb2.ClassifyResponse:
                    return await stub.Classify(
                        classifier_pb2.ClassifyRequest(image=image, tta="ten_crop"), timeout=120
                    )

                calls = [asyncio.create_task(classify_grpc()) for _ in range(GRPC_IN_FLIGHT)]
                deadline = time.monotonic() + 30
                seen: dict[str, float] = {}
                while time.monotonic() < deadline:
                    seen = await asyncio.to_thread(_in_flight, server.url)
                    if seen.get("http", 0) >= AT_SIGTERM_HTTP and seen.get("grpc", 0) >= AT_SIGTERM_GRPC:
                        break
                    await asyncio.sleep(0.02)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks), await asyncio.gather(*calls), seen

        responses, replies, seen = asyncio.run(scenario())
        assert seen.get("http", 0) >= AT_SIGTERM_HTTP, f"only {seen} requests were in flight at SIGTERM"
        assert seen.get("grpc", 0) >= AT_SIGTERM_GRPC, f"only {seen} requests were in flight at SIGTERM"
        assert [r.status_code for r in responses] == [200] * IN_FLIGHT
        assert all(r.json()["predictions"] for r in responses)
        assert len(replies) == GRPC_IN_FLIGHT and all(reply.ByteSize() > 0 for reply in replies)
        assert server.proc.wait(90) == 0, server.log()[-3000:]
        # No worker outlives the server (they run in sessions of their own, out of reach of a group kill).
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert workers and not alive, f"workers left running: {alive}"
        # And the server no longer accepts connections.
        try:
            httpx.get(server.url + "/livez", timeout=2)
            accepted = True
        except httpx.HTTPError:
            accepted = False
        assert not accepted
