"""Liveness and readiness tell the truth: a core that cannot start (GPU required, none) is never ready."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from tests.http_server import running_server

# Every answer these tests receive is checked against the server's own /openapi.json.
pytestmark = pytest.mark.usefixtures("openapi_conformance")


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="needs a machine without CUDA to make start-up fail")
def test_failed_start_is_not_live_and_never_ready(tmp_path: Path) -> None:
    with running_server(tmp_path, "--require-gpu", "--models", "lenet5", wait_ready=False) as server:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while c.get("/livez").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert c.get("/livez").status_code == 503
            assert c.get("/readyz").status_code == 503
            ready = c.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json() == {"ready": False}
            live = c.get("/v2/health/live")
            assert live.status_code == 503 and live.json() == {"live": False}
            assert server.proc.poll() is None
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert not inference.ServerLive(grpc_predict_v2_pb2.ServerLiveRequest(), timeout=10).live
            assert not inference.ServerReady(grpc_predict_v2_pb2.ServerReadyRequest(), timeout=10).ready
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_not_ready_while_models_load_then_ready(tmp_path: Path) -> None:
    """Live at once; not ready (HTTP and gRPC health) until every model is loaded and warmed up."""
    from tests.http_server import MODELS

    repo = tmp_path / "repo"
    (repo / "efficientnet_lite0").mkdir(parents=True)
    for v in ("1", "2", "3", "4"):  # four versions to load and warm: long enough to watch the loading
        (repo / "efficientnet_lite0" / v).symlink_to((MODELS / "efficientnet_lite0" / "1").resolve())
    (repo / "efficientnet_lite0" / "version_policy.json").write_text('{"all": {}}')
    seen: list[tuple[int, int, int, int]] = []
    with running_server(tmp_path, "--repository", str(repo), wait_ready=False) as server:
        deadline = time.monotonic() + 180
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                except grpc.RpcError:  # the gRPC server starts a moment after HTTP
                    status = health_pb2.HealthCheckResponse.UNKNOWN
                seen.append(
                    (
                        c.get("/livez").status_code,
                        c.get("/readyz").status_code,
                        c.get("/v2/health/ready").status_code,
                        status,
                    )
                )
                if seen[-1][1] == 200:
                    break
                time.sleep(0.05)
            final = (
                c.get("/readyz").status_code,
                c.get("/v2/health/ready").status_code,
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status,
            )
            answer = c.post("/classify", params={"version": "3"}, content=_jpeg())
        channel.close()
    assert all(live == 200 for live, *_ in seen), seen
    loading = [s for s in seen if s[1] == 503]
    assert loading, f"the server was ready before the first poll: {seen}"
    # The last loading sample may straddle the moment the models became ready (its three probes are asked
    # one after another), so it is left out.
    steady = loading[:-1]
    assert all(s[2] == 503 and s[3] != health_pb2.HealthCheckResponse.SERVING for s in steady), loading
    assert final == (200, 200, health_pb2.HealthCheckResponse.SERVING)
    assert answer.status_code == 200 and answer.json()["version"] == "3"


def _jpeg() -> bytes:
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "JPEG", quality=90)
    return buf.getvalue()
