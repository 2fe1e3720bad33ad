"""The BentoML service: one worker per process, holding the inference core, the metrics and the gRPC server.

`python -m service serve` runs `bentoml serve service.http.service:ClassifierService` with the settings in the
environment (`Settings.to_env()`), read here once. Everything heavy happens in the worker at start-up: the
metrics are created there (Prometheus multiprocess mode), the models load in the background so that `/livez`
answers at once while `/readyz` (`__is_ready__`) stays 503 until every model is loaded and warmed up, and the
gRPC server starts in the same process so both transports share the core and its batcher.

Shutdown: on SIGTERM uvicorn stops accepting and finishes in-flight HTTP requests (up to the graceful timeout
that `python -m service serve` sets from `drain_timeout_s`); then `on_shutdown` drains gRPC and the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import bentoml

from service import logs
from service.arbiter import report_fatal
from service.collector import LoopCollector
from service.config import Settings
from service.core import InferenceCore
from service.looplag import LoopLagMonitor
from service.memory import settle_heap
from service.metrics import Metrics
from service.oip import OpenInference
from service.priority import make_realtime
from service.storage import RepositoryError, is_url

from . import connections, tracing, traffic
from .api import build_app
from .middleware import RequestContextMiddleware
from .parsing import BodyParser
from .routes import Runtime

if TYPE_CHECKING:
    from service.grpc.server import GrpcServer

log = logging.getLogger("cnn_serve.http")

SETTINGS = Settings.from_env()
logs.configure(SETTINGS.log_level)
app = build_app(SETTINGS)
# The connection limit and the idle and header timeouts: the HTTP protocol uvicorn builds after this import.
connections.install(SETTINGS, lambda: getattr(getattr(app.state, "runtime", None), "metrics", None))
traffic.install()
tracing.install()


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="cnn_serve",
    workers=1,
    traffic={"timeout": max(1.0, SETTINGS.request_timeout_s + SETTINGS.drain_timeout_s)},
    http={"host": SETTINGS.host, "port": SETTINGS.http_port},
    # Our middleware writes one JSON access line per request; BentoML's text line would double it.
    logging={"access": {"enabled": False}},
)
class ClassifierService:
    """Owns the process-wide objects; the routes reach them through `app.state.runtime`."""

    def __init__(self) -> None:
        self.settings: Settings = SETTINGS
        self.core: InferenceCore | None = None
        self.grpc: GrpcServer | None = None
        self.metrics: Metrics | None = None
        self.load_task: asyncio.Task | None = None
        self.grpc_drain: asyncio.Task | None = None
        self.lag: LoopLagMonitor | None = None
        self.collector = LoopCollector()
        self.parser: BodyParser | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "uvloop" or "asyncio"
        log.info("HTTP and gRPC share one %s event loop (event_loop=%s)", loop, self.settings.event_loop)
        if self.settings.loop_realtime_priority:
            refused = make_realtime(self.settings.loop_realtime_priority)
            if refused:
                log.warning("the event loop stays in the ordinary scheduling class: %s", refused)
            else:
                log.info("the event loop runs at real-time priority %d", self.settings.loop_realtime_priority)
        self.metrics = Metrics()
        self.lag = LoopLagMonitor(self.metrics)
        self.lag.start()
        self.core = InferenceCore(self.settings, observer=self.metrics)
        protocol = OpenInference(self.core, self.settings)
        self.parser = BodyParser(self.settings.parse_processes)
        app.state.runtime = Runtime(self.settings, self.core, self.metrics, protocol, self.parser)
        if self.settings.grpc_port > 0:  # bound before any model loads: a taken port must cost nothing
            from service.grpc.server import GrpcServer

            self.grpc = GrpcServer(self.core, self.settings, self.metrics)
            try:
                await self.grpc.start()
            except Exception as exc:  # a port taken, a key unreadable: a restarted worker would fail alike
                self.grpc = None
                if not report_fatal(
                    str(exc) if isinstance(exc, RuntimeError) else f"gRPC cannot start: {exc}"
                ):
                    raise  # no arbiter of ours to stop: fail the start-up
                return  # the arbiter stops the server (exit 1); no model loads meanwhile
            self._drain_grpc_on_sigterm()
        self.load_task = asyncio.create_task(self._load())

    def _drain_grpc_on_sigterm(self) -> None:
        """Start draining gRPC when SIGTERM arrives, alongside uvicorn's HTTP drain, not after it.

        uvicorn installed its handler before our start-up hook ran; ours calls it after scheduling the drain.
        """
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: Any) -> None:
            if self.grpc_drain is None and self.grpc is not None:
                self.grpc_drain = loop.create_task(self.grpc.stop(self.settings.drain_timeout_s))
            previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: gRPC then drains in on_shutdown, after HTTP
            pass

    async def _load(self) -> None:
        assert self.core is not None and self.metrics is not None
        try:
            await self.core.start(before_ready=settle_heap)
        except Exception as exc:  # a failed start-up: not live, never ready, and the log says why
            log.error("inference core failed to start: %s", exc)
            if isinstance(exc, RepositoryError) and is_url(self.settings.repository):
                # a bucket out of reach or missing: a restarted worker would fail alike, the server stops
                report_fatal(str(exc))
            return
        finally:
            if self.grpc is not None:  # gRPC health follows at once, not at its next periodic refresh
                await self.grpc.refresh_health()
        if self.settings.loop_full_collections and self.collector.start():
            log.info("full garbage collections run on the event loop's thread")
        models = self.core.models()
        self.metrics.model_info(models)
        log.info("models ready: %s", ", ".join(f"{m.name}/{m.version}" for m in models))

    @bentoml.on_shutdown
    async def stop(self) -> None:
        grace = self.settings.drain_timeout_s
        if self.grpc is not None:
            if self.grpc_drain is None:
                self.grpc_drain = asyncio.ensure_future(self.grpc.stop(grace))
            await self.grpc_drain
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
        if self.core is not None:
            await self.core.stop()
        await self.collector.stop()
        if self.lag is not None:
            await self.lag.stop()
        if self.parser is not None:
            self.parser.close()

    def __is_ready__(self) -> bool:
        return bool(self.core is not None and self.core.ready and self.core.live)

    def __is_alive__(self) -> bool:
        return self.core is None or self.core.live


ClassifierService.add_asgi_middleware(
    RequestContextMiddleware,
    settings=SETTINGS,
    metrics=lambda: getattr(getattr(app.state, "runtime", None), "metrics", None),
    core=lambda: getattr(getattr(app.state, "runtime", None), "core", None),
)
