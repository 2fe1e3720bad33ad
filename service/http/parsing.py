"""JSON request bodies parsed with their memory bounded and away from the event loop.

JSON costs more once parsed than as text: ten million `{}` (30 MB) become 750 MB of dicts. So a body's cost
is estimated from its text before it is parsed (`json_cost`, counts of the characters that make objects),
refused past `json_memory_factor` times its size or past the decode memory budget, and reserved from that
budget (which bounds what every request being parsed or decoded holds at once) until the parsed objects have
been turned into compact ones (arrays, bytes) and dropped.

Python's JSON parser and base64 decoder hold the interpreter lock while they run, so a worker thread does not
keep a large parse from stalling the event loop that every HTTP and gRPC call shares (a 20 MB tensor takes
a second). Bodies of `PROCESS_BYTES` or more are therefore parsed in a child process (`BodyParser`,
`parse_processes` of them), smaller ones in a thread; the estimate is counted in a thread, a slice at a time.
What comes back from a child is what our own code built there (`InferBody`, arrays, bytes, typed errors),
never a client's bytes to unpickle.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import anyio
import numpy as np

from service.children import end_child, start_child
from service.errors import InvalidArgument, ModelUnavailable, RequestTooLarge
from service.memory import MemoryBudget, return_memory
from service.priority import as_work

T = TypeVar("T")
log = logging.getLogger("cnn_serve.http")

# What parsing costs beyond the text, by the characters that make Python objects (CPython 3.10 to 3.13,
# measured with tracemalloc; tests/test_http_hostile.py checks the estimate against measured peaks): each
# object (a dict, its entries, a list and its slots, a string) and twice the text (the decoded str and the
# strings' contents). Counted anywhere, strings included: base64 holds none of them, and more is safer.
JSON_COSTS = {b"{": 200, b"[": 100, b",": 48, b":": 64, b'"': 28}
_COSTS_BY_BYTE = tuple((char[0], cost) for char, cost in JSON_COSTS.items())
JSON_TEXT_COST = 2
JSON_BASE_COST = 16 * 1024  # the parser's own objects, whatever the text
# Bodies whose estimate is under this are never refused by `json_memory_factor`: a small request's objects
# cost more than its text does, and little in all.
JSON_FREE_BYTES = 64 * 1024
# The estimate counts a slice at a time: what it holds beside the body stays small.
COUNT_SLICE = 1 << 20
# Bodies from this size on are parsed in a child process: below it a parse holds the loop for milliseconds.
PROCESS_BYTES = 128 * 1024
PARSE_NICENESS = 10


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def _outcome(fn: Callable[[], T]) -> T | _Raised:
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - raised again on the loop's side, by `off_loop`
        return _Raised(e)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread at the work's priority, for work that releases the interpreter lock or
    takes milliseconds.

    An error comes back as a value and is raised here. AnyIO would raise it from the frame that awaits its
    future, and that frame, the future and the error's traceback then refer to each other: each refused
    request (a JSON bomb's 413, say) would leave its frames, request and body to the collector's next full
    pass, which walks them on the event loop's time."""
    outcome = await anyio.to_thread.run_sync(_outcome, as_work(functools.partial(fn, *args)))
    if not isinstance(outcome, _Raised):
        return outcome
    error = outcome.error
    del outcome
    try:
        raise error
    finally:
        del error  # this frame is in the error's traceback: it must not hold the error too


def parse_json(data: bytes, what: str) -> Any:
    """JSON, or InvalidArgument: malformed text, and nesting too deep for the parser (RecursionError)."""
    try:
        return json.loads(data or b"null")
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{what} is not valid JSON (or nests too deep)") from None


def json_cost(data: bytes, end: int | None = None) -> int:
    """Bytes that parsing `data[:end]` may take at its peak, by estimate (an upper bound for what JSON can
    say), from counts that make no object. NumPy compares and counts with the interpreter lock released
    (`bytes.count` holds it: threads counting large bodies kept the event loop's thread waiting for it)."""
    end = len(data) if end is None else end
    total = JSON_BASE_COST + JSON_TEXT_COST * end
    if end <= 0:
        return total
    text = np.frombuffer(data, np.uint8, count=end)
    for at in range(0, end, COUNT_SLICE):
        piece = text[at : at + COUNT_SLICE]
        total += sum(int(np.count_nonzero(piece == char)) * cost for char, cost in _COSTS_BY_BYTE)
    return total


