"""Refusing an inference request from its headers, before its body is read.

Under overload the body of a request the service will refuse anyway costs the most: reading and parsing a
batch of images took 300-500 ms before admission answered 503. The route, the query string's `tta` and the
client's `x-request-timeout-ms` already say what the request needs at the least (one image's views) and by
when; when the work queued now would not be done by then, the answer is 503 with Retry-After at once, the
body unread. Otherwise those views are held for the request (`InferenceCore.hold`) while its body is read,
so that the requests of a burst arriving behind it see them; the route's own admission replaces the hold
with the request's real views. A request for a model that cannot answer it (unknown, unloaded, not ready)
holds nothing and is never shed: its route answers 404 or 503 with the reason, which a retry would not
change.

The views are held only once what the body will hold is reserved from the receive budget (`body_bytes`,
`service/receiving.py`): a request waiting for room, its body unread, holds no place in the queue. And each
client holds at most its share of the queue (`client_share` x `queue_size`, `HeaderHolds`): one client's
requests whose bodies come slowly or never would otherwise fill the queue's expected wait, and every other
client's requests would be shed from their headers.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any
from urllib.parse import parse_qs

from service import augmentation
from service.batching import Hold
from service.config import Settings
from service.errors import InvalidArgument

from .requests import timeout_s

INFERENCE_PATH = re.compile(r"^/(classify|classify_batch|v2/models/([^/]+)(/versions/([^/]+))?/infer)$")


class HeaderHolds:
    """The views each client holds from its headers, bounded by its share of the queue. Past its share a
    request holds nothing: its route's admission alone decides, as for a request whose headers say too
    little. A client's count lasts until its request is answered. Used on the event loop only."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.share = max(1, math.floor(settings.queue_size * settings.client_share))
        self._views: dict[str, int] = {}

    def take(
        self, core: Any, scope: dict, headers: dict[str, str], client: str, arrived: float
    ) -> Hold | None:
        """`hold_from_headers` within the client's share (None past it)."""
        if self._views.get(client, 0) >= self.share:
            return None
        hold = hold_from_headers(core, scope, headers, self.settings, arrived)
        if hold is not None:
            self._views[client] = self._views.get(client, 0) + hold.views
        return hold

    def end(self, core: Any, hold: Hold, client: str) -> None:
        """The request is answered: its hold given back, if its admission did not take it."""
        core.release_hold(hold)
        left = self._views.get(client, 0) - hold.views
        if left > 0:
            self._views[client] = left
        else:
            self._views.pop(client, None)


def hold_from_headers(
    core: Any, scope: dict, headers: dict[str, str], settings: Settings, arrived: float | None = None
) -> Hold | None:
    """The views held for an inference request that `arrived` (`time.monotonic()`; now when None), or None
    (not an inference request, the core not running yet, a model that cannot answer, or a header malformed:
    the route answers that). Raises Overloaded when the queue cannot serve the request before its deadline."""
    route = INFERENCE_PATH.match(scope.get("path", "")) if scope.get("method") == "POST" else None
    if core is None or route is None:
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    model, version = (route[2], route[4]) if route[2] else (_last(query, "model"), _last(query, "version"))
    if not core.serves(model, version):
        return None
    seconds = _timeout_s(headers, settings)
    if seconds is None:
        return None
    views = 1
    tta = query.get("tta")
    if tta:
        try:
            views = augmentation.view_count(tta[-1])
        except InvalidArgument:
            return None
    return core.hold((time.monotonic() if arrived is None else arrived) + seconds, views)


def body_bytes(headers: dict[str, str], settings: Settings) -> int:
    """What a request's body may hold once read, reserved from the receive budget (`service/receiving.py`)
    before it is: its Content-Length; `max_request_bytes` when it is chunked or compressed (its size is
    known only once read); nothing past `max_request_bytes`, which the route refuses (413) unread."""
    encoded = headers.get("content-encoding", "").strip().lower() not in ("", "identity")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return settings.max_request_bytes
    declared = headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()) or int(declared) > settings.max_request_bytes:
        return 0
    return settings.max_request_bytes if encoded and int(declared) else int(declared)


def request_deadline(headers: dict[str, str], settings: Settings, arrived: float) -> float:
    """The deadline (`time.monotonic()`) of a request that `arrived`; a malformed timeout header is the
    route's to refuse."""
    return arrived + (_timeout_s(headers, settings) or settings.request_timeout_s)


def _timeout_s(headers: dict[str, str], settings: Settings) -> float | None:
    """The request's `timeout_s`; None when its header is malformed (the route answers that)."""
    try:
        return timeout_s(headers.get("x-request-timeout-ms"), settings)
    except InvalidArgument:
        return None


def _last(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None
