"""The threads that decode and run inference run below the event loop (`service.priority`).

Each worker's event loop answers connections while its threads keep the cores busy; with a higher nice value
on the work threads (ONNX Runtime's included), the loop is run first whenever it is ready.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import priority
from service.batching import Batcher, Job
from service.config import Settings
from service.core import InferenceCore, NullObserver
from service.priority import made_lowered, make_realtime, thread_niceness
from tests.conftest import classify_now, encode
from tests.http_server import ROOT, descendants, running_server

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

    mine = thread_niceness()
    priority.configure(mine + 4)
    try:

        async def main() -> int:
            return await anyio.to_thread.run_sync(priority.as_work(thread_niceness))

        assert anyio.run(main) == mine + 4
        assert thread_niceness() == mine
    finally:
        priority.configure(0)


ORDINARY = (os.SCHED_OTHER, 0)


def _policy(tid: int, pid: int | None = None) -> tuple[int, int]:
    """A thread's scheduling class and real-time priority, as the kernel reports them (`/proc/.../stat`)."""
    stat = Path(f"/proc/{pid or os.getpid()}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command's name, which may hold spaces
    return int(fields[38]), int(fields[37])  # policy, rt_priority (fields 41 and 40 of proc(5))


def _realtime_allowed() -> bool:
    """Whether this process may put a thread in the real-time class (CAP_SYS_NICE), asked of a thread that
    ends at once."""
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(make_realtime(1)))
    thread.start()
    thread.join()
    return outcome == [None]


