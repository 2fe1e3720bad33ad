"""Prometheus metrics of the service, shared by the HTTP and gRPC transports.

BentoML serves `/metrics` from Prometheus' multiprocess files (`PROMETHEUS_MULTIPROC_DIR`), so the metrics
are created by `Metrics()` in the worker at start-up, never at import time: a metric made before the worker
set the directory would live only in memory and never appear. For the same reason the model info is a gauge
(value 1, labelled name/version/provider), since `Info` does not work in multiprocess mode, and every gauge
names its multiprocess mode.

`Metrics` also implements the core's observer protocol (`queue_depth`, `decode_memory`, `queue_wait`,
`preprocess`, `inference`), so the core reports batching figures without importing prometheus.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from service.looplag import LATE_S

if TYPE_CHECKING:
    from service.core import ModelInfo

PREFIX = "cnn_serve"

# Latency buckets from 1 ms to 30 s: CPU CNNs answer in tens to hundreds of milliseconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The event loop's lag, from a millisecond (a loop with nothing to do) to seconds (a loop blocked).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The lag gauge shows the largest lag of the current and the previous window of this length: a stall stays
# visible for at least one window, whenever it is scraped.
LAG_WINDOW_S = 10.0
# Late lag samples are counted by cause (`service.looplag`) at or over each of these.
LATE_BOUNDS = (LATE_S, 2 * LATE_S)


def _prometheus() -> Any:
    """prometheus_client, switched to multiprocess values if the worker set the directory after its import."""
    import prometheus_client
    from prometheus_client import values

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()
    return prometheus_client


class Metrics:
    """Every metric of one worker process; create it once, in the worker, at start-up."""

    def __init__(self, registry: Any = None) -> None:
        prom = _prometheus()
        # A private registry: in multiprocess mode the values go to files whatever the registry, and a
        # private one lets tests create several `Metrics` in one process without name clashes.
        self.registry = registry if registry is not None else prom.CollectorRegistry(auto_describe=True)
        self._models: frozenset[str] = frozenset()  # names that may be a `model` label (see `request`)
        r = self.registry
        self.requests = prom.Counter(
            f"{PREFIX}_requests",
            "Requests answered, by model, the version that answered, endpoint, protocol and status.",
            ["model", "version", "endpoint", "protocol", "status"],
            registry=r,
        )
        self.request_seconds = prom.Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Total time to answer a request.",
            ["model", "version", "endpoint", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = prom.Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a request waited in the batcher's queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = prom.Histogram(
            f"{PREFIX}_preprocess_seconds",
            "Time to decode and preprocess one request's images.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = prom.Histogram(
            f"{PREFIX}_inference_seconds",
            "Time of one ONNX Runtime call (one batch).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = prom.Histogram(
            f"{PREFIX}_batch_size",
            "Images per ONNX Runtime call.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth_gauge = prom.Gauge(
            f"{PREFIX}_queue_depth",
            "Requests waiting in the batcher's queue.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.decode_memory_gauge = prom.Gauge(
            f"{PREFIX}_decode_memory_bytes",
            "Memory reserved by the images being decoded (estimates), against decode_memory_mb.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.receive_memory_gauge = prom.Gauge(
            f"{PREFIX}_receive_memory_bytes",
            "Bytes reserved by requests being received and not yet answered, against receive_memory_mb.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight_gauge = prom.Gauge(
            f"{PREFIX}_in_flight_requests",
            "Requests being answered now, by protocol.",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_info_gauge = prom.Gauge(
            f"{PREFIX}_model_info",
            "Loaded models (value 1), labelled with name, version and provider.",
            ["name", "version", "provider", "state"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.load_failures = prom.Counter(
            f"{PREFIX}_model_load_failures",
            "Model versions that failed to load (corrupt graph, sha256 mismatch, invalid card, warm-up).",
            ["model"],
            registry=r,
        )
        self.versions_loaded = prom.Gauge(
            f"{PREFIX}_model_versions_loaded",
            "Versions of a model ready to answer now.",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.loop_lag_seconds = prom.Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop that HTTP and gRPC share runs a timer (sampled every 50 ms).",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = prom.Gauge(
            f"{PREFIX}_event_loop_lag_max_seconds",
            f"The largest event loop lag of the last {LAG_WINDOW_S:g} to {2 * LAG_WINDOW_S:g} seconds.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self._lag_window = (time.monotonic(), 0.0, 0.0)  # (window start, its max, the previous window's max)
        self.loop_late = prom.Counter(
            f"{PREFIX}_event_loop_late_samples",
            "Event loop lag samples of 25 ms or more (`over`: 0.025, or 0.05 for those of 50 ms or more), by "
            "cause: gc (the garbage collector ran at least half the lag), core_wait (the loop's thread "
            "waited for a core at least half the lag), callbacks (it ran: the loop's own callbacks held it), "
            "lock (it was blocked: the interpreter lock another thread held), unknown (the kernel does not "
            "say).",
            ["cause", "over"],
            registry=r,
        )
        self.loop_core_wait = prom.Counter(
            f"{PREFIX}_event_loop_core_wait_seconds",
            "Time the event loop's thread was ready to run but waited for a core (busy cores, CPU limit).",
            registry=r,
        )
        self.gc_collections = prom.Counter(
            f"{PREFIX}_gc_collections",
            "Passes of Python's garbage collector in the worker, by generation (2: full). Each holds the "
            "interpreter lock, and so the event loop, while it runs.",
            ["generation"],
            registry=r,
        )
        self.gc_seconds = prom.Counter(
            f"{PREFIX}_gc_seconds",
            "Time Python's garbage collector ran in the worker, by generation (2: full).",
            ["generation"],
            registry=r,
        )
        self.connections_refused = prom.Counter(
            f"{PREFIX}_http_connections_refused",
            "HTTP connections answered 503 and closed at once: max_connections were open.",
            registry=r,
        )
        self.connections_timed_out = prom.Counter(
            f"{PREFIX}_http_connections_timed_out",
            "HTTP connections closed by a timeout: idle (idle_timeout_s) or headers (header_timeout_s, 408).",
            ["reason"],
            registry=r,
        )
        self.files_intact = prom.Gauge(
            f"{PREFIX}_model_files_intact",
            "1 while the files a ready model version was loaded from still match what it serves, else 0.",
            ["model", "version"],
            multiprocess_mode="livemin",
            registry=r,
        )

    # --- transports -------------------------------------------------------------------------------------
    def request(
        self, model: str, endpoint: str, protocol: str, status: str, seconds: float, version: str = ""
    ) -> None:
        """Count one answered request and record its total latency.

        `model` is what the client asked for: only names of the repository's models (`model_info`) become
        labels, anything else is "-", so that clients cannot grow the series without bound. `version` is the
        one that produced the answer (never the client's words), "-" when no version answered."""
        model = model if model in self._models else "-"
        version = version if model != "-" and version.isdigit() and len(version) <= 12 else "-"
        self.requests.labels(model, version, endpoint, protocol, str(status)).inc()
        self.request_seconds.labels(model, version, endpoint, protocol).observe(max(0.0, seconds))

    @contextmanager
    def in_flight(self, protocol: str) -> Iterator[None]:
        """Count a request as in flight while the block runs."""
        gauge = self.in_flight_gauge.labels(protocol)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    @contextmanager
    def timed_request(self, model: str, endpoint: str, protocol: str) -> Iterator[dict[str, str]]:
        """In flight and timed; the caller sets `status` (and `model` if it learns it) in the yielded dict."""
        outcome = {"status": "ok", "model": model, "version": ""}
        start = time.perf_counter()
        with self.in_flight(protocol):
            try:
                yield outcome
            finally:
                elapsed = time.perf_counter() - start
                self.request(
                    outcome["model"], endpoint, protocol, outcome["status"], elapsed, outcome["version"]
                )

    def event_loop_lag(self, seconds: float, late_cause: str | None = None) -> None:
        """One sample of the loop's lag (`service.looplag`), with its cause when it is late."""
        self.loop_lag_seconds.observe(seconds)
        if late_cause is not None:
            for bound in LATE_BOUNDS:
                if seconds >= bound:
                    self.loop_late.labels(late_cause, f"{bound:g}").inc()
        now = time.monotonic()
        start, current, previous = self._lag_window
        if now - start >= LAG_WINDOW_S:
            start, current, previous = now, 0.0, current
        current = max(current, seconds)
        self._lag_window = (start, current, previous)
        self.loop_lag_max.set(max(current, previous))

    def event_loop_core_wait(self, seconds: float) -> None:
        self.loop_core_wait.inc(max(0.0, seconds))

    def garbage_collected(self, generation: int, collections: int, seconds: float) -> None:
        self.gc_collections.labels(str(generation)).inc(collections)
        self.gc_seconds.labels(str(generation)).inc(max(0.0, seconds))

    def connection_refused(self) -> None:
        self.connections_refused.inc()

    def connection_timed_out(self, reason: str) -> None:
        """`reason`: idle or headers."""
        self.connections_timed_out.labels(reason).inc()

    def model_info(self, models: Sequence[ModelInfo]) -> None:
        """Publish one `model_info` sample per model version (from `core.models()`, again whenever the model
        set changes: a version unloaded leaves no sample); their names become labels."""
        self._models = self._models | {m.name for m in models}
        self.model_info_gauge.clear()
        for m in models:
            self.model_info_gauge.labels(m.name, m.version, m.provider, m.state).set(1)

    # --- the core's observer ----------------------------------------------------------------------------
    def queue_depth(self, n: int) -> None:
        self.queue_depth_gauge.set(n)

    def decode_memory(self, nbytes: int) -> None:
        self.decode_memory_gauge.set(nbytes)

    def receive_memory(self, nbytes: int) -> None:
        self.receive_memory_gauge.set(nbytes)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(max(0.0, seconds))

    def preprocess(self, seconds: float) -> None:
        self.preprocess_seconds.observe(max(0.0, seconds))

    def inference(self, seconds: float, batch_size: int, model: str, version: str) -> None:
        self.inference_seconds.labels(model, version).observe(max(0.0, seconds))
        self.batch_size.labels(model, version).observe(batch_size)

    def model_load_failure(self, model: str) -> None:
        self.load_failures.labels(model).inc()

    def model_versions(self, model: str, loaded: int) -> None:
        """Also makes a model loaded after start-up a valid `model` label of the request metrics."""
        self._models = self._models | {model}
        self.versions_loaded.labels(model).set(loaded)

    def model_files_intact(self, model: str, version: str, intact: bool) -> None:
        self.files_intact.labels(model, version).set(1 if intact else 0)
