"""Admission in views, fair turns between requests, shedding by expected wait, memory given back when idle.

Core tests run the real core on generated ONNX models; the server tests run `python -m service serve` on
loopback and call it over HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from proto import classifier_pb2, classifier_pb2_grpc
from service.batching import Batcher, Job, held
from service.config import Settings
from service.core import InferenceCore, NullObserver, Prediction
from service.errors import InvalidArgument, Overloaded
from service.fair import FairPool
from service.memory import IdleTrim
from tests.conftest import classify_now, decode_memory_released, encode
from tests.http_server import Server, jpeg, running_server


def _images(img: Image.Image, n: int, size: tuple[int, int] = (96, 64)) -> list[bytes]:
    return [encode(img.rotate(5 * i).resize(size), "PNG") for i in range(n)]


# -- the batcher ----
def _batcher(run_s: float = 0.0, queue_size: int = 64) -> tuple[Batcher, threading.Event, list]:
    gate, ran = threading.Event(), []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append(float(batch[0, 0, 0, 0]))
        gate.wait(10)
        time.sleep(run_s * batch.shape[0])
        return batch.reshape(batch.shape[0], -1)[:, :1]

    b = Batcher(run, max_batch_size=1, max_wait_s=0.0, queue_size=queue_size, observer=NullObserver())
    return b, gate, ran


def _job(value: float, owner: object, views: int = 1) -> Job:
    return Job("m", np.full((views, 1, 2, 2), value, np.float32), Future(), 1e12, owner=owner)


def test_requests_take_turns_in_the_batcher() -> None:
    """A request queued behind another's four jobs runs after the first of them, not after all four."""
    b, gate, ran = _batcher()
    big, small = object(), object()
    jobs = [_job(1.0, big), _job(2.0, big), _job(3.0, big), _job(4.0, big), _job(9.0, small)]
    b.admit(5, preparing=False)
    b.submit(jobs[0], from_preparing=False)  # taken at once; it waits for the gate while the rest queue
    while not ran:
        time.sleep(0.001)
    for job in jobs[1:]:
        b.submit(job, from_preparing=False)
    gate.set()
    for job in jobs:
        job.future.result(10)
    b.stop(5)
    assert ran == [1.0, 9.0, 2.0, 3.0, 4.0]


def test_a_job_larger_than_a_batch_runs_in_parts_between_other_requests() -> None:
    gate, ran = threading.Event(), []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append(batch[:, 0, 0, 0].tolist())
        gate.wait(10)
        return batch.reshape(batch.shape[0], -1)[:, :1] * 10

    b = Batcher(run, max_batch_size=2, max_wait_s=0.0, queue_size=16, observer=NullObserver())
    big = Job(
        "m", np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((6, 1, 2, 2)), Future(), 1e12
    )
    big.owner = object()
    small = _job(9.0, object())
    b.admit(7, preparing=False)
    b.submit(big, from_preparing=False)
    while not ran:
        time.sleep(0.001)
    b.submit(small, from_preparing=False)
    gate.set()
    out = big.future.result(10)
    assert small.future.result(10).ravel().tolist() == [90.0]
    b.stop(5)
    assert ran == [[1.0, 2.0], [9.0], [3.0, 4.0], [5.0, 6.0]]
    assert out.ravel().tolist() == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # the parts' outputs, in order


def test_a_large_request_takes_a_turn_of_each_batch_and_stays_out_of_small_requests_batches() -> None:
    """A batch a small request waits behind stays short: a large request (more views than a turn) gives at
    most a turn of its views to any batch, and none to a batch that a small request leads. Small requests
    still batch together, and ride in a large request's batch."""
    gate, ran = threading.Event(), []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append(batch[:, 0, 0, 0].tolist())
        gate.wait(10)
        return batch.reshape(batch.shape[0], -1)[:, :1] * 10

    b = Batcher(
        run,
        max_batch_size=8,
        max_wait_s=0.0,
        queue_size=32,
        observer=NullObserver(),
        turn_limit=lambda key: 2,
    )

    def views(*values: float) -> np.ndarray:
        return np.asarray(values, np.float32).reshape(-1, 1, 1, 1) * np.ones(
            (len(values), 1, 2, 2), np.float32
        )

    def job(owner: object, *values: float, request_views: int = 0) -> Job:
        return Job("m", views(*values), Future(), 1e12, owner=owner, request_views=request_views)

    first = job(object(), 0.0)
    large_b, large_e = object(), object()
    queued = [
        job(object(), 9.0),  # small
        job(large_b, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0),  # one job of six views
        job(object(), 8.0),  # small
        job(large_e, 11.0, 12.0, request_views=4),  # two images of a four-view request
        job(large_e, 13.0, 14.0, request_views=4),
    ]
    b.admit(1 + 1 + 6 + 1 + 4, preparing=False)
    b.submit(first, from_preparing=False)  # taken at once; it waits for the gate while the rest queue
    while not ran:
        time.sleep(0.001)
    for j in queued:
        b.submit(j, from_preparing=False)
    gate.set()
    answers = [j.future.result(10).ravel().tolist() for j in queued]
    b.stop(5)
    assert ran == [[0.0], [9.0, 8.0], [1.0, 2.0, 11.0, 12.0], [3.0, 4.0, 13.0, 14.0], [5.0, 6.0]]
    assert answers[1] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0] and answers[4] == [130.0, 140.0]


