"""Decoding in child processes (service/decoders.py): the same views as in a thread, errors of the same types,
reservations made by the parent, children that die replaced, and the decode's CPU spent outside the worker's
interpreter."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import decoding
from service.card import read_card
from service.config import Settings
from service.core import InferenceCore
from service.decoders import DecodeProcess, DecodeProcesses, _error
from service.errors import DeadlineExceeded, ImageTooLarge, InvalidArgument, InvalidImage, ServiceError
from service.pipeline import Pipeline
from tests.conftest import classify_now, decode_memory_released, encode


@pytest.fixture(scope="module")
def pipeline(model_repo: Path) -> Pipeline:
    card = read_card(model_repo / "efficientnet_lite0" / "1")
    return Pipeline.for_card(card, decoding.Limits(), "exact")


@pytest.fixture
def child() -> Iterator[DecodeProcess]:
    process = DecodeProcess(niceness=0, trim_idle_s=1.0)
    yield process
    process.close()


def test_a_child_gives_the_views_a_thread_gives(
    child: DecodeProcess, pipeline: Pipeline, chelsea: Image.Image, coffee: Image.Image
) -> None:
    for img, tta in ((chelsea, "none"), (coffee, "flip"), (chelsea, "ten_crop")):
        data = encode(img, "JPEG", quality=90)
        asked: list[int] = []
        views = child.prepare(("efficientnet_lite0", "1", 0), pipeline, data, tta, asked.append)
        here = pipeline.prepare(data, tta)
        assert views.dtype == np.float32 and views.flags.writeable and views.shape == here.shape
        np.testing.assert_array_equal(views, here)
        assert len(asked) == 1 and asked[0] > img.width * img.height * 3  # the decode's estimate, once


def test_a_bad_image_is_its_own_error_and_the_child_serves_on(
    child: DecodeProcess, pipeline: Pipeline, chelsea: Image.Image
) -> None:
    key = ("efficientnet_lite0", "1", 0)
    jpeg = encode(chelsea, "JPEG", quality=90)
    with pytest.raises(InvalidImage, match="corrupt or truncated JPEG"):
        child.prepare(key, pipeline, jpeg[: len(jpeg) // 3] + b"\x00" * 64, "none", lambda n: None)
    with pytest.raises(InvalidArgument) as raised:
        child.prepare(key, pipeline, b"not an image at all", "none", lambda n: None)
    assert raised.value.http_status == 400 and raised.value.grpc_code == "INVALID_ARGUMENT"
    wide = encode(Image.new("RGB", (4000, 100)), "PNG")
    with pytest.raises(ImageTooLarge, match="aspect ratio"):
        child.prepare(key, pipeline, wide, "none", lambda n: None)
    assert child.prepare(key, pipeline, jpeg, "none", lambda n: None).shape == (1, 3, 224, 224)
    assert not child.broken


def test_a_child_keeps_a_bounded_set_of_pipelines(
    child: DecodeProcess, pipeline: Pipeline, chelsea: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each model version's pipeline is sent once; past `MAX_KEYS` the parent starts the child's set again,
    so versions loaded and unloaded for months do not grow the child."""
    from service import decoders

    monkeypatch.setattr(decoders, "MAX_KEYS", 2)
    jpeg = encode(chelsea, "JPEG", quality=90)
    for key in [("a", "1", 0), ("b", "1", 0), ("a", "1", 0), ("c", "1", 0), ("a", "1", 0), ("b", "1", 0)]:
        assert child.prepare(key, pipeline, jpeg, "none", lambda n: None).shape == (1, 3, 224, 224)
        assert key in child._keys and len(child._keys) <= 2
    assert not child.broken


def test_a_reservation_refused_by_the_parent_stops_the_image(
    child: DecodeProcess, pipeline: Pipeline, chelsea: Image.Image
) -> None:
    def no_room(nbytes: int) -> None:
        raise DeadlineExceeded("no room for the decode before the deadline")

    jpeg = encode(chelsea, "JPEG", quality=90)
    with pytest.raises(DeadlineExceeded, match="no room"):
        child.prepare(("m", "1", 0), pipeline, jpeg, "none", no_room)
    assert child.prepare(("m", "1", 0), pipeline, jpeg, "none", lambda n: None).shape == (1, 3, 224, 224)


def test_a_child_that_dies_fails_its_image_and_is_replaced(pipeline: Pipeline, chelsea: Image.Image) -> None:
    processes = DecodeProcesses(niceness=0, trim_idle_s=1.0)
    jpeg = encode(chelsea, "JPEG", quality=90)
    try:
        processes.start(1)
        (first,) = processes.pids()

        def killed(nbytes: int) -> None:  # the child waits for this answer: it dies meanwhile
            os.kill(first, signal.SIGKILL)
            time.sleep(0.2)

        with processes.borrow() as process, pytest.raises(ServiceError) as raised:
            process.prepare(("m", "1", 0), pipeline, jpeg, "none", killed)
        assert raised.value.http_status == 500 and "decoding process ended" in str(raised.value)
        assert processes.pids() == []
        with processes.borrow() as process:
            assert process.prepare(("m", "1", 0), pipeline, jpeg, "none", lambda n: None).shape[0] == 1
        assert len(processes.pids()) == 1 and processes.pids() != [first]
    finally:
        processes.close()
    assert processes.pids() == []


