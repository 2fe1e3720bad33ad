"""BentoML's request tracing as the service installs it (`service/http/tracing.py`): one span per request,
none per body piece or reply message, with the request's span as before."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.instrumentation import asgi
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.http import tracing

PIECES = 48  # a 12 MB body arrives in about this many pieces


async def _app(scope: dict, receive, send) -> None:
    """Reads the whole body piece by piece, then answers its size."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _spans(middleware_class: type) -> tuple[list, list[dict]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # samples every request: a span skipped here is skipped for good
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    middleware = middleware_class(_app, tracer_provider=provider)
    pieces = [
        {"type": "http.request", "body": b"x" * 1000, "more_body": i < PIECES - 1} for i in range(PIECES)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return pieces.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "scheme": "http",
        "server": ("127.0.0.1", 3000),
        "client": ("127.0.0.1", 50000),
        "http_version": "1.1",
    }
    asyncio.run(middleware(scope, receive, send))
    return exporter.get_finished_spans(), sent


def test_a_request_is_one_span_however_many_pieces_its_body_comes_in() -> None:
    spans, sent = _spans(tracing.RequestSpanMiddleware)
    assert sent[0]["status"] == 200 and sent[1]["body"] == str(PIECES * 1000).encode()
    assert len(spans) == 1
    (span,) = spans
    assert span.attributes.get("http.method", span.attributes.get("http.request.method")) == "POST"
    assert span.attributes.get("http.status_code", span.attributes.get("http.response.status_code")) == 200


def test_the_plain_middleware_opens_a_span_per_piece() -> None:
    """What the installed one leaves out: this is the cost on the event loop, a span per piece."""
    plain = tracing.RequestSpanMiddleware.__bases__[0]  # OpenTelemetry's, even once installed
    spans, _ = _spans(plain)
    assert len(spans) >= PIECES + 1


def test_install_makes_bentoml_build_the_request_span_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "OpenTelemetryMiddleware", asgi.OpenTelemetryMiddleware)
    tracing.install()
    # BentoML imports the name when it builds its app (`_bentoml_impl.server.app`)
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    assert OpenTelemetryMiddleware is tracing.RequestSpanMiddleware
    kept = OpenTelemetryMiddleware(_app, exclude_spans=["send"])
    assert not kept.exclude_receive_span and kept.exclude_send_span
