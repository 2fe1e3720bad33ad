"""The receive budget (`service/receiving.py`): request bytes still arriving, all connections and transports
together, bounded by `receive_memory_mb`; calls past `grpc_max_calls` refused. Against real servers on
loopback: HTTP bodies left unfinished, gRPC calls whose message never comes, and raw HTTP/2 streams that send
as much of a large message as the server's flow control lets them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from bench.raw_http2 import WINDOW, RawCalls
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service import turns
from service.config import Settings
from service.errors import Overloaded, RequestTooLarge
from service.receiving import ReceiveBudget, Reservation, client_of
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


def test_waiters_refused_together_are_answered_a_batch_a_pass() -> None:
    """Requests that waited together reach their deadline together; their refusals take turns, so that no
    pass of the loop answers a hundred of them (`service/turns.py`)."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        passes = 0

        def count() -> None:
            nonlocal passes
            passes += 1
            loop.call_soon(count)

        budget = ReceiveBudget(1)
        await budget.acquire(1, time.monotonic() + 1)
        deadline = time.monotonic() + 0.2
        refused_in: list[int] = []

        async def wait() -> None:
            with pytest.raises(Overloaded):
                await budget.acquire(1, deadline)
            refused_in.append(passes)

        loop.call_soon(count)
        await asyncio.gather(*(wait() for _ in range(100)))
        return refused_in

    refused_in = asyncio.run(main())
    per_pass = collections.Counter(refused_in)
    assert len(refused_in) == 100 and max(per_pass.values()) <= turns.BATCH, per_pass
    assert len(per_pass) >= 100 // turns.BATCH


