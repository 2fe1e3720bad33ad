"""`InferenceCore`: image bytes in, top-k predictions out; the facade every transport calls.

It owns the live model set (`service.models.ModelSet`: one ONNX Runtime session per version, loaded, swapped
and drained there), a decoding/preprocessing thread pool and the one adaptive batcher. Each request holds the
version that answers it until its answer is made. It knows nothing of HTTP, gRPC or Prometheus: metrics flow
through the `Observer` protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service import augmentation, decoding, limits, postprocessing, priority
from service.batching import Batcher, Hold, Job, settle
from service.config import Settings
from service.decoders import DecodeProcess, DecodeProcesses
from service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelUnavailable,
    Overloaded,
    ServiceError,
)
from service.fair import FairPool
from service.integrity import FileCheck
from service.memory import IdleTrim, MemoryBudget, return_memory
from service.models import LoadedModel, ModelSet
from service.postprocessing import ClassScore
from service.receiving import ReceiveBudget
from service.repository import ModelCard
from service.sessions import ModelSession

log = logging.getLogger(__name__)

__all__ = [
    "ClassScore",
    "InferenceCore",
    "LoadedModel",
    "ModelInfo",
    "NullObserver",
    "Observer",
    "Prediction",
]


class Observer(Protocol):
    """What the core reports from the batcher and the decode memory budget (service/metrics.py implements it
    with Prometheus)."""

    def queue_depth(self, n: int) -> None: ...
    def decode_memory(self, nbytes: int) -> None: ...
    def receive_memory(self, nbytes: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def preprocess(self, seconds: float) -> None: ...
    def inference(self, seconds: float, batch_size: int, model: str, version: str) -> None: ...
    def model_info(self, models: Sequence[ModelInfo]) -> None: ...
    def model_load_failure(self, model: str) -> None: ...
    def model_versions(self, model: str, loaded: int) -> None: ...
    def model_files_intact(self, model: str, version: str, intact: bool) -> None: ...


class NullObserver:
    def queue_depth(self, n: int) -> None:
        pass

    def decode_memory(self, nbytes: int) -> None:
        pass

    def receive_memory(self, nbytes: int) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def preprocess(self, seconds: float) -> None:
        pass

    def inference(self, seconds: float, batch_size: int, model: str, version: str) -> None:
        pass

    def model_info(self, models: Sequence[ModelInfo]) -> None:
        pass

    def model_load_failure(self, model: str) -> None:
        pass

    def model_versions(self, model: str, loaded: int) -> None:
        pass

    def model_files_intact(self, model: str, version: str, intact: bool) -> None:
        pass


@dataclass
class Prediction:
    model: str
    version: str
    top_k: list[ClassScore]
    probabilities: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "predictions": [c.to_dict() for c in self.top_k],
        }


@dataclass(frozen=True)
class ModelInfo:
    """What the core tells transports about one model version: its card (None when the card could not be
    read), its state and why it is not ready, how its session runs (provider, precision, batches), and
    whether the files it was loaded from still match what it serves (None: not checked; see
    `service.integrity`)."""

    name: str
    version: str
    state: str  # loading | ready | unloading | unavailable
    reason: str = ""
    card: ModelCard | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    in_flight: int = 0  # requests holding this version (an unloading one is released at 0)
    files_intact: bool | None = None
    files_problem: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @property
    def provider(self) -> str:
        return str(self.runtime.get("provider", ""))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`GET /models`): the card's metadata, the state and the runtime description."""
        out: dict[str, Any] = self.card.metadata() if self.card else {}
        out.update({"name": self.name, "version": self.version, "state": self.state, "reason": self.reason})
        out["in_flight"] = self.in_flight
        out.update({"files_intact": self.files_intact, "files_problem": self.files_problem})
        out.update(self.runtime or {"provider": ""})
        return out


def info_of(entry: LoadedModel) -> ModelInfo:
    session = entry.session
    runtime = session.describe() if session is not None else {}
    return ModelInfo(
        entry.name,
        entry.version,
        entry.state,
        entry.reason,
        entry.card,
        runtime,
        entry.active,
        entry.files_intact,
        entry.files_problem,
    )


