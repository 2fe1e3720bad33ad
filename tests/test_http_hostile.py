"""Hostile HTTP clients against a real server with short timeouts: JSON bodies that would parse into
gigabytes, clients that leave mid-body, bodies that stop arriving, idle and slowloris connections, too many
connections.

Each is sent on raw sockets or httpx to a server on loopback; each test checks the status, what the access log
and the metrics record, and that a normal request still succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvloop

from service.config import Settings
from service.http.parsing import JSON_FREE_BYTES, json_cost
from tests.http_server import Server, descendants, png, running_server

IDLE_S, HEADER_S, BODY_S, REQUEST_S, MAX_CONNECTIONS = 1.5, 2.0, 1.5, 4.0, 40


LOOPS = ("uvloop", "asyncio")  # every test of a running server runs on both event loops


@pytest.fixture(scope="module", params=LOOPS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        *("--event-loop", request.param),
        *("--models", "lenet5", "--default-model", "lenet5"),
        *("--idle-timeout-s", str(IDLE_S), "--header-timeout-s", str(HEADER_S)),
        *("--body-timeout-s", str(BODY_S), "--request-timeout-s", str(REQUEST_S)),
        *("--max-connections", str(MAX_CONNECTIONS), "--max-images-per-request", "64"),
    )
    with running_server(tmp_path_factory.mktemp("hostile"), *flags) as s:
        yield s


def test_the_service_runs_on_the_event_loop_its_setting_names(request: pytest.FixtureRequest, server: Server):
    loop = request.node.callspec.params["server"]
    assert f"HTTP and gRPC share one {loop} event loop (event_loop={loop})" in server.log()


@pytest.fixture(scope="module")
def digit() -> bytes:
    canvas = np.zeros((28, 28), np.uint8)
    canvas[4:24, 12:16] = 255  # a "1"
    return png(canvas)


def _normal(server: Server, digit: bytes) -> None:
    """A normal request: it must succeed."""
    r = httpx.post(server.url + "/classify", content=digit, timeout=30)
    assert r.status_code == 200, r.text


def _metric(server: Server, name: str, text: str | None = None, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (in `text`, or a scrape made now)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text if text is None else text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head = line.rsplit(" ", 1)[0]
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _access(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith('{"ts"')]


def _connect(server: Server) -> socket.socket:
    host, port = server.url.rsplit("//", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds from now)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {timeout} s; received {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# -- JSON bodies ------------------------------------------------------------------------------------------


def _peak(data: bytes) -> int:
    tracemalloc.start()
    try:
        json.loads(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_json_cost_bounds_what_a_parse_takes() -> None:
    """The estimate is at least the measured peak of parsing every shape JSON can take, and it keeps the
    bodies real clients send (tensors as floats, base64 images) within the default `json_memory_factor`."""
    n = 50_000
    hostile = {
        "empty objects": "[" + ",".join(["{}"] * n) + "]",
        "one-key objects": "[" + ",".join(f'{{"k{i}":1}}' for i in range(n)) + "]",
        "a wide object": "{" + ",".join(f'"k{i}":"v"' for i in range(n)) + "}",
        "empty lists": "[" + ",".join(["[]"] * n) + "]",
        "one-element lists": "[" + ",".join(["[1]"] * n) + "]",
        "short strings": "[" + ",".join(['"\\ud83d\\ude00"'] * n) + "]",
        "empty strings": json.dumps([""] * n),
        "numbers": "[" + ",".join(["1000"] * n) + "]",
        "short floats": "[" + ",".join(["0.5"] * n) + "]",
        "long integers": "[" + ",".join(["9" * 40] * n) + "]",
        "nesting": "[" * 900 + "]" * 900,
    }
    for name, text in hostile.items():
        data = text.encode()
        assert json_cost(data) >= _peak(data), name
    default = Settings().json_memory_factor
    rng = np.random.default_rng(0)
    real = {
        "FP32 tensor": {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [64, 1, 32, 32],
                    "data": rng.random(64 * 1024).astype(np.float32).tolist(),
                }
            ]
        },
        "zeros": {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [64, 1024], "data": [0.0] * 65536}]
        },
        "base64 image": {"image": base64.b64encode(rng.bytes(3 << 20)).decode()},
    }
    for name, doc in real.items():
        data = json.dumps(doc).encode()
        assert json_cost(data) >= _peak(data), name
        assert json_cost(data) <= max(JSON_FREE_BYTES, default * len(data)), name
    assert json_cost(b"[" + b"{}," * 100_000 + b"{}]") > default * 300_002  # ten million of them: refused


def test_json_cost_lets_other_threads_run_while_it_counts() -> None:
    """The estimate of a large body runs in a thread beside the event loop's; it must not hold the
    interpreter lock while it counts (`bytes.count` did, and the loop's thread waited for it after each of
    its own system calls). With a switch interval longer than the count, a thread that held the lock
    throughout would leave this one no turn at all."""
    body = b"[" + b"{}," * 10_000_000 + b"{}]"
    expected = json_cost(body)
    results: list[int] = []
    started = threading.Event()

    def count() -> None:
        started.set()
        results.append(json_cost(body))

    turns = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        counter = threading.Thread(target=count)
        counter.start()
        started.wait(10)
        while counter.is_alive():
            turns += 1
            time.sleep(0)  # gives the lock back at once
        counter.join()
    finally:
        sys.setswitchinterval(interval)
    assert results == [expected]
    assert turns >= 20


def _worker_rss(server: Server) -> int:
    return sum(p.memory_info().rss for p in descendants(server) if p.is_running())


def test_json_that_would_parse_into_gigabytes_is_refused_first(server: Server, digit: bytes) -> None:
    """One image and millions of `{}` under a key of no meaning, four at once: 413 before any is parsed, the
    server's memory unmoved; an unknown key alone is 400; valid JSON bodies still classify."""
    image = base64.b64encode(digit).decode()
    junk = b"[" + b"{}," * 4_000_000 + b"{}]"  # 12 MB of text, some 300 MB once parsed
    oip = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":["' + image.encode() + b'"]}],'
    bodies = [oip + b'"junk":' + junk + b"}", b'{"image":"' + image.encode() + b'","junk":' + junk + b"}"]
    before = _worker_rss(server)
    answers: list[httpx.Response] = []

    def send(path: str, body: bytes) -> None:
        headers = {"content-type": "application/json"}
        answers.append(httpx.post(server.url + path, content=body, headers=headers, timeout=60))

    threads = [
        threading.Thread(target=send, args=(path, body))
        for path, body in [("/v2/models/lenet5/infer", bodies[0]), ("/classify", bodies[1])] * 2
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [413] * 4, [a.text[:200] for a in answers]
    assert "json_memory_factor" in answers[0].json()["message"]
    assert _worker_rss(server) - before < 150 << 20  # the bodies themselves, not their parse
    small = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}], "junk": 1}
    r = httpx.post(server.url + "/v2/models/lenet5/infer", json=small, timeout=30)
    assert r.status_code == 400 and "unknown keys ['junk']" in r.json()["message"], r.text
    small.pop("junk")
    small["inputs"][0]["extra"] = [{}]
    r = httpx.post(server.url + "/v2/models/lenet5/infer", json=small, timeout=30)
    assert r.status_code == 400 and "unknown keys ['extra'] in the input 0" in r.json()["message"], r.text
    r = httpx.post(server.url + "/classify", json={"image": image, "junk": 1}, timeout=30)
    assert r.status_code == 400 and "unknown keys ['junk']" in r.json()["message"], r.text
    small["inputs"][0].pop("extra")
    r = httpx.post(server.url + "/v2/models/lenet5/infer", json=small, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/classify", json={"image": image, "top_k": 2}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text


def _lag_over(server: Server, seconds: str) -> float:
    """Event loop lag samples above `seconds` (a bucket bound) so far."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    total = _metric(server, "cnn_serve_event_loop_lag_seconds_count", text)
    return total - _metric(server, "cnn_serve_event_loop_lag_seconds_bucket", text, le=seconds)


def test_large_json_bodies_are_parsed_away_from_the_event_loop(server: Server, digit: bytes) -> None:
    """A 29 MB tensor of floats (a second of parsing) and a 64-image base64 batch: the event loop, which a
    normal request needs to be answered, never stalls for half a second meanwhile (loose enough for a shared
    test machine, and a parse on the loop exceeds it; bench/bench_hostile.py measures the lag itself)."""
    assert _metric(server, "cnn_serve_event_loop_lag_seconds_count") > 0  # the lag is measured all along
    if sys.platform.startswith("linux"):  # with the loop's wait for a core, from the kernel's counters
        assert _metric(server, "cnn_serve_event_loop_core_wait_seconds_total") > 0
    floats = np.random.default_rng(1).random(1_400_000).astype(np.float32).tolist()
    tensor = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [64, 1, 32, 32], "data": floats}]}
    big = json.dumps(tensor).encode()
    assert 25 << 20 < len(big) < 32 << 20
    batch = {"images": [base64.b64encode(digit + bytes(200_000)).decode()] * 64}
    before = _lag_over(server, "0.5")
    answers: list[httpx.Response] = []
    bodies = {"/v2/models/lenet5/infer": big, "/classify_batch": json.dumps(batch).encode()}

    def send(path: str) -> None:
        headers = {"content-type": "application/json"}
        answers.append(httpx.post(server.url + path, content=bodies[path], headers=headers, timeout=60))

    senders = [threading.Thread(target=send, args=(path,)) for path in bodies]
    for t in senders:
        t.start()
    while any(t.is_alive() for t in senders):  # normal requests keep being answered meanwhile
        _normal(server, digit)
    for t in senders:
        t.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 400], [a.text[:300] for a in answers]  # 1,400,000 floats for a 65,536 shape
    assert any("needs 65536 elements, got 1400000" in a.text for a in answers)
    time.sleep(0.3)
    assert _lag_over(server, "0.5") == before, "the event loop stalled while large bodies were parsed"
    assert _metric(server, "cnn_serve_event_loop_lag_max_seconds") < 0.5


# -- clients that leave, bodies that stop ----------------------------------------------------------------


def test_a_client_that_leaves_mid_body_is_499_without_a_traceback(server: Server, digit: bytes) -> None:
    before = _metric(server, "cnn_serve_requests_total", endpoint="classify", status="499")
    sock = _connect(server)
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
        "X-Request-Id: leaves-mid-body\r\n\r\n"
    )
    sock.sendall(head.encode() + f"{len(digit) // 2:x}\r\n".encode() + digit[: len(digit) // 2] + b"\r\n")
    time.sleep(0.5)
    sock.close()
    deadline = time.monotonic() + 10
    while not [e for e in _access(server) if e.get("request_id") == "leaves-mid-body"]:
        assert time.monotonic() < deadline, "no access line for the request"
        time.sleep(0.1)
    (line,) = [e for e in _access(server) if e.get("request_id") == "leaves-mid-body"]
    assert line["status"] == 499, line
    assert _metric(server, "cnn_serve_requests_total", endpoint="classify", status="499") == before + 1
    log = server.log()
    assert "ClientDisconnect" not in log and "Traceback" not in log
    _normal(server, digit)


def test_a_body_shorter_than_its_content_length_is_408_within_the_body_timeout(
    server: Server, digit: bytes
) -> None:
    before = _metric(server, "cnn_serve_requests_total", endpoint="classify", status="408")
    sock = _connect(server)
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(digit) + 1000}\r\nX-Request-Id: short-body\r\n\r\n"
    )
    sock.sendall(head.encode() + digit)
    answer, closed_after = _read_all(sock, timeout=BODY_S + 5)
    sock.close()
    assert _status(answer) == 408, answer[:300]
    assert b'"code":"request_timeout"' in answer
    assert BODY_S - 0.2 < closed_after < BODY_S + 4
    (line,) = [e for e in _access(server) if e.get("request_id") == "short-body"]
    assert line["status"] == 408
    assert _metric(server, "cnn_serve_requests_total", endpoint="classify", status="408") == before + 1
    _normal(server, digit)


def test_a_body_that_trickles_past_the_request_timeout_is_408(server: Server, digit: bytes) -> None:
    """Each piece within `body_timeout_s`, the whole not within `request_timeout_s`."""
    sock = _connect(server)
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(digit)}\r\n"
        "\r\n"
    )
    sock.sendall(head.encode())
    start = time.monotonic()
    answer = b""
    sock.settimeout(0.1)
    for byte in digit:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        try:
            answer += sock.recv(65536)
            break
        except TimeoutError:
            time.sleep(BODY_S / 3)
        assert time.monotonic() - start < REQUEST_S + 4
    sock.close()
    assert _status(answer) == 408, answer[:300]
    assert REQUEST_S - 0.5 < time.monotonic() - start < REQUEST_S + 4
    _normal(server, digit)


# -- connections ----------------------------------------------------------------------------------------


def test_idle_and_slowloris_connections_are_closed_while_requests_keep_their_latency(
    server: Server, digit: bytes
) -> None:
    _normal(server, digit)
    idle = [_connect(server) for _ in range(15)]
    slow = [_connect(server) for _ in range(10)]
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    stop = threading.Event()
    slow_answers: dict[int, tuple[bytes, float]] = {}

    def slowloris(i: int, sock: socket.socket) -> None:
        start = time.monotonic()
        answer = b""
        sock.settimeout(0.2)
        for byte in head:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            answer += chunk
            if not chunk:
                break
        slow_answers[i] = (answer, time.monotonic() - start)

    threads = [threading.Thread(target=slowloris, args=(i, s)) for i, s in enumerate(slow)]
    for t in threads:
        t.start()
    for _ in range(10):  # normal requests keep being answered meanwhile
        _normal(server, digit)
    idle_results = [_read_all(s, timeout=IDLE_S + 5) for s in idle]
    for t in threads:
        t.join(HEADER_S + 10)
    stop.set()
    for s in idle + slow:
        s.close()
    assert all(answer == b"" for answer, _ in idle_results)  # closed without a word
    assert max(after for _, after in idle_results) < IDLE_S + 4
    assert len(slow_answers) == len(slow)
    for answer, after in slow_answers.values():
        assert _status(answer) == 408 and b"request_timeout" in answer, answer[:200]
        assert after < HEADER_S + 4
    assert _metric(server, "cnn_serve_http_connections_timed_out_total", reason="idle") >= len(idle)
    assert _metric(server, "cnn_serve_http_connections_timed_out_total", reason="headers") >= len(slow)


def test_connections_past_the_limit_are_refused_at_once(server: Server, digit: bytes) -> None:
    before = _metric(server, "cnn_serve_http_connections_refused_total")
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    extra = _connect(server)
    answer, _ = _read_all(extra, timeout=5)
    extra.close()
    assert _status(answer) == 503 and b"retry-after: 1" in answer.lower(), answer[:300]
    assert b"max_connections" in answer
    for s in held:
        s.close()
    time.sleep(0.3)
    _normal(server, digit)
    assert _metric(server, "cnn_serve_http_connections_refused_total") == before + 1
    assert f"refused 1 HTTP connections: {MAX_CONNECTIONS} open, the limit (max_connections)" in server.log()


def test_a_flood_of_connections_is_accepted_a_batch_per_pass_of_the_event_loop() -> None:
    """What the service's HTTP worker installs: asyncio accepts a waiting flood `ACCEPT_BATCH` connections
    per pass of its loop, other work running between them, instead of all at once; every connection is
    still accepted (the rest wait in the kernel's queue)."""
    from service.http import connections

    connections.accept_in_passes()
    connections.accept_in_passes()  # installing twice changes nothing
    made: list[asyncio.BaseTransport] = []
    flood = 3 * connections.ACCEPT_BATCH + 5

    class Count(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def main() -> list[int]:
        server = await asyncio.get_running_loop().create_server(Count, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(flood)]
        seen = [len(made)]  # the loop has not run since: every connection waits in the kernel's queue
        deadline = time.monotonic() + 10
        while len(made) < flood and time.monotonic() < deadline:
            await asyncio.sleep(0)  # one pass of the loop
            seen.append(len(made))
        for transport in made:
            transport.close()
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()
        return seen

    seen = asyncio.run(main())
    assert seen[0] == 0 and seen[-1] == flood
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert max(steps) == connections.ACCEPT_BATCH, seen


def run_on(loop: str, main: Any) -> Any:
    """`main()` run to its end on a new event loop of that kind."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_connections_whose_timeouts_fall_due_together_are_closed_a_batch_per_pass(monkeypatch, loop: str):
    """asyncio runs every timer due in one pass of its loop: connections opened together time out together,
    and ending them all at once held the loop. The service's HTTP protocol ends them `CLOSE_BATCH` a pass,
    and a connection whose client spoke between its timer and its turn is not cut: one idle connection
    sends a request then, another completes the request head it had started."""
    import uvicorn
    from uvicorn.server import ServerState

    from service.http import connections

    monkeypatch.setattr(connections.GUARD, "idle_timeout_s", 0.2)
    monkeypatch.setattr(connections.GUARD, "header_timeout_s", 0.2)
    monkeypatch.setattr(connections.GUARD, "max_connections", 10_000)

    async def app(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
    config.load()
    state = ServerState()
    protocols: list[connections.GuardedH11Protocol] = []

    def factory() -> connections.GuardedH11Protocol:
        protocols.append(connections.GuardedH11Protocol(config=config, server_state=state, app_state={}))
        return protocols[-1]

    idle = 3 * connections.CLOSE_BATCH + 5

    async def main() -> tuple[list[int], bytes, bytes, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(idle + 1)]
        deadline = time.monotonic() + 10
        while len(protocols) < idle + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0)
        header = socket.create_connection(("127.0.0.1", port), timeout=5)
        header.sendall(b"GET /late HTTP/1.1\r\n")  # its head's clock starts last
        while len(protocols) < idle + 2 or protocols[-1]._head_timer is None:
            await asyncio.sleep(0)
        time.sleep(0.4)  # a pass of the loop that outlasts every timeout: they all fall due in the next
        await asyncio.sleep(0)  # that pass: every timer has fired, no connection is closed yet
        clients[-1].sendall(b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n")  # spoke after its timer fell due
        header.sendall(b"Host: a\r\n\r\n")
        closed = [sum(p.transport.is_closing() for p in protocols)]
        while closed[-1] < idle and time.monotonic() < deadline:
            await asyncio.sleep(0)
            closed.append(sum(p.transport.is_closing() for p in protocols))
        ports = {clients[-1].getsockname()[1], header.getsockname()[1]}
        spoke = [p for p in protocols if p.transport.get_extra_info("peername")[1] in ports]
        while not all(p.cycle and p.cycle.response_complete for p in spoke) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # the two requests answered (their connections idle for 0.2 s again)
        still_open = sum(not p.transport.is_closing() for p in protocols)
        answers = []
        for sock in (clients[-1], header):
            sock.settimeout(5)
            answers.append(sock.recv(4096))
        for sock in (*clients, header):
            sock.close()
        server.close()
        await server.wait_closed()
        return closed, answers[0], answers[1], still_open

    closed, after_idle, after_header, still_open = run_on(loop, main)
    assert closed[0] == 0 and closed[-1] == idle, closed
    steps = [b - a for a, b in zip(closed, closed[1:], strict=False)]
    assert max(steps) == connections.CLOSE_BATCH, closed
    assert after_idle.startswith(b"HTTP/1.1 200"), after_idle
    assert after_header.startswith(b"HTTP/1.1 200"), after_header
    assert still_open == 2


def test_a_closed_connections_transport_is_freed_without_the_garbage_collector() -> None:
    """asyncio's socket transport refers to itself through a bound method, so every closed connection waited
    for a full collection, thousands at once under a flood, on the event loop's time. `release_transport`,
    called by the service's HTTP protocol when a connection is lost, cuts that cycle."""
    import gc
    import weakref

    from service.http import connections

    def freed_after_close(release: bool) -> bool:
        refs: list[weakref.ref] = []
        lost = asyncio.Event()

        class Track(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                refs.append(weakref.ref(transport))

            def connection_lost(self, exc: Exception | None) -> None:
                if release:
                    connections.release_transport(self.transport)
                self.transport = None
                lost.set()

        async def main() -> None:
            server = await asyncio.get_running_loop().create_server(Track, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            while not refs:
                await asyncio.sleep(0.01)
            client.close()
            await asyncio.wait_for(lost.wait(), 5)
            for _ in range(5):
                await asyncio.sleep(0)  # the loop's own handles let go
            server.close()
            await server.wait_closed()

        gc.collect()
        gc.disable()
        try:
            asyncio.run(main())
            return refs[0]() is None
        finally:
            gc.enable()

    assert not freed_after_close(release=False)  # the cycle: only a collection frees it
    assert freed_after_close(release=True)


def test_a_json_body_refused_off_the_loop_is_freed_without_the_garbage_collector() -> None:
    """An error raised in a worker thread came back through AnyIO's future, whose awaiting frame the error's
    traceback holds: every refused JSON bomb left its frames and its body to the collector's next full pass,
    and under a stream of them those passes (tens of milliseconds) ran on the event loop's time. The error now
    comes back as a value (`parsing.off_loop`) and is freed once handled."""
    import gc
    import weakref

    import anyio

    from service.errors import RequestTooLarge
    from service.http.parsing import JsonBudget, off_loop, parse_json_body

    bomb = b'{"inputs": [], "x": [' + b"{}," * 100_000 + b"{}]}"

    def freed(run: Callable[[], Awaitable[object]]) -> bool:
        refs: list[weakref.ref] = []

        async def main() -> None:
            try:
                await run()
            except RequestTooLarge as e:
                refs.append(weakref.ref(e))

        gc.collect()
        gc.disable()
        try:
            anyio.run(main)
            # AnyIO's worker thread drops its reference to the last outcome when it next runs: on a busy
            # host that may come after the call has returned (a reference count, not a cycle)
            deadline = time.monotonic() + 10
            while refs and refs[0]() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            return bool(refs) and refs[0]() is None
        finally:
            gc.enable()

    budget = JsonBudget(factor=16)
    assert freed(lambda: off_loop(budget.check, bomb, len(bomb), "the body"))
    assert freed(lambda: parse_json_body(bomb, len(bomb), "the body", lambda parsed, _: parsed, budget, None))
    assert asyncio.run(off_loop(sum, [1, 2, 3])) == 6


def test_the_new_settings_are_checked() -> None:
    for bad in (
        {"idle_timeout_s": 0},
        {"header_timeout_s": float("inf")},
        {"body_timeout_s": -1},
        {"max_connections": 0},
        {"body_read_ahead_bytes": 0},
        {"socket_receive_buffer_bytes": -1},
        {"json_memory_factor": 0.5},
        {"parse_processes": -1},
        {"event_loop": "tornado"},
    ):
        with pytest.raises(ValueError):
            Settings(**bad).validate()


def test_uvloop_asked_for_without_the_package_is_refused_at_start(monkeypatch) -> None:
    """`auto` falls back to asyncio's loop where uvloop is not installed (Windows); `uvloop` says what is
    missing before the server starts."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="event_loop=uvloop needs the uvloop package"):
        Settings(event_loop="uvloop").validate()
    Settings(event_loop="auto").validate()
    Settings(event_loop="asyncio").validate()


def test_a_body_is_buffered_up_to_the_read_ahead_before_the_application_reads_it(monkeypatch) -> None:
    """`body_read_ahead_bytes` bounds what a connection buffers ahead of the application (memory), and lets a
    body of a few images arrive whole in one pass: uvicorn's 64 KiB paused it every 64 KiB, and under a burst
    each pause waited behind every other connection's work."""
    import uvicorn
    from uvicorn import config
    from uvicorn.protocols.http import h11_impl

    from service.http import connections

    monkeypatch.setattr(h11_impl, "HIGH_WATER_LIMIT", h11_impl.HIGH_WATER_LIMIT)  # restored afterwards
    for name in ("auto", "h11"):
        monkeypatch.setitem(config.HTTP_PROTOCOLS, name, config.HTTP_PROTOCOLS[name])
    body = bytes(1 << 20)

    def first_read(read_ahead: int) -> tuple[int, bool]:
        connections.install(Settings(body_read_ahead_bytes=read_ahead), lambda: None)
        sent = threading.Event()
        first: list[tuple[int, bool]] = []

        async def app(scope, receive, send) -> None:
            if scope["type"] != "http":
                return
            deadline = time.monotonic() + 10
            while not sent.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the client writes while the application has not read yet
            await asyncio.sleep(0.3)  # the loop reads whatever it will without the application
            message = await receive()
            first.append((len(message["body"]), message["more_body"]))
            while message["more_body"]:
                message = await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})

        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="off", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.02)
            head = f"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                writer = threading.Thread(target=lambda: (client.sendall(head + body), sent.set()))
                writer.start()
                assert client.recv(1024).startswith(b"HTTP/1.1 200")
                writer.join(10)
        finally:
            server.should_exit = True
            thread.join(10)
            listener.close()
        return first[0]

    assert h11_impl.HIGH_WATER_LIMIT == 64 * 1024  # uvicorn's own, until the service installs its protocol
    assert Settings().body_read_ahead_bytes == 256 * 1024
    size, more = first_read(64 * 1024)
    assert more and size <= 64 * 1024 + 256 * 1024  # paused: at most one more read (asyncio's 256 KiB)
    assert first_read(2 << 20) == (len(body), False)  # the whole body, read without the application


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_that_fits_the_receive_buffer_arrives_in_one_read(monkeypatch, loop: str) -> None:
    """`socket_receive_buffer_bytes` sizes the kernel's buffer of each connection: a 200 KB request sent while
    the event loop is busy is whole in the connection's first read. With Linux's first 128 KiB the client's
    kernel held the rest until the loop had read the first part, and under a burst the next read waited for
    a pass behind every other connection."""
    import uvicorn
    from uvicorn import config

    from service.http import connections

    monkeypatch.setattr(connections.GUARD, "receive_buffer", connections.GUARD.receive_buffer)
    for name in ("auto", "h11"):
        monkeypatch.setitem(config.HTTP_PROTOCOLS, name, config.HTTP_PROTOCOLS[name])
    monkeypatch.setitem(config.LOOP_FACTORIES, "auto", config.LOOP_FACTORIES["auto"])
    monkeypatch.setattr(uvicorn.Server, "startup", uvicorn.Server.startup)  # `install` wraps it
    size = 256 * 1024
    connections.install(Settings(socket_receive_buffer_bytes=size), lambda: None)
    reads: dict[int, list[int]] = {}
    data_received = connections.GuardedH11Protocol.data_received

    def recording(self, data: bytes) -> None:
        reads.setdefault(id(self), []).append(len(data))
        data_received(self, data)

    monkeypatch.setattr(connections.GuardedH11Protocol, "data_received", recording)
    blocking = threading.Event()

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        message = {"more_body": True}
        while message["more_body"]:
            message = await receive()
        if scope["path"] == "/block":
            blocking.set()
            time.sleep(0.5)  # holds the event loop, as a pass behind many connections would
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="h11", loop=loop, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    request = b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n" + bytes(200_000)
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as first,
            socket.create_connection(("127.0.0.1", port), timeout=10) as second,
        ):
            first.sendall(b"GET /warm HTTP/1.1\r\nhost: x\r\n\r\n")
            assert first.recv(1024).startswith(b"HTTP/1.1 200")
            first.sendall(b"GET /block HTTP/1.1\r\nhost: x\r\n\r\n")
            assert blocking.wait(10)
            second.sendall(request)  # lands in the kernel's buffer while the loop is held
            assert first.recv(1024).startswith(b"HTTP/1.1 200")
            assert second.recv(1024).startswith(b"HTTP/1.1 200")
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= size
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
    body_reads = [r for r in reads.values() if sum(r) == len(request)]
    assert len(body_reads) == 1
    assert body_reads[0][0] == len(request)  # the whole request in the first read
