"""The threads that decode and run inference run below the event loop (`service.priority`).

Each worker's event loop answers connections while its threads keep the cores busy; with a higher nice value
on the work threads (ONNX Runtime's included), the loop is run first whenever it is ready.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.batching import Batcher, Job
from service.config import Settings
from service.core import InferenceCore, NullObserver
from service.priority import made_lowered, thread_niceness
from tests.conftest import classify_now, encode

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values: Linux"),
    pytest.mark.skipif(
        os.getpriority(os.PRIO_PROCESS, 0) > 12, reason="this process runs at a nice value near 19"
    ),
]


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _loaded_core(repository: Path, niceness: int, **settings: object) -> InferenceCore:
    """The tiny model's core, two decode threads, its work at `niceness`."""
    core = InferenceCore(
        Settings(
            repository=str(repository),
            models=("tiny",),
            worker_niceness=niceness,
            decode_threads=2,
            **settings,  # type: ignore[arg-type]
        )
    )
    core.load()
    return core


def test_decode_batcher_and_onnx_runtime_threads_run_below_the_caller(
    tiny_repo: Path, chelsea: Image.Image
) -> None:
    mine = thread_niceness()
    before = _tasks()
    core = _loaded_core(tiny_repo, mine + 7, intra_op_threads=2)
    try:
        (answer,) = classify_now(core, [encode(chelsea)], model="tiny")
        assert answer.top_k
        python_threads = {t.native_id for t in threading.enumerate()}
        pool = [t.native_id for t in core._pool._threads]
        batcher = [t.native_id for t in core.batcher._threads]
        assert len(pool) == 2 and len(batcher) == 1
        for tid in pool:
            assert thread_niceness(tid) == mine + 7, tid
        # The batcher's worker holds the interpreter lock for its own steps: it keeps the caller's priority
        # and runs its batches on a lowered thread (`test_a_batchers_runs_are_lowered_and_its_own_steps_not`).
        assert thread_niceness(batcher[0]) == mine
        # ONNX Runtime's own threads (not Python's) were started by a session made on a lowered thread
        runtime = [t for t in _tasks() - before if t not in python_threads]
        assert runtime and all(thread_niceness(t) == mine + 7 for t in runtime), runtime
        assert thread_niceness() == mine  # the caller (the event loop's thread in a server) keeps its own
    finally:
        core.close()


def test_with_decode_processes_the_children_are_lowered_and_the_threads_that_wait_on_them_not(
    tiny_repo: Path, chelsea: Image.Image
) -> None:
    mine = thread_niceness()
    core = _loaded_core(tiny_repo, mine + 7, decode_processes=True)
    runs: list[int] = []  # the nice value of each batch's thread
    run = core.batcher._run

    def recorded(*args: object, **kwargs: object) -> np.ndarray:
        runs.append(thread_niceness())
        return run(*args, **kwargs)

    core.batcher._run = recorded
    try:
        for _ in range(3):  # one at a time: a lone job, which a lowered decode thread would run itself
            (answer,) = classify_now(core, [encode(chelsea)], model="tiny")
            assert answer.top_k
        answers = classify_now(core, [encode(chelsea)] * 4, model="tiny")
        assert all(answer.top_k for answer in answers)
        assert runs and all(niceness == mine + 7 for niceness in runs), runs  # inference below the loop
        pool = [t.native_id for t in core._pool._threads]
        assert len(pool) == 2 and all(thread_niceness(tid) == mine for tid in pool)
        assert core.decoders is not None
        children = core.decoders.pids()
        assert children
        deadline = time.monotonic() + 10  # a child lowers itself as it starts
        while any(os.getpriority(os.PRIO_PROCESS, pid) != mine + 7 for pid in children):
            assert time.monotonic() < deadline, [os.getpriority(os.PRIO_PROCESS, pid) for pid in children]
            time.sleep(0.05)
    finally:
        core.close()


def test_a_batchers_runs_are_lowered_and_its_own_steps_not() -> None:
    mine = thread_niceness()
    ran: list[tuple[str, int]] = []

    def run(key: object, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append((threading.current_thread().name, thread_niceness()))
        return batch.reshape(batch.shape[0], -1)[:, :1] * 2

    b = Batcher(
        run, max_batch_size=4, max_wait_s=0.0, queue_size=8, observer=NullObserver(), niceness=mine + 7
    )
    try:
        for value in (1.0, 2.0):
            b.admit(1, preparing=False)
            job = Job("m", np.full((1, 1, 2, 2), value, np.float32), Future(), 1e12)
            b.submit(job, from_preparing=False)  # from a thread that must not block: a worker runs it
            assert job.future.result(10).tolist() == [[2 * value]]
        assert ran == [("batcher-0-run_0", mine + 7)] * 2  # one lowered thread, kept between batches
        (worker,) = b._threads
        assert thread_niceness(worker.native_id) == mine
    finally:
        b.stop(5)
    assert not any(t.name.startswith("batcher-0-run") for t in threading.enumerate())  # ended with its worker


def test_niceness_zero_changes_nothing(tiny_repo: Path) -> None:
    mine = thread_niceness()
    core = InferenceCore(Settings(repository=str(tiny_repo), models=("tiny",), worker_niceness=0))
    core.load()
    try:
        core.batcher.start()
        assert all(thread_niceness(t.native_id) == mine for t in core._pool._threads + core.batcher._threads)
    finally:
        core.close()


def test_made_lowered_returns_or_raises_on_the_callers_thread() -> None:
    mine = thread_niceness()
    assert made_lowered(mine + 3, thread_niceness) == mine + 3
    with pytest.raises(ValueError, match="bad"):
        made_lowered(mine + 3, lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert thread_niceness() == mine
    with pytest.raises(ValueError, match="worker_niceness"):
        Settings(worker_niceness=20).validate()


def test_request_work_on_a_shared_pool_runs_at_the_work_niceness() -> None:
    """A JSON body's estimate and parse run on anyio's (or asyncio's) shared threads: at the work's nice
    value, not above inference."""
    import anyio

    from service import priority

    mine = thread_niceness()
    priority.configure(mine + 4)
    try:

        async def main() -> int:
            return await anyio.to_thread.run_sync(priority.as_work(thread_niceness))

        assert anyio.run(main) == mine + 4
        assert thread_niceness() == mine
    finally:
        priority.configure(0)