@dataclass(frozen=True)
class JsonBudget:
    """How much a JSON body may cost once parsed: `factor` times its size, and room in `memory` (the decode
    memory budget) waited for until `deadline`."""

    factor: float
    memory: MemoryBudget | None = None
    deadline: float | None = None

    def check(self, data: bytes, end: int, what: str) -> int:
        """The estimated cost of the JSON text `data[:end]`, or RequestTooLarge."""
        cost = json_cost(data, end)
        if cost > max(JSON_FREE_BYTES, self.factor * end):
            raise RequestTooLarge(
                f"{what} would take about {_mib(cost)} MiB once parsed, more than {self.factor:g} times its "
                f"{end} bytes (json_memory_factor): send tensors as binary data"
            )
        if self.memory is not None and cost > self.memory.capacity:
            raise RequestTooLarge(
                f"{what} would take about {_mib(cost)} MiB once parsed; the limit is "
                f"{_mib(self.memory.capacity)} MiB (decode_memory_mb)"
            )
        return cost


def _mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f}"


def parse_then(data: bytes, json_end: int, what: str, then: Callable[[Any, memoryview], T]) -> T:
    """`then(parsed, rest)`: the JSON text `data[:json_end]` parsed, and the bytes after it. `then` turns the
    parsed objects into compact ones, so that nothing big outlives this call. Runs in a thread or a child."""
    view = memoryview(data)
    return then(parse_json(bytes(view[:json_end]), what), view[json_end:])


def _yield_the_cpu() -> None:
    """A parsing process runs at a lower priority than the worker: a burst of large bodies must not take the
    cores that the event loop and inference need."""
    try:
        os.nice(PARSE_NICENESS)
    except OSError:  # not allowed here: the default priority, still another process
        pass