def test_one_client_holds_no_more_than_its_share() -> None:
    async def main() -> None:
        budget = ReceiveBudget(10, client_capacity=4)
        await budget.acquire(4, time.monotonic() + 1, "a")
        started = time.monotonic()
        with pytest.raises(Overloaded, match="this client holds as many request bytes as its share"):
            await budget.acquire(1, time.monotonic() + 0.2, "a")
        assert time.monotonic() - started >= 0.15
        await asyncio.wait_for(budget.acquire(4, time.monotonic() + 1, "b"), 0.5)  # another client: at once
        waiting = asyncio.create_task(budget.acquire(2, time.monotonic() + 5, "a"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        budget.release(4, "a")
        await asyncio.wait_for(waiting, 1)
        assert dict(budget.by_client) == {"a": 2, "b": 4} and budget.used == 6
        with pytest.raises(RequestTooLarge, match="share"):
            await budget.acquire(5, time.monotonic() + 1, "c")

    asyncio.run(main())


def test_clients_are_addresses_and_ipv6_networks() -> None:
    assert client_of("ipv4:10.1.2.3:5000") == client_of("10.1.2.3") == "10.1.2.3"
    assert client_of("ipv6:[2001:db8::1:2]:443") == client_of("2001:db8::9") == "2001:db8::/64"
    assert client_of("ipv6:[::ffff:10.1.2.3]:80") == "10.1.2.3"  # IPv4 on a dual-stack socket
    assert client_of("unix:/run/x.sock") == "unix:/run/x.sock"


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
        {"client_share": 0},
        {"client_share": 1.5},
        {"client_share": 0.01},  # 5 MiB of 512: less than one request of 32 MiB
    ):
        with pytest.raises(ValueError):
            Settings(**bad).validate()


# --- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """4 MiB of receive budget, 2 MiB of it for each client, bodies of 1 MiB at most, 3 s for a request; a
    queue of 6 views, 3 of them for each client's requests held from their headers."""
    flags = ("--models", "lenet5", "--default-model", "lenet5", "--receive-memory-mb", "4")
    flags += ("--max-request-bytes", str(MIB), "--client-share", "0.5", "--request-timeout-s", "3")
    flags += ("--queue-size", "6")
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


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _unfinished_body(server: Server, source: str, declared: int = MIB, sent: int = MIB // 2) -> socket.socket:
    """A POST from `source` (a loopback address) whose body declares `declared` bytes and sends `sent`."""
    sock = socket.create_connection(("127.0.0.1", _port(server)), source_address=(source, 0))
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n"
    sock.sendall(head.encode() + b"\r\n" + b"\0" * sent)
    return sock


def _image() -> bytes:
    return png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _classify(server: Server, source: str, timeout_ms: int | None = None) -> httpx.Response:
    image = _image()
    headers = {"Content-Type": "image/png"}
    if timeout_ms is not None:
        headers["x-request-timeout-ms"] = str(timeout_ms)
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        return client.post(server.url + "/classify", content=image, headers=headers)


def test_http_bodies_in_transit_are_bounded_and_a_request_without_room_is_refused_at_its_deadline(
    http_server: Server,
) -> None:
    """Two clients each hold two bodies of 1 MiB, half sent: the whole budget of 4 MiB. A third client's
    request waits for room and is refused 503 (Retry-After) at its deadline, its body unread; one that waits
    longer is served once a held body goes; requests without a body never wait."""
    held = [_unfinished_body(http_server, source) for source in ("127.0.0.2", "127.0.0.3") for _ in range(2)]
    try:
        _wait_reserved(http_server, 4 * MIB)
        started = time.monotonic()
        refused = _classify(http_server, "127.0.0.1", timeout_ms=1000)
        took = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "overloaded"
        assert "the server holds as many request bytes as receive_memory_mb" in refused.json()["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert 0.9 <= took < 5, took
        assert httpx.get(http_server.url + "/livez", timeout=5).status_code == 200

        answer: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: answer.update(r=_classify(http_server, "127.0.0.1")))
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


def test_http_one_client_holds_no_more_than_its_share(http_server: Server) -> None:
    """A client holding its share (two bodies of 1 MiB) waits for its own next request, and is refused at
    its deadline; another client is served at once."""
    held = [_unfinished_body(http_server, "127.0.0.2") for _ in range(2)]
    try:
        _wait_reserved(http_server, 2 * MIB)
        refused = _classify(http_server, "127.0.0.2", timeout_ms=1000)
        assert refused.status_code == 503, refused.text
        assert "this client holds as many request bytes as its share" in refused.json()["message"]
        started = time.monotonic()
        assert _classify(http_server, "127.0.0.1").status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in held:
            sock.close()
    _wait_reserved(http_server, 0)


def test_http_a_body_is_due_by_the_requests_deadline_however_long_it_waited_for_room(
    http_server: Server,
) -> None:
    """The request timeout counts from the request's arrival: a body that waited for room until then, and
    still has not come, is 408 at once, not a whole timeout later."""
    held = [_unfinished_body(http_server, "127.0.0.3") for _ in range(2)]  # its share, until their 408 at 3 s
    try:
        _wait_reserved(http_server, 2 * MIB)
        started = time.monotonic()
        late = _unfinished_body(http_server, "127.0.0.3", sent=0)  # waits for room, then sends nothing
        late.settimeout(20)
        answer = late.recv(4096)
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert took < 4.5, took  # its 3 s from arrival, where its wait for room took nearly all of them
        late.close()
    finally:
        for sock in held:
            sock.close()
    _wait_reserved(http_server, 0)


def test_http_a_clients_requests_hold_at_most_its_share_of_the_queue(http_server: Server) -> None:
    """A client's six requests whose bodies do not come hold three views of the queue of six from their
    headers, its share: another client's request is served at once, not refused as the queue full. The six
    are served in full once their bodies come."""
    image = _image()
    waiting = [_unfinished_body(http_server, "127.0.0.2", declared=len(image), sent=0) for _ in range(6)]
    try:
        _wait_reserved(http_server, 6 * len(image))
        answer = _classify(http_server, "127.0.0.1")
        assert answer.status_code == 200, answer.text
        for sock in waiting:
            sock.sendall(image)
        for sock in waiting:
            sock.settimeout(20)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "a held request lost"
    finally:
        for sock in waiting:
            sock.close()
    _wait_reserved(http_server, 0)


def test_http_a_request_waiting_for_room_holds_no_place_in_the_queue(http_server: Server) -> None:
    """Two clients' bodies, nearly 4 MiB, hold four views of the six; a third client's two requests of 1 MiB
    wait for room, holding none: a small request from a fourth fits in both and is served at once."""
    near = MIB - (64 << 10)
    held = [
        _unfinished_body(http_server, source, declared=near, sent=near // 2)
        for source in ("127.0.0.2", "127.0.0.3")
        for _ in range(2)
    ]
    try:
        _wait_reserved(http_server, 4 * near)
        held += [_unfinished_body(http_server, "127.0.0.4", sent=0) for _ in range(2)]
        time.sleep(0.5)  # both wait for room
        assert _reserved(http_server) == 4 * near
        answer = _classify(http_server, "127.0.0.1")
        assert answer.status_code == 200, answer.text
    finally:
        for sock in held:
            sock.close()
    _wait_reserved(http_server, 0)


def test_http_a_chunked_body_reserves_the_request_limit(http_server: Server) -> None:
    """A chunked body says nothing of its size: it counts as `max_request_bytes` until its request ends."""
    sock = socket.create_connection(("127.0.0.1", _port(http_server)))
    try:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
        )
        _wait_reserved(http_server, MIB)
    finally:
        sock.close()
    _wait_reserved(http_server, 0)


# --- gRPC ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """4 MiB of receive budget, 2 MiB of it for each client, messages of 1 MiB at most."""
    s = Served(
        settings_for(
            need_models(),
            models=("lenet5",),
            default_model="lenet5",
            receive_memory_mb=4,
            client_share=0.5,
            max_request_bytes=MIB,
            request_timeout_s=3.0,
        )
    )
    yield s
    s.close()


def _released(budget: ReceiveBudget) -> None:
    deadline = time.monotonic() + 5
    while budget.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.used == 0


def test_grpc_messages_in_transit_are_bounded_by_the_budget_and_the_stream_window(served: Served) -> None:
    """Two clients of five calls each send all but the last byte of a 1 MiB message as fast as the server
    lets them: two calls of each (their share, 4 MiB in all) take in their whole message, the other six wait
    for room with no more than HTTP/2's initial window of theirs in grpc's core. Without the budget and with
    `grpc_bdp_probe` on, grpc's core took in every call's message."""
    budget = served.core.receive_memory
    clients = [
        RawCalls("127.0.0.1", served.server.port, INFER, streams=5, declared=MIB, source=source)
        for source in ("127.0.0.2", "127.0.0.3")
    ]
    try:
        for _ in range(4):  # 2 s in all, within the request timeout of 3 s
            for calls in clients:
                calls.run(0.25)
        taken = sum(sum(calls.sent.values()) for calls in clients)
        assert budget.used == 4 * MIB and budget.peak <= budget.capacity
        assert dict(budget.by_client) == {"127.0.0.2": 2 * MIB, "127.0.0.3": 2 * MIB}
        assert 4 * (MIB + 4) <= taken <= 4 * (MIB + 4) + 6 * WINDOW, taken
        assert all(calls.ended == set() for calls in clients)  # still waiting, within the request timeout
    finally:
        for calls in clients:
            calls.close()
    _released(budget)  # given back when their connections went


def test_grpc_one_client_holds_no_more_than_its_share(served: Served) -> None:
    """A client whose calls hold its share waits for its next ones; another client is served at once."""
    budget = served.core.receive_memory
    calls = RawCalls("127.0.0.1", served.server.port, INFER, streams=3, declared=MIB, source="127.0.0.2")
    try:
        calls.run(1.0)
        assert budget.by_client["127.0.0.2"] == 2 * MIB and budget.waiting == 1
        with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
            started = time.monotonic()
            assert (
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live
            )
            assert time.monotonic() - started < 1
    finally:
        calls.close()
    _released(budget)


@contextlib.contextmanager
def _calls_without_message(port: int, count: int, timeout: float) -> Iterator[tuple[Any, list[grpc.Future]]]:
    """A stub, connected, and `count` `ModelInfer` calls on its channel whose message is never sent (a request
    stream that yields nothing until the block ends)."""
    never_sent = threading.Event()

    def nothing() -> Iterator[bytes]:
        never_sent.wait()
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        infer = channel.stream_unary(INFER, request_serializer=None, response_deserializer=None)
        held = [infer.future(nothing(), timeout=timeout) for _ in range(count)]
        try:
            yield stub, held
        finally:
            never_sent.set()
            for call in held:
                call.exception(timeout=10)


def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


def test_a_grpc_call_waits_for_room_and_is_served_once_there_is(served: Served) -> None:
    """Two calls whose message never comes hold their client's share (each `max_request_bytes` until its
    message is in) until their deadline (1.5 s) ends them; the client's next call (3 s) waits, then is
    served."""
    budget = served.core.receive_memory
    held_since = time.monotonic()
    with _calls_without_message(served.server.port, 2, timeout=1.5) as (stub, held):
        _until(lambda: budget.used >= 2 * MIB)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        waited_until = time.monotonic() - held_since
        for call in held:
            err = call.exception(timeout=10)
            assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert waited_until >= 1.2, waited_until  # the held calls' 1.5 s, less what passed before
    _released(budget)


def test_grpc_calls_past_the_limit_are_refused_at_once(served: Served) -> None:
    server = served.add(served.settings.replace(grpc_max_calls=2, client_share=1.0))
    with _calls_without_message(server.port, 2, timeout=60) as (stub, _held):
        _until(lambda: server.interceptor.calls >= 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        assert time.monotonic() - started < 1
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc_max_calls" in info.value.details()
        metadata = dict(info.value.trailing_metadata())
        assert metadata["x-error-code"] == "overloaded" and int(metadata["retry-after"]) >= 1
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # a slot is free again
    assert server.interceptor.calls == 0


def test_one_client_has_no_more_than_its_share_of_the_grpc_calls(served: Served) -> None:
    """A client that opens calls and never sends their messages takes its share of `grpc_max_calls`, not all
    of them: its next call is refused at once, another client's is served."""
    server = served.add(served.settings.replace(grpc_max_calls=4, client_share=0.5, max_request_bytes=1024))
    calls = RawCalls("127.0.0.1", server.port, INFER, streams=3, declared=64, source="127.0.0.2")
    try:
        calls.run(1.0)
        assert server.interceptor.calls_by_client["127.0.0.2"] == 2
        assert calls.ended == {5}  # the third stream: refused, answered with its status
        assert _live(server.port)  # another client (127.0.0.1)
    finally:
        calls.close()
    _until(lambda: server.interceptor.calls == 0)


def _live(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live)