class InferenceCore:
    def __init__(self, settings: Settings | None = None, observer: Observer | None = None) -> None:
        self.settings = settings or Settings()
        priority.configure(self.settings.worker_niceness, self.settings.loop_realtime_priority)
        self.observer: Observer = observer or NullObserver()
        self.loaded = False  # load() finished and close() not begun: each ready model serves
        self.failure: BaseException | None = None  # why start-up failed; the process is then not live
        self.limits = decoding.Limits.from_settings(self.settings)
        self.decode_memory = MemoryBudget(self.limits.max_decode_bytes, self.observer.decode_memory)
        # What the transports hold of requests still arriving (`service/receiving.py`).
        receive_bytes = self.settings.receive_memory_mb << 20
        self.receive_memory = ReceiveBudget(
            receive_bytes,
            int(receive_bytes * self.settings.client_share),
            self.observer.receive_memory,
        )
        # The model_info metric follows every load, swap and unload.
        publish = lambda: self.observer.model_info(self.models())  # noqa: E731
        self.model_set = ModelSet(self.settings, self.limits, self.observer, on_change=publish)
        self.file_check = FileCheck(
            self.model_set.entries, self.observer, self.settings.model_check_interval_s
        )
        # Decoding takes requests in turns (fair queueing), as the batcher does: a request of many images
        # does not hold the pool while a one-image request waits behind all of them. A request with two
        # batches' worth of views already queued waits for its next turn to decode.
        ahead = 2 * self.settings.max_batch_size
        threads = max(1, self.settings.decode_threads)
        # With decode_processes the children do the work at worker_niceness, and these threads only hand
        # them bytes and wait on pipes: lowered, one holding the interpreter lock for those short steps
        # could lose its core and keep the event loop waiting for the lock.
        pool_niceness = 0 if self.settings.decode_processes else self.settings.worker_niceness
        self._pool = FairPool(
            threads,
            "preprocess",
            lambda owner: self.batcher.ahead(owner) < ahead,
            niceness=pool_niceness,
            steps=self.settings.decode_processes,
        )
        # A lone job runs on the pool thread that prepared it when another is left to decode meanwhile, and
        # only where that thread is lowered: inference runs below the loop, never on a lifted thread.
        lifted = self._pool.steps and self.settings.loop_realtime_priority > 0
        self._run_here = threads > 1 and pool_niceness == self.settings.worker_niceness and not lifted
        self.decoders = (
            DecodeProcesses(self.settings.worker_niceness, self.settings.memory_trim_idle_s)
            if self.settings.decode_processes
            else None
        )
        self.trim = IdleTrim(
            self.settings.memory_trim_idle_s, lambda: self.batcher.outstanding == 0, self._give_back_memory
        )
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            queue_size=self.settings.queue_size,
            observer=self.observer,
            labels=lambda key: (key[0], key[1]),
            batch_limit=self._batch_limit,
            turn_limit=self._turn_limit,
            workers=self.settings.inference_workers,
            preparers=self.settings.decode_threads,
            on_idle=self.trim.poke,
            niceness=self.settings.worker_niceness,
        )
        self.batcher.on_taken = self._pool.wake

    # -- lifecycle ----
    def load(self, before_ready: Callable[[], None] | None = None) -> None:
        """Load and warm up the start set (`service.models`: every version the policies name, or
        `load_model` in explicit mode); failures are kept with their reason (GpuRequired raises). In poll mode
        the repository is then rescanned in the background.

        `before_ready` runs once everything is loaded and before the core says it is ready: work that would
        stall the process (a full garbage collection) is done before any traffic is sent to it."""
        priority.leave_steps()  # on a shared thread that served request work: the warm-ups take the cores
        if self.decoders is not None:
            self.decoders.start(max(1, self.settings.decode_threads))
        self.model_set.start()
        self.batcher.start()
        if before_ready is not None:
            before_ready()
        self.loaded = True
        self.file_check.start()

    @property
    def ready(self) -> bool:
        """What the readiness probes answer. The Open Inference Protocol's server readiness is "all the
        models are ready" (Triton's strict readiness): every model that should serve has a ready version, so
        a rollout whose new pods hold a broken model stops there, the old pods serving on. Without it, a pod
        serves its good models and answers ModelUnavailable for the others."""
        return self.loaded and self.model_set.ready()

    async def start(self, before_ready: Callable[[], None] | None = None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load, before_ready)
        except Exception as exc:
            self.failure = exc
            raise

    @property
    def live(self) -> bool:
        """False once start-up failed (e.g. `require_gpu` without a GPU): restarting is the only cure."""
        return self.failure is None

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """Drain: images being decoded reach the batcher, queued jobs finish, then the worker ends.

        The pool goes first: stopping the batcher while an image was still being decoded would leave that
        image with nowhere to go."""
        self.loaded = False
        self.file_check.stop()
        self.model_set.stop()
        self._pool.shutdown(wait=True)
        if self.decoders is not None:
            self.decoders.close()
        self.batcher.stop(self.settings.drain_timeout_s)
        self.trim.stop()

    # -- metadata ----
    def models(self) -> list[ModelInfo]:
        """Every version the model set reports: ready, loading, unloading or unavailable (with the reason)."""
        return [info_of(m) for m in self.model_set.entries()]

    def model_info(self, name: str | None = None, version: str | None = None) -> ModelInfo:
        """The version asked for, or the latest ready one; ModelNotFound for an unknown name or version."""
        return info_of(self._entry(name, version, require_ready=False))

    def serves(self, name: str | None, version: str | None = None) -> bool:
        """Whether a request for this model (None: the default) and version finds one ready to answer it. A
        request for one that is unknown, unloaded or not ready is answered that (404 or 503 with the
        reason), never shed as overload: retrying it later would not help."""
        try:
            self._entry(name, version)
        except ServiceError:
            return False
        return True

    def _entry(self, name: str | None, version: str | None, require_ready: bool = True) -> LoadedModel:
        return self.model_set.entry(name, version, require_ready)

    def _default_model(self) -> str:
        return self.model_set.default_model()

    # -- the repository (Triton's model repository extension) ----
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model of the repository and every version known: name, version, state, reason."""
        return self.model_set.index(ready_only)

    async def load_model(self, name: str) -> None:
        """Explicit mode: load `name` by its version policy, off the event loop, one change at a time."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.model_set.loader, self.model_set.load, name)

    async def unload_model(self, name: str) -> None:
        """Explicit mode: retire every version of `name`; admitted requests finish on it first."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.model_set.loader, self.model_set.unload, name)

    def _give_back_memory(self) -> None:
        """After a burst, on the idle trim's thread: objects in reference cycles (a request's futures, errors
        with tracebacks) hold their arrays until the collector's next full pass; collect them, shrink each
        session's arena to one image's run, then hand the freed pages back (glibc keeps them otherwise).
        What each step returns: docs/BENCHMARKS.md. It runs at the event loop's priority: the loop's
        allocations wait for the allocator's locks that malloc_trim holds, which a lowered thread could keep
        while the scheduler runs others."""
        gc.collect()
        for entry in self.model_set.entries():
            session = entry.session
            if session is None:
                continue
            try:
                session.release_arena()
            except Exception:  # noqa: BLE001 - a session that cannot run now keeps its arena; serving goes on
                log.warning("%s:%s: its arena could not be shrunk", entry.name, entry.version, exc_info=True)
        return_memory()

    # -- inference ----
    def _session(self, key: tuple[str, str, int]) -> ModelSession | None:
        """The loaded session of a batcher key, or None once it is gone."""
        try:
            return self.model_set.by_key(key).session
        except ModelUnavailable:
            return None

    def _batch_limit(self, key: tuple[str, str, int]) -> int:
        session = self._session(key)
        return session.preferred_batch if session is not None else self.settings.max_batch_size

    def _turn_limit(self, key: tuple[str, str, int]) -> int:
        session = self._session(key)
        return session.turn_batch if session is not None else 1

    def _run_batch(self, key: tuple[str, str, int], batch: np.ndarray, alone: bool = False) -> np.ndarray:
        session = self.model_set.by_key(key).session  # held by the requests of this batch
        if session is None:
            raise ModelUnavailable(f"model {key[0]!r} version {key[1]} is no longer loaded")
        return session.run(batch, alone=alone)

    def _submit(
        self, images: Sequence[bytes], entry: LoadedModel, tta: str, deadline: float
    ) -> list[concurrent.futures.Future]:
        """Admit the request's views, then decode+preprocess each image in the pool, in turns with other
        requests; each future resolves to the image's raw view outputs."""
        per = augmentation.view_count(tta)
        total = len(images) * per
        self.batcher.admit(total, deadline=deadline)
        owner = object()  # this request, for fair turns in the pool and the batcher
        futures = []
        for data in images:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.add_done_callback(lambda _f: self.batcher.release(per))
            futures.append(fut)
            try:
                self._pool.submit(owner, per, self._prepare, data, entry, tta, deadline, fut, owner, total)
            except RuntimeError:  # the pool is shut down: the core is closing
                settle(fut, error=Overloaded("the service is shutting down"))
                self.batcher.prepared(per)
        return futures

    def _prepare(
        self,
        data: bytes,
        entry: LoadedModel,
        tta: str,
        deadline: float,
        fut: concurrent.futures.Future,
        owner: object = None,
        request_views: int = 0,
    ) -> None:
        queued = False
        try:
            if fut.cancelled():
                return
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed before decoding")
            t0 = time.perf_counter()
            with self.decoders.borrow() if self.decoders else contextlib.nullcontext() as process:
                views = self.preprocess(data, entry, tta, deadline, keep_until=fut, process=process)
            seconds = time.perf_counter() - t0
            self.observer.preprocess(seconds)
            self.batcher.note_preprocess(seconds, views.shape[0])
            self.batcher.submit(
                Job(entry.key, views, fut, deadline, owner=owner, request_views=request_views),
                run_here=self._run_here,
            )
            queued = True
        except ServiceError as e:  # its traceback would keep the decoded image alive as long as the answer
            settle(fut, error=e.with_traceback(None))
        except Exception as e:  # never leak a stack trace to clients
            settle(fut, error=ServiceError(f"preprocessing failed: {type(e).__name__}"))
        finally:
            if not queued:
                self.batcher.prepared(augmentation.view_count(tta))

    def preprocess(
        self,
        data: bytes,
        entry: LoadedModel,
        tta: str,
        deadline: float | None = None,
        keep_until: concurrent.futures.Future | None = None,
        process: DecodeProcess | None = None,
    ) -> np.ndarray:
        """Bytes -> (views, C, H, W) float32 for one image (runs in the pool; with `process`, in that child
        process). The decoded image's memory is reserved from the decode memory budget until its views are
        cut; with `keep_until`, the views' tensor is reserved with it and stays reserved until that future is
        done (the batcher ran it), so that queued views count against the budget as decoding images do."""
        assert entry.pipeline is not None and entry.card is not None
        views_bytes = 0
        if keep_until is not None:
            spec = entry.card.preprocessing
            views_bytes = augmentation.view_count(tta) * spec.channels * spec.height * spec.width * 4
        with self.decode_memory.holding(deadline) as hold:
            reserve = lambda n: hold.reserve(n + views_bytes)  # noqa: E731
            if process is None:
                views = entry.pipeline.prepare(data, tta, reserve=reserve)
            else:
                views = process.prepare(entry.key, entry.pipeline, data, tta, reserve, deadline)
            if keep_until is not None:
                kept = hold.keep(views_bytes)
                if kept:
                    keep_until.add_done_callback(lambda _f: self.decode_memory.release(kept))
            return views

    def _check(self, images: Sequence[bytes], entry: LoadedModel, top_k: int | None, tta: str) -> int:
        augmentation.check_mode(tta)
        assert entry.card is not None
        k = postprocessing.check_top_k(top_k, entry.card.num_classes, self.settings.max_top_k)
        limits.check_count(len(images), self.settings.max_images_per_request)
        limits.check_views(
            len(images), augmentation.view_count(tta), self.settings.max_views_per_request, tta
        )
        return k

    def hold(self, deadline: float | None = None, views: int = 1) -> Hold:
        """Reserve `views` for a request from its headers, before its body is read, or raise Overloaded at
        once when they would wait past `deadline` (the configured timeout when None). The request's
        admission, in the same task, takes the hold back; `release_hold` ends one it did not reach."""
        return self.batcher.hold(views, self._deadline(deadline))

    def release_hold(self, hold: Hold) -> None:
        self.batcher.drop(hold)

    def _outcome(
        self, entry: LoadedModel, k: int, fut: asyncio.Future | concurrent.futures.Future, done: bool
    ) -> Prediction | ServiceError:
        """One image's answer from its future (asyncio's or a thread's): a prediction or its error."""
        if not done:
            return DeadlineExceeded("deadline passed before the image was classified")
        if fut.cancelled():
            return DeadlineExceeded("request cancelled")
        return self._finish(entry, k, fut.exception() or fut.result())

    def _finish(self, entry: LoadedModel, k: int, outcome: Any) -> Prediction | ServiceError:
        if isinstance(outcome, ServiceError):
            return outcome
        if isinstance(outcome, BaseException):
            return ServiceError(f"classification failed: {type(outcome).__name__}")
        assert entry.pipeline is not None
        (answer,) = entry.pipeline.finish(outcome, [outcome.shape[0]], k)
        return Prediction(entry.name, entry.version, answer.top_k, answer.probabilities)

    def _deadline(self, deadline: float | None) -> float:
        return deadline if deadline is not None else time.monotonic() + self.settings.request_timeout_s

    async def classify(
        self,
        images: Sequence[bytes],
        *,
        model: str | None = None,
        version: str | None = None,
        top_k: int | None = None,
        tta: str = "none",
        deadline: float | None = None,
    ) -> list[Prediction | ServiceError]:
        """One entry per image; a bad image fails only itself. Request-level problems raise. The version that
        answers is held from admission to answer: a swap or unload meanwhile does not touch it."""
        entry = self.model_set.acquire(model, version)
        try:
            k = self._check(images, entry, top_k, tta)
            deadline = self._deadline(deadline)
            futures = self._submit(images, entry, tta, deadline)
            wrapped = [asyncio.wrap_future(f) for f in futures]
            timeout = max(0.0, deadline - time.monotonic())
            try:
                done, pending = await asyncio.wait(wrapped, timeout=timeout)
            finally:  # past the deadline, or the caller went away (a cancelled gRPC call): drop what is left
                for f in futures:
                    if not f.done():
                        f.cancel()
            return [self._outcome(entry, k, w, done=w not in pending) for w in wrapped]
        finally:
            self.model_set.release(entry)

    async def infer_tensor(
        self, model: str | None, version: str | None, array: np.ndarray, deadline: float | None = None
    ) -> np.ndarray:
        """Probabilities (N, classes) for an already-preprocessed fp32 NCHW tensor, through the batcher."""
        probabilities, _ = await self.infer_tensor_versioned(model, version, array, deadline)
        return probabilities

    async def infer_tensor_versioned(
        self, model: str | None, version: str | None, array: np.ndarray, deadline: float | None = None
    ) -> tuple[np.ndarray, str]:
        """`infer_tensor`, with the version that answered (held from admission to answer, as classify's)."""
        entry = self.model_set.acquire(model, version)
        try:
            return await self._infer_tensor(entry, array, deadline), entry.version
        finally:
            self.model_set.release(entry)

    async def _infer_tensor(
        self, entry: LoadedModel, array: np.ndarray, deadline: float | None
    ) -> np.ndarray:
        assert entry.session is not None and entry.card is not None
        array = np.ascontiguousarray(array, dtype=np.float32)
        expected = entry.session.input_shape
        if array.ndim != 4 or tuple(array.shape[1:]) != expected or array.shape[0] < 1:
            raise InvalidArgument(
                f"tensor must have shape [N >= 1, {', '.join(map(str, expected))}], got {list(array.shape)}"
            )
        samples = limits.check_count(int(array.shape[0]), self.settings.max_images_per_request, "samples")
        deadline = self._deadline(deadline)
        limits.check_views(samples, 1, self.settings.max_views_per_request, "none")
        # a place in the queue per sample, as per view
        self.batcher.admit(samples, preparing=False, deadline=deadline)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(lambda _f: self.batcher.release(samples))
        self.batcher.submit(Job(entry.key, array, fut, deadline, owner=object()), from_preparing=False)
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            fut.cancel()
            raise DeadlineExceeded("deadline passed before inference finished") from None
        assert entry.pipeline is not None
        return entry.pipeline.probabilities(out)