def test_a_large_job_never_runs_whole_where_it_was_prepared() -> None:
    """`run_here` runs a lone job at once on the preparing thread; a large one is queued in turns instead,
    so that a small request that comes meanwhile waits for one turn, not for the whole job."""
    ran = []

    def run(key, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        ran.append((batch.shape[0], threading.current_thread().name))
        return batch.reshape(batch.shape[0], -1)[:, :1]

    b = Batcher(
        run,
        max_batch_size=2,
        max_wait_s=0.0,
        queue_size=16,
        observer=NullObserver(),
        turn_limit=lambda key: 1,
    )
    b.admit(3)
    large = Job("m", np.zeros((3, 1, 2, 2), np.float32), Future(), 1e12, owner=object())
    b.submit(large, run_here=True)
    assert large.future.result(10).shape == (3, 1)
    b.stop(5)
    assert ran == [(1, "batcher-0")] * 3


def _measured_batcher() -> Batcher:
    """A batcher that has run one batch: its cost per view (at least 50 ms) is measured."""
    b, gate, _ = _batcher(run_s=0.05)
    gate.set()
    warm = _job(0.0, object())
    b.admit(1, preparing=False)
    b.submit(warm, from_preparing=False)
    warm.future.result(10)
    b.release(1)
    return b


def test_admission_sheds_by_expected_wait_with_retry_after() -> None:
    b = _measured_batcher()
    assert b.per_view_s >= 0.05  # measured from the batch that ran
    b.admit(1, preparing=False, deadline=time.monotonic() + 1e-3)  # idle: admitted whatever its deadline
    b.admit(20, preparing=False)  # 21 views waiting: about a second of work
    soon = time.monotonic() + 0.2
    with pytest.raises(Overloaded, match="past this request's deadline") as refused:
        b.admit(1, preparing=False, deadline=soon)
    assert refused.value.retry_after_s >= 1  # whole seconds until what waits is done, rounded up
    with pytest.raises(Overloaded):
        b.hold(1, soon)
    assert b.outstanding == 21  # a refused hold reserves nothing
    b.admit(1, preparing=False, deadline=time.monotonic() + 60)
    assert b.outstanding == 22
    b.release(22)
    b.stop(5)


def test_views_held_from_headers_count_until_admitted_or_dropped() -> None:
    """A burst reaches the server before any body is read: each request holds its least views from its
    headers, so the requests behind it see them and the ones past their deadline are refused at once."""
    b = _measured_batcher()
    per_view = b.per_view_s
    assert per_view >= 0.05

    def in_task(fn):  # each request is its own asyncio task, with its own context
        return contextvars.copy_context().run(fn)

    deadline = time.monotonic() + 10 * per_view
    holds = []
    refused = 0
    for _ in range(30):  # 30 requests' headers, no body read yet
        try:
            holds.append(in_task(lambda: b.hold(1, deadline)))
        except Overloaded as e:
            refused += 1
            assert e.retry_after_s >= 1
    assert 5 <= len(holds) <= 10 and refused == 30 - len(holds)
    assert b.outstanding == len(holds)

    # the first request's body holds 3 images: its admission replaces its hold, in its own task
    def admit_three() -> None:
        held.set(holds[0])
        b.admit(3, preparing=False, deadline=time.monotonic() + 60)

    in_task(admit_three)
    assert not holds[0].live and b.outstanding == len(holds) + 2
    b.drop(holds[0])  # taken back by the admission: dropping it again changes nothing
    assert b.outstanding == len(holds) + 2
    for h in holds[1:]:  # the others end before admission (their bodies were bad, say)
        b.drop(h)
        b.drop(h)
    assert b.outstanding == 3
    # a hold that is not this task's is not taken by an admission
    b.admit(1, preparing=False)
    assert b.outstanding == 4
    b.release(4)
    b.stop(5)


def test_a_request_for_a_model_that_cannot_answer_is_not_shed(tiny_repo: Path) -> None:
    """Under overload a request for an unknown model is still told so (the route's 404), not 503 with a
    Retry-After that no retry would help; requests for a served model are shed."""
    from service.http.admission import hold_from_headers

    settings = Settings(repository=str(tiny_repo), default_model="tiny", queue_size=8)
    core = InferenceCore(settings)
    core.load()
    try:
        full = core.hold(time.monotonic() + 30, 8)

        def scope(path: str, query: str = "") -> dict:
            return {"method": "POST", "path": path, "query_string": query.encode()}

        for path, query in [
            ("/classify", "model=nosuch"),
            ("/classify_batch", "model=tiny&version=9"),
            ("/v2/models/nosuch/infer", ""),
            ("/v2/models/tiny/versions/9/infer", ""),
        ]:
            assert hold_from_headers(core, scope(path, query), {}, settings) is None, (path, query)
        for path, query in [
            ("/classify", ""),
            ("/classify", "model=tiny&tta=flip"),
            ("/v2/models/tiny/infer", ""),
        ]:
            with pytest.raises(Overloaded):
                hold_from_headers(core, scope(path, query), {}, settings)
        core.release_hold(full)
        assert hold_from_headers(core, scope("/v2/models/tiny/versions/1/infer"), {}, settings) is not None
    finally:
        core.close()


def test_a_client_holds_at_most_its_share_of_the_queue_from_headers(tiny_repo: Path) -> None:
    """One client's requests whose bodies have not come hold at most `client_share` of the queue: past it
    they hold nothing (their admission alone decides), and another client's still hold theirs."""
    from service.http.admission import HeaderHolds

    settings = Settings(repository=str(tiny_repo), default_model="tiny", queue_size=8, client_share=0.25)
    core = InferenceCore(settings)
    core.load()
    try:
        holds = HeaderHolds(settings)
        scope = {"method": "POST", "path": "/classify", "query_string": b""}

        def take(client: str):  # each request is its own asyncio task, with its own context
            return contextvars.copy_context().run(holds.take, core, scope, {}, client, time.monotonic())

        first = [take("10.0.0.1") for _ in range(4)]
        assert [h is not None for h in first] == [True, True, False, False]
        assert core.batcher.outstanding == 2
        other = take("10.0.0.2")
        assert other is not None and core.batcher.outstanding == 3
        holds.end(core, first[0], "10.0.0.1")  # answered: its view and its place in the share come back
        assert core.batcher.outstanding == 2
        assert take("10.0.0.1") is not None
        tta = {**scope, "query_string": b"tta=flip"}  # two views each: one request fills a share of two
        holds.end(core, other, "10.0.0.2")
        two = contextvars.copy_context().run(holds.take, core, tta, {}, "10.0.0.2", time.monotonic())
        assert two is not None and two.views == 2 and take("10.0.0.2") is None
    finally:
        core.close()


def test_the_decode_pool_takes_requests_in_turns_and_keeps_a_thread_free() -> None:
    """Two threads: a request of six calls runs on one of them at a time, so a request that comes later
    starts on the other at once, before the first request's second call ends."""
    pool = FairPool(2, "test-pool")
    started: list[str] = []
    lock = threading.Lock()
    release = threading.Event()

    def work(name: str) -> None:
        with lock:
            started.append(name)
        if name.startswith("big"):
            release.wait(10)

    big, small = object(), object()
    for i in range(6):
        pool.submit(big, 30, work, f"big{i}")
    time.sleep(0.1)
    pool.submit(small, 1, work, "small")
    until = time.monotonic() + 5
    while "small" not in started and time.monotonic() < until:
        time.sleep(0.01)
    assert started == ["big0", "small"]  # big1 waits: one thread is the most one request holds
    release.set()
    pool.shutdown(wait=True)
    assert started == ["big0", "small", "big1", "big2", "big3", "big4", "big5"]
    with pytest.raises(RuntimeError):
        pool.submit(small, 1, work, "late")


# -- the core ----
def test_view_limit_is_a_client_error_naming_it(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", max_views_per_request=60))
    core.load()
    try:
        images = _images(chelsea, 3)
        with pytest.raises(InvalidArgument, match=r"90 views in one request \(3 images x 30 views of "):
            classify_now(core, images, tta="multiscale")
        with pytest.raises(InvalidArgument, match=r"the limit is 60 views \(max_views_per_request\)"):
            classify_now(core, images, tta="multiscale")
        assert core.batcher.outstanding == 0  # refused before admission
        answers = classify_now(core, images[:2], tta="multiscale")  # 60 views: within the limit
        assert all(isinstance(a, Prediction) for a in answers)
        assert len(classify_now(core, images * 20)) == 60  # 60 images of one view each fit too
    finally:
        core.close()


def test_a_multiscale_flood_does_not_starve_a_lone_client(tiny_repo: Path, chelsea: Image.Image) -> None:
    """One request of 13 multiscale images (390 views) and, just after it, one of a single image: the lone
    image is decoded and run in turn with the flood's, answered correctly before most of the flood."""
    settings = Settings(repository=str(tiny_repo), default_model="tiny", decode_threads=1, max_batch_size=32)
    core = InferenceCore(settings)
    core.load()
    try:
        flood = _images(chelsea, 13, size=(300, 200))
        lone = encode(chelsea.resize((120, 90)), "PNG")
        expected = classify_now(core, [lone])[0]
        flood_alone = classify_now(core, flood, tta="multiscale")
        finished: list[str] = []

        async def both() -> tuple[list, list]:
            async def run(images: list[bytes], tta: str, name: str) -> list:
                answer = await core.classify(images, tta=tta)
                finished.append(name)
                return answer

            big = asyncio.ensure_future(run(flood, "multiscale", "flood"))
            await asyncio.sleep(0)  # the flood is admitted and queued for decoding first
            small = asyncio.ensure_future(run([lone], "none", "lone"))
            return await asyncio.gather(big, small)

        core.batcher.peak = 0
        big, (small,) = asyncio.run(both())
        assert finished == ["lone", "flood"]
        assert isinstance(small, Prediction) and small.top_k[0].index == expected.top_k[0].index
        np.testing.assert_allclose(small.probabilities, expected.probabilities, atol=1e-5)
        for got, ref in zip(big, flood_alone, strict=True):
            np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-5)
        # admission counted the flood's views, not its images; every view is given back
        assert core.batcher.peak >= 390 and core.batcher.outstanding == 0
        # the queued views' tensors were held in the memory budget (30 views of 3x32x32 float32 each)
        assert core.decode_memory.peak >= 30 * 3 * 32 * 32 * 4
        assert decode_memory_released(core)
    finally:
        core.close()


def test_memory_is_trimmed_once_idle(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny", memory_trim_idle_s=0.1))
    core.load()
    try:
        assert core.trim.trims == 0
        classify_now(core, _images(chelsea, 4), tta="ten_crop")
        until = time.monotonic() + 10
        while core.trim.trims == 0 and time.monotonic() < until:
            time.sleep(0.05)
        assert core.trim.trims == 1  # once after the burst, not once per request
    finally:
        core.close()


def test_a_steady_load_is_never_trimmed() -> None:
    """Requests answered every 50 ms leave the service idle between them, never for the trim's 0.3 s: no
    trim (each would hold the allocator's locks in the midst of requests). Once they stop, one trim."""
    trim = IdleTrim(0.3, lambda: True, lambda: None)
    try:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            trim.poke()
            time.sleep(0.05)
        assert trim.trims == 0
        until = time.monotonic() + 5
        while trim.trims == 0 and time.monotonic() < until:
            time.sleep(0.02)
        time.sleep(0.5)
        assert trim.trims == 1
    finally:
        trim.stop()


# -- the server ----
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("admission"),
        "--models",
        "efficientnet_lite0",
        "--queue-size",
        "800",
        "--max-batch-size",
        "4",
        "--request-timeout-s",
        "300",  # the flood's second request waits for the first's 390 views, on a slow runner too
    ) as s:
        yield s


def _small_jpegs(n: int) -> list[bytes]:
    astronaut = Image.fromarray(photos.astronaut())
    return [jpeg(np.asarray(astronaut.rotate(3 * i).resize((64, 64)))) for i in range(n)]


def test_view_limit_over_http_and_grpc(server: Server) -> None:
    images = _small_jpegs(14)  # 14 x 30 = 420 views, past the default 400
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]
    r = httpx.post(server.url + "/classify_batch", params={"tta": "multiscale"}, files=files, timeout=60)
    assert r.status_code == 400, r.text
    assert "420 views" in r.json()["message"] and "max_views_per_request" in r.json()["message"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = classifier_pb2_grpc.ImageClassifierStub(ch)
        request = classifier_pb2.ClassifyBatchRequest(images=images, tta="multiscale")
        with pytest.raises(grpc.RpcError) as info:
            stub.ClassifyBatch(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 400 views" in info.value.details()


def _headers_only(server: Server, path: str, content_length: int) -> bytes:
    """Send a request's headers, promise a large body, never send it: what the server answers."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {content_length}\r\nx-request-timeout-ms: 100\r\n\r\n"
            ).encode()
        )
        try:
            return sock.recv(4096)
        except TimeoutError:  # let in (nothing was queued yet): the server waits for the body
            return b""


def _send_head(server: Server, deadline_ms: int) -> socket.socket:
    """A connection that sent a /classify request's headers (a 1 MB body promised, none sent)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        (
            f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: 1000000\r\nx-request-timeout-ms: {deadline_ms}\r\n\r\n"
        ).encode()
    )
    return sock


