"""The receive budget (`service/receiving.py`): request bytes still arriving, all connections and transports
together, bounded by `receive_memory_mb`; calls past `grpc_max_calls` refused. Against real servers on
loopback: HTTP bodies left unfinished, gRPC calls whose message never comes, and raw HTTP/2 streams that send
as much of a large message as the server's flow control lets them."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest

from bench.raw_http2 import WINDOW, RawCalls
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.config import Settings
from service.errors import Overloaded, RequestTooLarge
from service.receiving import ReceiveBudget, Reservation
from tests.http_server import Server, png, running_server
from tests.test_grpc import Served, need_models, settings_for

MIB = 1 << 20
INFER = "/inference.GRPCInferenceService/ModelInfer"


# --- the budget itself --------------------------------------------------------------------------------------


def test_the_budget_serves_whoever_fits_and_refuses_at_the_deadline() -> None:
    """A request that fits goes before a larger one that waits: a client holding large bodies open must not
    keep every small request behind its next one."""

    async def main() -> None:
        budget = ReceiveBudget(10)
        await budget.acquire(6, time.monotonic() + 1)
        order: list[str] = []

        async def take(name: str, nbytes: int) -> None:
            await budget.acquire(nbytes, time.monotonic() + 5)
            order.append(name)

        big = asyncio.create_task(take("big", 8))
        await asyncio.sleep(0.05)
        small = asyncio.create_task(take("small", 2))  # fits now, though it arrived after the big one
        await asyncio.wait_for(small, 1)
        assert order == ["small"] and budget.waiting == 1
        budget.release(6)
        await asyncio.wait_for(big, 1)
        assert order == ["small", "big"] and budget.used == 10 and budget.peak == 10

        started = time.monotonic()
        with pytest.raises(Overloaded, match="receive_memory_mb"):
            await budget.acquire(1, time.monotonic() + 0.2)
        assert 0.15 <= time.monotonic() - started < 2
        assert budget.waiting == 0 and budget.used == 10  # the refused waiter left nothing behind
        with pytest.raises(RequestTooLarge):
            await budget.acquire(11, time.monotonic() + 1)

    asyncio.run(main())


def test_waiters_are_served_in_arrival_order_and_one_that_leaves_takes_nothing() -> None:
    async def main() -> None:
        budget = ReceiveBudget(10)
        await budget.acquire(9, time.monotonic() + 1)
        first = asyncio.create_task(budget.acquire(5, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(budget.acquire(3, time.monotonic() + 5))
        second = asyncio.create_task(budget.acquire(5, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client went away
        await asyncio.sleep(0.05)
        assert budget.waiting == 2
        budget.release(9)
        await asyncio.wait_for(asyncio.gather(first, second), 1)
        assert budget.used == 10 and budget.waiting == 0

        reservation = Reservation(budget)
        budget.release(10)
        await reservation.reserve(8, time.monotonic() + 1)
        reservation.keep(3)  # what arrived
        assert budget.used == 3
        reservation.close()
        assert budget.used == 0

    asyncio.run(main())


def test_a_waiter_on_another_event_loop_is_woken_on_its_own() -> None:
    """HTTP and gRPC share one loop in the worker; the tests' servers run loops of their own."""
    budget = ReceiveBudget(4)
    got = threading.Event()

    async def other() -> None:
        await budget.acquire(4, time.monotonic() + 5)
        got.set()

    async def holder() -> None:
        await budget.acquire(4, time.monotonic() + 1)
        thread = threading.Thread(target=asyncio.run, args=(other(),))
        thread.start()
        while budget.waiting == 0:
            await asyncio.sleep(0.01)
        budget.release(4)
        await asyncio.to_thread(thread.join, 5)

    asyncio.run(holder())
    assert got.is_set() and budget.used == 4


def test_the_settings_are_checked() -> None:
    for bad in (
        {"receive_memory_mb": 0},
        {"receive_memory_mb": 16, "max_request_bytes": 17 * MIB},  # one request of the limit must fit
        {"grpc_max_calls": 0},
    ):
        with pytest.raises(ValueError):
            Settings(**bad).validate()


# --- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ("--models", "lenet5", "--default-model", "lenet5", "--receive-memory-mb", "4")
    flags += ("--max-request-bytes", str(2 * MIB))
    with running_server(tmp_path_factory.mktemp("receiving"), *flags) as s:
        yield s


