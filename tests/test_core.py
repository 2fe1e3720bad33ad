"""InferenceCore on real ONNX Runtime sessions: versions, failures, arguments, top-k, tensors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service import postprocessing
from service.config import Settings
from service.core import InferenceCore, Prediction
from service.errors import InvalidArgument, InvalidImage, ModelNotFound, ModelUnavailable
from service.memory import settle_heap
from service.sessions import GpuRequired, ModelSession, batch_buckets
from tests.conftest import classify_now, encode, write_tiny_model


@pytest.fixture(scope="module")
def core(tiny_repo: Path) -> InferenceCore:
    c = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", max_batch_size=8))
    c.load()
    yield c
    c.close()


@pytest.fixture(scope="module")
def photo(chelsea: Image.Image) -> bytes:
    return encode(chelsea, "JPEG", quality=90)


def test_loads_every_model_and_reports_metadata(core: InferenceCore) -> None:
    assert core.ready
    infos = {(m.name, m.version): m for m in core.models()}
    assert set(infos) == {("tiny", "1"), ("tiny", "2"), ("tinygray", "1"), ("tinyprob", "1")}
    for m in infos.values():
        assert m.state == "READY" and m.provider == "CPUExecutionProvider" and m.reason == ""
        assert m.runtime["batch_buckets"] == [1, 2, 4, 8]
    assert core.model_info().name == "tiny" and core.model_info().version == "2"


def test_latest_version_by_default_a_given_one_on_request(core: InferenceCore, photo: bytes) -> None:
    (latest,) = classify_now(core, [photo], model="tiny")
    (v1,) = classify_now(core, [photo], model="tiny", version="1")
    assert (latest.model, latest.version) == ("tiny", "2") and v1.version == "1"
    assert not np.allclose(latest.probabilities, v1.probabilities)  # two different graphs really ran
    d = latest.to_dict()
    assert d["model"] == "tiny" and d["version"] == "2" and len(d["predictions"]) == 5
    assert set(d["predictions"][0]) == {"index", "id", "label", "probability"}


def test_top_k_ranked_with_labels(core: InferenceCore, photo: bytes) -> None:
    (p,) = classify_now(core, [photo], top_k=10)
    probs = [c.probability for c in p.top_k]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    assert p.top_k[0].id == f"c{p.top_k[0].index}" and p.top_k[0].label == f"class {p.top_k[0].index}"
    assert p.top_k[0].index == int(np.argmax(p.probabilities))


def test_probabilities_output_is_not_softmaxed_again(
    core: InferenceCore, tiny_repo: Path, photo: bytes
) -> None:
    import onnxruntime as ort

    (p,) = classify_now(core, [photo], model="tinyprob", top_k=3)
    spec_views = core.preprocess(photo, core._entry("tinyprob", None), "none")
    sess = ort.InferenceSession(str(tiny_repo / "tinyprob" / "1" / "model.onnx"))
    direct = sess.run(None, {"input": spec_views})[0][0]
    np.testing.assert_allclose(p.probabilities, direct, atol=1e-6)


def test_grayscale_model(core: InferenceCore, photo: bytes) -> None:
    (p,) = classify_now(core, [photo], model="tinygray", top_k=1)
    assert isinstance(p, Prediction) and p.model == "tinygray"


def test_tie_order_is_stable_by_index() -> None:
    probs = np.array([0.1, 0.3, 0.3, 0.0, 0.3], dtype=np.float32)
    assert [c.index for c in postprocessing.top_k(probs, 4, [])] == [1, 2, 4, 0]


def test_softmax_is_stable() -> None:
    p = postprocessing.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize("k", [0, 11, -1])
def test_top_k_out_of_range(core: InferenceCore, photo: bytes, k: int) -> None:
    with pytest.raises(InvalidArgument, match="top_k"):
        classify_now(core, [photo], top_k=k)


def test_unknown_tta(core: InferenceCore, photo: bytes) -> None:
    with pytest.raises(InvalidArgument, match="tta"):
        classify_now(core, [photo], tta="mirror")


def test_unknown_model_and_version(core: InferenceCore, photo: bytes) -> None:
    with pytest.raises(ModelNotFound):
        classify_now(core, [photo], model="vgg99")
    with pytest.raises(ModelNotFound):
        classify_now(core, [photo], model="tiny", version="7")
    with pytest.raises(ModelNotFound):
        core.model_info("vgg99")


def test_bad_image_fails_only_itself(core: InferenceCore, photo: bytes) -> None:
    results = classify_now(core, [photo, b"", photo])
    assert isinstance(results[0], Prediction) and isinstance(results[2], Prediction)
    assert isinstance(results[1], InvalidImage)


def test_async_classify_and_infer_tensor(core: InferenceCore, photo: bytes) -> None:
    async def go() -> tuple[list, np.ndarray]:
        preds = await core.classify([photo] * 3, top_k=2, tta="flip")
        tensor = core.preprocess(photo, core._entry(None, None), "none")
        return preds, await core.infer_tensor("tiny", None, tensor)

    preds, probs = asyncio.run(go())
    assert all(isinstance(p, Prediction) and len(p.top_k) == 2 for p in preds)
    (single,) = classify_now(core, [photo])
    np.testing.assert_allclose(probs[0], single.probabilities, atol=1e-6)
    with pytest.raises(InvalidArgument, match="shape"):
        asyncio.run(core.infer_tensor("tiny", None, np.zeros((1, 3, 8, 8), np.float32)))


def test_default_top_k_is_every_class_of_a_smaller_model(tmp_path: Path, photo: bytes) -> None:
    """Keras' default of 5 would be an error on a 3-class model that the caller never asked for."""
    write_tiny_model(tmp_path, "three", "1", classes=3)
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="three"))
    core.load()
    try:
        (p,) = classify_now(core, [photo])
        assert len(p.top_k) == 3 and sorted(c.index for c in p.top_k) == [0, 1, 2]
        (p,) = classify_now(core, [photo], top_k=2)
        assert len(p.top_k) == 2
        with pytest.raises(InvalidArgument, match="between 1 and 3"):
            classify_now(core, [photo], top_k=5)  # asked for: still an error
    finally:
        core.close()


