"""One ONNX Runtime session per model: provider choice, precision, I/O binding on GPU, warm-up.

On a CPU, `solo_threads` adds a second session of the same graph for batches that run alone (nothing else
queued, decoding or running): it spreads them over that many threads, spinning between operators inside a run,
while the main session serves the batches of a busy service (one thread each, several at once).
A lone request then gets every core without slowing the service under load; the price is a second copy of
the model's weights in memory.

ONNX Runtime silently drops to CPU when CUDA or cuDNN libraries are missing; we compare the providers the
session really got with the ones asked for and, with `require_gpu`, refuse to start instead of serving slowly.
Without it, a session that fell back is served, on the fp32 graph when the precision was `auto`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from service.card import ModelCard, RepositoryError
from service.config import Settings

log = logging.getLogger("service.sessions")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class GpuRequired(RuntimeError):
    """`require_gpu` is set and the session would run on CPU."""


def requested_providers(settings: Settings) -> list[str]:
    """Settings.providers if given, else CUDA (when this onnxruntime build has it) then CPU."""
    if settings.providers:
        return list(settings.providers)
    available = ort.get_available_providers()
    return [p for p in (CUDA, CPU) if p in available]


def batch_buckets(max_batch_size: int, fixed: int | None = None) -> list[int]:
    """Batch sizes warmed up (and padded to on GPU): powers of two up to the max, and the max itself."""
    if fixed:
        return [fixed]
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes


class ModelSession:
    """An ONNX Runtime session for one model card; `run` takes fp32 NCHW (the prepared tensor, transposed here
    for an NHWC graph) and returns fp32 outputs, one row per image."""

    def __init__(self, card: ModelCard, settings: Settings) -> None:
        self.card = card
        self.settings = settings
        providers = requested_providers(settings)
        if settings.require_gpu and CUDA not in providers:
            raise GpuRequired(f"require_gpu is set but {CUDA} is not available to this onnxruntime build")
        on_gpu_requested = bool(providers) and providers[0] == CUDA
        precision = settings.precision
        if precision == "auto":
            precision = "fp16" if on_gpu_requested else "fp32"
        graph = self._open(card, self._pick_file(card, precision), providers)
        if settings.require_gpu and self.provider != CUDA:
            raise GpuRequired(
                f"require_gpu is set but the session fell back to {self.provider} (CUDA or cuDNN missing?)"
            )
        if settings.precision == "auto" and self.precision == "fp16" and self.provider != CUDA:
            # ONNX Runtime fell back to the CPU on its own (CUDA or cuDNN missing): fp16 was chosen for a GPU
            # and only costs time on a CPU, so serve the fp32 graph there.
            log.warning("%s: CUDA unavailable, on %s: serving the fp32 graph", card.name, self.provider)
            del graph  # this copy of the fp16 bytes goes before the fp32 ones are read
            graph = self._open(card, self._pick_file(card, "fp32"), providers)
        self.on_gpu = self.provider == CUDA
        self.solo: ort.InferenceSession | None = None
        if settings.solo_threads and not self.on_gpu:  # from the same checked bytes: no second read and hash
            options = self._options(threads=settings.solo_threads, spinning=True)
            self.solo = ort.InferenceSession(graph, sess_options=options, providers=[CPU])
        del graph  # ONNX Runtime holds its own copy: a VGG's 550 MB must not stay alive here too
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = card.output.name if card.output.name in outputs else outputs[0]
        first = inp.shape[0] if inp.shape else None
        # A graph that declares a dynamic batch but runs one image at a time says so in its card.
        self.fixed_batch = first if isinstance(first, int) and first > 0 else card.fixed_batch
        # What callers hand `run`: the prepared NCHW tensor, whatever the graph's own layout.
        self.input_shape = tuple(card.preprocessing.input_size)
        self.nhwc = card.layout == "NHWC"
        self.buckets = batch_buckets(settings.max_batch_size, self.fixed_batch)
        self._lock = threading.Lock()
        self.preferred_batch = self.buckets[-1]  # until warm_up measures the buckets
        self.turn_batch = self.buckets[0]
        self.per_image_s: dict[int, float] = {}

    def _open(self, card: ModelCard, fname: str, providers: Sequence[str]) -> bytes:
        """Open the session on `fname`; the graph's checked bytes are returned for a solo session."""
        graph = card.read_verified(fname)  # sha256 of the very bytes ONNX Runtime gets
        self.file = fname  # the graph file served (`service.integrity` compares it with what is loaded)
        self.precision = card.files[fname].precision
        self.session = ort.InferenceSession(
            graph, sess_options=self._options(), providers=self._provider_options(providers)
        )
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        return graph

    @staticmethod
    def _pick_file(card: ModelCard, precision: str) -> str:
        path = card.file(precision)
        if path is None and precision == "fp16":  # no fp16 graph in the card: serve fp32 rather than nothing
            path = card.file("fp32")
        if path is not None:
            return path.name
        raise RepositoryError(f"no {precision} graph listed in the card")

    def _options(self, threads: int | None = None, spinning: bool | None = None) -> ort.SessionOptions:
        """Session options: `intra_op_threads` and `thread_spinning` unless given. The card's `optimization`
        says what the saved graph already has (the exporter keeps files portable); at run time ONNX Runtime
        may apply every optimization for the provider it got.
        Thread spinning is off by default: decoding threads run beside inference and spinning ones would
        starve them. `thread_spinning` turns it on inside a run only: with `session.force_spinning_stop` the
        threads stop spinning when the last run returns, so an idle service burns no CPU (or pod quota).
        """
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self.settings.intra_op_threads if threads is None else threads
        if threads:
            so.intra_op_num_threads = threads
        # Independent branches (Inception's, GoogLeNet's) run at once only in parallel mode; with one inter-op
        # thread ONNX Runtime runs the nodes one after another, each spread over the intra-op threads.
        if self.settings.inter_op_threads > 1:
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            so.inter_op_num_threads = self.settings.inter_op_threads
        else:
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if (self.settings.thread_spinning if spinning is None else spinning) else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        so.add_session_config_entry("session.force_spinning_stop", spin)
        so.log_severity_level = 3
        return so

    def _provider_options(self, providers: Sequence[str]) -> list[str | tuple[str, dict[str, str]]]:
        out: list[str | tuple[str, dict[str, str]]] = []
        for p in providers:
            if p == CUDA:
                opts = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
                if self.settings.gpu_mem_limit_mb:
                    opts["gpu_mem_limit"] = str(self.settings.gpu_mem_limit_mb * 1024 * 1024)
                out.append((p, opts))
            else:
                out.append(p)
        return out

    def bucket(self, n: int) -> int:
        """The smallest warmed batch size holding n (GPU pads to it; CPU runs n as is)."""
        for b in self.buckets:
            if b >= n:
                return b
        return n

    def run(self, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        """Raw network outputs (fp32) for an fp32 NCHW batch of any size (split by the fixed batch if any).
        `alone`: nothing else is running or waiting, so the solo session (if any) may take every core."""
        session = self.solo if alone and self.solo is not None else self.session
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.fixed_batch and batch.shape[0] != self.fixed_batch:
            parts = []
            for i in range(0, batch.shape[0], self.fixed_batch):
                chunk = batch[i : i + self.fixed_batch]
                n = chunk.shape[0]
                if n < self.fixed_batch:
                    chunk = np.concatenate(
                        [chunk, np.zeros((self.fixed_batch - n, *chunk.shape[1:]), np.float32)]
                    )
                parts.append(self._run(chunk, session)[:n])
            return np.concatenate(parts)
        n = batch.shape[0]
        if self.on_gpu:
            b = self.bucket(n)
            if b > n:  # fixed shapes keep cuDNN's tuned algorithms
                batch = np.concatenate([batch, np.zeros((b - n, *batch.shape[1:]), np.float32)])
            return self._run_bound(batch)[:n]
        return self._run(batch, session)

    def _feed(self, batch: np.ndarray) -> np.ndarray:
        """The graph's input: the prepared NCHW batch, channels moved last for an NHWC graph."""
        return np.ascontiguousarray(batch.transpose(0, 2, 3, 1)) if self.nhwc else batch

    @staticmethod
    def _rows(out: np.ndarray) -> np.ndarray:
        """One row of scores per image: [N, C, 1, 1] (a graph ending in a 1x1 convolution or a global pooling
        without flatten) is read as [N, C]."""
        out = np.asarray(out, dtype=np.float32)
        return out.reshape(out.shape[0], -1) if out.ndim > 2 else out

    def _run(self, batch: np.ndarray, session: ort.InferenceSession) -> np.ndarray:
        out = session.run([self.output_name], {self.input_name: self._feed(batch)})[0]
        return self._rows(out)

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        """GPU: I/O binding, so ONNX Runtime copies the input once and allocates the output on the device."""
        with self._lock:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, self._feed(batch))
            binding.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        return self._rows(out)

    def warm_up(self, timed_passes: int = 3) -> None:
        """Run every batch-size bucket: first runs allocate arenas and (on GPU) pick kernels.

        Then `timed_passes` passes over all buckets, interleaved so that a noisy moment on a shared host hits
        one pass rather than one bucket, give the cost per image (the least seen per bucket), and
        `preferred_batch` caps the batcher's batches (see `pick_batch`). The cost is what throughput under
        load pays for: on GPU the wall time of a run; on CPU the process's CPU time, because there the decode
        threads share the cores with inference, so a run that keeps two cores busy for 3 ms costs 6 ms of
        the machine, whatever its wall time (nothing else of the process runs during warm-up).
        """

        # Normalized pixels look like a standard normal; zeros can run faster on a GPU than real data does.
        # One array, sliced per bucket: a fresh one per run would double the memory warm-up needs.
        rng = np.random.default_rng(0)
        data = rng.standard_normal((self.buckets[-1], *self.input_shape), dtype=np.float32)
        for b in self.buckets:
            self.run(data[:b])
        clock = time.perf_counter if self.on_gpu else time.process_time
        per_image = {b: float("inf") for b in self.buckets}
        for _ in range(max(1, timed_passes)):
            for b in self.buckets:
                x = data[:b]
                t0 = clock()
                self.run(x)
                per_image[b] = min(per_image[b], (clock() - t0) / b)
        self.per_image_s = per_image
        self.preferred_batch = pick_batch(per_image)
        self.turn_batch = pick_turn(per_image)
        if not self.on_gpu:
            self._settle_memory(data)

    def _settle_memory(self, data: np.ndarray) -> None:
        """CPU: the batcher runs at most `preferred_batch` views at a time, so the activation memory of the
        larger buckets goes back (how much: see docs/CORE.md, "Batching"); a later larger run (batch
        scoring) takes it again. The solo session is warmed up to that size only."""
        if self.solo is not None:
            for b in self.buckets:
                if b <= self.preferred_batch:
                    self.run(data[:b], alone=True)
        self._shrink(self.session, data[: self.preferred_batch])

    def release_arena(self) -> None:
        """CPU: give back what ONNX Runtime's arena took beyond one image's run (a fixed batch's, if any).
        Under load the batcher's concurrent runs, and the solo session's, grow each arena to their sum, which
        it keeps for good (see docs/BENCHMARKS.md, "Hostile load"); the idle trim calls this when nothing
        runs. An arena frees only whole regions that are unused at the end of a run."""
        if self.on_gpu:
            return
        one = np.zeros((self.fixed_batch or 1, *self.input_shape), np.float32)  # a fixed batch is a whole one
        self._shrink(self.session, one)
        if self.solo is not None:
            self._shrink(self.solo, one)

    def _shrink(self, session: ort.InferenceSession, batch: np.ndarray) -> None:
        """One run of `batch` that ends by freeing the arena's unused regions."""
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        session.run([self.output_name], {self.input_name: self._feed(batch)}, shrink)

    def describe(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "providers": list(self.providers),
            "precision": self.precision,
            "batch_buckets": list(self.buckets),
            "preferred_batch": self.preferred_batch,
            "turn_batch": self.turn_batch,
            "per_image_s": dict(self.per_image_s),
            "per_image_clock": "wall" if self.on_gpu else "cpu",
            "io_binding": self.on_gpu,
            "solo_threads": self.settings.solo_threads if self.solo is not None else 0,
        }


