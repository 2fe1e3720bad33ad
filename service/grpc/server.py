"""The grpc.aio server that runs beside BentoML's HTTP worker, in the same process and on the same core.

It serves `cnnserve.v1.ImageClassifier`, `inference.GRPCInferenceService`, `grpc.health.v1.Health` (the
server "" and each model name, SERVING only once ready) and server reflection. With TLS configured, a
second, plaintext port (Settings.grpc_health_port) serves only health, for Kubernetes' gRPC probe, which
sends neither TLS nor metadata. The port is bound with SO_REUSEPORT off, so that a second server on the same
port fails loudly instead of silently sharing the traffic. Token, request ids, metrics, access log and error
statuses are one interceptor's (`service/grpc/interceptor.py`), for the servicers and reflection alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import classifier_pb2_grpc, grpc_predict_v2_pb2_grpc
from service.config import Settings
from service.core import InferenceCore
from service.grpc.classifier import ImageClassifierServicer
from service.grpc.inference import InferenceServicer
from service.grpc.interceptor import CLASSIFIER_SERVICE, HEALTH_SERVICE, INFERENCE_SERVICE, ServiceInterceptor
from service.metrics import Metrics

log = logging.getLogger("service.grpc")

HEALTH_REFRESH_S = 0.5
# The drain stops the server once no call has been in a handler for this long.
SETTLE_S, SETTLE_POLL_S = 0.2, 0.02
# Room for the answer to a full batch (probabilities of 1000 classes per image) whatever the receive limit.
MIN_SEND_BYTES = 16 * 1024 * 1024
# A health request names a service: the health-only port takes no larger message.
HEALTH_MESSAGE_BYTES = 4096


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """What gRPC's own C core enforces on each port's connections, as uvicorn's are guarded for HTTP
    (`service/http/connections.py`): a connection past `grpc_max_connections` is closed at accept; one whose
    client has not sent its HTTP/2 settings (after TLS) within `grpc_handshake_timeout_s` is sent GOAWAY and
    closed, whatever it sends byte by byte; one without a call for `grpc_idle_timeout_s` is sent GOAWAY and
    closed, and a client's channel connects again for its next call; at most `grpc_max_streams` calls are
    open at once on one connection (the client holds its next ones until one ends). Without them a
    connection that never sent its settings stayed open for the core's default of two minutes, one without
    calls for ever, and neither their number, each a file descriptor of the worker that HTTP shares, nor
    the calls on each had a bound (a call's wait for its message is the interceptor's, `_first`). The core
    counts and logs none of these: its clients see UNAVAILABLE, or a new connection.

    Without `grpc_bdp_probe` the core never widens a stream's window past HTTP/2's 64 KiB before its
    handler asks for a message: a call waiting for room in the receive budget (`service/receiving.py`)
    then holds no more of its message than that. With it, the window grows with the measured bandwidth and
    delay, up to 64 MiB a stream whatever the budget."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", int(settings.grpc_max_connections)),
        ("grpc.server_handshake_timeout_ms", round(settings.grpc_handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(settings.grpc_idle_timeout_s * 1000)),
        ("grpc.max_concurrent_streams", int(settings.grpc_max_streams)),
        ("grpc.http2.bdp_probe", int(settings.grpc_bdp_probe)),
    ]


