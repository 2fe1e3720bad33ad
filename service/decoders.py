"""Images decoded and preprocessed in child processes: one per decode thread, away from the event loop's lock.

Python code holds the interpreter lock, and a thread that holds it when the scheduler takes its core keeps
the event loop (every HTTP and gRPC connection) from running until that thread is scheduled again: with the
work at a raised nice value (`worker_niceness`), tens of milliseconds behind every other runnable thread of
the host. Pillow's file parsers, the Pillow-to-NumPy copies and the views' NumPy steps are such code. In a
child process they take cores, at the same nice value, but never the loop's lock: the decode thread that
hands an image over waits on a pipe with the lock released.

One image at a time per child, over a pipe:
- parent -> child, pickled (the child trusts its parent): the model's key, its `Pipeline` the first time this
  child sees that key, the image's bytes and the test-time augmentation mode;
- child -> parent, never unpickled (a child decodes what clients send): JSON headers and raw bytes.
  `{"reserve": n}` asks for the decode's memory before any pixel is decoded (the core's decode memory
  budget, which may wait for room), answered True (go on) or False (stop: the room did not come in time);
  then `{"shape": [...]}` followed by the views' float32 bytes, or `{"error": name, "message": text}`.

A child that dies (a decoder crash, the OOM killer) fails its image with a 500 and is replaced by the next
image's; one still decoding at the image's deadline is killed (a thread could not be stopped) and replaced.
Each child gives its freed memory back to the system after `memory_trim_idle_s` without work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from service import errors
from service.children import STOP_S, end_child, start_child
from service.errors import DeadlineExceeded, ServiceError
from service.memory import return_memory
from service.pipeline import Pipeline
from service.priority import lower_this_thread

log = logging.getLogger(__name__)

MAX_HEADER = 4096  # bytes of a child's JSON header; an error message is cut well before
MAX_MESSAGE = 500  # characters of an error message a child sends
MAX_KEYS = 64  # models' pipelines a child keeps; past it, the parent starts its list again


class _Overran(Exception):
    """The child did not answer before the image's deadline."""


class _Stopped(ServiceError):
    """The parent said no to a reservation: the child drops the image (its reason is the parent's)."""


def _error(header: dict[str, Any]) -> ServiceError:
    """The child's error as the core's own type; an unknown name is an internal failure."""
    kind = getattr(errors, str(header.get("error")), None)
    message = str(header.get("message", ""))[:MAX_MESSAGE]
    if isinstance(kind, type) and issubclass(kind, ServiceError) and kind.__init__ is ServiceError.__init__:
        return kind(message)
    return ServiceError(message or "preprocessing failed")


def _serve(conn: Connection, niceness: int, trim_idle_s: float) -> None:
    """The child's loop: prepare each image the parent sends until it sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains, then ends its children
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lower_this_thread(niceness)  # the work's nice value, whichever thread started this child
    pipelines: dict[Hashable, Pipeline] = {}

    def reserve(nbytes: int) -> None:
        conn.send_bytes(json.dumps({"reserve": int(nbytes)}).encode())
        if conn.recv() is not True:
            raise _Stopped("stopped by the parent")

    trimmed = True
    while True:
        try:
            if not conn.poll(None if trimmed or trim_idle_s <= 0 else trim_idle_s):
                return_memory()  # idle: the pages of the last images go back to the system
                trimmed = True
                continue
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        trimmed = False
        key, pipeline, reset, data, tta = message
        del message
        if reset:
            pipelines.clear()
        if pipeline is not None:
            pipelines[key] = pipeline
        try:
            _answer(conn, pipelines[key], data, tta, reserve)
        except (EOFError, OSError):  # the parent is gone
            return
        del data


def _answer(
    conn: Connection, pipeline: Pipeline, data: bytes, tta: str, reserve: Callable[[int], None]
) -> None:
    """One image's views, or why there are none, sent to the parent."""
    try:
        views = pipeline.prepare(data, tta, reserve=reserve)
    except _Stopped:
        header: dict[str, Any] = {"stopped": True}
    except ServiceError as e:
        header = {"error": type(e).__name__, "message": str(e)[:MAX_MESSAGE]}
    except Exception as e:  # noqa: BLE001 - never a stack trace to clients
        header = {"error": "ServiceError", "message": f"preprocessing failed: {type(e).__name__}"}
    else:
        views = np.ascontiguousarray(views, dtype=np.float32)
        conn.send_bytes(json.dumps({"shape": list(views.shape)}).encode())
        conn.send_bytes(views)
        return
    conn.send_bytes(json.dumps(header).encode())


