"""`InferenceCore`: image bytes in, top-k predictions out; the facade every transport calls.

It owns the loaded models (one ONNX Runtime session each), a decoding/preprocessing thread pool and the one
adaptive batcher. It knows nothing of HTTP, gRPC or Prometheus: metrics flow through the `Observer` protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service import augmentation, decoding, limits, postprocessing
from service.batching import Batcher, Job, settle
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelUnavailable,
    Overloaded,
    ServiceError,
)
from service.memory import MemoryBudget
from service.pipeline import Pipeline
from service.postprocessing import ClassScore
from service.repository import ModelCard, entry_path, read_card, resolve, scan
from service.sessions import GpuRequired, ModelSession

log = logging.getLogger(__name__)

__all__ = ["ClassScore", "InferenceCore", "ModelInfo", "NullObserver", "Observer", "Prediction"]


class Observer(Protocol):
    """What the core reports from the batcher and the decode memory budget (service/metrics.py implements it
    with Prometheus)."""

    def queue_depth(self, n: int) -> None: ...
    def decode_memory(self, nbytes: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def preprocess(self, seconds: float) -> None: ...
    def inference(self, seconds: float, batch_size: int, model: str) -> None: ...


class NullObserver:
    def queue_depth(self, n: int) -> None:
        pass

    def decode_memory(self, nbytes: int) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def preprocess(self, seconds: float) -> None:
        pass

    def inference(self, seconds: float, batch_size: int, model: str) -> None:
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
    read), its state and why it is not ready, and how its session runs (provider, precision, batches)."""

    name: str
    version: str
    state: str  # loading | ready | unavailable
    reason: str = ""
    card: ModelCard | None = None
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def provider(self) -> str:
        return str(self.runtime.get("provider", ""))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`GET /models`): the card's metadata, the state and the runtime description."""
        out: dict[str, Any] = self.card.metadata() if self.card else {}
        out.update({"name": self.name, "version": self.version, "state": self.state, "reason": self.reason})
        out.update(self.runtime or {"provider": ""})
        return out


@dataclass
class LoadedModel:
    name: str
    version: str
    card: ModelCard | None = None
    state: str = "loading"  # loading | ready | unavailable
    reason: str = ""
    session: ModelSession | None = None
    pipeline: Pipeline | None = None

    def info(self) -> ModelInfo:
        runtime = self.session.describe() if self.session is not None else {}
        return ModelInfo(self.name, self.version, self.state, self.reason, self.card, runtime)