def test_broken_model_is_unavailable_while_others_serve(tmp_path: Path, photo: bytes) -> None:
    write_tiny_model(tmp_path, "good", "1")
    bad = write_tiny_model(tmp_path, "bad", "1", seed=5)
    with open(bad / "model.onnx", "r+b") as f:  # same size, different bytes: only the sha256 can tell
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    nocard = write_tiny_model(tmp_path, "nocard", "1")
    (nocard / "model.json").unlink()
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="good"))
    core.load()
    try:
        # strict readiness (the protocol's, Triton's default): not ready while a model is broken, yet serving
        assert core.loaded and not core.ready
        info = core.model_info("bad")
        assert info.state == "UNAVAILABLE" and "sha256" in info.reason
        assert "model.json" in core.model_info("nocard").reason
        with pytest.raises(ModelUnavailable):
            classify_now(core, [photo], model="bad")
        (p,) = classify_now(core, [photo], model="good")
        assert p.model == "good"
    finally:
        core.close()
    assert not core.loaded and not core.ready
    lenient = InferenceCore(Settings(repository=str(tmp_path), default_model="good", strict_readiness=False))
    lenient.load()
    try:
        assert lenient.ready and lenient.model_info("bad").state == "UNAVAILABLE"
    finally:
        lenient.close()


def test_settings_models_filter_and_latest(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "a", "1")
    write_tiny_model(tmp_path, "a", "10")
    write_tiny_model(tmp_path, "a", "9")
    write_tiny_model(tmp_path, "b", "1")
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="a", models=("a",)))
    core.load()
    try:
        assert core.model_info().version == "10"  # numeric, not lexical
        assert {m.name for m in core.models()} == {"a"}
    finally:
        core.close()


def test_require_gpu_fails_start_up_on_cpu(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime is installed: the CPU fallback cannot be provoked here")
    write_tiny_model(tmp_path, "a", "1")
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="a", require_gpu=True))
    with pytest.raises(GpuRequired):
        core.load()
    core.close()


def test_providers_override_is_reported(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "a", "1")
    core = InferenceCore(
        Settings(repository=str(tmp_path), default_model="a", providers=("CPUExecutionProvider",))
    )
    core.load()
    try:
        assert core.model_info().runtime["providers"] == ["CPUExecutionProvider"]
    finally:
        core.close()


