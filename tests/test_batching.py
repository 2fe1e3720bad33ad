"""The adaptive batcher: batches form under concurrency, a full queue answers at once, deadlines drop work."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.batching import Batcher, Job
from service.config import Settings
from service.core import InferenceCore, NullObserver, Prediction
from service.errors import DeadlineExceeded, InvalidArgument, Overloaded, ServiceError
from service.sessions import pick_batch, pick_turn
from tests.conftest import classify_now, encode


class Recorder(NullObserver):
    """A real observer that keeps what the core reports (the Prometheus one is tested in test_metrics)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list] = {"queue_depth": [], "queue_wait": [], "preprocess": [], "inference": []}

    def queue_depth(self, n: int) -> None:
        with self.lock:
            self.calls["queue_depth"].append(n)

    def queue_wait(self, seconds: float) -> None:
        with self.lock:
            self.calls["queue_wait"].append(seconds)

    def preprocess(self, seconds: float) -> None:
        with self.lock:
            self.calls["preprocess"].append(seconds)

    def inference(self, seconds: float, batch_size: int, model: str, version: str) -> None:
        with self.lock:
            self.calls["inference"].append((seconds, batch_size, model, version))


def _images(chelsea: Image.Image, n: int) -> list[bytes]:
    return [encode(chelsea.rotate(7 * i).resize((120, 80)), "PNG") for i in range(n)]


def test_batch_cap_is_the_largest_near_tie_of_the_cheapest() -> None:
    # costs seen on a 2-vCPU host for EfficientNet-Lite0 (CPU seconds per image): batch 4 is the cheapest and
    # batch 8 is 7% dearer, so batches are capped at 4
    cpu = {1: 6.4e-3, 2: 5.4e-3, 4: 5.1e-3, 8: 5.5e-3, 16: 5.9e-3, 32: 6.9e-3}
    assert pick_batch(cpu) == 4
    # a GPU: the cost falls, then flattens; the largest bucket of the flat part wins the near tie
    gpu = {1: 1.0e-3, 8: 2.0e-4, 64: 5.1e-5, 128: 5.0e-5, 256: 5.1e-5}
    assert pick_batch(gpu) == 256
    assert pick_batch(gpu, tolerance=0.0) == 128
    assert pick_batch({1: 3e-3, 2: float("inf")}) == 1  # a bucket never timed never wins
    with pytest.raises(ValueError, match="no batch size"):
        pick_batch({})


def test_a_large_requests_turn_runs_at_most_twice_as_long_as_one_image() -> None:
    # the 2-vCPU costs above: one image's run costs 6.4 ms; two images' 10.8 ms, four images' 20.4 ms
    cpu = {1: 6.4e-3, 2: 5.4e-3, 4: 5.1e-3, 8: 5.5e-3, 16: 5.9e-3, 32: 6.9e-3}
    assert pick_turn(cpu) == 2
    assert pick_turn(cpu, factor=4.0) == 4
    # a GPU's run hardly grows with the batch at first: eight images take 1.6 ms against one's 1 ms
    gpu = {1: 1.0e-3, 8: 2.0e-4, 64: 5.1e-5, 128: 5.0e-5, 256: 5.1e-5}
    assert pick_turn(gpu) == 8
    assert pick_turn({4: 3e-3}) == 4  # a fixed-batch graph: its one bucket
    assert pick_turn({1: 3e-3, 2: float("inf")}) == 1
    with pytest.raises(ValueError, match="no batch size"):
        pick_turn({})


def test_warm_up_costs_cpu_sessions_in_cpu_time(tiny_repo: Path) -> None:
    """On CPU the cost is the process's CPU time, and model_info says which clock its figures are."""
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", max_batch_size=8))
    core.load()
    try:
        session = core._entry("tiny", None).session
        assert not session.on_gpu
        assert set(session.per_image_s) == set(session.buckets)
        assert all(0 <= t < 1 for t in session.per_image_s.values())
        assert session.preferred_batch == pick_batch(session.per_image_s)
        info = core.model_info("tiny")
        assert (
            info.runtime["per_image_clock"] == "cpu"
            and info.runtime["preferred_batch"] == session.preferred_batch
        )
    finally:
        core.close()


