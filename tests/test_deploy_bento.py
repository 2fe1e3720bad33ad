"""`bentoml build` offline from bentofile.yaml, and the service started the way Kubernetes runs it: HOME
unwritable, every write in a writable TMPDIR/BENTOML_HOME (the pod's emptyDir)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("CNN_SERVE_TEST_MODELS", ROOT / "models"))
# Any connection through these fails at once: a build that needs the network fails visibly.
OFFLINE = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
    "PIP_NO_INDEX": "1",
    "BENTOML_DO_NOT_TRACK": "True",
}


def requirement_pins(text: str) -> set[str]:
    return {ln.strip().lower() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")}


@pytest.mark.slow
def test_bentoml_build_offline_packs_service_protos_and_models(tmp_path: Path) -> None:
    if not (MODELS / "efficientnet_lite0").is_dir():
        pytest.fail(f"no model repository at {MODELS}: run `make models`")
    if not (ROOT / "proto" / "classifier_pb2.py").exists():
        pytest.fail("no gRPC stubs: run `make proto`")
    home = tmp_path / "bentoml"
    env = {**os.environ, **OFFLINE, "BENTOML_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (bento,) = [p for p in (home / "bentos" / "cnn_serve").iterdir() if p.name != "latest"]
    src = bento / "src"
    # The service, the protos with their stubs, and every model file with its card.
    assert (src / "service" / "http" / "service.py").exists()
    # The web page's files (Swagger UI's come from the swagger-ui-py requirement).
    for page_file in (ROOT / "service" / "http" / "static").iterdir():
        assert (src / "service" / "http" / "static" / page_file.name).read_bytes() == page_file.read_bytes()
    assert (src / "service" / "core.py").exists()
    for proto in (ROOT / "proto").glob("*.proto"):
        assert (src / "proto" / proto.name).read_bytes() == proto.read_bytes()
        assert (src / "proto" / f"{proto.stem}_pb2.py").exists()
    for model_file in MODELS.glob("*/*/*"):
        if model_file.suffix in (".onnx", ".json"):
            packed = src / "models" / model_file.relative_to(MODELS)
            assert packed.stat().st_size == model_file.stat().st_size, model_file
    # Nothing else of the working tree: no tests, tooling, caches or PyTorch-side code.
    for unwanted in ("tests", "bench", "export", "build", ".venv", ".pytest_cache"):
        assert not (src / unwanted).exists(), unwanted
    assert not list(src.rglob("__pycache__"))
    # Locking off: the pinned file is taken as it is.
    packed_reqs = (bento / "env" / "python" / "requirements.txt").read_text()
    assert requirement_pins(packed_reqs) == requirement_pins(
        (ROOT / "requirements" / "runtime.txt").read_text()
    )
    assert not any(p.startswith("torch") for p in requirement_pins(packed_reqs))
    # The container it describes: the CUDA 13 cuDNN runtime image, with Python added by our template.
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    froms = [ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("FROM ")]
    assert froms[0].startswith("nvidia/cuda:13.") and "cudnn-runtime" in froms[0]
    assert "python3" in dockerfile and "EXPOSE 3000 50051" in dockerfile
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.http.service:ClassifierService"
    assert {e["name"]: e["value"] for e in meta["envs"]}["CNN_SERVE_REPOSITORY"] == "models"


@pytest.mark.slow
def test_serves_with_home_unwritable(tmp_path: Path, chelsea_jpeg: bytes) -> None:
    """What the pod has: HOME unwritable, writes only under TMPDIR/BENTOML_HOME.

    HOME is a read-only regular file, so nothing can be created under it even by root (tests may run as
    root, which writes through a chmod 500 directory): any write below HOME fails with ENOTDIR.
    """
    home = tmp_path / "home"
    home.write_bytes(b"")
    home.chmod(0o400)
    writable = tmp_path / "tmp"
    writable.mkdir()
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "BENTOML_", "PROMETHEUS_"))}
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(writable),
            "BENTOML_HOME": str(writable / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "XDG_CACHE_HOME": str(home / ".cache"),  # inside the unwritable HOME, like the pod's defaults
            "PYTHONDONTWRITEBYTECODE": "1",
            "CNN_SERVE_REPOSITORY": str(MODELS),
            "CNN_SERVE_MODELS": "lenet5",
            "CNN_SERVE_DEFAULT_MODEL": "lenet5",
            "CNN_SERVE_HOST": "127.0.0.1",
            "CNN_SERVE_HTTP_PORT": str(http_port),
            "CNN_SERVE_GRPC_PORT": str(grpc_port),
            "CNN_SERVE_DRAIN_TIMEOUT_S": "2",
        }
    )
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ready, (tmp_path / "serve.log").read_text()[-4000:]
        assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
        r = httpx.post(
            f"{base}/classify", files={"image": ("cat.jpg", chelsea_jpeg, "image/jpeg")}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "lenet5"
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert "cnn_serve_in_flight_requests" in metrics
        # gRPC health, as the startup probe asks it.
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert home.is_file() and home.read_bytes() == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-4000:]