def _reserved(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.search(r"^cnn_serve_receive_memory_bytes\S* (\S+)$", text, re.M)
    assert found, "no receive memory gauge"
    return float(found[1])


def _wait_reserved(server: Server, nbytes: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _reserved(server)) != nbytes:
        assert time.monotonic() < deadline, f"{seen} bytes reserved, not {nbytes}"
        time.sleep(0.1)


def _unfinished_body(server: Server, declared: int, sent: int) -> socket.socket:
    """A POST whose body declares `declared` bytes and sends `sent` of them."""
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\x00" * sent)
    return sock


def test_http_bodies_in_transit_are_bounded_and_a_request_without_room_is_refused_at_its_deadline(
    http_server: Server,
) -> None:
    """Two bodies of 2 MiB, half sent, hold the whole budget of 4 MiB: a third request waits for room and is
    refused 503 (Retry-After) at its deadline, its body unread; one that waits longer is served once a held
    body goes; requests without a body never wait."""
    image = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    held = [_unfinished_body(http_server, 2 * MIB, MIB) for _ in range(2)]
    try:
        _wait_reserved(http_server, 4 * MIB)
        started = time.monotonic()
        refused = httpx.post(
            http_server.url + "/classify",
            content=image,
            headers={"Content-Type": "image/png", "x-request-timeout-ms": "1000"},
            timeout=30,
        )
        took = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "overloaded"
        assert "receive_memory_mb" in refused.json()["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert 0.9 <= took < 5, took
        assert httpx.get(http_server.url + "/livez", timeout=5).status_code == 200

        answer: dict[str, httpx.Response] = {}
        waiter = threading.Thread(
            target=lambda: answer.update(
                r=httpx.post(
                    http_server.url + "/classify",
                    content=image,
                    headers={"Content-Type": "image/png"},
                    timeout=30,
                )
            )
        )
        waiter.start()
        time.sleep(1.0)
        assert "r" not in answer  # waiting for room
        held.pop().close()  # a held body's client goes: its room is free
        waiter.join(20)
        assert answer["r"].status_code == 200, answer["r"].text
    finally:
        for sock in held:
            sock.close()
    _wait_reserved(http_server, 0)


def test_http_a_chunked_body_reserves_the_request_limit(http_server: Server) -> None:
    """A chunked body says nothing of its size: it counts as `max_request_bytes` until its request ends."""
    port = int(http_server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
        )
        _wait_reserved(http_server, 2 * MIB)
    finally:
        sock.close()
    _wait_reserved(http_server, 0)


# --- gRPC ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(
        settings_for(
            need_models(),
            models=("lenet5",),
            default_model="lenet5",
            receive_memory_mb=4,
            max_request_bytes=2 * MIB,
            request_timeout_s=3.0,
        )
    )
    yield s
    s.close()


def test_grpc_messages_in_transit_are_bounded_by_the_budget_and_the_stream_window(served: Served) -> None:
    """Ten calls each send all but the last byte of a 2 MiB message as fast as the server lets them: two
    (4 MiB of budget) take in their whole message, the other eight wait for room with no more than HTTP/2's
    initial window of theirs in grpc's core. Without the budget and `grpc_bdp_probe` off, grpc's core took
    in every call's message (30 MiB messages on 100 calls: 3 GB)."""
    budget = served.core.receive_memory
    calls = RawCalls("127.0.0.1", served.server.port, INFER, streams=10, declared=2 * MIB)
    try:
        taken = calls.run(2.0)
        assert budget.used == 4 * MIB and budget.peak <= budget.capacity
        assert 2 * (2 * MIB + 4) <= taken <= 2 * (2 * MIB + 4) + 8 * WINDOW, taken
        assert calls.ended == set()  # all still waiting, within the request timeout
    finally:
        calls.close()
    deadline = time.monotonic() + 5
    while budget.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.used == 0  # given back when their connection went


def test_a_grpc_call_waits_for_room_and_is_served_once_there_is(served: Served) -> None:
    """Two calls whose message never comes hold the budget (each `max_request_bytes` until its message is
    in) until the request timeout ends them; a call made meanwhile waits, then is served."""
    port = served.server.port
    budget = served.core.receive_memory
    never_sent = threading.Event()

    def nothing() -> Iterator[bytes]:
        never_sent.wait()
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        infer = channel.stream_unary(INFER, request_serializer=None, response_deserializer=None)
        held_since = time.monotonic()
        held = [infer.future(nothing(), timeout=60) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while budget.used < 4 * MIB:
                assert time.monotonic() < deadline, budget.used
                time.sleep(0.02)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            waited_until = time.monotonic() - held_since
            for call in held:
                err = call.exception(timeout=10)
                assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert waited_until >= 2.5, waited_until  # the held calls' 3 s, less what passed before
        finally:
            never_sent.set()


def test_grpc_calls_past_the_limit_are_refused_at_once(served: Served) -> None:
    server = served.add(served.settings.replace(grpc_max_calls=2, max_request_bytes=MIB))
    never_sent = threading.Event()

    def nothing() -> Iterator[bytes]:
        never_sent.wait()
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        infer = channel.stream_unary(INFER, request_serializer=None, response_deserializer=None)
        held = [infer.future(nothing(), timeout=60) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while server.interceptor.calls < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert time.monotonic() - started < 1
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "grpc_max_calls" in info.value.details()
            metadata = dict(info.value.trailing_metadata())
            assert metadata["x-error-code"] == "overloaded" and int(metadata["retry-after"]) >= 1
        finally:
            never_sent.set()
        for call in held:
            call.exception(timeout=10)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # a slot is free again
    assert server.interceptor.calls == 0
