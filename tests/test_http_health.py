"""Liveness and readiness tell the truth: a core that cannot start (GPU required, none) is never ready."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.test_http_server_helpers import running_server


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
            assert c.get("/v2/health/live").status_code == 200  # the process answers; the core is what failed
            assert server.proc.poll() is None
