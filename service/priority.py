"""Thread priorities: the event loop before the work.

A worker process answers every connection on one event loop (HTTP and gRPC) while its threads decode images
and run inference. On a CPU those threads keep every core busy under load, and the loop, woken to read a
body or answer a 503, waits for a core like any of them: each step of a request then waits for the
scheduler. Linux keeps a nice value per thread: the threads that do the work raise theirs
(`worker_niceness`), so the scheduler runs the loop whenever it is ready, and the work takes every cycle the
loop leaves. ONNX Runtime starts its own threads when a session is made; they take the nice value of the
thread that makes it (`made_lowered`). Elsewhere than Linux the nice value is the process's: nothing changes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
PER_THREAD = sys.platform.startswith("linux")


def lower_this_thread(niceness: int) -> None:
    """Raise the calling thread's nice value to `niceness`; never lower it (that needs a privilege)."""
    if niceness <= 0 or not PER_THREAD:
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, min(niceness, 19))
    except OSError:  # not allowed here: the thread keeps its priority
        pass


def thread_niceness(tid: int | None = None) -> int:
    """A thread's nice value (the caller's by default)."""
    return os.getpriority(os.PRIO_PROCESS, tid if tid is not None else threading.get_native_id())


def made_lowered(niceness: int, make: Callable[[], T]) -> T:
    """`make()` run on a new thread of `niceness`: for objects that start threads of their own, which take
    that nice value. The caller's thread keeps its own."""
    if niceness <= 0 or not PER_THREAD:
        return make()
    outcome: dict[str, object] = {}

    def run() -> None:
        lower_this_thread(niceness)
        try:
            outcome["value"] = make()
        except BaseException as exc:  # raised again on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="lowered-maker")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