class DecodeProcess:
    """One child and the pipe to it, used by one thread at a time (`DecodeProcesses.borrow`)."""

    def __init__(self, niceness: int, trim_idle_s: float) -> None:
        self._conn, self.process = start_child(_serve, (niceness, trim_idle_s), "cnn-serve-decode")
        self._keys: set[Hashable] = set()
        self.broken = False

    def prepare(
        self,
        key: Hashable,
        pipeline: Pipeline,
        data: bytes,
        tta: str,
        reserve: Callable[[int], None],
        deadline: float | None = None,
    ) -> np.ndarray:
        """`pipeline.prepare(data, tta, reserve)`, done by the child; `reserve` runs here, in the caller. A
        child still decoding at `deadline` (monotonic) is killed: a thread could not be stopped, a process
        gives the core back at once."""
        reset = len(self._keys) >= MAX_KEYS and key not in self._keys
        if reset:
            self._keys.clear()
        message = (key, pipeline if key not in self._keys else None, reset, bytes(data), tta)
        try:
            outcome = self._exchange(message, reserve, deadline)
            self._keys.add(key)
        except _Overran:
            self.broken = True
            self.process.kill()
            self.process.join(1.0)
            raise DeadlineExceeded("deadline passed while the image was being decoded") from None
        except (EOFError, OSError, ValueError, TypeError, KeyError, pickle.PicklingError) as e:
            self.broken = True
            self.process.join(0.5)
            log.warning(
                "a decoding process ended or broke its protocol (%s, exit code %s); starting another",
                type(e).__name__,
                self.process.exitcode,
            )
            raise ServiceError("the image's decoding process ended before answering") from None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _exchange(
        self, message: tuple, reserve: Callable[[int], None], deadline: float | None
    ) -> np.ndarray | BaseException:
        """Send one image and answer the child until it gives the views or their error; a broken pipe or
        protocol raises, a child past `deadline` too."""
        self._conn.send(message)
        refused: BaseException | None = None
        while True:
            if refused is not None:  # the child stops at once: its answer is awaited past the deadline
                if not self._conn.poll(STOP_S):
                    raise _Overran
            elif deadline is not None and not self._conn.poll(max(0.0, deadline - time.monotonic())):
                raise _Overran
            header = self._header()
            if "reserve" in header:
                try:
                    reserve(int(header["reserve"]))
                except BaseException as e:  # noqa: BLE001 - the image's error, once the child has stopped
                    refused = e
                self._conn.send(refused is None)
                continue
            if "shape" in header:
                return self._views(header["shape"])
            if header.get("stopped") and refused is not None:
                return refused
            return _error(header)

    def _header(self) -> dict[str, Any]:
        header = json.loads(self._conn.recv_bytes(MAX_HEADER))
        if not isinstance(header, dict):
            raise ValueError("a header is an object")
        return header

    def _views(self, shape: Any) -> np.ndarray:
        dims = tuple(int(d) for d in shape)
        if len(dims) != 4 or min(dims) < 1:
            raise ValueError(f"views of shape {dims}")
        out = np.empty(dims, dtype=np.float32)
        if self._conn.recv_bytes_into(memoryview(out).cast("B")) != math.prod(dims) * 4:
            raise ValueError("the views' bytes do not match their shape")
        return out

    def close(self) -> None:
        end_child(self._conn, self.process)


class DecodeProcesses:
    """The children of the core's decode threads: each thread borrows one for an image, or starts one."""

    def __init__(self, niceness: int, trim_idle_s: float) -> None:
        self._niceness = niceness
        self._trim_idle_s = trim_idle_s
        self._lock = threading.Lock()
        self._free: list[DecodeProcess] = []
        self._all: list[DecodeProcess] = []
        self._closed = False

    def start(self, count: int) -> None:
        """Start `count` children now, so that the first images do not wait for their start-up."""
        with self._lock:
            while len(self._all) < count and not self._closed:
                process = DecodeProcess(self._niceness, self._trim_idle_s)
                self._all.append(process)
                self._free.append(process)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[DecodeProcess]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoding processes are closed")
            process = self._free.pop() if self._free else None
            dead = process if process is not None and not process.process.is_alive() else None
            if dead is not None:  # ended while idle (the OOM killer, say): the image goes to a new one
                self._all.remove(dead)
                log.warning(
                    "a decoding process ended while idle (exit code %s); starting another",
                    dead.process.exitcode,
                )
                process = None
            if process is None:
                process = DecodeProcess(self._niceness, self._trim_idle_s)
                self._all.append(process)
        if dead is not None:
            dead.close()
        try:
            yield process
        finally:
            with self._lock:
                if process.broken or self._closed:
                    if process in self._all:
                        self._all.remove(process)
                    closing = True
                else:
                    self._free.append(process)
                    closing = False
            if closing:
                process.close()

    def pids(self) -> list[int]:
        with self._lock:
            return [p.process.pid for p in self._all if p.process.pid is not None]

    def close(self) -> None:
        """End every child not in use (the decode threads have stopped by now: `InferenceCore.close`)."""
        with self._lock:
            self._closed = True
            closing, self._free, self._all = list(self._free), [], []
        for process in closing:
            process.close()