def _serve_parses(conn: Connection) -> None:
    """A parsing process: `(fn, args)` pickled, then the body's bytes as they are; answers `(True, value)` or
    `(False, error)`. Its heap is given back to the system after each: a parse's millions of objects are freed
    when it returns, and the C allocator would otherwise keep their pages."""
    _yield_the_cpu()
    while True:
        try:
            message = conn.recv()
            if message is None:
                return
            fn, args = message
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the worker is gone
            return
        try:
            outcome: tuple[bool, Any] = (True, fn(data, *args))
        except BaseException as e:  # noqa: BLE001 - the request's error, raised again in the worker
            outcome = (False, e)
        finally:
            data = b""
            return_memory()
        try:
            conn.send(outcome)
        except (EOFError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - an error that does not pickle: its kind and text instead
            conn.send((False, InvalidArgument(f"the body could not be parsed: {type(e).__name__}")))
        del outcome


class _EndedIdle(Exception):
    """The child had ended before it had the body: another may take it."""


class ParseProcess:
    """One parsing child and the pipe to it, used by one thread at a time."""

    def __init__(self) -> None:
        self._conn, self.process = start_child(_serve_parses, (), "cnn-serve-parse")

    def call(self, fn: Callable[..., T], data: bytes, *args: Any) -> tuple[bool, Any]:
        """`fn(data, *args)` in the child: `(True, value)` or `(False, error)`. The body goes down the pipe
        from its own buffer (the system call lets the interpreter lock go); what comes back is what our own
        code built there (`InferBody`, arrays, bytes, typed errors), never a client's bytes to unpickle. A
        child that ended or broke the protocol raises."""
        try:
            self._conn.send((fn, args))
            self._conn.send_bytes(data)
        except OSError as e:  # its end of the pipe is closed: it ended before it had the body
            raise _EndedIdle from e
        ok, value = self._conn.recv()
        return bool(ok), value

    def close(self) -> None:
        end_child(self._conn, self.process)


class BodyParser:
    """`processes` child processes that parse large JSON bodies, each started at the first body that finds
    none free. The thread that hands a body over (request work, `off_loop`) waits on its pipe with the
    interpreter lock let go: no thread of the worker pickles the body or reads the answer besides it."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._room = threading.Condition()
        self._free: list[ParseProcess] = []
        self._started = 0
        self._closed = False

    async def run(self, fn: Callable[..., T], data: bytes, *args: Any) -> T:
        """`fn(data, *args)` in a child; one that dies (the OOM killer, say) answers 503 and is replaced."""
        return await off_loop(self._call, fn, data, *args)

    def _call(self, fn: Callable[..., T], data: bytes, *args: Any) -> T:
        try:
            ok, value = self._exchange(self._borrow(), fn, data, *args)
        except _EndedIdle:  # killed while idle (the OOM killer, say): the body goes to a new child
            try:
                ok, value = self._exchange(self._borrow(), fn, data, *args)
            except _EndedIdle:
                raise ModelUnavailable("the request's body could not be parsed now; retry") from None
        if not ok:
            raise value
        return value

    def _exchange(
        self, process: ParseProcess, fn: Callable[..., T], data: bytes, *args: Any
    ) -> tuple[bool, Any]:
        """One body through `process`, which is then given back: kept, or closed where it ended or broke."""
        try:
            outcome = process.call(fn, data, *args)
        except _EndedIdle:
            log.warning("a JSON parsing process ended while idle; starting another")
            self._give_back(process, broken=True)
            raise
        except Exception as e:  # noqa: BLE001 - the pipe broke or the child ended: where it stood is unknown
            process.process.join(0.5)
            log.error(
                "a JSON parsing process ended or broke its protocol (%s, exit code %s); starting another",
                type(e).__name__,
                process.process.exitcode,
            )
            self._give_back(process, broken=True)
            raise ModelUnavailable("the request's body could not be parsed now; retry") from None
        except BaseException:
            self._give_back(process, broken=True)
            raise
        self._give_back(process, broken=False)
        return outcome

    def _borrow(self) -> ParseProcess:
        """An idle child, or a new one while fewer than `processes` run; one that ended while idle is found
        when its body will not go down the pipe (`_call`)."""
        with self._room:
            while not self._free and self._started >= self.processes and not self._closed:
                self._room.wait()
            if self._closed:
                raise ModelUnavailable("the service is shutting down")
            if self._free:
                return self._free.pop()
            self._started += 1
        try:
            return ParseProcess()
        except BaseException:
            with self._room:
                self._started -= 1
                self._room.notify()
            raise

    def _give_back(self, process: ParseProcess, broken: bool) -> None:
        with self._room:
            keep = not broken and not self._closed
            if keep:
                self._free.append(process)
            else:
                self._started -= 1
            self._room.notify()
        if not keep:
            process.close()

    def pids(self) -> list[int]:
        """The idle children's process ids."""
        with self._room:
            return [p.process.pid for p in self._free if p.process.pid is not None]

    def close(self) -> None:
        """End the idle children; one still parsing ends when its body is answered."""
        with self._room:
            self._closed = True
            closing, self._free = self._free, []
            self._room.notify_all()
        for process in closing:
            process.close()


async def parse_json_body(
    data: bytes,
    json_end: int,
    what: str,
    then: Callable[[Any, memoryview], T],
    budget: JsonBudget,
    parser: BodyParser | None,
) -> T:
    """`then(parsed, rest)` of `data` whose first `json_end` bytes are JSON: its cost checked and reserved
    first, parsed in a child process when large (`parser`), else in a thread; never on the event loop."""
    cost = await off_loop(budget.check, data, json_end, what)
    memory = budget.memory
    if memory is not None:
        await off_loop(memory.acquire, cost, budget.deadline)
    try:
        if parser is not None and parser.processes > 0 and json_end >= PROCESS_BYTES:
            return await parser.run(parse_then, data, json_end, what, then)
        return await off_loop(parse_then, data, json_end, what, then)
    finally:
        if memory is not None:
            memory.release(cost)