@contextlib.contextmanager
def _tiny_core(tiny_repo: Path, **settings: Any) -> Iterator[tuple[InferenceCore, ModelSession]]:
    """A loaded core serving `tiny` with these settings, and tiny's session; closed afterwards."""
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", **settings))
    core.load()
    try:
        session = core._entry("tiny", None).session
        assert session is not None
        yield core, session
    finally:
        core.close()


def _classify(core: InferenceCore, photo: bytes) -> np.ndarray:
    (p,) = classify_now(core, [photo], top_k=3)
    assert isinstance(p, Prediction)
    return p.probabilities


def test_inter_op_threads_run_branches_in_parallel_with_the_same_answers(
    tiny_repo: Path, photo: bytes
) -> None:
    import onnxruntime as ort

    answers, modes = [], []
    for inter in (1, 2):
        with _tiny_core(tiny_repo, inter_op_threads=inter) as (core, session):
            modes.append(session.session.get_session_options().execution_mode)
            answers.append(_classify(core, photo))
    assert modes == [ort.ExecutionMode.ORT_SEQUENTIAL, ort.ExecutionMode.ORT_PARALLEL]
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-7)


def test_thread_spinning_stops_when_the_run_returns(tiny_repo: Path, photo: bytes) -> None:
    """Spinning, when asked for, is confined to runs: an idle service must not burn a pod's CPU quota."""
    for spinning, expected in ((False, "0"), (True, "1")):
        with _tiny_core(tiny_repo, thread_spinning=spinning) as (core, session):
            options = session.session.get_session_options()
            for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
                assert options.get_session_config_entry(key) == expected, key
            _classify(core, photo)


def test_solo_session_takes_lone_batches_with_the_same_answers(tiny_repo: Path, photo: bytes) -> None:
    """`solo_threads`: a second session, on that many spinning threads, runs the batches that run alone; its
    answers are the main ONNX Runtime session's. Without the setting there is no second one."""
    answers, runs = [], {"solo": 0, "first": 0}
    for solo in (0, 2):
        profile = {"intra_op_threads": 1, "inference_workers": 2, "solo_threads": solo}
        with _tiny_core(tiny_repo, **profile) as (core, session):
            assert core.model_info("tiny").runtime["solo_threads"] == solo
            if not solo:
                assert session.solo is None
            else:
                assert session.solo is not None
                options = session.solo.get_session_options()
                assert options.intra_op_num_threads == 2
                assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
                assert options.get_session_config_entry("session.force_spinning_stop") == "1"
                for name, ort_session in (("solo", session.solo), ("first", session.session)):
                    ort_run = ort_session.run

                    def counted(*args, _name=name, _run=ort_run, **kw):
                        runs[_name] += 1
                        return _run(*args, **kw)

                    ort_session.run = counted
            answers.append(_classify(core, photo))
            if solo:
                assert runs == {"solo": 1, "first": 0}
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="thread counts must not be negative"):
        Settings(solo_threads=-1).validate()


def test_a_lone_image_runs_on_its_pool_thread_when_another_is_left(tiny_repo: Path, photo: bytes) -> None:
    """A lone image's batch runs on the pool thread that prepared it (no worker to wake), unless that is the
    only pool thread: it must stay free to decode the next image while the batch runs."""
    for decode_threads, runner in ((2, "preprocess"), (1, "batcher")):
        with _tiny_core(tiny_repo, decode_threads=decode_threads) as (core, _):
            threads: list[str] = []
            batch_run = core.batcher._run

            def recorded(key, batch, alone=False, _run=batch_run, _threads=threads):
                _threads.append(threading.current_thread().name)
                return _run(key, batch, alone)

            core.batcher._run = recorded
            _classify(core, photo)
            assert len(threads) == 1 and threads[0].startswith(runner), threads


def test_batch_buckets() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32, fixed=1) == [1]


def test_card_precision_fp16_falls_back_to_fp32_file(tmp_path: Path, photo: bytes) -> None:
    folder = write_tiny_model(tmp_path, "a", "1")
    card = json.loads((folder / "model.json").read_text())
    assert list(card["files"]) == ["model.onnx"]
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="a", precision="fp16"))
    core.load()
    try:
        assert core.model_info().runtime["precision"] == "fp32"
    finally:
        core.close()


