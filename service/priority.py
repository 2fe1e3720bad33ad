"""Thread priorities: the event loop before the work.

A worker process answers every connection on one event loop (HTTP and gRPC) while its threads decode images
and run inference. On a CPU those threads keep every core busy under load, and the loop, woken to read a
body or answer a 503, waits for a core like any of them: each step of a request then waits for the
scheduler. Linux keeps a nice value per thread: the threads that do the work raise theirs
(`worker_niceness`), so the scheduler runs the loop whenever it is ready, and the work takes every cycle the
loop leaves. ONNX Runtime starts its own threads when a session is made; they take the nice value of the
thread that makes it (`made_lowered`). A request's work handed to a shared thread pool (a JSON body's
estimate and parse, a gRPC tensor's copy: `as_work`) runs at that value too: were it above inference, a
client sending large bodies would be served before the others' images. Elsewhere than Linux the nice value
is the process's: nothing changes.

A nice value orders the worker's threads among themselves only: Linux shares the cores between groups of
processes (a container, a session's autogroup) before it shares them between threads, so a busy neighbour
still makes the loop wait for a core. `make_realtime` (the `loop_realtime_priority` setting, off by default,
needing CAP_SYS_NICE or a real-time limit, `RLIMIT_RTPRIO`) puts the loop's thread in the real-time class,
which runs before every ordinary thread of the host; the threads and processes it starts are ordinary.

The loop then never waits for a core, but it still waits for the interpreter lock, and an ordinary thread
that takes the lock can lose its core with it in hand (to the loop waking on that core, or to the host) and
keep the loop waiting until the scheduler runs it again. So beside a real-time loop, the threads that take
the lock for short Python steps and leave the heavy work to others join the class one priority below it
(`lift_steps`): the batcher's workers, the decode threads that only hand images to child processes, and the
threads of shared pools that take request work (`as_work`: a body's estimate, a form's split, a gRPC
message's decode, handing a large body to its parsing child), which there goes before inference, as the
loop's own reading of bodies does. The batcher's run threads are lifted too, and leave the class for each
run (`run_ordinary`): their Python steps around a run (taking it, handing its outputs back) are short,
while the run itself takes the cores. Inference, decoding and parsing in children stay ordinary and
lowered.
"""

from __future__ import annotations

import ctypes
import functools
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


_work_niceness = 0  # what `as_work` lowers a pool's thread to: the core's `worker_niceness`
_steps_priority = 0  # the real-time priority of threads that take short steps (`lift_steps`); 0: ordinary
_thread = threading.local()  # `lifted`: the real-time priority `lift_steps` gave the calling thread, or 0


def configure(niceness: int, loop_realtime_priority: int = 0) -> None:
    """The nice value of request work (`as_work`), and the loop's real-time priority, below which the
    threads of short steps run (`lift_steps`); set once, by the inference core."""
    global _work_niceness, _steps_priority
    _work_niceness = niceness
    _steps_priority = max(1, loop_realtime_priority - 1) if loop_realtime_priority > 0 else 0


def lift_steps() -> bool:
    """Beside a real-time loop, put the calling thread, which takes the interpreter lock for short steps
    only, in the real-time class one priority below the loop; whether it is there now. Refused once (no
    privilege: the loop's own warning says so), it is not asked again."""
    global _steps_priority
    if not _steps_priority:
        return False
    if make_realtime(_steps_priority) is None:
        _thread.lifted = _steps_priority
        return True
    _steps_priority = 0
    return False


def run_ordinary(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, native work that takes the cores (inference), run ordinary at the thread's nice value by a
    thread lifted for its steps (`lift_steps`), which is lifted again afterwards; elsewhere just `fn(*args)`.

    Both switches let the interpreter lock go or take it for one system call only: the thread holds the lock
    as an ordinary thread for the Python steps into and out of `fn`, not for the steps between runs."""
    lifted = getattr(_thread, "lifted", 0)
    if not lifted:
        return fn(*args)
    leave_realtime()
    try:
        return fn(*args)
    finally:
        if make_realtime(lifted) is None:  # the privilege that lifted it holds: never refused in practice
            _thread.lifted = lifted


def as_work(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, run at the nice value of request work on whatever pool thread runs it; beside a real-time loop,
    in the class of short steps (`lift_steps`), where the thread then stays.

    The rest of such a thread's time is short steps as well (its pool taking work and handing results back
    to the loop, BentoML's probes and metrics): made ordinary again after each piece, it held the lock in
    those steps as an ordinary thread, and lost its core with it in hand. Work that takes the cores and may
    land on a shared thread leaves the class first (`leave_steps`)."""

    def lowered(*args: object, **kwargs: object) -> T:
        if not getattr(_thread, "lifted", 0) and not lift_steps():
            lower_this_thread(_work_niceness)
        return fn(*args, **kwargs)

    return lowered


def leave_steps() -> None:
    """Make the calling thread ordinary again if `lift_steps` lifted it (a shared pool's thread that served
    request work), before work that takes the cores (loading and warming up models)."""
    if getattr(_thread, "lifted", 0):
        leave_realtime()


def leave_realtime() -> None:
    """Make the calling thread ordinary again (which needs no privilege), with the interpreter lock let go.

    The kernel may run another thread the moment this one leaves the class, and a thread that lost its core
    there with the lock in hand would keep the loop waiting: `os.sched_setscheduler` holds the lock, while
    ctypes lets it go around a C call."""
    _thread.lifted = 0
    call = _sched_setscheduler()
    if call is None or call(0, os.SCHED_OTHER, ctypes.byref(ctypes.c_int(0))) != 0:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@functools.cache
def _sched_setscheduler() -> Callable[..., int] | None:
    """The C library's call (ctypes lets the interpreter lock go around it), or None."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "sched_setscheduler", None)
    except OSError:
        return None


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


def make_realtime(priority: int) -> str | None:
    """Put the calling thread in `SCHED_FIFO` at `priority`; None when done, else why not.

    `SCHED_RESET_ON_FORK`: a thread or process it starts is ordinary again, at nice 0, so that no work thread
    inherits a class that would hold a core for as long as it computes."""
    if not PER_THREAD or not hasattr(os, "SCHED_FIFO"):
        return "real-time scheduling of one thread needs Linux"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as exc:  # EPERM: no CAP_SYS_NICE, an RLIMIT_RTPRIO below it, or no real-time budget
        return f"{exc.strerror or exc} (it needs CAP_SYS_NICE, or an RLIMIT_RTPRIO of {priority} or more)"
    return None