def test_concurrent_callers_share_batches(tiny_repo: Path, chelsea: Image.Image) -> None:
    obs = Recorder()
    core = InferenceCore(
        Settings(repository=str(tiny_repo), default_model="tiny", max_batch_size=16, max_wait_ms=20), obs
    )
    core.load()
    session = core._entry("tiny", None).session
    assert session.per_image_s and session.preferred_batch in session.buckets  # measured at warm-up
    session.preferred_batch = 16  # the warm-up measurement is timing-dependent; pin it for this test
    images = _images(chelsea, 24)
    try:
        alone = [classify_now(core, [b])[0].probabilities for b in images]
        obs.calls["inference"].clear()

        async def callers() -> list:
            return await asyncio.gather(*(core.classify([b], tta="flip") for b in images))

        together = asyncio.run(callers())
        sizes = [b for _, b, _, _ in obs.calls["inference"]]
        assert sum(sizes) == 2 * len(images) and max(sizes) > 2 and max(sizes) <= 16  # views, batched
        assert all((m, v) == ("tiny", "2") for _, _, m, v in obs.calls["inference"])  # the latest serves
        flip_alone = [classify_now(core, [b], tta="flip")[0].probabilities for b in images]
        for (p,), ref in zip(together, flip_alone, strict=True):
            np.testing.assert_allclose(p.probabilities, ref, atol=1e-5)
        assert not all(np.allclose(a, f) for a, f in zip(alone, flip_alone, strict=True))
        assert obs.calls["preprocess"] and obs.calls["queue_wait"] and obs.calls["queue_depth"]
    finally:
        core.close()


def _gated_batcher(queue_size: int = 4) -> tuple[Batcher, threading.Event, list]:
    gate, ran = threading.Event(), []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append((key, batch.shape[0]))
        gate.wait(5)
        return batch.reshape(batch.shape[0], -1).sum(axis=1, keepdims=True)

    b = Batcher(run, max_batch_size=4, max_wait_s=0.0, queue_size=queue_size, observer=NullObserver())
    return b, gate, ran


def _job(key: str, n: int = 1, deadline: float = 1e12) -> Job:
    return Job(key, np.ones((n, 1, 2, 2), np.float32), Future(), deadline)


def test_full_queue_answers_overloaded_at_once() -> None:
    b, gate, _ = _gated_batcher(queue_size=2)
    b.admit(2)
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        b.admit(1)
    assert time.monotonic() - t0 < 0.1
    b.release(2)
    b.admit(1)  # room again once answered
    gate.set()
    b.stop(1)


