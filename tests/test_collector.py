"""Full garbage collections on the event loop's thread (`service.collector`), with real collections."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from service.collector import SUPPORTED, LoopCollector

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="CPython 3.14's collector has no full pass to move")


class Node:
    """A cycle's link, which a weak reference can watch."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def full_passes() -> Iterator[list[int]]:
    """The thread (its ident) that ran each full collection while the test ran."""
    threads: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start" and info.get("generation") == 2:
            threads.append(threading.get_ident())

    gc.collect()
    gc.callbacks.append(seen)
    try:
        yield threads
    finally:
        gc.callbacks.remove(seen)


def _on_a_thread(work: Callable[[threading.Event], None]) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), name="allocating", daemon=True)
    thread.start()
    return thread, stop


def _growing(kept: list[object]) -> Callable[[threading.Event], None]:
    """A thread whose objects stay: the heap grows."""

    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            kept.extend({"k": [1, 2]} for _ in range(500))
            time.sleep(0.002)

    return work


def _old_cycles(count: int) -> list[weakref.ref]:
    """Cycles moved to the oldest generation, then dropped: only a full collection frees them."""
    firsts = []
    for _ in range(count):
        a, b = Node(), Node()
        a.other, b.other = b, a
        firsts.append(a)
    gc.collect(1)  # the survivors of the young generations move to the oldest
    refs = [weakref.ref(a) for a in firsts]
    firsts.clear()
    return refs


def test_full_collections_run_on_the_loop_thread_and_still_free_cycles(full_passes: list[int]) -> None:
    kept: list[object] = []

    async def serve() -> tuple[int, int, int]:
        collector = LoopCollector(check_s=0.05)
        cycles = _old_cycles(1_000)
        assert collector.start()
        thread, stop = _on_a_thread(_growing(kept))
        try:
            deadline = time.monotonic() + 20
            while (collector.collections < 3 or any(r() for r in cycles)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            thread.join()
            await collector.stop()
        return threading.get_ident(), collector.collections, sum(r() is not None for r in cycles)

    loop_thread, ran, alive = asyncio.run(serve())
    assert ran >= 3, "a growing heap got no full collection"
    assert alive == 0, "cycles in the oldest generation were never freed"
    assert full_passes, "no full collection ran"
    assert set(full_passes) == {loop_thread}, "a full collection ran on the allocating thread"


def _rounds_until(done: Callable[[], bool], limit: int = 200) -> int:
    """Rounds of a heap that grows and shrinks back (objects kept through young collections, then freed by
    reference counting), until `done()`; the round it became true in."""
    for round_ in range(1, limit + 1):
        held = [{"k": [1, 2]} for _ in range(5_000)]
        del held
        if done():
            return round_
    raise AssertionError(f"not done after {limit} rounds")


def test_a_full_collection_falls_due_when_python_would_run_one(full_passes: list[int]) -> None:
    """The same heap's history from the same start: the round in which Python's own schedule runs a full
    collection, and the round after which the loop's collector says one is due."""
    gc.collect()
    full_passes.clear()
    by_python = _rounds_until(lambda: bool(full_passes))

    async def with_collector() -> int:
        collector = LoopCollector(check_s=3600)
        gc.collect()
        assert collector.start()
        full_passes.clear()
        try:
            return _rounds_until(collector.due)
        finally:
            await collector.stop()

    by_loop = asyncio.run(with_collector())
    assert not full_passes, "Python ran a full collection of its own while the collector held them"
    assert by_python >= 5, "the heap's history was too short to tell"
    assert abs(by_loop - by_python) <= 2, (by_loop, by_python)


def test_stop_gives_full_collections_back_to_python() -> None:
    before = gc.get_threshold()

    async def serve() -> tuple[int, ...]:
        collector = LoopCollector()
        assert collector.start()
        assert not collector.start(), "started twice"
        during = gc.get_threshold()
        await collector.stop()
        return during

    during = asyncio.run(serve())
    assert during[:2] == before[:2] and during[2] > 10**6
    assert gc.get_threshold() == before
