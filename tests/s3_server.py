"""A real S3 server on loopback for the tests of remote model repositories: moto's server mode
(`ThreadedMotoServer`), with every request it answers counted and, on demand, each answer delayed.

No test here: `test_storage.py` and `test_storage_export.py` share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    """The running server: its endpoint, the requests it answered (method, path) and a delay per answer."""

    endpoint: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    delay_s: float = 0.0

    def gets(self, suffix: str) -> list[str]:
        """Paths of the GETs of objects whose key ends with `suffix`."""
        return [p for m, p in self.requests if m == "GET" and p.split("?")[0].endswith(suffix)]

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def upload_folder(self, local: Path, bucket: str, prefix: str) -> None:
        """Every file under `local` as `s3://bucket/prefix/<relative path>` (the card of a version last)."""
        client = self.client()
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == "model.json")
        for p in files:
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def aws_env(monkeypatch: pytest.MonkeyPatch, *, credentials: bool = True) -> None:
    """Dummy credentials only (or none at all): nothing of the machine's own AWS setup is read."""
    for key in list(__import__("os").environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if credentials:
        for k, v in DUMMY_CREDENTIALS.items():
            monkeypatch.setenv(k, v)


@contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 on a free loopback port, its WSGI app wrapped to count and delay the answers."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    state = S3("")
    lock = threading.Lock()

    class Counted(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def counted(environ: dict, start_response: Any) -> Any:
                with lock:
                    state.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
                if state.delay_s:
                    time.sleep(state.delay_s)
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, counted, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Counted(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    state.endpoint = f"http://{host}:{port}"
    try:
        yield state
    finally:
        state.delay_s = 0.0
        server.stop()
