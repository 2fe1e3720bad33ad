"""The event loop's lag and its cause (`service.looplag`), on real loops, threads and busy processes.

A late sample is put down to the garbage collector when it ran for at least half the lag; otherwise to
waiting for a core when the loop's thread was ready but off a core for at least half the lag; otherwise to
the loop's own callbacks when the thread ran, and to a lock when it was blocked. Each is made to happen here:
a full collection of a large heap on another thread, a callback that holds the loop, a thread that holds the
interpreter lock, and a loop thread at nice 19 behind busy processes on its core.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from service.looplag import LoopLagMonitor, sched_s
from service.metrics import Metrics
from service.priority import lower_this_thread

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the wait for a core: Linux's schedstat"
)


def _late(metrics: Metrics, cause: str, over: str) -> float:
    value = metrics.registry.get_sample_value(
        "cnn_serve_event_loop_late_samples_total", {"cause": cause, "over": over}
    )
    return value or 0.0


def _watch(
    metrics: Metrics,
    seconds: float,
    during: Callable[[], None] | None = None,
    thread: threading.Thread | None = None,
) -> LoopLagMonitor:
    """Run a loop with the monitor on it for `seconds` in the calling thread; `during()` on it at 0.2 s.
    With a `thread`, the monitor watches until it has ended and the window it ended in is reported (on a
    busy host its work may outlast `seconds`)."""

    async def main() -> LoopLagMonitor:
        monitor = LoopLagMonitor(metrics, interval_s=0.02)
        monitor.start()
        if during is not None:
            asyncio.get_running_loop().call_later(0.2, during)
        await asyncio.sleep(seconds)
        if thread is not None:
            while thread.is_alive():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
        await monitor.stop()
        return monitor

    return asyncio.run(main())


def test_a_callback_that_holds_the_loop_is_late_by_its_callbacks() -> None:
    metrics = Metrics(CollectorRegistry())

    def hold() -> None:
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end:
            pass

    monitor = _watch(metrics, 0.6, hold)
    assert monitor.max_lag >= 0.1
    assert _late(metrics, "callbacks", "0.05") >= 1
    assert _late(metrics, "core_wait", "0.05") == 0
    assert _late(metrics, "lock", "0.05") == 0
    samples = metrics.registry.get_sample_value("cnn_serve_event_loop_lag_seconds_count")
    assert samples is not None and samples >= 10


def test_a_thread_that_holds_the_interpreter_lock_makes_the_loop_late_by_the_lock() -> None:
    """A large integer power is one C call that never lets the lock go, for a good part of a second: the
    loop's thread wakes from its sleep and waits for the lock, neither running nor waiting for a core."""
    metrics = Metrics(CollectorRegistry())
    worker = threading.Thread(target=pow, args=(7, 1_000_000))
    monitor = _watch(metrics, 0.8, worker.start, worker)
    worker.join()
    assert monitor.max_lag >= 0.05
    assert _late(metrics, "lock", "0.05") >= 1
    assert _late(metrics, "callbacks", "0.05") == 0


def test_a_full_collection_on_another_thread_makes_the_loop_late_by_the_collector() -> None:
    """The collector holds the interpreter lock for its whole pass, on whichever thread runs it: the loop
    waits for it as for a lock, and the sample is put down to the collector, whose passes are counted."""
    import gc

    metrics = Metrics(CollectorRegistry())
    heap = [[i] for i in range(2_000_000)]  # two million containers for a full pass to walk
    worker = threading.Thread(target=gc.collect)
    try:
        monitor = _watch(metrics, 0.8, worker.start, worker)
        worker.join()
    finally:
        del heap
    assert monitor.max_lag >= 0.05
    assert _late(metrics, "gc", "0.05") >= 1
    assert _late(metrics, "lock", "0.05") == 0 and _late(metrics, "callbacks", "0.05") == 0
    full = metrics.registry.get_sample_value("cnn_serve_gc_collections_total", {"generation": "2"})
    seconds = metrics.registry.get_sample_value("cnn_serve_gc_seconds_total", {"generation": "2"})
    assert full is not None and full >= 1
    assert seconds is not None and seconds >= 0.05
    assert gc.callbacks.count(monitor.collector._callback) == 0  # removed when the monitor stopped


def test_the_collector_clock_counts_a_pass_whose_end_is_not_yet_counted() -> None:
    """The end's callback is Python code: the loop's thread can take the interpreter lock from it before it
    has counted the pass (on a busy host it did, and a long pass was put down to the lock). The clock's time
    includes the pass under way, and counts it once."""
    import gc

    from service.looplag import CollectorClock

    clock = CollectorClock()
    clock.install()
    try:
        gc.collect()
        finished = clock.spent_s(time.perf_counter())
        assert clock.collections[2] == 1 and finished == pytest.approx(sum(clock.seconds))
        # the loop's view inside a pass: its start seen, its end not yet
        before = time.perf_counter()
        clock._callback("start", {"generation": 2})
        time.sleep(0.05)
        inside = clock.spent_s(time.perf_counter())
        assert inside - finished >= 0.05 and clock.collections[2] == 1
        clock._callback("stop", {"generation": 2})
        elapsed = time.perf_counter() - before
        after = clock.spent_s(time.perf_counter() + 10)  # no pass under way: the time stands still
        assert clock.collections[2] == 2 and 0.05 <= after - finished <= elapsed
        assert after == pytest.approx(sum(clock.seconds))
    finally:
        clock.remove()


def _spin(seconds: float, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def keep_busy() -> None:
    """A callback of 1 ms of the thread's CPU that schedules itself again."""
    end = time.thread_time() + 0.001
    while time.thread_time() < end:
        pass
    asyncio.get_running_loop().call_soon(keep_busy)


@pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) > 10, reason="this process runs near nice 15")
def test_a_loop_starved_of_cores_is_late_by_waiting_for_one() -> None:
    """A busy process at this process's nice value and the loop's thread at 15, both on one core (however
    many the machine has). The loop always has work (callbacks of 1 ms of its CPU, one after another): a loop
    that mostly sleeps is let run at once when it wakes, by Linux's EEVDF scheduler, however low its
    priority."""
    metrics = Metrics(CollectorRegistry())
    result: list[LoopLagMonitor] = []
    waits: list[tuple[float, float] | None] = []

    cpu = min(os.sched_getaffinity(0))

    def loop_thread() -> None:
        os.sched_setaffinity(0, {cpu})  # this thread's only
        lower_this_thread(15)
        waits.append(sched_s())
        result.append(_watch(metrics, 3.0, keep_busy))
        waits.append(sched_s())

    ctx = multiprocessing.get_context("spawn")
    spinner = ctx.Process(target=_spin, args=(4.5, cpu), daemon=True)
    spinner.start()
    time.sleep(1.0)  # the child past its start-up, spinning on that core
    watcher = threading.Thread(target=loop_thread)
    watcher.start()
    watcher.join(30)
    spinner.join(30)
    assert result, "the loop did not finish"
    start, end = waits
    assert start is not None and end is not None and end[1] - start[1] > 0.2  # it waited for cores, counted
    waited = metrics.registry.get_sample_value("cnn_serve_event_loop_core_wait_seconds_total")
    assert waited is not None and waited > 0.2
    starved = _late(metrics, "core_wait", "0.025")
    assert starved >= 5
    assert starved > _late(metrics, "callbacks", "0.025") + _late(metrics, "lock", "0.025")
