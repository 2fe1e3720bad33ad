"""The live model set through the real service on loopback (`python -m service serve`, HTTP and gRPC).

- explicit mode through NVIDIA's Triton client, over HTTP and gRPC: index, load, unload, ready; an unknown
  model; the admin token missing, wrong, or replaced by the inference token;
- names that are not plain names, over both transports;
- an unload while 32 requests are in flight: all answered by the old session, later ones 404;
- poll mode under load (16 clients for the whole test): a new version, a broken one, a removed one, and not
  one request lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import write_tiny_model
from tests.http_server import MODELS, ROOT, Server, jpeg, png, running_server

PYTHON = ROOT / "build" / "tritonclient" / "bin" / "python"
SCRIPT = ROOT / "tests" / "clients" / "triton_repository.py"
ADMIN, INFERENCE = "admin-secret", "inference-secret"
BIG = "efficientnet_lite0"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(1)
    return png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Explicit mode, both tokens: `tiny` in the repository, not loaded; efficientnet_lite0 loaded first."""
    tmp = tmp_path_factory.mktemp("explicit")
    repo = tmp / "repo"
    write_tiny_model(repo, "tiny", "1", seed=1)
    os.symlink(MODELS / BIG, repo / BIG)
    flags = ["--repository", str(repo), "--model-control", "explicit", "--load-model", BIG]
    flags += [
        "--admin-token",
        ADMIN,
        "--auth-token",
        INFERENCE,
        "--max-batch-size",
        "1",
        "--decode-threads",
        "2",
        # 32 ten-crop requests behind a 16-image one, one view a batch, must all be admitted (none shed by
        # their expected wait) on a host busy with other work too.
        "--request-timeout-s",
        "300",
    ]
    with running_server(tmp, *flags) as server:
        yield server
        assert server.proc.poll() is None, "the server died"