class GrpcServer:
    """Start and stop the gRPC transport; `port` is the bound port (useful with grpc_port=0)."""

    def __init__(self, core: InferenceCore, settings: Settings, metrics: Metrics | None = None) -> None:
        self.core = core
        self.settings = settings
        self.metrics = metrics
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.health_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._watch: asyncio.Task | None = None
        self.interceptor = ServiceInterceptor(settings, metrics, core.receive_memory)

    def _options(self) -> list[tuple[str, Any]]:
        limit = int(self.settings.max_request_bytes)
        return [
            *connection_options(self.settings),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, MIN_SEND_BYTES)),
        ]

    def _address(self, port: int) -> str:
        host = self.settings.host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _credentials(self) -> grpc.ServerCredentials | None:
        if not self.settings.grpc_tls_cert:
            return None
        key = Path(self.settings.grpc_tls_key).read_bytes()
        cert = Path(self.settings.grpc_tls_cert).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])

    async def start(self) -> None:
        """Bind and serve; raises RuntimeError if a port cannot be bound (e.g. already in use)."""
        server = grpc.aio.server(options=self._options(), interceptors=[self.interceptor])
        classifier_pb2_grpc.add_ImageClassifierServicer_to_server(
            ImageClassifierServicer(self.core, self.settings), server
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.core, self.settings), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (CLASSIFIER_SERVICE, INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        credentials = self._credentials()
        self.port = _bind(server, self._address(self.settings.grpc_port), credentials)
        health_server = None
        if credentials is not None and self.settings.grpc_health_port:
            # The same interceptor: its calls count with the main port's, and wait for their message within
            # the receive budget and the request timeout.
            health_server = grpc.aio.server(
                options=[
                    *connection_options(self.settings),
                    ("grpc.max_receive_message_length", HEALTH_MESSAGE_BYTES),
                ],
                interceptors=[self.interceptor],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = _bind(health_server, self._address(self.settings.grpc_health_port), None)
        await self.refresh_health()
        await server.start()
        if health_server is not None:
            await health_server.start()
        self._server, self._health_server = server, health_server
        self._watch = asyncio.create_task(self._watch_health(), name="grpc-health")
        log.info(
            "gRPC serving on port %s (%s)%s",
            self.port,
            "TLS" if credentials else "plaintext",
            f", health only on plaintext port {self.health_port}" if self.health_port else "",
        )

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, answer every call in flight or already on its way, then stop; within `grace`.

        The server is stopped once no call has been in our handlers for a moment (at the latest after half
        the grace, so that a steady stream of new calls cannot hold it: they are then refused, UNAVAILABLE,
        and the running ones get the other half). Stopping it at once (grpc's `stop(grace)`) let the running
        calls finish but cancelled those that had arrived and not yet been handed to a handler, as when a
        burst is still being taken in: their clients got CANCELLED for calls sent before the signal."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        deadline = started + grace
        log.info("gRPC: draining, NOT_SERVING (grace %s s)", grace)
        await self._settle(started + grace / 2)
        servers = [s for s in (self._server, self._health_server) if s is not None]
        await asyncio.gather(*(s.stop(max(0.0, deadline - time.monotonic())) for s in servers))
        log.info("gRPC: stopped after %.2f s", time.monotonic() - started)
        self._server = self._health_server = None

    async def _settle(self, deadline: float) -> None:
        """Until no call has been in a handler for SETTLE_S (arriving calls are served) or `deadline`."""
        quiet_since = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.interceptor.active:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= SETTLE_S:
                return
            await asyncio.sleep(SETTLE_POLL_S)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def refresh_health(self) -> None:
        """SERVING for "" and the services once the core is ready; per model by its state once loading is
        over (a good model serves beside a broken one even while strict readiness keeps "" NOT_SERVING)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = bool(self.core.ready)
        for service in ("", CLASSIFIER_SERVICE, INFERENCE_SERVICE):
            await self.health.set(service, serving if ready else not_serving)
        for model in self.core.models():
            await self.health.set(model.name, serving if model.ready and self.core.loaded else not_serving)

    async def _watch_health(self) -> None:
        while True:
            try:
                await self.refresh_health()
            except Exception:  # noqa: BLE001 - keep watching; a failed refresh leaves the last status
                log.exception("gRPC health refresh failed")
            await asyncio.sleep(HEALTH_REFRESH_S)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC cannot bind {address} (in use?): {exc}") from None
    if not port:
        raise RuntimeError(f"gRPC cannot bind {address} (in use?)")
    return port


__all__ = ["GrpcServer"]
