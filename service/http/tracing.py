"""BentoML's request tracing, one span per request instead of one more per body piece and per reply message.

BentoML wraps every app in OpenTelemetry's ASGI middleware, which by default opens a span for each message
the app receives or sends as well as for the request. A 12 MB body arrives in about fifty pieces: fifty
spans, each with its context attached and detached on the event loop, even at BentoML's default sampling
rate of 0, when none is recorded: under a load of large bodies, a large share of the loop's time
(docs/BENCHMARKS.md, "Hostile clients"). `install` makes BentoML build the middleware with those spans
left out; the request's span, its attributes and the trace context it passes on are unchanged.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.instrumentation import asgi

PER_MESSAGE_SPANS = ["receive", "send"]


class RequestSpanMiddleware(asgi.OpenTelemetryMiddleware):
    """OpenTelemetry's ASGI middleware without the per-message spans (unless a caller asks for them)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exclude_spans", PER_MESSAGE_SPANS)
        super().__init__(app, **kwargs)


def install() -> None:
    """Make BentoML build its apps with `RequestSpanMiddleware` (it imports the name when it builds one)."""
    asgi.OpenTelemetryMiddleware = RequestSpanMiddleware  # type: ignore[misc]