@pytest.mark.gpu
def test_gpu_session_uses_fp16_and_io_binding(tmp_path: Path, photo: bytes) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    repo = Path(__file__).resolve().parents[1] / "models"
    dst = tmp_path / "efficientnet_lite0"
    shutil.copytree(repo / "efficientnet_lite0", dst)
    core = InferenceCore(Settings(repository=str(tmp_path), require_gpu=True, gpu_mem_limit_mb=2048))
    core.load()
    try:
        info = core.model_info()
        assert (
            info.provider == "CUDAExecutionProvider"
            and info.runtime["precision"] == "fp16"
            and info.runtime["io_binding"]
        )
        (p,) = classify_now(core, [photo])
        assert isinstance(p, Prediction)
    finally:
        core.close()


def test_before_load_models_are_unavailable(tiny_repo: Path, photo: bytes) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    assert not core.ready
    with pytest.raises(ModelUnavailable, match="starting"):
        classify_now(core, [photo])
    core.close()


def test_start_and_stop_from_an_event_loop(tiny_repo: Path, photo: bytes) -> None:
    async def go() -> Prediction:
        core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
        await core.start()
        assert core.ready
        (p,) = await core.classify([photo])
        await core.stop()
        assert not core.ready
        return p

    assert asyncio.run(go()).model == "tiny"


def test_the_heap_is_settled_once_the_models_are_loaded_and_before_the_core_is_ready(
    tiny_repo: Path, photo: bytes
) -> None:
    """The full collection at start-up holds the interpreter lock for tens of milliseconds: it runs before
    readiness lets traffic in, not under the first requests."""
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    seen: list[object] = []

    def settle() -> None:
        seen.append((core.ready, {m.state for m in core.models()}))
        frozen = gc.get_freeze_count()
        settle_heap()
        seen.append(gc.get_freeze_count() > frozen)

    async def go() -> Prediction:
        await core.start(before_ready=settle)
        assert core.ready
        (p,) = await core.classify([photo])
        await core.stop()
        return p

    try:
        assert asyncio.run(go()).model == "tiny"
    finally:
        gc.unfreeze()  # the test process goes on: what it froze is collectable again
    assert seen == [(False, {"READY"}), True]


def test_repository_versions_are_plain_integers_and_the_folder_wins(tmp_path: Path) -> None:
    """A folder named `²` once crashed the scan (isdigit() yes, int() no), taking every model down; `01`
    would be a second version 1. A card copied from version 1 into folder 2 serves as version 2."""
    from service.repository import read_card, scan

    write_tiny_model(tmp_path, "tiny", "1", seed=1)
    for odd in ("\u00b2", "01", "0", "v2", "1.5"):
        (tmp_path / "tiny" / odd).mkdir()
    assert scan(tmp_path) == {"tiny": ["1"]}
    write_tiny_model(tmp_path, "tiny", "2", seed=2)
    card = tmp_path / "tiny" / "2" / "model.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "version": "1"}))
    assert read_card(card.parent).version == "2"
    (tmp_path / "tiny" / "version_policy.json").write_text('{"all": {}}')
    core = InferenceCore(Settings(repository=str(tmp_path), default_model="tiny"))
    core.load()
    try:
        assert {m.version: m.state for m in core.models()} == {"1": "READY", "2": "READY"}
    finally:
        core.close()


def test_a_silent_cpu_fallback_serves_the_fp32_graph(model_repo: Path) -> None:
    """ONNX Runtime drops to the CPU on its own when CUDA is asked for but missing (as here: a CPU build).
    `precision=auto` chose fp16 for the GPU; on the CPU that only costs time, so fp32 is served instead."""
    from service.repository import read_card
    from service.sessions import CPU, CUDA, ModelSession

    card = read_card(model_repo / "efficientnet_lite0" / "1")
    assert {m.precision for m in card.files.values()} == {"fp32", "fp16"}
    fell_back = ModelSession(card, Settings(providers=(CUDA, CPU)))
    assert (fell_back.provider, fell_back.precision) == (CPU, "fp32")
    asked = ModelSession(card, Settings(providers=(CUDA, CPU), precision="fp16"))  # what was asked, is served
    assert (asked.provider, asked.precision) == (CPU, "fp16")
