"""The adaptive batcher shared by every caller (HTTP, gRPC, batch scoring) of the core.

Requests are admitted in *views* (an image counts once per test-time augmentation view: 30 for multiscale),
against two bounds: `queue_size` views between admission and answer, and the expected wait, the views ahead
and the request's own times a measured cost per view (`per_view_s`), against the request's deadline. Either
refuses at once with `Overloaded` and a Retry-After, instead of queueing work that would answer too late.
Admitted images are decoded and preprocessed in a thread pool (the core's), in parallel with inference,
then queued here as jobs of one or more views.

Jobs are taken in fair-queueing order between requests (`service.fair`), not in arrival order: a request
of many images is served one image's views at a time between the other requests' jobs, so their batches
interleave with its batches. A *large* request, of more views than the model's turn (`turn`), gives at most
a turn of its views to any batch and none to a batch that a small request leads: a small request then waits
behind a short run, and runs without the large one's views.

A worker thread forms batches: it takes the oldest job and, while images are still being preprocessed and
the batch is below `max_batch_size` views, waits up to `max_wait_ms` for more jobs of the same model. When
nothing else is on its way it runs at once, so a lone request pays no waiting; under load batches grow by
themselves while the previous batch runs (that is the "adaptive" part). Jobs whose deadline has passed, or
whose caller gave up, are dropped before inference.

There is one worker by default. With `workers` > 1 that many batches run at once (an ONNX Runtime session
takes concurrent runs): on a CPU, two single-threaded runs side by side do more work per core than one run
spread over two threads, which waits on its slowest thread at every operator.

`run` is told whether its batch runs *alone*: nothing else queued, being preprocessed or running. Such a batch
has the machine to itself, and the session may then spend every core on it (see `solo_threads`).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import DeadlineExceeded, InvalidArgument, Overloaded, ServiceError
from service.fair import FairClock
from service.priority import lift_steps, lower_this_thread, run_ordinary

log = logging.getLogger("service.batching")


@dataclass(eq=False)
class Hold:
    """Views a request reserved from its headers (`Batcher.hold`), before its body says how many it brings.

    A burst of requests reaches the server before any of their bodies is read: checked one by one against an
    empty queue, every one would pass, and the ones past the deadline would only be refused after their
    bodies were read and parsed. Held views count in the queue and the expected wait of the requests after
    them, so those are refused from their headers at once. The request's own admission (`Batcher.admit`, in
    the same task: `held`) takes them back and admits what the body holds instead; a request that ends
    before its admission gives them back (`Batcher.drop`)."""

    views: int
    live: bool = True


held: ContextVar[Hold | None] = ContextVar("held", default=None)  # the hold of the request this task serves


@dataclass
class Job:
    key: Hashable  # which session runs it (model name, version)
    views: np.ndarray  # (V, C, H, W) float32
    future: Future  # resolves to the (V, outputs) raw network outputs
    deadline: float  # time.monotonic() seconds
    owner: Hashable | None = None  # the request it belongs to: jobs of one owner take turns with others'
    request_views: int = 0  # views of the whole request (0: this job's): what makes a request large
    enqueued: float = field(default_factory=time.monotonic)
    order: tuple[float, int] = (0.0, 0)  # its fair-queueing tag, set when queued


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future unless the caller already cancelled it (deadline) or it is resolved."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def split(job: Job, limit: int) -> list[Job]:
    """The job itself, or parts of at most `limit` views whose outputs, once all are in, resolve the job's
    future in order; the first part to fail fails the job, and a job cancelled or answered cancels what is
    left of its parts."""
    n = job.views.shape[0]
    if n <= limit:
        return [job]
    parts = [
        Job(
            job.key,
            job.views[i : i + limit],
            Future(),
            job.deadline,
            owner=job.owner,
            request_views=max(job.request_views, n),
            enqueued=job.enqueued,
        )
        for i in range(0, n, limit)
    ]
    outputs: list[Any] = [None] * len(parts)
    lock = threading.Lock()
    left = [len(parts)]

    def on_part(i: int, done: Future) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            settle(job.future, error=error)
            return
        with lock:
            outputs[i] = done.result()
            left[0] -= 1
            last = left[0] == 0
        if last:
            settle(job.future, np.concatenate(outputs))

    def on_job(_done: Future) -> None:
        # Futures keep their callbacks: the job's and its parts' refer to each other, and the cycle would
        # hold the views and outputs until the garbage collector's next full pass. Cut it here.
        for part in parts:
            part.future.cancel()
        parts.clear()
        outputs.clear()

    for i, part in enumerate(parts):
        part.future.add_done_callback(functools.partial(on_part, i))
    job.future.add_done_callback(on_job)
    return list(parts)


class Batcher:
    def __init__(
        self,
        run: Callable[[Hashable, np.ndarray, bool], np.ndarray],
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        observer: Any,
        labels: Callable[[Hashable], tuple[str, str]] = lambda key: (str(key), ""),
        batch_limit: Callable[[Hashable], int] | None = None,
        turn_limit: Callable[[Hashable], int] | None = None,
        workers: int = 1,
        preparers: int = 1,
        on_idle: Callable[[], None] | None = None,
        niceness: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError("the batcher needs at least one worker")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.observer = observer
        self._labels = labels  # a key's (model, version), for the observer
        self._batch_limit = batch_limit
        self._turn_limit = turn_limit
        self._cond = threading.Condition()
        self._queue: list[Job] = []  # in fair-queueing order (`Job.order`)
        self._clock = FairClock()
        self._outstanding = 0  # admitted views not yet answered
        self._preparing = 0  # admitted views still in decoding/preprocessing
        self.peak = 0  # the most views ever admitted at once (what tests and operators check)
        self.preparers = max(1, preparers)  # threads preparing views (the core's decode pool)
        self._on_idle = on_idle  # called when the last admitted view is answered (the core trims memory)
        self.on_taken: Callable[[], None] | None = None  # called after workers take jobs (the pool may go on)
        self._ahead: dict[Hashable, int] = {}  # views queued and not yet taken, per owner
        # Measured seconds per view, moving averages: of inference (per worker) and of preprocessing (per
        # thread). 0 until measured: nothing is refused by expected wait before the first batch.
        self._infer_per_view = 0.0
        self._prepare_per_view = 0.0
        self._running = 0  # views taken (by workers, or run where they were prepared) and not yet answered
        self._batches = 0  # batches running: never more than `workers`, whichever thread runs them
        self._stopping = False
        self.workers = workers
        self.niceness = niceness  # of the threads that run the batches (`service.priority`)
        self._threads: list[threading.Thread] = []
        self._local = threading.local()  # a worker's lowered thread for its runs (`_loop`)

    # -- admission ----
    def admit(self, n: int, preparing: bool = True, deadline: float | None = None) -> None:
        """Reserve room for n views, or raise Overloaded at once: the queue is full, or (with a deadline)
        the views ahead and these would not be answered before it. Views this task held from the request's
        headers (`held`) are given back first: these n replace them."""
        with self._cond:
            hold = held.get()
            if hold is not None and hold.live:
                hold.live = False
                self._outstanding -= hold.views
            if n > self.queue_size:  # would never fit: retrying cannot help, so not a 503
                raise InvalidArgument(
                    f"{n} views in one request; the queue holds {self.queue_size} views (queue_size)"
                )
            self._reserve(n, deadline)
            if preparing:
                self._preparing += n

    def hold(self, n: int, deadline: float) -> Hold:
        """Reserve n views for a request from its headers, before its body is read, or raise Overloaded when
        even n views would wait past `deadline` or not fit in the queue. The hold is this task's (`held`):
        its admission replaces it; `drop` gives it back if the request ends first."""
        with self._cond:
            self._reserve(n, deadline)
        hold = Hold(n)
        held.set(hold)
        return hold

    def _reserve(self, n: int, deadline: float | None) -> None:
        """Count n more views admitted, or raise Overloaded: stopping, the queue full, or (with a deadline)
        the views ahead and these not answered before it. The lock is held."""
        if self._stopping:
            raise Overloaded("the service is shutting down")
        if self._outstanding + n > self.queue_size:
            raise Overloaded(
                f"{self._outstanding} views waiting; the queue holds {self.queue_size}, retry shortly",
                retry_after_s=self._drain_s(),
            )
        if deadline is not None and self._outstanding > 0:  # an idle server tries whatever it admits
            wait = (self._outstanding + n) * self.per_view_s
            left = deadline - time.monotonic()
            if wait > left:
                raise Overloaded(
                    f"{self._outstanding} views waiting: about {wait:.2f} s expected, past this "
                    f"request's deadline ({max(0.0, left):.2f} s left), retry shortly",
                    retry_after_s=self._drain_s(),
                )
        self._outstanding += n
        self.peak = max(self.peak, self._outstanding)

    def drop(self, hold: Hold) -> None:
        """Give back a hold its request did not turn into an admission (refused, failed, or gone)."""
        with self._cond:
            if not hold.live:
                return
            hold.live = False
        self.release(hold.views)

    @property
    def per_view_s(self) -> float:
        """Expected seconds each view adds to the wait: inference's and preprocessing's, each spread over its
        threads, added up. Where they share the cores (a CPU) a view costs both; where they overlap (a GPU)
        this errs towards refusing, by at most twice, rather than admitting what ends past its deadline."""
        return self._infer_per_view / self.workers + self._prepare_per_view / self.preparers

    def _drain_s(self) -> int:
        """Whole seconds (at least 1) until what is admitted now is answered: the Retry-After."""
        return max(1, math.ceil(self._outstanding * self.per_view_s))

    def note_preprocess(self, seconds: float, views: int) -> None:
        """One image's preprocessing time, for the expected wait."""
        if views > 0:
            with self._cond:
                self._prepare_per_view = _ewma(self._prepare_per_view, seconds / views)

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._outstanding -= n
            idle = self._outstanding == 0
        if idle and self._on_idle is not None:
            self._on_idle()

    def prepared(self, n: int = 1) -> None:
        """n admitted views left preprocessing without a job (they failed); wake the worker."""
        with self._cond:
            self._preparing -= n
            self._cond.notify_all()

    def ahead(self, owner: Hashable) -> int:
        """Views of this owner queued and not yet taken by a worker."""
        return self._ahead.get(owner, 0)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- queue ----
    def submit(self, job: Job, from_preparing: bool = True, run_here: bool = False) -> None:
        """Queue a job for the workers. With `run_here` (a thread that may block: the core's preprocessing
        pool, never an event loop), a job that would run alone runs at once on the calling thread instead:
        its tensor is still in this core's cache, and no worker needs waking (what that saves a lone
        request: see docs/CORE.md, "Batching")."""
        self.start()
        with self._cond:
            if from_preparing:
                self._preparing -= job.views.shape[0]
            if self._stopping:  # stopped for good: a late job is answered, never a reason to restart
                settle(job.future, error=Overloaded("the service is shutting down"))
                return
            turn = self.turn(job.key)
            large = self._large(job, turn)
            inline = run_here and self._idle() and not large  # a large job runs in turns, never whole
            if inline:  # taken as a worker would take it: later jobs see it running, and wait their turn
                self._running += job.views.shape[0]
                self._batches += 1
            else:
                # A job is queued in parts, each taking its turn: of a batch, or of a turn for a large
                # request's job. Between two parts of a multiscale image (30 views) other requests' jobs run.
                if job.owner is not None:
                    self._ahead[job.owner] = self._ahead.get(job.owner, 0) + job.views.shape[0]
                for part in split(job, turn if large else self.limit(job.key)):
                    part.order = self._clock.tag(part.owner, part.views.shape[0])
                    self._queue.append(part)
                    if len(self._queue) > 1 and self._queue[-2].order > part.order:
                        self._queue.sort(key=lambda j: j.order)
                self._cond.notify_all()
            depth = len(self._queue)
        self.observer.queue_depth(depth)
        if inline:
            self._serve_taken([job], alone=True)

    def start(self) -> None:
        """Start the workers (lazily, at the first job); never again once stopped."""
        if len(self._threads) == self.workers and all(t.is_alive() for t in self._threads):
            return
        with self._cond:
            if self._stopping:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.workers:
                t = threading.Thread(target=self._loop, name=f"batcher-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        until = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if until is None else max(0.0, until - time.monotonic()))

    @property
    def alive(self) -> bool:
        """Whether any worker thread still runs."""
        return any(t.is_alive() for t in self._threads)

    # -- worker ----
    def _take(self) -> tuple[list[Job], bool] | None:
        """The next batch, and whether it runs alone (nothing else queued, preparing or running)."""
        with self._cond:
            while True:
                # A batch run where it was prepared holds a worker's place: the jobs that come meanwhile wait
                # and batch, as they would behind a worker's run, instead of running beside it.
                while not self._queue or self._batches >= self.workers:
                    if self._stopping and not self._queue:
                        return None
                    self._cond.wait()
                first = self._queue[0]
                limit = self.limit(first.key)
                wait_until = first.enqueued + self.max_wait_s
                while True:
                    views = sum(j.views.shape[0] for j in self._queue if j.key == first.key)
                    now = time.monotonic()
                    if views >= limit or self._preparing <= 0 or now >= wait_until or self._stopping:
                        break
                    self._cond.wait(wait_until - now)
                if self._queue and self._queue[0] is first:
                    break
                # another worker took these jobs while this one waited for more: start over
            if self.workers > 1:
                # A fair share of the work in sight (queued, being preprocessed, in the other workers' runs):
                # one worker taking all that is queued would run it alone on its threads while the others
                # idle at the end of a burst.
                in_sight = views + self._preparing + self._running
                limit = min(limit, max(1, -(-in_sight // self.workers)))
            turn = self.turn(first.key)
            first_large = self._large(first, turn)
            turns: dict[Hashable, int] = {}  # views per large request in this batch
            taken: list[Job] = []
            rest: list[Job] = []
            total = 0
            for job in self._queue:
                n = job.views.shape[0]
                fits = job.key == first.key and (not taken or total + n <= limit)
                if fits and taken and self._large(job, turn):
                    # a large request's views never ride in a small request's batch, and take at most a
                    # turn of any batch: the batch a small request waits behind stays short
                    fits = first_large and turns.get(job.owner, 0) + n <= turn
                if fits:
                    if self._large(job, turn):
                        turns[job.owner] = turns.get(job.owner, 0) + n
                    taken.append(job)
                    total += n
                    if job.owner is not None:
                        left = self._ahead.pop(job.owner, 0) - n
                        if left > 0:
                            self._ahead[job.owner] = left
                else:
                    rest.append(job)
            self._queue = rest
            self._clock.served(taken[0].order[0])
            alone = self._idle()
            self._running += total
            self._batches += 1
            depth = len(rest)
        self.observer.queue_depth(depth)
        if self.on_taken is not None:
            self.on_taken()
        return taken, alone

    def _idle(self) -> bool:
        """Nothing queued, being preprocessed or running (the caller holds the lock): a batch taken now runs
        alone."""
        return not self._queue and self._preparing <= 0 and self._running == 0

    def limit(self, key: Hashable) -> int:
        """Views per batch for this model: the max batch size, or less where the model runs better so."""
        if self._batch_limit is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self._batch_limit(key)))

    def turn(self, key: Hashable) -> int:
        """Views of one large request per batch: what keeps the batch a small request waits behind short
        (`ModelSession.turn_batch`)."""
        limit = self.limit(key)
        if self._turn_limit is None:
            return limit
        return max(1, min(limit, self._turn_limit(key)))

    @staticmethod
    def _large(job: Job, turn: int) -> bool:
        """Whether the job's request brings more views than a turn."""
        return max(job.request_views, job.views.shape[0]) > turn

    def _loop(self) -> None:
        """A worker: its own steps at the priority it was started with, its runs on a lowered thread.

        Taking jobs, joining and splitting their arrays and settling their futures is Python code that holds
        the interpreter lock. A worker at the work's raised nice value that lost its core with the lock in
        hand kept the event loop waiting until the scheduler ran it again, behind every other runnable
        thread. So only the run, which lets the lock go and takes the cores, is handed to a thread of its own
        at that nice value (ONNX Runtime's threads have it too); the worker waits for it with the lock
        released. Beside a real-time loop the worker, with its runs elsewhere, joins the loop's class one
        priority below it (`service.priority.lift_steps`), and so does the run thread between its runs: it
        takes the lock on its way into and out of each run, and each run is ordinary and lowered
        (`service.priority.run_ordinary`)."""
        compute = None
        if self.niceness > 0:
            lift_steps()
            compute = ThreadPoolExecutor(
                1,
                thread_name_prefix=f"{threading.current_thread().name}-run",
                initializer=_start_run_thread,
                initargs=(self.niceness,),
            )
            self._local.compute = compute
        try:
            while True:
                taken = self._take()
                if taken is None:
                    return
                self._serve_taken(*taken)
        finally:
            if compute is not None:
                compute.shutdown(wait=True)

    def _serve_taken(self, jobs: list[Job], alone: bool) -> None:
        """Serve jobs counted in `_running`, and count them out; never raises."""
        try:
            self._serve(jobs, alone)
        except Exception as e:  # noqa: BLE001 - the worker never dies: the queue behind it would wait forever
            log.exception("batcher: a batch failed outside inference")
            for job in jobs:
                settle(job.future, error=ServiceError(f"inference failed: {type(e).__name__}"))
        finally:
            with self._cond:
                self._running -= sum(j.views.shape[0] for j in jobs)
                self._batches -= 1
                if self._queue:  # a worker may be waiting for this batch's place
                    self._cond.notify_all()

    def _serve(self, jobs: list[Job], alone: bool = False) -> None:
        now = time.monotonic()
        live = []
        for job in jobs:
            self.observer.queue_wait(now - job.enqueued)
            if job.future.cancelled():
                continue
            if now >= job.deadline:
                settle(job.future, error=DeadlineExceeded("deadline passed while waiting for inference"))
                continue
            live.append(job)
        if live:
            self._execute(live, alone)

    def _run_on(self, key: Hashable, chunk: np.ndarray, alone: bool) -> np.ndarray:
        """`run`, on the worker's lowered thread where it has one (`_loop`), else on this thread (a job run
        where it was prepared: a lowered decode thread)."""
        compute: ThreadPoolExecutor | None = getattr(self._local, "compute", None)
        if compute is None:
            return self._run(key, chunk, alone)
        return compute.submit(run_ordinary, self._run, key, chunk, alone).result()

    def _execute(self, jobs: list[Job], alone: bool = False) -> None:
        key = jobs[0].key
        limit = self.limit(key)
        batch = jobs[0].views if len(jobs) == 1 else np.concatenate([j.views for j in jobs])
        try:
            outputs = []
            for i in range(0, batch.shape[0], limit):  # one call per `limit` views
                chunk = batch[i : i + limit]
                t0 = time.perf_counter()
                outputs.append(self._run_on(key, chunk, alone))
                seconds = time.perf_counter() - t0
                self.observer.inference(seconds, int(chunk.shape[0]), *self._labels(key))
                with self._cond:
                    self._infer_per_view = _ewma(self._infer_per_view, seconds / chunk.shape[0])
            out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        except ServiceError as e:
            for job in jobs:
                settle(job.future, error=e)
            return
        except Exception as e:  # an ONNX Runtime failure fails this batch, never the worker
            for job in jobs:
                settle(job.future, error=ServiceError(f"inference failed: {type(e).__name__}"))
            return
        start = 0
        for job in jobs:
            n = job.views.shape[0]
            settle(job.future, out[start : start + n])
            start += n


def _start_run_thread(niceness: int) -> None:
    """A worker's run thread: its runs at the work's nice value, its steps between them lifted where the
    worker is (`Batcher._loop`)."""
    lower_this_thread(niceness)
    lift_steps()


EWMA_WEIGHT = 0.2  # of the newest measurement: about the last ten batches count


def _ewma(average: float, sample: float) -> float:
    return sample if average <= 0 else average + EWMA_WEIGHT * (sample - average)