def test_core_overload_is_typed(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", queue_size=2))
    core.load()
    try:
        core.batcher.admit(1, preparing=False)  # one view already waiting
        with pytest.raises(Overloaded):
            classify_now(core, _images(chelsea, 2))
        core.batcher.release(1)
        # More views than the whole queue holds would never fit: a client error, not a 503 to retry.
        with pytest.raises(InvalidArgument, match="3 views in one request; the queue holds 2 views"):
            classify_now(core, _images(chelsea, 3))
        with pytest.raises(InvalidArgument, match="4 views in one request; the queue holds 2 views"):
            classify_now(core, _images(chelsea, 2), tta="flip")  # two images, but two views each
        assert all(isinstance(p, Prediction) for p in classify_now(core, _images(chelsea, 2)))
        assert core.batcher.outstanding == 0
    finally:
        core.close()


def test_expired_requests_dropped_before_inference() -> None:
    b, gate, ran = _gated_batcher()
    first = _job("m")
    b.admit(2, preparing=False)
    b.submit(first, from_preparing=False)
    time.sleep(0.05)  # the worker is now inside run() for `first`
    late = _job("m", deadline=time.monotonic() + 0.05)
    b.submit(late, from_preparing=False)
    time.sleep(0.1)
    gate.set()
    assert first.future.result(2)[0, 0] == 4.0
    with pytest.raises(DeadlineExceeded):
        late.future.result(2)
    assert ran == [("m", 1)]  # the late job never reached inference
    b.stop(1)


def test_batches_group_by_model_and_respect_max_size() -> None:
    b, gate, ran = _gated_batcher()
    gate.set()
    jobs = [_job("a", 3), _job("b", 1), _job("a", 2), _job("a", 1)]
    b._stopping = False
    with b._cond:  # queue them together, as if they arrived while the worker was busy
        b._queue.extend(jobs)
    b.start()
    with b._cond:
        b._cond.notify_all()
    for j in jobs:
        assert j.future.result(2).shape == (j.views.shape[0], 1)
    assert ran[0] == ("a", 4) and ("b", 1) in ran and sum(n for _, n in ran) == 7
    b.stop(1)


def test_past_deadline_through_the_core(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    core.load()
    try:
        (r,) = classify_now(core, _images(chelsea, 1), deadline=time.monotonic() - 1)
        assert isinstance(r, DeadlineExceeded)
        (r,) = asyncio.run(core.classify(_images(chelsea, 1), deadline=time.monotonic() - 1))
        assert isinstance(r, DeadlineExceeded)
    finally:
        core.close()


def test_batch_limit_caps_views_per_call() -> None:
    ran = []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append(batch.shape[0])
        return batch.reshape(batch.shape[0], -1).sum(axis=1, keepdims=True)

    b = Batcher(
        run,
        max_batch_size=8,
        max_wait_s=0.0,
        queue_size=16,
        observer=NullObserver(),
        batch_limit=lambda key: 2,
    )
    job = _job("a", 5)
    b.admit(1, preparing=False)
    b.submit(job, from_preparing=False)
    assert job.future.result(2).shape == (5, 1)
    assert ran == [2, 2, 1]
    b.stop(1)


def test_close_while_an_image_is_decoding_answers_it_and_stays_closed(tiny_repo: Path) -> None:
    """close() once stopped the batcher first: the image still decoding then restarted it, and every later
    call failed with an untyped RuntimeError while its admission leaked."""
    rng = np.random.default_rng(0)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(big, "JPEG", quality=95)
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", preprocess_mode="exact"))
    core.load()
    answers: list = []
    caller = threading.Thread(target=lambda: answers.extend(classify_now(core, [big.getvalue()])))
    caller.start()
    time.sleep(0.1)  # decoding a 12 MP JPEG at full size takes longer than this
    core.close()
    caller.join(60)
    assert len(answers) == 1 and isinstance(answers[0], Prediction), answers
    assert not core.batcher.alive
    with pytest.raises(Overloaded, match="shutting down"):
        classify_now(core, [big.getvalue()])
    assert core.batcher.outstanding == 0 and core.batcher._preparing == 0


def test_an_empty_tensor_is_invalid(tiny_repo: Path) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    core.load()
    try:
        with pytest.raises(InvalidArgument, match="N >= 1"):
            asyncio.run(core.infer_tensor("tiny", None, np.zeros((0, 3, 32, 32), np.float32)))
    finally:
        core.close()


def test_the_worker_survives_a_failing_observer() -> None:
    """Anything raising outside inference (here the metrics observer) fails that batch's callers, never the
    worker: a dead worker would leave every later job waiting until its deadline."""

    class Flaky(NullObserver):
        calls = 0

        def queue_wait(self, seconds: float) -> None:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("scrape failed")

    b = Batcher(
        lambda key, x, alone=False: x.sum(axis=(1, 2, 3))[:, None],
        max_batch_size=4,
        max_wait_s=0.0,
        queue_size=8,
        observer=Flaky(),
    )
    first, second = _job("m"), _job("m")
    b.admit(2, preparing=False)
    b.submit(first, from_preparing=False)
    with pytest.raises(ServiceError, match="inference failed: RuntimeError"):
        first.future.result(10)
    b.submit(second, from_preparing=False)
    assert second.future.result(10).shape == (1, 1)
    b.stop(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_run_so_many_batches_at_once(workers: int) -> None:
    """With n workers, n batches are in ONNX Runtime at once (never more); every job is answered, and stop
    ends every worker."""
    lock, running, peak = threading.Lock(), [0], [0]
    both = threading.Event()

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if running[0] == 2:
                both.set()
        both.wait(0.3)  # a second worker takes the next job meanwhile; a lone one times out here
        with lock:
            running[0] -= 1
        return batch.reshape(batch.shape[0], -1).sum(axis=1, keepdims=True)

    b = Batcher(run, max_batch_size=1, max_wait_s=0.0, queue_size=8, observer=NullObserver(), workers=workers)
    jobs = [_job("m", deadline=time.monotonic() + 30) for _ in range(6)]
    b.admit(len(jobs), preparing=False)
    for job in jobs:
        b.submit(job, from_preparing=False)
    assert [j.future.result(10).tolist() for j in jobs] == [[[4.0]]] * 6
    assert peak[0] == workers
    assert len(b._threads) == workers
    b.stop(5)
    assert not b.alive


def test_inference_workers_setting_is_checked_and_reaches_the_batcher(tiny_repo: Path) -> None:
    with pytest.raises(ValueError, match="inference_workers"):
        Settings(inference_workers=0).validate()
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", inference_workers=3))
    core.load()
    try:
        assert core.batcher.workers == 3
        (p,) = classify_now(core, [encode(Image.new("RGB", (40, 30), "red"), "PNG")])
        assert isinstance(p, Prediction)
    finally:
        core.close()
    assert not core.batcher.alive


@pytest.mark.parametrize(("workers", "sizes"), [(1, [8]), (2, [4, 4])])
def test_workers_share_a_burst(workers: int, sizes: list[int]) -> None:
    """Eight images arriving at once: one worker runs them as one batch; two take four each, rather than the
    first taking all eight and running them alone while the other idles."""
    lock, ran = threading.Lock(), []
    started = threading.Event()

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        with lock:
            ran.append(batch.shape[0])
            if len(ran) == workers:
                started.set()
        started.wait(2)  # each batch is still running when the other worker takes its share
        return batch.reshape(batch.shape[0], -1).sum(axis=1, keepdims=True)

    b = Batcher(
        run, max_batch_size=32, max_wait_s=5.0, queue_size=8, observer=NullObserver(), workers=workers
    )
    jobs = [_job("m", deadline=time.monotonic() + 30) for _ in range(8)]
    b.admit(8)  # all eight are being preprocessed: the batch waits for them
    for job in jobs:
        b.submit(job)
    for job in jobs:
        assert job.future.result(10).shape == (1, 1)
    assert sorted(ran) == sizes
    b.stop(5)


def test_a_batch_runs_alone_only_when_nothing_else_is_in_sight() -> None:
    """`alone` (the solo session's cue) holds for a lone job, and fails while another image is being
    preprocessed or another batch is running: the solo session's threads must not crowd a busy service."""
    seen: list[tuple[float, bool]] = []
    release = threading.Event()

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        value = float(batch.reshape(-1)[0])
        seen.append((value, alone))
        if value == 1.0:
            release.wait(10)  # the first batch is still running when the second one is taken
        return batch.reshape(batch.shape[0], -1)[:, :1]

    b = Batcher(run, max_batch_size=4, max_wait_s=0.0, queue_size=8, observer=NullObserver(), workers=2)

    def job(value: float) -> Job:
        return Job("m", np.full((1, 1, 2, 2), value, np.float32), Future(), time.monotonic() + 30)

    lone = job(0.0)
    b.admit(1, preparing=False)
    b.submit(lone, from_preparing=False)
    assert lone.future.result(10).tolist() == [[0.0]]

    b.admit(1)  # an image still being decoded: the job in the queue does not run alone
    early = job(3.0)
    b.admit(1, preparing=False)
    b.submit(early, from_preparing=False)
    early.future.result(10)
    b.prepared(1)  # that image failed to decode

    first, second = job(1.0), job(2.0)
    b.admit(2, preparing=False)
    b.submit(first, from_preparing=False)
    while not any(v == 1.0 for v, _ in seen):
        time.sleep(0.01)
    b.submit(second, from_preparing=False)  # taken by the other worker while `first` runs
    second.future.result(10)
    release.set()
    first.future.result(10)
    assert seen == [(0.0, True), (3.0, False), (1.0, True), (2.0, False)]
    b.stop(5)


def test_a_lone_job_runs_on_the_thread_that_prepared_it() -> None:
    """`run_here` (the preprocessing pool's submissions): a job that would run alone runs at once on the
    submitting thread, with no worker to wake. A job that comes while it runs is queued for a worker, as is
    one submitted without `run_here` (an event loop must never block on a run); the answers are the same.
    The run holds a worker's place: the jobs behind it batch as they would behind a worker's run."""
    seen: list[tuple[list[float], str, bool]] = []
    running, release = threading.Event(), threading.Event()

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        values = batch[:, 0, 0, 0].tolist()
        seen.append((values, threading.current_thread().name, alone))
        if values == [1.0]:
            running.set()
            release.wait(10)
        return batch.reshape(batch.shape[0], -1)[:, :1] * 2

    b = Batcher(run, max_batch_size=4, max_wait_s=0.0, queue_size=8, observer=NullObserver())

    def job(value: float) -> Job:
        return Job("m", np.full((1, 1, 2, 2), value, np.float32), Future(), time.monotonic() + 30)

    first, second, third = job(1.0), job(2.0), job(3.0)
    b.admit(1)
    pool = threading.Thread(target=b.submit, args=(first,), kwargs={"run_here": True}, name="preprocess-0")
    pool.start()
    assert running.wait(10)
    b.admit(1)
    b.submit(second, run_here=True)  # `first` is running: this one waits for the worker
    b.admit(1, preparing=False)
    b.submit(third, from_preparing=False)
    time.sleep(0.2)
    assert len(seen) == 1  # `first` holds the one worker's place: the others wait, and batch, behind it
    release.set()
    pool.join(10)
    assert [f.result(10).tolist() for f in (first.future, second.future, third.future)] == [
        [[2.0]],
        [[4.0]],
        [[6.0]],
    ]
    assert seen == [([1.0], "preprocess-0", True), ([2.0, 3.0], "batcher-0", True)]

    b.admit(1, preparing=False)
    lone = job(4.0)
    b.submit(lone, from_preparing=False)  # alone, but from a thread that must not block: a worker runs it
    assert lone.future.result(10).tolist() == [[8.0]]
    assert seen[-1] == ([4.0], "batcher-0", True)
    b.stop(5)
