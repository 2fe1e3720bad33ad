"""BentoML's traffic timeout as the service installs it (`service/http/traffic.py`): the same answers, and
nothing of a request kept alive by its timer once it is answered."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.http.traffic import TimeoutMiddleware, install


def _scope() -> dict:
    return {"type": "http", "method": "GET", "path": "/", "headers": []}


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _call(middleware: TimeoutMiddleware) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await middleware(_scope(), _receive, send)
    return sent


def _app(delay_s: float, then_s: float = 0.0, seen: dict | None = None):
    async def app(scope: dict, receive, send) -> None:
        try:
            await asyncio.sleep(delay_s)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await asyncio.sleep(then_s)
            await send({"type": "http.response.body", "body": b"ok"})
        except asyncio.CancelledError:
            if seen is not None:
                seen["cancelled"] = True
            raise

    return app


def _live_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]


def test_answers_pass_and_leave_no_timer_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = _live_timers(loop)
        middleware = TimeoutMiddleware(_app(0.0), timeout=60.0)
        for _ in range(200):
            sent = await _call(middleware)
            assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
            assert sent[0]["status"] == 200
        # BentoML's own kept one live 60 s timer per request, holding the request's context
        assert _live_timers(loop) == before

    asyncio.run(main())


def test_no_answer_begun_in_time_is_504_and_the_app_is_cancelled() -> None:
    async def main() -> None:
        seen: dict = {}
        sent = await _call(TimeoutMiddleware(_app(5.0, seen=seen), timeout=0.1))
        assert sent[0]["status"] == 504 and seen == {"cancelled": True}
        assert "0.1 seconds" in json.loads(sent[1]["body"])["error"]
        assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]

    asyncio.run(main())


def test_an_answer_begun_in_time_is_not_cut() -> None:
    async def main() -> None:
        sent = await _call(TimeoutMiddleware(_app(0.0, then_s=0.3), timeout=0.1))
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"

    asyncio.run(main())


def test_a_cancelled_caller_stays_cancelled() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(_call(TimeoutMiddleware(_app(5.0), timeout=60.0)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_the_service_installs_it_where_bentoml_looks_it_up() -> None:
    from bentoml._internal.server.http import traffic

    install()
    assert traffic.TimeoutMiddleware is TimeoutMiddleware