PICK_TOLERANCE = 0.03


def pick_batch(per_image: dict[int, float], tolerance: float = PICK_TOLERANCE) -> int:
    """The batch cap: the largest bucket costing at most `tolerance` more per image than the cheapest.

    On GPU the cost falls with the batch until the device is full, so this is a large bucket. On a CPU with
    a few cores, batches of a depthwise network such as EfficientNet-Lite0 can overflow the caches, so that
    a larger batch costs more per image and a small cap serves more images per second under load (see
    docs/BENCHMARKS.md, `bench/bench_core.py --caps`). The tolerance lets a larger batch win a near tie
    (fewer batcher hand-offs) but stays below the gap between such buckets.
    """
    finite = {b: t for b, t in per_image.items() if math.isfinite(t) and t >= 0}
    if not finite:
        raise ValueError("no batch size was timed")
    best = min(finite.values())
    return max(b for b, t in finite.items() if t <= best * (1 + tolerance))


TURN_FACTOR = 2.0


def pick_turn(per_image: dict[int, float], factor: float = TURN_FACTOR) -> int:
    """A large request's turn: the largest bucket whose run costs at most `factor` times the smallest
    bucket's. The batcher gives a large request at most this many views of a batch, so that a small request
    waits behind a run about as short as its own. On GPU, where a
    run's time hardly grows with the batch until the device is full, that is a large bucket; on a CPU, one
    of two or three images.
    """
    finite = {b: t for b, t in per_image.items() if math.isfinite(t) and t >= 0}
    if not finite:
        raise ValueError("no batch size was timed")
    smallest = min(finite)
    budget = factor * smallest * finite[smallest]
    return max([smallest, *(b for b, t in finite.items() if b * t <= budget)])
