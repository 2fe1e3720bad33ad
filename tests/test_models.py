"""The live model set on real ONNX Runtime sessions: control modes, version policies, swaps that lose nothing,
bad versions that never replace good ones, drains, names that are never paths."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.card import CardError
from service.config import Settings, add_arguments, from_args
from service.core import InferenceCore, ModelInfo, NullObserver
from service.errors import InvalidArgument, ModelNotFound, ModelUnavailable, PermissionDenied
from service.models import POLICY_FILE, VersionPolicy, check_name
from tests.conftest import encode, write_tiny_model


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), "PNG")


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}

    def model_load_failure(self, model: str) -> None:
        self.failures.append(model)

    def model_versions(self, model: str, loaded: int) -> None:
        self.versions[model] = loaded

    def model_info(self, models: Sequence[ModelInfo]) -> None:
        self.info = {(m.name, m.version): m.state for m in models}


@pytest.fixture
def started() -> Iterator[Callable[..., InferenceCore]]:
    cores: list[InferenceCore] = []

    def start(repo: Path, observer: NullObserver | None = None, **kw: object) -> InferenceCore:
        settings = Settings(repository=str(repo), default_model="tiny", max_batch_size=4, **kw)  # type: ignore[arg-type]
        core = InferenceCore(settings, observer=observer)
        core.load()
        cores.append(core)
        return core

    yield start
    for core in cores:
        core.close()


def classify(core: InferenceCore, photo: bytes, **kw: object) -> str:
    (p,) = asyncio.run(core.classify([photo], **kw))  # type: ignore[arg-type]
    assert not isinstance(p, Exception), p
    return p.version


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def states(core: InferenceCore) -> dict[tuple[str, str], str]:
    return {(m.name, m.version): m.state for m in core.models()}


def corrupt_graph(folder: Path) -> None:
    """Garbage for a graph, with a card that vouches for it (its sha256 matches): ONNX Runtime fails."""
    import hashlib

    graph = folder / "model.onnx"
    graph.write_bytes(b"this is not an onnx graph" * 10)
    card = json.loads((folder / "model.json").read_text())
    card["files"]["model.onnx"].update(
        sha256=hashlib.sha256(graph.read_bytes()).hexdigest(), bytes=graph.stat().st_size
    )
    (folder / "model.json").write_text(json.dumps(card))


# -- version policy ----


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"latest": {"num_versions": 2}}, ["2", "10"]),
        ({"latest": {}}, ["10"]),
        ({"all": {}}, ["1", "2", "10"]),
        ({"specific": {"versions": [1, "10", 7]}}, ["1", "10"]),
    ],
)
def test_version_policy_forms(doc: dict, expected: list[str]) -> None:
    assert VersionPolicy.from_dict(doc).select(["10", "1", "2"]) == expected


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {},
        {"latest": {"num_versions": 0}},
        {"latest": {"num_versions": True}},
        {"latest": 2},
        {"specific": {"versions": []}},
        {"specific": {"versions": ["01"]}},
        {"specific": {"versions": ["../1"]}},
        {"newest": {}},
        {"all": {}, "latest": {}},
    ],
)
def test_version_policy_refuses_what_it_cannot_mean(doc: object) -> None:
    with pytest.raises(CardError, match=POLICY_FILE):
        VersionPolicy.from_dict(doc)


def test_no_policy_file_serves_the_latest_version(tmp_path: Path) -> None:
    assert VersionPolicy.read(tmp_path) == VersionPolicy("latest", count=1)


def test_policy_file_chooses_the_versions_and_a_bad_one_is_reported(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    for v in ("1", "2", "3"):
        write_tiny_model(tmp_path, "tiny", v, seed=int(v))
    (tmp_path / "tiny" / POLICY_FILE).write_text(json.dumps({"latest": {"num_versions": 2}}))
    write_tiny_model(tmp_path, "other", "1")
    (tmp_path / "other" / POLICY_FILE).write_text("{not json")
    core = started(tmp_path)
    assert states(core) == {
        ("tiny", "2"): "READY",
        ("tiny", "3"): "READY",
        ("other", "1"): "UNAVAILABLE",
    }
    assert POLICY_FILE in core.model_info("other", "1").reason
    assert classify(core, photo) == "3" and classify(core, photo, version="2") == "2"
    with pytest.raises(ModelNotFound, match="no version '1'"):
        classify(core, photo, version="1")


# -- poll mode ----


def test_poll_loads_new_versions_keeps_good_ones_and_retires_removed_ones(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    recorder = Recorder()
    core = started(tmp_path, observer=recorder, model_control="poll", poll_interval_s=0.2)
    assert classify(core, photo) == "1" and recorder.versions == {"tiny": 1}

    write_tiny_model(tmp_path, "tiny", "2", seed=2)
    wait_for(lambda: classify(core, photo) == "2")
    wait_for(lambda: recorder.versions == {"tiny": 1})  # the latest replaces the one before (no policy file)

    folder = write_tiny_model(tmp_path, "tiny", "3", seed=3)
    corrupt_graph(folder)
    wait_for(lambda: states(core).get(("tiny", "3")) == "UNAVAILABLE")
    assert "onnx" in core.model_info("tiny", "3").reason.lower() or core.model_info("tiny", "3").reason
    assert recorder.failures == ["tiny"]  # reported once, not at every scan
    assert classify(core, photo) == "2" and core.ready  # the model serves: it is ready

    shutil.rmtree(tmp_path / "tiny" / "1")
    wait_for(lambda: ("tiny", "1") not in states(core))
    assert classify(core, photo) == "2"
    time.sleep(0.6)  # more scans: the broken version is not retried while its files stay the same
    assert recorder.failures == ["tiny"]

    # Its files fixed, it is tried again and takes over.
    shutil.rmtree(folder)
    write_tiny_model(tmp_path, "tiny", "3", seed=3)
    wait_for(lambda: classify(core, photo) == "3")

    # A model that leaves the repository leaves the set.
    write_tiny_model(tmp_path, "gone", "1")
    wait_for(lambda: ("gone", "1") in states(core) and states(core)[("gone", "1")] == "READY")
    shutil.rmtree(tmp_path / "gone")
    wait_for(lambda: not any(name == "gone" for name, _ in states(core)))
    # The gauge follows just after the row leaves /models: the drain gives memory back first.
    wait_for(lambda: recorder.versions["gone"] == 0)
    with pytest.raises(ModelNotFound):
        classify(core, photo, model="gone")


def test_poll_skips_a_folder_still_being_written(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    core = started(tmp_path, model_control="poll", poll_interval_s=0.3)
    # The graph is there, the card not yet: skipped, never reported broken.
    stage = write_tiny_model(tmp_path / ".stage", "tiny", "2", seed=2)
    (tmp_path / "tiny" / "2").mkdir()
    shutil.copy(stage / "model.onnx", tmp_path / "tiny" / "2" / "model.onnx")
    for _ in range(3):  # a file that keeps changing between scans is never judged
        time.sleep(0.35)
        with open(tmp_path / "tiny" / "2" / "model.onnx", "ab") as f:
            f.write(b"")
        (tmp_path / "tiny" / "2" / "model.onnx").touch()
        assert ("tiny", "2") not in states(core)
    shutil.copy(stage / "model.json", tmp_path / "tiny" / "2" / "model.json")
    wait_for(lambda: classify(core, photo) == "2")


def test_poll_a_version_whose_graph_does_not_match_its_card_stays_out(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    core = started(tmp_path, model_control="poll", poll_interval_s=0.2)
    folder = write_tiny_model(tmp_path / ".stage", "tiny", "2", seed=2)
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")  # sha256 no longer the card's
    shutil.copytree(folder, tmp_path / "tiny" / "2")
    wait_for(lambda: states(core).get(("tiny", "2")) == "UNAVAILABLE")
    assert "sha256" in core.model_info("tiny", "2").reason
    assert classify(core, photo) == "1"


def test_poll_reloads_a_version_changed_in_place(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    """Triton's poll reloads a version whose files changed; a broken change leaves the loaded one serving."""

    def answer() -> list[tuple[int, float]]:
        (p,) = asyncio.run(core.classify([photo], top_k=3))
        assert not isinstance(p, Exception), p
        return [(c.index, round(c.probability, 6)) for c in p.top_k]

    folder = write_tiny_model(tmp_path, "tiny", "1", seed=1)
    recorder = Recorder()
    core = started(tmp_path, observer=recorder, model_control="poll", poll_interval_s=0.2)
    first = answer()

    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")  # no longer the card's sha256
    wait_for(lambda: "files changed" in core.model_info("tiny", "1").reason)
    assert "sha256" in core.model_info("tiny", "1").reason and recorder.failures == ["tiny"]
    assert core.model_info("tiny", "1").state == "READY" and answer() == first and core.ready
    time.sleep(0.6)  # the same broken files are not tried again at every scan
    assert recorder.failures == ["tiny"]

    stage = write_tiny_model(tmp_path / ".stage", "tiny", "1", seed=2)
    for name in ("model.onnx", "model.json"):
        shutil.copy(stage / name, folder / (name + ".new"))
        (folder / (name + ".new")).replace(folder / name)
    wait_for(lambda: answer() != first)
    info = core.model_info("tiny", "1")
    assert (info.state, info.reason, recorder.versions) == ("READY", "", {"tiny": 1})