class InferenceCore:
    def __init__(self, settings: Settings | None = None, observer: Observer | None = None) -> None:
        self.settings = settings or Settings()
        self.observer: Observer = observer or NullObserver()
        self.ready = False  # what the readiness probes answer: see `load`
        self.loaded = False  # load() finished and close() not begun: each ready model serves
        self.failure: BaseException | None = None  # why start-up failed; the process is then not live
        self.limits = decoding.Limits.from_settings(self.settings)
        self.decode_memory = MemoryBudget(self.limits.max_decode_bytes, self.observer.decode_memory)
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._versions: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.settings.decode_threads), thread_name_prefix="preprocess"
        )
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            queue_size=self.settings.queue_size,
            observer=self.observer,
            model_name=lambda key: key[0],
            batch_limit=self._batch_limit,
            workers=self.settings.inference_workers,
        )

    # -- lifecycle ----
    def load(self) -> None:
        """Load and warm up every model version; failures are kept with their reason (GpuRequired raises)."""
        versions = scan(self.settings.repository)
        if self.settings.models:
            missing = [m for m in self.settings.models if m not in versions]
            if missing:
                log.warning("models %s are not in the repository %s", missing, self.settings.repository)
            versions = {k: v for k, v in versions.items() if k in self.settings.models}
        self._versions = versions
        for name, vs in versions.items():
            for v in vs:
                self._models[(name, v)] = LoadedModel(name, v)
        for (name, v), entry in self._models.items():
            try:
                card = read_card(entry_path(self.settings.repository, name, v))
                entry.card = card
                entry.pipeline = Pipeline.for_card(card, self.limits, self.settings.preprocess_mode)
                session = ModelSession(card, self.settings)
                session.warm_up()
                entry.session = session
                entry.state = "ready"
                log.info("model %s:%s ready on %s (%s)", name, v, session.provider, session.precision)
                if session.on_gpu and self.settings.inference_workers > 1:
                    log.warning(
                        "%s:%s: GPU runs take turns, so inference_workers=%d only splits batches; use 1",
                        name,
                        v,
                        self.settings.inference_workers,
                    )
            except GpuRequired:
                raise
            except Exception as e:  # one broken model must not take the others down
                entry.state = "unavailable"
                entry.reason = f"{type(e).__name__}: {e}"[:500]
                log.error("model %s:%s unavailable: %s", name, v, entry.reason)
        self.batcher.start()
        self.loaded = True
        # The Open Inference Protocol's server readiness is "all the models are ready" (Triton's strict
        # readiness): a rollout whose new pods hold a broken model stops there, the old pods serving on.
        # Without it, a pod serves its good models and answers ModelUnavailable for the others.
        states = [m.state == "ready" for m in self._models.values()]
        self.ready = any(states) and (all(states) or not self.settings.strict_readiness)

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
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
        self.ready = self.loaded = False
        self._pool.shutdown(wait=True)
        self.batcher.stop(self.settings.drain_timeout_s)

    # -- metadata ----
    def models(self) -> list[ModelInfo]:
        return [m.info() for m in self._models.values()]

    def model_info(self, name: str | None = None, version: str | None = None) -> ModelInfo:
        """The version asked for, or the latest; ModelNotFound for an unknown name or version."""
        return self._entry(name, version, require_ready=False).info()

    def _entry(self, name: str | None, version: str | None, require_ready: bool = True) -> LoadedModel:
        if not self._models:
            raise ModelUnavailable("no model is loaded yet: the service is starting")
        name = name or self._default_model()
        v = resolve(self._versions, name, None if version is None else str(version))
        entry = self._models[(name, v)]
        if require_ready and entry.state != "ready":
            raise ModelUnavailable(
                f"model {name!r} version {v} is {entry.state}: {entry.reason or 'not loaded'}"
            )
        return entry

    def _default_model(self) -> str:
        if self.settings.default_model in self._versions or not self._versions:
            return self.settings.default_model
        return next(iter(self._versions))

    # -- inference ----
    def _batch_limit(self, key: tuple[str, str]) -> int:
        session = self._models[key].session
        return session.preferred_batch if session is not None else self.settings.max_batch_size

    def _run_batch(self, key: tuple[str, str], batch: np.ndarray, alone: bool = False) -> np.ndarray:
        session = self._models[key].session
        assert session is not None
        return session.run(batch, alone=alone)

    def _submit(
        self, images: Sequence[bytes], entry: LoadedModel, tta: str, deadline: float
    ) -> list[concurrent.futures.Future]:
        """Admit, then decode+preprocess each image in the pool; each future resolves to raw view outputs."""
        self.batcher.admit(len(images))
        futures = []
        for data in images:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.add_done_callback(lambda _f: self.batcher.release(1))
            futures.append(fut)
            try:
                self._pool.submit(self._prepare, data, entry, tta, deadline, fut)
            except RuntimeError:  # the pool is shut down: the core is closing
                settle(fut, error=Overloaded("the service is shutting down"))
                self.batcher.prepared(1)
        return futures

    def _prepare(
        self, data: bytes, entry: LoadedModel, tta: str, deadline: float, fut: concurrent.futures.Future
    ) -> None:
        queued = False
        try:
            if fut.cancelled():
                return
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed before decoding")
            t0 = time.perf_counter()
            views = self.preprocess(data, entry, tta, deadline)
            self.observer.preprocess(time.perf_counter() - t0)
            # A lone job runs on this thread when another pool thread is left to decode what comes meanwhile
            self.batcher.submit(
                Job(key=(entry.name, entry.version), views=views, future=fut, deadline=deadline),
                run_here=self.settings.decode_threads > 1,
            )
            queued = True
        except ServiceError as e:  # its traceback would keep the decoded image alive as long as the answer
            settle(fut, error=e.with_traceback(None))
        except Exception as e:  # never leak a stack trace to clients
            settle(fut, error=ServiceError(f"preprocessing failed: {type(e).__name__}"))
        finally:
            if not queued:
                self.batcher.prepared(1)

    def preprocess(
        self, data: bytes, entry: LoadedModel, tta: str, deadline: float | None = None
    ) -> np.ndarray:
        """Bytes -> (views, C, H, W) float32 for one image (runs in the pool). The decoded image's memory
        is reserved from the decode memory budget until its views are cut."""
        assert entry.pipeline is not None
        with self.decode_memory.holding(deadline) as hold:
            return entry.pipeline.prepare(data, tta, reserve=hold.reserve)

    def _check(
        self, images: Sequence[bytes], model: str | None, version: str | None, top_k: int | None, tta: str
    ):
        entry = self._entry(model, version)
        augmentation.check_mode(tta)
        assert entry.card is not None
        k = postprocessing.check_top_k(top_k, entry.card.num_classes, self.settings.max_top_k)
        limits.check_count(len(images), self.settings.max_images_per_request)
        return entry, k

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
        """One entry per image; a bad image fails only itself. Request-level problems raise."""
        entry, k = self._check(images, model, version, top_k, tta)
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

    async def infer_tensor(
        self, model: str | None, version: str | None, array: np.ndarray, deadline: float | None = None
    ) -> np.ndarray:
        """Probabilities (N, classes) for an already-preprocessed fp32 NCHW tensor, through the batcher."""
        entry = self._entry(model, version)
        assert entry.session is not None and entry.card is not None
        array = np.ascontiguousarray(array, dtype=np.float32)
        expected = entry.session.input_shape
        if array.ndim != 4 or tuple(array.shape[1:]) != expected or array.shape[0] < 1:
            raise InvalidArgument(
                f"tensor must have shape [N >= 1, {', '.join(map(str, expected))}], got {list(array.shape)}"
            )
        samples = limits.check_count(int(array.shape[0]), self.settings.max_images_per_request, "samples")
        deadline = self._deadline(deadline)
        self.batcher.admit(samples, preparing=False)  # a place in the queue per sample, as per image
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(lambda _f: self.batcher.release(samples))
        self.batcher.submit(Job((entry.name, entry.version), array, fut, deadline), from_preparing=False)
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            fut.cancel()
            raise DeadlineExceeded("deadline passed before inference finished") from None
        assert entry.pipeline is not None
        return entry.pipeline.probabilities(out)
