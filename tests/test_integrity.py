"""The files under a serving model change: the version serves on from memory, and the periodic check says so
(once per change, in `/models`, in `cnn_serve_model_files_intact`), readiness unchanged. A real core on a copy
of the repository's LeNet, then a real server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.core import InferenceCore
from service.metrics import Metrics
from tests.conftest import classify_now, encode
from tests.http_server import MODELS, running_server


def digit() -> bytes:
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (12, 4, 16, 24))
    return encode(img)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    if not (MODELS / "lenet5" / "1").is_dir():
        pytest.fail(f"{MODELS} lacks lenet5: run `make models` first (make test does)")
    root = tmp_path / "models"
    shutil.copytree(MODELS / "lenet5", root / "lenet5")
    return root


@pytest.fixture()
def served(repo: Path) -> Iterator[tuple[InferenceCore, Metrics]]:
    metrics = Metrics()
    settings = Settings(repository=str(repo), default_model="lenet5", model_check_interval_s=0)
    core = InferenceCore(settings, observer=metrics)
    core.load()  # the check's thread is off (interval 0): each test runs the rounds itself
    yield core, metrics
    core.close()


def gauge(metrics: Metrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.labels["model"], s.labels["version"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cnn_serve_model_files_intact"
    }


def state(core: InferenceCore) -> tuple[bool | None, str]:
    info = core.model_info("lenet5", "1").to_dict()
    return info["files_intact"], info["files_problem"]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "service.integrity" and r.levelno >= 30]


def test_a_changed_graph_is_reported_once_and_the_model_serves_on(
    served: tuple[InferenceCore, Metrics], repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core, metrics = served
    graph = repo / "lenet5" / "1" / "model.onnx"
    original = graph.read_bytes()
    assert state(core) == (None, "")  # not checked yet
    (before,) = classify_now(core, [digit()], model="lenet5")
    core.file_check.check_all()
    assert state(core) == (True, "") and gauge(metrics) == {("lenet5", "1"): 1.0}

    caplog.set_level(logging.INFO, logger="service.integrity")
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    for _ in range(3):
        core.file_check.check_all()
    intact, problem = state(core)
    assert intact is False and "model.onnx differs from the graph served" in problem
    assert gauge(metrics) == {("lenet5", "1"): 0.0}
    (line,) = warnings(caplog)  # one line per change of state, not one per round
    assert "lenet5:1" in line and "model.onnx" in line and str(repo) not in line
    assert core.ready  # readiness unchanged: the version in memory is good
    (after,) = classify_now(core, [digit()], model="lenet5")  # served from memory, as before
    assert after.top_k == before.top_k

    graph.write_bytes(original)  # the same bytes again (a new mtime): hashed, and intact
    core.file_check.check_all()
    assert state(core) == (True, "") and gauge(metrics) == {("lenet5", "1"): 1.0}
    assert any("match what it serves again" in r.getMessage() for r in caplog.records)
    assert len(warnings(caplog)) == 1


def test_a_changed_card_a_deleted_folder_and_a_vanished_repository(
    served: tuple[InferenceCore, Metrics], repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core, metrics = served
    folder = repo / "lenet5" / "1"
    core.file_check.check_all()
    assert state(core)[0] is True

    card = json.loads((folder / "model.json").read_text())
    rewritten = json.dumps(card, indent=4)  # the same card, written otherwise: still what is served
    (folder / "model.json").write_text(rewritten)
    core.file_check.check_all()
    assert state(core) == (True, "")
    card["description"] = "another model"
    (folder / "model.json").write_text(json.dumps(card))
    core.file_check.check_all()
    assert state(core) == (False, "model.json differs from the card served")

    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)
    core.file_check.check_all()
    assert state(core) == (False, "its folder lenet5/1 is gone")
    shutil.move(moved, folder)
    (folder / "model.json").write_text(rewritten)
    core.file_check.check_all()
    assert state(core) == (True, "")

    os.rename(repo, tmp_path / "unmounted")  # the repository itself gone
    try:
        core.file_check.check_all()
        assert state(core) == (False, "its folder lenet5/1 is gone")
        repo.write_text("not a folder")  # something else where the repository was: the same state
        core.file_check.check_all()
        assert state(core) == (False, "its folder lenet5/1 is gone")
    finally:
        repo.unlink()
        os.rename(tmp_path / "unmounted", repo)
    assert core.ready and gauge(metrics) == {("lenet5", "1"): 0.0}
    assert len(warnings(caplog)) == 3  # changed card, folder gone, repository gone: once each


def test_the_server_checks_on_its_own(repo: Path, tmp_path: Path) -> None:
    """The setting reaches the worker; /models and /metrics show the change, /readyz stays 200."""
    flags = ("--repository", str(repo), "--default-model", "lenet5", "--model-check-interval-s", "0.2")
    with running_server(tmp_path, *flags) as server, httpx.Client(base_url=server.url, timeout=30) as c:

        def lenet() -> dict:
            return next(m for m in c.get("/models").json()["models"] if m["name"] == "lenet5")

        deadline = time.monotonic() + 30
        while lenet()["files_intact"] is not True:
            assert time.monotonic() < deadline, lenet()
            time.sleep(0.1)
        graph = repo / "lenet5" / "1" / "model.onnx"
        graph.write_bytes(b"not the graph that is served")
        while lenet()["files_intact"] is not False:
            assert time.monotonic() < deadline, lenet()
            time.sleep(0.1)
        assert "model.onnx differs" in lenet()["files_problem"]
        assert c.get("/readyz").status_code == 200
        answer = c.post("/classify", content=digit(), headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        metric = [
            s
            for f in text_string_to_metric_families(c.get("/metrics").text)
            for s in f.samples
            if s.name == "cnn_serve_model_files_intact"
        ]
        assert [(s.labels["model"], s.labels["version"], s.value) for s in metric] == [("lenet5", "1", 0.0)]
        time.sleep(0.5)  # a few more rounds: still one line
        assert server.log().count("model lenet5:1: model.onnx differs") == 1, server.log()[-3000:]