def test_triton_client_index_load_unload_ready(explicit: Server) -> None:
    assert PYTHON.exists(), f"{PYTHON} is missing: run `make tritonclient` (`make test` does)"
    done = subprocess.run(
        [str(PYTHON), str(SCRIPT), "--http", explicit.url.removeprefix("http://"), "--grpc",
         f"127.0.0.1:{explicit.grpc_port}", "--model", "tiny", "--admin-token", ADMIN,
         "--inference-token", INFERENCE],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    for transport in ("http", "grpc"):
        r = report[transport]
        http = transport == "http"

        def refused(key: str, status: str, r: dict = r, transport: str = transport) -> str:
            entry = r[key]
            assert isinstance(entry, dict) and "error" in entry, f"{transport} {key}: {entry}"
            assert entry["status"] == status, f"{transport} {key}: {entry}"
            return entry["error"]

        before = {(row["name"], row["version"]): row["state"] for row in r["index_before"]}
        assert before[(BIG, "1")] == "READY" and ("tiny", "") in before
        if http:
            assert r["ready_before"] is False
        else:
            assert "tiny" in refused("ready_before", "StatusCode.NOT_FOUND")
        unauthenticated = "401" if http else "StatusCode.UNAUTHENTICATED"
        refused("load_no_token", unauthenticated)
        refused("load_wrong_token", unauthenticated)
        refused("load_inference_token", unauthenticated)
        assert r["load"] is True and r["ready_after_load"] is True and r["ready_v1_after_load"] is True
        after = {(row["name"], row["version"]): row["state"] for row in r["index_after_load"]}
        assert after[("tiny", "1")] == "READY"
        assert "no_such_model" in refused("load_unknown", "404" if http else "StatusCode.NOT_FOUND")
        refused("unload_unknown", "404" if http else "StatusCode.NOT_FOUND")
        invalid = "400" if http else "StatusCode.INVALID_ARGUMENT"
        assert "model name" in refused("load_dotdot", invalid)
        assert "characters long" in refused("load_long", invalid)
        refused("unload_wrong_token", unauthenticated)
        assert r["ready_after_refused_unload"] is True
        assert r["unload"] is True
        if http:
            assert r["ready_after_unload"] is False
        else:
            refused("ready_after_unload", "StatusCode.NOT_FOUND")
        unloaded = [row for row in r["index_after_unload"] if row["name"] == "tiny"]
        assert unloaded == [{"name": "tiny", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert r["load_again"] is True and r["ready_after_load_again"] is True and r["unload_end"] is True


BAD_NAMES = {  # as the URL path carries it -> what the server gets
    "..%2Fx": "../x",
    "%2Fetc%2Fpasswd": "/etc/passwd",
    "%2E%2E": "..",
    "a%00b": "a\x00b",
    "x" * 300: "x" * 300,
    ".hidden": ".hidden",
}


@pytest.mark.parametrize("path", list(BAD_NAMES))
def test_names_that_are_not_plain_are_invalid_over_http(explicit: Server, path: str) -> None:
    for call in ("load", "unload"):
        r = httpx.post(f"{explicit.url}/v2/repository/models/{path}/{call}", headers=auth(ADMIN), timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.json()["code"] == "invalid_argument" and "model name" in r.json()["message"]


def test_names_that_are_not_plain_are_invalid_over_grpc(explicit: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{explicit.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = (("authorization", f"Bearer {ADMIN}"),)
        for name in [*BAD_NAMES.values(), ""]:
            for rpc, message in (
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    rpc(message(model_name=name), metadata=meta, timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryIndex(
                pb.RepositoryIndexRequest(repository_name="other"), metadata=meta, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the index takes the inference token
        inference = (("authorization", f"Bearer {INFERENCE}"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryIndex(
                pb.RepositoryIndexRequest(repository_name="other"), metadata=inference, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=inference, timeout=30)
        assert {(m.name, m.version, m.state) for m in ready.models} >= {(BIG, "1", "READY")}


def test_http_repository_bodies_are_checked(explicit: Server) -> None:
    url = explicit.url + "/v2/repository"
    for body in (b"[]", b"{", b'{"ready": "yes"}', b'{"other": 1}'):
        r = httpx.post(url + "/index", content=body, headers=auth(INFERENCE), timeout=30)
        assert r.status_code == 400, (body, r.text)
    r = httpx.post(url + "/index", json={"ready": True}, headers=auth(INFERENCE), timeout=30)
    assert r.status_code == 200 and all(row["state"] == "READY" for row in r.json())
    assert httpx.post(url + "/index", timeout=30).status_code == 401
    for body in ({"parameters": {"config": "{}"}}, {"parameters": []}, {"other": 1}):
        r = httpx.post(url + "/models/tiny/load", json=body, headers=auth(ADMIN), timeout=30)
        assert r.status_code == 400, (body, r.text)
    r = httpx.post(url + "/models/tiny/unload", json={"parameters": {"unload_dependents": False}},
                   headers=auth(ADMIN), timeout=30)  # fmt: skip
    assert r.status_code == 200


def test_unload_while_32_requests_are_in_flight(explicit: Server) -> None:
    """Each request is admitted (it holds version 1) before the unload; each is answered 200 by it. A batch
    request ahead of them keeps the batcher busy (it serves in order) while the 32 arrive."""
    from skimage import data as photos

    image = jpeg(photos.astronaut(), quality=95)
    headers = auth(INFERENCE)

    def models() -> dict[str, Any]:
        rows = httpx.get(explicit.url + "/models", headers=headers, timeout=30).json()["models"]
        return {m["name"]: m for m in rows}

    def classify(client: httpx.Client) -> httpx.Response:
        return client.post(
            explicit.url + "/classify",
            params={"model": BIG, "tta": "ten_crop"},  # ten views each: the 32 take seconds on a CPU
            files={"file": ("a.jpg", image, "image/jpeg")},
            headers=headers,
            timeout=300,
        )

    def blocker(client: httpx.Client) -> httpx.Response:
        return client.post(
            explicit.url + "/classify_batch",
            params={"model": BIG, "tta": "ten_crop"},
            files=[("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(16)],
            headers=headers,
            timeout=300,
        )

    with httpx.Client(limits=httpx.Limits(max_connections=64)) as client, ThreadPoolExecutor(33) as pool:
        first = pool.submit(blocker, client)
        while models()[BIG]["in_flight"] < 1:
            time.sleep(0.01)
        futures = [pool.submit(classify, client) for _ in range(32)]
        deadline = time.monotonic() + 120
        while models()[BIG]["in_flight"] < 33:
            assert time.monotonic() < deadline, models()[BIG]
            assert not any(f.done() for f in futures), "requests finished before all 32 were in flight"
            time.sleep(0.02)
        r = client.post(f"{explicit.url}/v2/repository/models/{BIG}/unload", headers=auth(ADMIN), timeout=60)
        assert r.status_code == 200, r.text
        state = models().get(BIG, {}).get("state")
        later = classify(client)
        answers = [f.result() for f in futures]
        assert first.result().status_code == 200 and first.result().json()["failed"] == 0
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers if a.status_code != 200]
    assert {a.json()["version"] for a in answers} == {"1"}
    assert state in ("UNLOADING", None)  # draining, or already drained
    assert later.status_code == 404 and later.json()["code"] == "not_found"
    assert BIG not in models()
    r = httpx.post(f"{explicit.url}/v2/repository/models/{BIG}/load", headers=auth(ADMIN), timeout=300)
    assert r.status_code == 200, r.text


def publish(repo: Path, name: str, version: str, broken: bool = False, seed: int = 0) -> None:
    """Write a version the way export does: in a dot-folder of the repository, then one rename."""
    stage = repo / f".stage-{version}"
    folder = write_tiny_model(stage, name, version, seed=seed)
    if broken:
        graph = folder / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:-16] + os.urandom(16))  # same size, sha256 not the card's
    os.rename(folder, repo / name / version)
    shutil.rmtree(stage)


def test_poll_mode_under_load_loses_no_request(tmp_path: Path, photo: bytes) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, "tiny", "1", seed=1)
    interval = 1.0
    flags = ["--repository", str(repo), "--default-model", "tiny", "--model-control", "poll",
             "--poll-interval-s", str(interval)]  # fmt: skip
    with running_server(tmp_path, *flags) as server:
        stop = threading.Event()
        answers: list[tuple[float, str]] = []
        failures: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post(server.url + "/classify", files={"file": ("a.png", photo, "image/png")})
                        ok = r.status_code == 200
                        with lock:
                            if ok:
                                answers.append((time.monotonic(), r.json()["version"]))
                            else:
                                failures.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        with lock:
                            failures.append(repr(exc))

        def models() -> dict[str, dict[str, Any]]:
            rows = httpx.get(server.url + "/models", timeout=30).json()["models"]
            return {m["version"]: m for m in rows if m["name"] == "tiny"}

        def wait(check: Any, timeout: float, what: str) -> float:
            start = time.monotonic()
            while not check():
                assert time.monotonic() - start < timeout, f"{what}: not in {timeout} s; /models: {models()}"
                time.sleep(0.05)
            return time.monotonic() - start

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        try:
            wait(lambda: len(answers) >= 32, 60, "first answers")
            published = time.monotonic()
            publish(repo, "tiny", "2", seed=2)
            wait(
                lambda: any(v == "2" and t > published for t, v in answers[-16:]), interval + 30, "version 2"
            )
            switched = min(t for t, v in answers if v == "2") - published
            print(
                f"version 2 answered {switched:.2f} s after its folder appeared (poll interval {interval} s)"
            )
            assert switched < interval + 30  # one poll interval plus the warm-up, on a loaded machine

            publish(repo, "tiny", "3", broken=True, seed=3)
            wait(lambda: models().get("3", {}).get("state") == "UNAVAILABLE", 4 * interval + 30, "version 3")
            assert "sha256" in models()["3"]["reason"]
            index = httpx.post(server.url + "/v2/repository/index", timeout=30).json()
            row = {"name": "tiny", "version": "3", "state": "UNAVAILABLE", "reason": models()["3"]["reason"]}
            assert row in index

            shutil.rmtree(repo / "tiny" / "1")
            wait(lambda: "1" not in models(), 2 * interval + 30, "version 1 retired")
            count = len(answers)
            wait(lambda: len(answers) > count + 32, 60, "answers after the removal")
            metrics = httpx.get(server.url + "/metrics", timeout=30).text
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert failures == []
        versions = Counter(v for _, v in answers)
        assert "3" not in versions and versions["1"] > 0 and versions["2"] > 0
        last = [v for _, v in answers[-16:]]
        assert set(last) == {"2"}
        assert set(models()) == {"2", "3"} and models()["2"]["state"] == "READY"
        assert re.search(r'model_load_failures_total\{[^}]*model="tiny"[^}]*\} 1\.0', metrics), metrics
        assert re.search(r'model_versions_loaded\{[^}]*model="tiny"[^}]*\} 1\.0', metrics), metrics
        assert server.proc.poll() is None


def test_load_and_unload_are_off_without_an_admin_token(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, "tiny", "1", seed=1)
    flags = ["--repository", str(repo), "--default-model", "tiny", "--model-control", "explicit",
             "--load-model", "tiny"]  # fmt: skip
    with running_server(tmp_path, *flags) as server:
        for call in ("load", "unload"):
            r = httpx.post(f"{server.url}/v2/repository/models/tiny/{call}", headers=auth("x"), timeout=30)
            assert r.status_code == 403 and "--admin-token" in r.json()["message"]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--admin-token" in err.value.details()
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
            assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1", "READY")]
        assert httpx.get(server.url + "/v2/models/tiny/ready", timeout=30).status_code == 200