def _answered(sock: socket.socket, within_s: float) -> bytes:
    sock.settimeout(within_s)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b""


def test_requests_whose_bodies_are_on_their_way_count_for_the_next(server: Server) -> None:
    """Each request's headers hold a view while its body is read: requests arriving together see the ones
    ahead of them, and those that would wait past their deadline are refused from their headers at once.
    A client gone before sending its body gives its view back."""
    probe = _small_jpegs(1)[0]
    assert httpx.post(server.url + "/classify", content=probe, timeout=60).status_code == 200  # measured
    held: list[socket.socket] = []
    refusal = b""
    try:
        for _ in range(200):  # bodies never sent: nothing is ever admitted, only held
            sock = _send_head(server, 150)
            refusal = _answered(sock, 0.3)
            if refusal:
                sock.close()
                break
            held.append(sock)
        assert refusal.startswith(b"HTTP/1.1 503"), refusal[:200]
        assert b"retry-after: " in refusal.lower()
        assert 1 <= len(held) < 200
    finally:
        for sock in held:  # gone mid-body: each hold is given back
            sock.close()
    deadline = time.monotonic() + 20
    while True:  # once the server has seen them go, a request with the same deadline is held, not refused
        sock = _send_head(server, 150)
        answer = _answered(sock, 0.3)
        sock.close()
        if not answer:
            break
        assert time.monotonic() < deadline, answer[:200]
        time.sleep(0.2)
    r = httpx.post(
        server.url + "/classify", content=probe, headers={"x-request-timeout-ms": "5000"}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_overload_is_refused_at_once_over_http_and_grpc(server: Server) -> None:
    """While 780 multiscale views are queued, a request with 100 ms to live is refused: over HTTP from its
    headers alone (503, Retry-After; its promised body never sent), over gRPC with RESOURCE_EXHAUSTED and
    a retry-after entry. The flood itself is answered in full."""
    probe = _small_jpegs(1)[0]
    assert httpx.post(server.url + "/classify", content=probe, timeout=60).status_code == 200  # measured
    flood = _small_jpegs(13)
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(flood)]
    answers: list[httpx.Response] = []

    def send_flood() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            answers.append(c.post("/classify_batch", params={"tta": "multiscale"}, files=files))

    floods = [threading.Thread(target=send_flood) for _ in range(2)]
    for t in floods:
        t.start()
    refused: dict[str, object] = {}
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch,
    ):
        stub = classifier_pb2_grpc.ImageClassifierStub(ch)
        while any(t.is_alive() for t in floods) and len(refused) < 3:
            if "http" not in refused:
                r = c.post("/classify", content=probe, headers={"x-request-timeout-ms": "100"})
                if r.status_code == 503:
                    refused["http"] = r
            if "headers" not in refused:
                raw = _headers_only(server, "/classify_batch", 5_000_000)
                if raw.startswith(b"HTTP/1.1 503"):
                    refused["headers"] = raw
            if "grpc" not in refused:
                try:
                    stub.Classify(classifier_pb2.ClassifyRequest(image=probe), timeout=0.1)
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused["grpc"] = err
            time.sleep(0.02)
    for t in floods:
        t.join(300)
    assert set(refused) == {"http", "headers", "grpc"}, refused
    r = refused["http"]
    assert isinstance(r, httpx.Response)
    assert r.json()["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert b"retry-after: " in refused["headers"].lower()  # type: ignore[union-attr]
    err = refused["grpc"]
    assert isinstance(err, grpc.RpcError)
    assert int(dict(err.trailing_metadata())["retry-after"]) >= 1  # type: ignore[attr-defined]
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    for a in answers:
        results = a.json()["results"]
        assert len(results) == 13 and all(x["predictions"] for x in results)
    # the service keeps serving once the flood is done
    assert httpx.post(server.url + "/classify", content=probe, timeout=60).status_code == 200
