"""A port that is already taken stops `python -m service serve` at once, with one line and a non-zero exit
status: before BentoML starts (the ports are checked first), and from a worker that finds its gRPC port
taken (it stops the arbiter, which would otherwise restart it, reloading every model, forever)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.__main__ import serve_command
from service.config import Settings
from tests.http_server import MODELS, ROOT, free_port


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "PROMETHEUS_"))}
    env["BENTOML_HOME"] = str(tmp / "bentoml")
    return env


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_taken_port_fails_in_one_line_within_seconds(tmp_path: Path, which: str) -> None:
    with taken_port() as busy:
        other = free_port()
        http_port, grpc_port = (other, busy) if which == "grpc" else (busy, other)
        flags = ["--repository", str(MODELS), "--host", "127.0.0.1", "--models", "lenet5"]
        flags += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve", *flags],
            cwd=ROOT,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-2000:]
    assert took < 5, f"{took:.1f} s"
    lines = done.stderr.strip().splitlines()
    flag = "--grpc-port" if which == "grpc" else "--http-port"
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and f"port {busy} on 127.0.0.1" in lines[0] and flag in lines[0]
    assert "in use" in lines[0], lines[0]
    assert _bindable(other), "the other port was left bound"


def test_a_worker_that_cannot_bind_grpc_stops_the_server(tmp_path: Path) -> None:
    """The port taken after the check (here: BentoML started without it): the worker's failure ends the
    server with status 1 instead of a restart."""
    with taken_port() as busy:
        http_port = free_port()
        settings = Settings(
            repository=str(MODELS),
            host="127.0.0.1",
            models=("lenet5",),
            http_port=http_port,
            grpc_port=busy,
            drain_timeout_s=2,
        )
        cmd, env = serve_command(settings)
        env.update({k: v for k, v in _env(tmp_path).items() if k == "BENTOML_HOME"})
        log_path = tmp_path / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                code = proc.wait(120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert code == 1, text[-4000:]
    assert text.count(f"gRPC cannot bind 127.0.0.1:{busy}") >= 1, text[-4000:]
    assert text.count("the server stops") == 1, text[-4000:]  # one worker, never restarted
    assert "model lenet5:1 ready" not in text, "models were loaded for a worker that could not serve"
    deadline = time.monotonic() + 10
    while not _bindable(http_port):  # the arbiter's HTTP socket is closed with it
        assert time.monotonic() < deadline, "the HTTP port stayed bound"
        time.sleep(0.1)