def test_a_child_still_decoding_at_the_deadline_is_killed_and_replaced(
    pipeline: Pipeline, astronaut: Image.Image
) -> None:
    big = encode(astronaut.resize((3000, 3000)), "JPEG", quality=95)
    processes = DecodeProcesses(niceness=0, trim_idle_s=1.0)
    try:
        processes.start(1)
        (first,) = processes.pids()
        with processes.borrow() as process:
            process.prepare(("m", "1", 0), pipeline, big, "none", lambda n: None)  # warm: its pipeline sent
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="while the image was being decoded"):
                process.prepare(("m", "1", 0), pipeline, big, "ten_crop", lambda n: None, deadline=t0 + 0.01)
            assert time.monotonic() - t0 < 2.0 and not process.process.is_alive()
        assert processes.pids() == []
        with processes.borrow() as process:
            assert process.prepare(("m", "1", 0), pipeline, big, "none", lambda n: None).shape[0] == 1
        assert processes.pids() != [first]

        def no_room(nbytes: int) -> None:  # the budget's wait ends at the deadline: the child is not killed
            time.sleep(0.05)
            raise DeadlineExceeded("no room for the decode before the deadline")

        (child,) = processes.pids()
        with processes.borrow() as process, pytest.raises(DeadlineExceeded, match="no room"):
            process.prepare(("m", "1", 0), pipeline, big, "none", no_room, deadline=time.monotonic() + 0.02)
        assert processes.pids() == [child]
    finally:
        processes.close()


def test_the_decode_costs_the_calling_thread_little_cpu(
    child: DecodeProcess, pipeline: Pipeline, astronaut: Image.Image
) -> None:
    """The point of the children: the Python and C work of a decode runs in another interpreter. The CPU
    time of the thread that hands a large image over is a small part of what decoding it in that thread
    costs (CPU time, not wall time: the host's other work does not change it). One view: ten crops' 6 MB of
    tensors coming back cost the thread about a fifth of what rendering them there does."""
    big = encode(astronaut.resize((3000, 3000)), "JPEG", quality=95)
    key = ("m", "1", 0)
    child.prepare(key, pipeline, big, "none", lambda n: None)  # the pipeline is sent once, not timed
    spent: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.thread_time()
        for _ in range(3):
            fn()
        spent[name] = time.thread_time() - t0

    runs = {
        "child": lambda: child.prepare(key, pipeline, big, "none", lambda n: None),
        "thread": lambda: pipeline.prepare(big, "none"),
    }
    for name, fn in runs.items():
        t = threading.Thread(target=timed, args=(name, fn))
        t.start()
        t.join()
    assert spent["child"] < 0.25 * spent["thread"], spent


def test_only_the_core_s_own_errors_come_back_as_themselves() -> None:
    assert type(_error({"error": "InvalidImage", "message": "corrupt"})) is InvalidImage
    assert type(_error({"error": "ImageTooLarge", "message": "x" * 10_000})) is ImageTooLarge
    assert len(str(_error({"error": "ImageTooLarge", "message": "x" * 10_000}))) <= 500
    for name in ("Overloaded", "SystemExit", "os", "__builtins__", None):  # other signatures, or not errors
        assert type(_error({"error": name, "message": "m"})) is ServiceError


def test_the_core_decodes_in_children_at_the_work_s_nice_value(tiny_repo: Path, chelsea: Image.Image) -> None:
    settings = Settings(
        repository=str(tiny_repo), default_model="tiny", decode_threads=2, decode_processes=True
    )
    core = InferenceCore(settings)
    core.load()
    try:
        assert core.decoders is not None
        pids = core.decoders.pids()
        assert len(pids) == 2
        for pid in pids:
            until = time.monotonic() + 10
            while os.getpriority(os.PRIO_PROCESS, pid) != 10 and time.monotonic() < until:
                time.sleep(0.05)  # the child lowers itself as it starts
            assert os.getpriority(os.PRIO_PROCESS, pid) == 10
        jpeg = encode(chelsea, "JPEG", quality=90)
        answers = classify_now(core, [jpeg] * 6 + [b"\x89PNG broken"], top_k=3)
        assert all(a.top_k for a in answers[:6]) and isinstance(answers[6], InvalidArgument)
        assert core.decoders.pids() == pids  # the same children served every image
        assert decode_memory_released(core)
    finally:
        core.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # ended and reaped


def test_by_default_the_threads_decode(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    core.load()
    try:
        assert core.decoders is None
        (answer,) = classify_now(core, [encode(chelsea, "JPEG", quality=90)])
        assert answer.top_k
    finally:
        core.close()


def test_a_served_worker_decodes_in_children_and_outlives_a_dead_one(
    tmp_path: Path, chelsea: Image.Image
) -> None:
    """Over HTTP, in BentoML's worker: images are answered from the children, a bad one is a 400, and children
    killed while idle (as by the OOM killer) cost no image: each is replaced before it is handed one (one
    killed while it holds an image fails that image only: `test_a_child_that_dies_fails_its_image...`)."""
    import httpx
    import psutil

    from tests.http_server import descendants, running_server

    photo = encode(chelsea, "JPEG", quality=90)
    flags = ("--models", "efficientnet_lite0", "--decode-processes", "--decode-threads", "2")
    with running_server(tmp_path, *flags) as server:
        r = httpx.post(server.url + "/classify", content=photo, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.post(server.url + "/classify", content=b"\xff\xd8 broken", timeout=30).status_code == 400

        def children() -> list[psutil.Process]:
            return [p for p in descendants(server) if "spawn_main" in " ".join(p.cmdline())]

        before = children()
        assert len(before) >= 2  # the decoding children (and a JSON parsing one once a large body came)
        for p in before:
            p.kill()
        psutil.wait_procs(before, timeout=10)
        codes = [
            httpx.post(server.url + "/classify", content=photo, timeout=30).status_code for _ in range(6)
        ]
        assert codes == [200] * 6  # each dead child is found before it is handed an image
        assert {p.pid for p in children()}.isdisjoint({p.pid for p in before})
        log = server.log()
        assert "a decoding process ended while idle" in log and "Traceback" not in log
