"""SIGTERM with HTTP and gRPC requests in flight: every one is answered OK and the process exits 0.

All 32 HTTP requests are in flight at SIGTERM, each in the middle of its body (the rest is sent after the
signal), so that the test does not depend on the machine's speed: requests sent at full speed are answered,
on a fast machine, before the last ones arrive."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
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
# SIGTERM is sent once every HTTP request and this many gRPC calls are in flight at the same moment. gRPC
# calls (unary: in a handler only once their message is whole) are answered while later ones arrive.
AT_SIGTERM_GRPC = 4
# After SIGTERM, the HTTP bodies are finished this much later: the server is draining by then.
RELEASE_AFTER_S = 0.5


def _in_flight(url: str) -> dict[str, float]:
    answer = httpx.get(url + "/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    text = answer.text
    for family in text_string_to_metric_families(text):
        if family.name == "cnn_serve_in_flight_requests":
            return {s.labels["protocol"]: s.value for s in family.samples}
    return {}


async def held_body(image: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """The image's first half at once, the rest once `release` is set: the request stays in flight."""
    yield image[: len(image) // 2]
    await release.wait()
    yield image[len(image) // 2 :]


async def wait_in_flight(url: str, http: int, grpc: int, timeout: float = 60) -> dict[str, float]:
    """The in-flight gauges once at least `http` and `grpc` requests are in flight (or at the timeout)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(_in_flight, url)
        if seen.get("http", 0) >= http and seen.get("grpc", 0) >= grpc:
            break
        await asyncio.sleep(0.02)
    return seen


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    image = jpeg(photos.astronaut())
    # Ten views per image, batches of one: the 8 gRPC calls take seconds, and are in flight at SIGTERM.
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
                release = asyncio.Event()
                headers = {"content-type": "image/jpeg", "content-length": str(len(image))}
                tasks = [
                    asyncio.create_task(
                        c.post(
                            "/classify",
                            content=held_body(image, release),
                            params={"tta": "ten_crop"},
                            headers=headers,
                        )
                    )
                    for _ in range(IN_FLIGHT)
                ]
                await wait_in_flight(server.url, http=IN_FLIGHT, grpc=0)

                async def classify_grpc() -> classifier_pb2.ClassifyResponse:
                    return await stub.Classify(
                        classifier_pb2.ClassifyRequest(image=image, tta="ten_crop"), timeout=120
                    )

                calls = [asyncio.create_task(classify_grpc()) for _ in range(GRPC_IN_FLIGHT)]
                seen = await wait_in_flight(server.url, http=IN_FLIGHT, grpc=AT_SIGTERM_GRPC)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(RELEASE_AFTER_S)
                release.set()
                return await asyncio.gather(*tasks), await asyncio.gather(*calls), seen

        responses, replies, seen = asyncio.run(scenario())
        assert seen.get("http", 0) == IN_FLIGHT, f"only {seen} requests were in flight at SIGTERM"
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