def test_a_realtime_thread_starts_ordinary_threads_or_says_why_it_is_not_realtime() -> None:
    seen: dict[str, object] = {}

    def loop_thread() -> None:
        seen["refused"] = make_realtime(7)
        seen["mine"] = _policy(threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=_policy(threading.get_native_id())))
        child.start()
        child.join()

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join()
    assert seen["child"] == ORDINARY  # never a work thread in the real-time class
    if seen["refused"] is None:
        assert seen["mine"] == (os.SCHED_FIFO, 7)
    else:
        assert "CAP_SYS_NICE" in str(seen["refused"])
        assert seen["mine"] == ORDINARY
    assert _policy(threading.get_native_id()) == ORDINARY  # the caller's thread is left as it was
    with pytest.raises(ValueError, match="loop_realtime_priority"):
        Settings(loop_realtime_priority=100).validate()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="becomes another user: root")
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_RTPRIO)[0] != 0, reason="a real-time limit is granted")
def test_without_the_privilege_the_thread_stays_ordinary_and_the_reason_says_what_it_needs() -> None:
    """As a user with no capability and no real-time limit (as in a container that drops them all). Request
    work beside a loop asked to be real-time is then lowered as it would be without."""
    code = (
        "import os; from service import priority; from service.priority import make_realtime; "
        "print(repr(make_realtime(5)), os.sched_getscheduler(0) == os.SCHED_OTHER); "
        "priority.configure(os.getpriority(os.PRIO_PROCESS, 0) + 3, loop_realtime_priority=5); "
        "print(priority.as_work(lambda: (os.sched_getscheduler(0), priority.thread_niceness()))(), "
        "priority.lift_steps())"
    )
    user = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps", "-all")
    if subprocess.run([*user, sys.executable, "-c", "import service"], cwd=ROOT, timeout=60).returncode:
        pytest.skip("another user cannot read this checkout or its Python")
    done = subprocess.run(
        [*user, sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    refused, lowered = done.stdout.strip().split("\n")
    assert refused == (
        "'Operation not permitted (it needs CAP_SYS_NICE, or an RLIMIT_RTPRIO of 5 or more)' True"
    )
    # lowered as without the setting, and not asked again
    assert lowered == f"({os.SCHED_OTHER}, {os.getpriority(os.PRIO_PROCESS, 0) + 3}) False", lowered


def test_beside_a_realtime_loop_a_batchers_worker_is_lifted_and_its_runs_stay_lowered() -> None:
    """The worker's steps, and its run thread's between runs, hold the interpreter lock: one priority below
    the loop, so that they never wait for a core with the lock in hand; the runs, which take the cores, are
    ordinary and lowered."""
    allowed = _realtime_allowed()
    mine = thread_niceness()
    ran: list[tuple[str, tuple[int, int], int]] = []

    def run(key: object, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append((threading.current_thread().name, _policy(threading.get_native_id()), thread_niceness()))
        return batch.reshape(batch.shape[0], -1)[:, :1] * 2

    priority.configure(mine + 7, loop_realtime_priority=5)
    b = Batcher(
        run, max_batch_size=4, max_wait_s=0.0, queue_size=8, observer=NullObserver(), niceness=mine + 7
    )
    try:
        for value in (3.0, 4.0):
            b.admit(1, preparing=False)
            job = Job("m", np.full((1, 1, 2, 2), value, np.float32), Future(), 1e12)
            b.submit(job, from_preparing=False)
            assert job.future.result(10).tolist() == [[2 * value]]
        assert ran == [("batcher-0-run_0", ORDINARY, mine + 7)] * 2  # each run, the second as the first
        lifted = (os.SCHED_FIFO, 4) if allowed else ORDINARY
        (worker,) = b._threads
        (run_thread,) = [t for t in threading.enumerate() if t.name == "batcher-0-run_0"]
        assert _policy(worker.native_id) == lifted
        assert (_policy(run_thread.native_id), thread_niceness(run_thread.native_id)) == (lifted, mine + 7)
    finally:
        b.stop(5)
        priority.configure(0)


def _on_a_thread_beside_a_realtime_loop(target: Callable[[], None], niceness: int) -> None:
    """`target` on a thread of its own, request work at `niceness`, the loop at real-time priority 5."""
    priority.configure(niceness, loop_realtime_priority=5)
    try:
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    finally:
        priority.configure(0)


def test_a_lifted_thread_runs_native_work_ordinary_and_is_lifted_again_even_when_it_fails() -> None:
    allowed = _realtime_allowed()
    mine = thread_niceness()
    seen: list[object] = []

    def fail() -> None:
        raise RuntimeError("inference failed")

    def lifted_thread() -> None:
        tid = threading.get_native_id()
        priority.lower_this_thread(mine + 3)
        seen.append(priority.lift_steps())
        seen.append(priority.run_ordinary(lambda: (_policy(tid), thread_niceness())))
        seen.append(_policy(tid))
        with pytest.raises(RuntimeError, match="inference failed"):
            priority.run_ordinary(fail)
        seen.append(_policy(tid))

    _on_a_thread_beside_a_realtime_loop(lifted_thread, mine + 3)
    lifted = (os.SCHED_FIFO, 4) if allowed else ORDINARY
    assert seen == [allowed, (ORDINARY, mine + 3), lifted, lifted]


def test_beside_a_realtime_loop_a_pool_thread_that_takes_request_work_stays_lifted_until_it_loads() -> None:
    """A shared pool's thread keeps the class between pieces of request work (its pool's own steps hold the
    lock too); loading models, which takes the cores, leaves it first."""
    allowed = _realtime_allowed()
    mine = thread_niceness()
    seen: dict[str, object] = {}

    def pool_thread() -> None:
        tid = threading.get_native_id()
        seen["during"] = priority.as_work(lambda: (_policy(tid), thread_niceness()))()
        seen["after"] = (_policy(tid), thread_niceness())
        seen["again"] = priority.as_work(lambda: _policy(tid))()
        priority.leave_steps()
        seen["left"] = (_policy(tid), thread_niceness())

    _on_a_thread_beside_a_realtime_loop(pool_thread, mine + 4)
    if allowed:
        lifted = ((os.SCHED_FIFO, 4), mine)
        assert seen == {"during": lifted, "after": lifted, "again": lifted[0], "left": (ORDINARY, mine)}
    else:  # lowered, as without a real-time loop
        lowered = (ORDINARY, mine + 4)
        assert seen == {"during": lowered, "after": lowered, "again": ORDINARY, "left": lowered}


def test_a_core_loaded_on_a_thread_that_took_request_work_warms_up_out_of_the_realtime_class(
    tiny_repo: Path,
) -> None:
    mine = thread_niceness()
    seen: list[tuple[int, int]] = []

    def pool_thread() -> None:
        tid = threading.get_native_id()
        priority.as_work(lambda: None)()  # a gRPC message's decode, say: the thread is lifted
        seen.append(_policy(tid))
        core = InferenceCore(
            Settings(
                repository=str(tiny_repo),
                models=("tiny",),
                worker_niceness=mine + 7,
                loop_realtime_priority=5,
            )
        )
        try:
            core.load()
            seen.append(_policy(tid))
        finally:
            core.close()

    allowed = _realtime_allowed()
    _on_a_thread_beside_a_realtime_loop(pool_thread, mine + 7)
    assert seen == [(os.SCHED_FIFO, 4) if allowed else ORDINARY, ORDINARY]


def test_beside_a_realtime_loop_decode_threads_are_lifted_only_where_children_decode(
    tiny_repo: Path, chelsea: Image.Image
) -> None:
    allowed = _realtime_allowed()
    mine = thread_niceness()
    lifted = (os.SCHED_FIFO, 4) if allowed else ORDINARY
    for processes in (True, False):
        core = _loaded_core(tiny_repo, mine + 7, decode_processes=processes, loop_realtime_priority=5)
        try:
            (answer,) = classify_now(core, [encode(chelsea)], model="tiny")
            assert answer.top_k
            pool = [t.native_id for t in core._pool._threads]
            if processes:  # they only hand images to their children, and never run inference
                assert [_policy(tid) for tid in pool] == [lifted, lifted] and not core._run_here
                assert core.decoders is not None and core.decoders.pids()
                assert all(_policy(pid, pid) == ORDINARY for pid in core.decoders.pids())
            else:  # they decode: ordinary, lowered
                assert [(_policy(tid), thread_niceness(tid)) for tid in pool] == [(ORDINARY, mine + 7)] * 2
            (worker,) = core.batcher._threads
            assert _policy(worker.native_id) == lifted
            assert _policy(threading.get_native_id()) == ORDINARY  # the caller is left as it was
        finally:
            core.close()
            priority.configure(0)


def test_a_lifted_decode_thread_never_runs_inference_even_with_the_work_at_the_loops_nice_value(
    tiny_repo: Path,
) -> None:
    core = InferenceCore(
        Settings(
            repository=str(tiny_repo),
            models=("tiny",),
            worker_niceness=0,
            decode_processes=True,
            loop_realtime_priority=5,
        )
    )
    try:
        assert not core._run_here
    finally:
        core.close()
        priority.configure(0)


def test_a_served_worker_runs_its_event_loop_and_its_steps_only_in_the_realtime_class(
    tmp_path: Path, chelsea: Image.Image
) -> None:
    """With `loop_realtime_priority` the worker's loop thread (its main thread) is real-time where the
    process may be, and one below it the threads of short steps (the batcher's worker and its run thread
    between runs, the two decode threads that hand images to children), and nothing else: not ONNX Runtime's
    threads, not its decoding children; it serves."""
    import httpx

    allowed = _realtime_allowed()
    flags = ("--models", "efficientnet_lite0", "--decode-processes", "--loop-realtime-priority", "3")
    with running_server(tmp_path, *flags) as server:
        answer = httpx.post(server.url + "/classify", content=encode(chelsea, "JPEG", quality=90), timeout=30)
        assert answer.status_code == 200, answer.text
        (worker,) = [p for p in descendants(server) if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        children = worker.children(recursive=True)
        policies = {}
        for p in [worker, *children]:
            for t in p.threads():
                with contextlib.suppress(FileNotFoundError):  # a pool's thread that ended meanwhile
                    policies[p.pid, t.id] = _policy(t.id, p.pid)
        realtime = {key: policy for key, policy in policies.items() if policy[0] != os.SCHED_OTHER}
        log = server.log()
        assert "full garbage collections run on the event loop's thread" in log  # whatever its class
        if allowed:
            assert realtime.pop((worker.pid, worker.pid)) == (os.SCHED_FIFO, 3), realtime
            steps = {key: policy for key, policy in realtime.items() if key[0] == worker.pid}
            assert sorted(steps.values()) == [(os.SCHED_FIFO, 2)] * 4 and steps == realtime, realtime
            assert "the event loop runs at real-time priority 3" in log
        else:
            assert realtime == {}
            assert "the event loop stays in the ordinary scheduling class" in log and "CAP_SYS_NICE" in log
        assert children and len(policies) > 10, policies  # its threads and its children, all looked at
