"""Large JSON bodies parsed in child processes (`service.http.parsing.BodyParser`), real children over pipes.

The thread that hands a body over is the only thread of the worker involved: no pool thread pickles the body
or reads the answer, so nothing else of the worker holds the interpreter lock for a parse.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import pytest

from service.errors import InvalidArgument, ModelUnavailable
from service.http.parsing import PROCESS_BYTES, BodyParser, JsonBudget, parse_json_body


def keep(parsed: Any, rest: memoryview) -> tuple[Any, bytes]:
    """What a route's `then` does: the parsed objects and the bytes after the JSON, built in the child."""
    return parsed, bytes(rest)


def end_the_child(parsed: Any, rest: memoryview) -> None:
    """A parse that kills its process (as the OOM killer would) before it answers."""
    os._exit(3)


def _body() -> tuple[bytes, int, dict[str, Any]]:
    document = {"inputs": [{"name": "x", "data": list(range(40_000))}]}
    text = json.dumps(document).encode()
    assert len(text) >= PROCESS_BYTES  # large enough for a child
    return text + b"\x00\x01binary", len(text), document


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rindex(")") + 2]


def _parse(parser: BodyParser, data: bytes, end: int, then: Any = keep) -> Any:
    return asyncio.run(parse_json_body(data, end, "the body", then, JsonBudget(factor=64), parser))


def test_a_large_body_is_parsed_in_a_child_and_no_other_thread_of_the_worker_touches_it() -> None:
    parser = BodyParser(1)
    before = {t.ident for t in threading.enumerate()}
    try:
        data, end, document = _body()
        assert _parse(parser, data, end) == (document, b"\x00\x01binary")
        (child,) = parser.pids()
        assert child != os.getpid()
        # an error raised in the child comes back as itself
        bad = b"{" * 10 + b" " * PROCESS_BYTES
        with pytest.raises(InvalidArgument, match="the body is not valid JSON"):
            _parse(parser, bad, len(bad))
        assert parser.pids() == [child]  # the same child, kept
        started = {t.name for t in threading.enumerate() if t.ident not in before}
        assert started <= {"AnyIO worker thread"}, started  # no queue feeder, no pool manager
    finally:
        parser.close()


def test_a_parsing_child_that_dies_answers_503_and_the_next_body_gets_a_new_one() -> None:
    parser = BodyParser(1)
    try:
        data, end, document = _body()
        with pytest.raises(ModelUnavailable, match="could not be parsed now; retry"):
            _parse(parser, data, end, then=end_the_child)
        assert parser.pids() == []
        assert _parse(parser, data, end) == (document, b"\x00\x01binary")
        (child,) = parser.pids()
        os.kill(child, signal.SIGKILL)  # ended while idle: the next body goes to a new child, unharmed
        deadline = time.monotonic() + 10
        while _state(child) != "Z" and time.monotonic() < deadline:  # ended, not yet reaped by its parent
            time.sleep(0.01)
        assert _parse(parser, data, end) == (document, b"\x00\x01binary")
        assert parser.pids() not in ([], [child])
    finally:
        parser.close()


def test_bodies_beyond_the_children_wait_for_one_and_close_ends_them() -> None:
    parser = BodyParser(2)
    data, end, document = _body()

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(parse_json_body(data, end, "the body", keep, JsonBudget(factor=64), parser) for _ in range(6))
        )

    try:
        assert asyncio.run(many()) == [(document, b"\x00\x01binary")] * 6
        children = parser.pids()
        assert len(children) == 2
    finally:
        parser.close()
    assert parser.pids() == []
    for child in children:
        with pytest.raises(ChildProcessError):  # ended and reaped
            os.waitpid(child, os.WNOHANG)
    with pytest.raises(ModelUnavailable, match="shutting down"):
        _parse(parser, data, end)
