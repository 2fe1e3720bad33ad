"""Starting the real service (`python -m service serve`) on loopback for the tests that need a server.

No test here: the helpers that `test_http*`, `test_metrics_http`, `test_shutdown`, `test_serve_only` share.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("TEST_MODEL_REPOSITORY", ROOT / "models"))


# Each server's own OpenAPI document, by URL, fetched once it answers: `conftest.openapi_conformance` checks
# the answers the tests receive against it.
DOCUMENTS: dict[str, dict] = {}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    grpc_port: int
    log_path: Path
    token: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def running_server(
    tmp: Path,
    *flags: str,
    env_extra: dict[str, str] | None = None,
    python: str = sys.executable,
    ready_timeout: float = 240.0,
    wait_ready: bool = True,
) -> Iterator[Server]:
    """The service as a subprocess on free loopback ports, ready (every model warmed) when yielded.

    With `wait_ready=False` it is yielded as soon as `/livez` answers at all (200 or 503).
    """
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "PROMETHEUS_"))}
    env.update(env_extra or {})
    env["BENTOML_HOME"] = str(tmp / "bentoml")
    env["PYTHONFAULTHANDLER"] = "1"  # a SIGABRT makes a process write every thread's stack to the log
    log_path = tmp / f"server-{http_port}.log"
    cmd = [
        python,
        "-m",
        "service",
        "serve",
        "--repository",
        str(MODELS),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--intra-op-threads",
        "1",
        *flags,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{http_port}"
    token = env.get("CNN_SERVE_AUTH_TOKEN", "")
    if "--auth-token" in flags:
        token = flags[flags.index("--auth-token") + 1]
    server = Server(proc, url, grpc_port, log_path, token)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if wait_ready and httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
                if not wait_ready and httpx.get(url + "/livez", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {ready_timeout}s:\n{server.log()[-4000:]}")
            time.sleep(0.3)
        DOCUMENTS[url] = document(server)
        yield server
    except BaseException as exc:  # a failure (pytest.fail is no Exception), but not a skip
        if not isinstance(exc, pytest.skip.Exception):
            dump_stacks(server)
        raise
    finally:
        stop(server)


def document(server: Server) -> dict:
    """The server's `/openapi.json` (with its token, if it has one)."""
    headers = {"Authorization": f"Bearer {server.token}"} if server.token else {}
    answer = httpx.get(server.url + "/openapi.json", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def dump_stacks(server: Server) -> None:
    """On a failed test, the stacks of the server's still running workers (a hung worker shows where it
    waits), then the log's end, in the test's captured output."""
    import psutil

    workers = []
    for process in descendants(server):
        try:
            if "_bentoml_impl.worker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            pass
    port = server.url.rsplit(":", 1)[1]
    try:  # the server's sockets: a listener's Recv-Q counts connections it never accepted
        sockets = subprocess.run(
            ["ss", "-tanp", f"( sport = :{port} or dport = :{port} )"], capture_output=True, text=True
        ).stdout
        print(f"--- sockets on port {port} ---\n{sockets}")
    except OSError:
        pass
    for worker in workers:
        try:
            worker.send_signal(signal.SIGABRT)
        except psutil.Error:
            pass
    if workers:
        time.sleep(2)
    print(f"--- server log ({server.log_path}), last 12000 characters ---\n{server.log()[-12000:]}")


def descendants(server: Server) -> list:
    """The server's processes below the one we started: BentoML's workers, each in a session of its own
    (circus calls setsid), so that a kill of our process group does not reach them."""
    import psutil

    try:
        return psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def stop(server: Server, timeout: float = 60.0) -> int | None:
    import psutil

    children = descendants(server)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
    for child in children:  # a worker left behind by its arbiter must not load the tests that follow
        try:
            child.kill()
        except psutil.Error:
            pass
    return server.proc.returncode
