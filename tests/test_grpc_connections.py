"""Connections and calls that hold a gRPC port, against real servers on loopback: sockets that never send
their HTTP/2 settings, connections left idle, more connections than the port allows
(`service.grpc.server.connection_options`), and calls whose message never comes (`interceptor._first`)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.ports import free_port
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.config import Settings
from tests.test_grpc import Served, need_models, settings_for
from tests.test_grpc_security import self_signed

HANDSHAKE_S, IDLE_S = 1.0, 1.5
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One core with a server of short timeouts (`server`) and, added by the tests, others."""
    s = Served(
        settings_for(
            need_models(),
            models=("lenet5",),
            default_model="lenet5",
            grpc_handshake_timeout_s=HANDSHAKE_S,
            grpc_idle_timeout_s=IDLE_S,
        )
    )
    yield s
    s.close()


def _open_on_server(port: int) -> int:
    """Connections this process's gRPC server holds open on `port` (its side of each)."""
    process = psutil.Process()
    listed = getattr(process, "net_connections", None) or process.connections  # psutil 6 renamed it
    established = psutil.CONN_ESTABLISHED
    return sum(1 for c in listed(kind="tcp") if c.laddr and c.laddr.port == port and c.status == established)


def _wait(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _live(port: int, channel: grpc.Channel | None = None) -> bool:
    if channel is not None:
        return pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live
    # a connection of its own: channels of the same target and options share one by default
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        return _live(port, ch)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (what it sent before, its settings and GOAWAY, is read away)."""
    try:
        while True:
            if not sock.recv(4096):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _lifetimes(socks: dict[str, socket.socket], tick: Callable[[dict[str, float]], None]) -> dict[str, float]:
    """Seconds until the server closed each of `socks` (opened just before), up to 10 s; `tick(lived)` runs
    every 50 ms meanwhile. The sockets are closed on return."""
    opened = time.monotonic()
    for sock in socks.values():
        sock.setblocking(False)
    lived: dict[str, float] = {}
    while len(lived) < len(socks) and time.monotonic() - opened < 10:
        tick(lived)
        for name, sock in socks.items():
            if name not in lived and _closed(sock):
                lived[name] = time.monotonic() - opened
        time.sleep(0.05)
    for sock in socks.values():
        sock.close()
    return lived


def test_sockets_that_never_send_their_settings_are_closed_after_the_handshake_timeout(
    served: Served,
) -> None:
    """One connection sends nothing, the other the HTTP/2 preface a byte at a time (slowloris): both are
    closed once `grpc_handshake_timeout_s` has passed since accept, not before; the port goes on serving."""
    port = served.server.port
    slow = socket.create_connection(("127.0.0.1", port))
    socks = {"silent": socket.create_connection(("127.0.0.1", port)), "slow": slow}
    sent = 0

    def one_byte(lived: dict[str, float]) -> None:
        nonlocal sent
        if "slow" not in lived and sent < len(PREFACE):
            try:
                slow.send(PREFACE[sent : sent + 1])
                sent += 1
            except OSError:
                pass

    lived = _lifetimes(socks, one_byte)
    assert set(lived) == {"silent", "slow"}, lived
    for name, seconds in lived.items():
        assert HANDSHAKE_S * 0.8 <= seconds <= HANDSHAKE_S + 3, (name, seconds)
    assert 0 < sent < len(PREFACE)  # still sending its preface when it was closed
    assert _live(port)


def test_a_tls_port_and_its_health_port_close_connections_that_never_finish_their_handshake(
    served: Served, tmp_path: Path
) -> None:
    """On a TLS port the timeout counts the TLS handshake too: a client that starts one (a record's first
    bytes) and stops is closed as one that sends nothing to the plaintext health port beside it."""
    cert, key = self_signed(tmp_path)
    settings = served.settings.replace(
        grpc_tls_cert=str(cert), grpc_tls_key=str(key), grpc_health_port=free_port()
    )
    server = served.add(settings)
    tls = socket.create_connection(("127.0.0.1", server.port))
    tls.sendall(b"\x16\x03\x01\x02")  # a TLS handshake record's header, cut short
    health = socket.create_connection(("127.0.0.1", server.health_port))
    lived = _lifetimes({"tls": tls, "health": health}, lambda lived: None)
    assert set(lived) == {"tls", "health"}, lived
    for name, seconds in lived.items():
        assert HANDSHAKE_S * 0.8 <= seconds <= HANDSHAKE_S + 3, (name, seconds)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        assert _live(server.port, channel)


def test_an_idle_connection_is_closed_and_its_channel_connects_again(served: Served) -> None:
    port = served.server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert _live(port, channel)
        assert _open_on_server(port) == 1
        called = time.monotonic()
        _wait(lambda: _open_on_server(port) == 0, 2 * IDLE_S + 3)
        assert time.monotonic() - called >= IDLE_S * 0.8
        assert _live(port, channel)  # the same channel, on a new connection
        assert _open_on_server(port) == 1


def test_a_call_in_progress_keeps_its_connection_past_the_idle_timeout(served: Served) -> None:
    """A stream open for twice the idle timeout without a message is a call in progress: its connection stays
    and its next message is answered on it."""
    port = served.server.port
    requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()

    def sent() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        while (request := requests.get()) is not None:
            yield request

    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(sent(), timeout=30)
        requests.put(ask)
        assert next(answers).list_services_response.service
        time.sleep(2 * IDLE_S + 1)
        assert _open_on_server(port) == 1
        requests.put(ask)
        assert next(answers).list_services_response.service
        requests.put(None)
        assert list(answers) == []


def test_connections_past_the_limit_are_closed_at_accept_and_the_open_ones_are_served(served: Served) -> None:
    settings: Settings = served.settings.replace(
        grpc_max_connections=3, grpc_handshake_timeout_s=30.0, grpc_idle_timeout_s=60.0
    )
    port = served.add(settings).port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as first:
        assert _live(port, first)
        _wait(lambda: _open_on_server(port) == 3, 5)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _live(port)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert time.monotonic() - started < 2  # refused at accept, not left to time out
        assert _live(port, first)  # the connections already open are served
        for sock in held:
            sock.close()
        _wait(lambda: _open_on_server(port) == 1, 5)
        assert _live(port)  # a slot is free again


def test_calls_whose_message_never_arrives_end_at_the_request_timeout_a_few_at_a_time(served: Served) -> None:
    """A client that opens calls and never sends their messages (a client stream that yields nothing, on a
    unary method) holds each until `request_timeout_s`, then gets DEADLINE_EXCEEDED `request_timeout`; one
    connection holds `grpc_max_streams` of them at once, its client queuing the rest."""
    settings = served.settings.replace(request_timeout_s=1.0, grpc_max_streams=4)
    server = served.add(settings)
    never_sent = threading.Event()

    def nothing() -> Iterator[bytes]:
        never_sent.wait()
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # Connected first: a client that opens more streams than the server's settings, not yet received,
        # allow gets the ones past the limit refused (HTTP/2's REFUSED_STREAM, UNAVAILABLE to the caller).
        assert _live(server.port, channel)
        infer = channel.stream_unary(INFER, request_serializer=None, response_deserializer=None)
        started = time.monotonic()
        calls = [infer.future(nothing(), timeout=60) for _ in range(10)]
        most = 0
        while not all(call.done() for call in calls) and time.monotonic() - started < 20:
            most = max(most, server.interceptor.active)
            time.sleep(0.01)
        took = time.monotonic() - started
        never_sent.set()
        assert most == 4  # the calls in the server's hands at once: the connection's streams
        timed_out = 0
        for call in calls:
            err = call.exception()
            assert err is not None
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                # A stream opened the moment one ended, before the server had counted that one out (this
                # client never closes its side): refused, HTTP/2's REFUSED_STREAM.
                assert "RST_STREAM" in err.details(), err
                continue
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
            assert "the request message did not arrive within" in err.details()
            assert dict(err.trailing_metadata())["x-error-code"] == "request_timeout"
            timed_out += 1
        assert timed_out >= 4  # the first four at least; the others as slots came free, or refused
        assert 1.5 <= took <= 10, took  # four after a second, each later one a second after its start
        assert _live(server.port, channel)
        # A call that ends without its message is the client's error.
        with pytest.raises(grpc.RpcError) as info:
            infer(iter([]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the call ended without its request message" in info.value.details()


def test_the_connection_settings_are_checked() -> None:
    for bad in (
        {"grpc_max_connections": 0},
        {"grpc_max_connections": 2**31 - 1},  # gRPC's core would abort the process at start-up
        {"grpc_handshake_timeout_s": 0},
        {"grpc_idle_timeout_s": float("nan")},
        {"grpc_idle_timeout_s": 100_000},
        {"grpc_max_streams": 0},
    ):
        with pytest.raises(ValueError):
            Settings(**bad).validate()