def test_none_mode_never_changes(tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    core = started(tmp_path)
    write_tiny_model(tmp_path, "tiny", "2", seed=2)
    core.model_set.scan_once  # noqa: B018 - exists, but nothing calls it in this mode
    time.sleep(0.3)
    assert classify(core, photo) == "1"
    with pytest.raises(PermissionDenied, match="--model-control explicit"):
        asyncio.run(core.load_model("tiny"))
    with pytest.raises(PermissionDenied):
        asyncio.run(core.unload_model("tiny"))


# -- explicit mode ----


def test_explicit_loads_the_start_set_then_on_request(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    write_tiny_model(tmp_path, "other", "1", seed=5)
    recorder = Recorder()
    core = started(tmp_path, recorder, model_control="explicit", load_model=("tiny",))
    assert set(states(core)) == {("tiny", "1")} and core.ready
    index = {(r["name"], r["version"]): (r["state"], r["reason"]) for r in core.repository_index()}
    assert index == {("tiny", "1"): ("READY", ""), ("other", ""): ("", "")}
    with pytest.raises(ModelNotFound):
        classify(core, photo, model="other")

    asyncio.run(core.load_model("other"))
    assert classify(core, photo, model="other") == "1"
    assert recorder.info[("other", "1")] == "READY"  # the model_info metric follows the model set
    asyncio.run(core.unload_model("other"))
    assert ("other", "1") not in recorder.info
    with pytest.raises(ModelNotFound, match="unloaded"):
        classify(core, photo, model="other")
    assert ("other", "", "UNAVAILABLE", "unloaded") in [tuple(r.values()) for r in core.repository_index()]
    assert [r["name"] for r in core.repository_index(ready_only=True)] == ["tiny"]

    with pytest.raises(ModelNotFound, match="unknown model .nosuch.$"):
        asyncio.run(core.load_model("nosuch"))
    with pytest.raises(ModelNotFound):
        asyncio.run(core.unload_model("nosuch"))
    assert classify(core, photo) == "1"  # still serving


@pytest.mark.parametrize(
    "name", ["", "../x", "..", ".hidden", "/etc/passwd", "a/b", "a\\b", "a\x00b", "x" * 256, "tab\there"]
)
def test_names_are_checked_never_used_as_paths(
    tmp_path: Path, name: str, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1")
    core = started(tmp_path, model_control="explicit")
    for call in (core.load_model, core.unload_model):
        with pytest.raises(InvalidArgument, match="model name"):
            asyncio.run(call(name))
    with pytest.raises(InvalidArgument):
        check_name(None)
    assert check_name("x" * 255) == "x" * 255


def test_explicit_load_of_a_bad_version_keeps_the_good_one(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    (tmp_path / "tiny" / POLICY_FILE).write_text('{"all": {}}')  # every version is tried
    recorder = Recorder()
    core = started(tmp_path, observer=recorder, model_control="explicit", load_model=("tiny",))
    # An invalid card, a corrupt graph, and one that fails its warm-up (the card's input is not the graph's).
    write_tiny_model(tmp_path, "tiny", "2", seed=2)
    (tmp_path / "tiny" / "2" / "model.json").write_text(json.dumps({"schema": 1, "name": "tiny"}))
    corrupt_graph(write_tiny_model(tmp_path, "tiny", "3", seed=3))
    warm = write_tiny_model(tmp_path, "tiny", "4", seed=4, size=32)
    card = json.loads((warm / "model.json").read_text())
    card["input"]["shape"] = [-1, 3, 40, 40]
    card["preprocessing"]["input_size"] = [3, 40, 40]
    (warm / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelUnavailable, match="failed to load") as failed:
        asyncio.run(core.load_model("tiny"))
    for v in ("2", "3", "4"):
        assert f"version {v}:" in failed.value.message
        assert core.model_info("tiny", v).state == "UNAVAILABLE" and core.model_info("tiny", v).reason
    assert classify(core, photo) == "1" and core.ready
    assert recorder.failures == ["tiny"] * 3


def test_unload_drains_the_requests_already_admitted(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    core = started(tmp_path, model_control="explicit", load_model=("tiny",))
    entry = core.model_set.entry("tiny", None)

    async def scenario() -> tuple[list, BaseException | None]:
        tasks = [asyncio.ensure_future(core.classify([photo], model="tiny")) for _ in range(32)]
        await asyncio.sleep(0)  # each has been admitted: it holds the version
        assert entry.active == 32
        await core.unload_model("tiny")
        assert entry.state == "UNLOADING" and core.ready  # a model leaving does not make the server unready
        later: BaseException | None = None
        try:
            await core.classify([photo], model="tiny")
        except ModelNotFound as exc:
            later = exc
        return await asyncio.gather(*tasks), later

    answers, later = asyncio.run(scenario())
    assert [a[0].version for a in answers] == ["1"] * 32
    assert isinstance(later, ModelNotFound)
    assert entry.active == 0 and entry.session is None  # released after its last request
    assert core.models() == []


def test_a_swap_under_load_loses_no_request(
    tmp_path: Path, photo: bytes, started: Callable[..., InferenceCore]
) -> None:
    """Requests without a version go to the highest ready one; the swap happens between two of them."""
    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    core = started(tmp_path, model_control="explicit", load_model=("tiny",))
    (tmp_path / "tiny" / POLICY_FILE).write_text(json.dumps({"latest": {}}))

    async def scenario() -> list[str]:
        versions: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                (p,) = await core.classify([photo])
                versions.append(p.version)

        clients = [asyncio.ensure_future(client()) for _ in range(8)]
        await asyncio.sleep(0.2)
        write_tiny_model(tmp_path, "tiny", "2", seed=2)
        await core.load_model("tiny")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        return versions

    versions = asyncio.run(scenario())
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and "1" not in versions[switch + 16 :]
    assert set(states(core)) == {("tiny", "2")}


# -- settings ----


def test_settings_of_the_control_modes() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--model-control", "explicit", "--load-model", "a", "--load-model", "b,c", "--admin-token", "t"]
    )
    settings = from_args(args, environ={})
    assert settings.load_model == ("a", "b", "c") and settings.admin_token == "t"
    assert from_args(
        parser.parse_args([]), environ={"CNN_SERVE_LOAD_MODEL": "x", "CNN_SERVE_MODEL_CONTROL": "explicit"}
    ).load_model == ("x",)
    with pytest.raises(ValueError, match="model_control"):
        Settings(model_control="sometimes").validate()
    with pytest.raises(ValueError, match="poll_interval_s"):
        Settings(model_control="poll", poll_interval_s=0).validate()
    with pytest.raises(ValueError, match="load_model"):
        Settings(load_model=("a",)).validate()
