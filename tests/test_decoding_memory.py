"""The decode memory budget: `decode_bytes` is a real bound of what decoding takes, and the budget holds.

The estimate is checked against the peak resident memory of a fresh process decoding and preprocessing one
real 6 MP file of each format and mode (bench/bench_decode_memory.py's measurement, which prints the same at
40 MP); the budget with real threads and a real ONNX Runtime model.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.core import InferenceCore, Prediction
from service.decoding import Limits, decode, decode_bytes
from service.errors import DeadlineExceeded, ImageTooLarge
from service.memory import MemoryBudget
from tests.conftest import classify_now, decode_memory_released, encode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode_memory import CASES, make_files, measure  # noqa: E402

W, H = 3000, 2000
MB = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("six-megapixels")
    make_files(folder, W, H)
    return folder


@pytest.mark.parametrize(("name", "mode", "channels"), CASES, ids=[f"{n}-{m}-{c}" for n, m, c in CASES])
def test_the_estimate_bounds_the_measured_peak_within_2x(files: Path, name: str, mode: str, channels: int):
    estimate, peak, _ = measure(files / name, mode, channels)
    assert peak > 0
    assert estimate >= peak, f"{name}: estimate {estimate / MB:.1f} MiB under the peak {peak / MB:.1f} MiB"
    assert estimate <= 2 * peak + 8 * MB, f"{name}: estimate {estimate / MB:.1f} MiB, peak {peak / MB:.1f}"


def test_sixteen_bit_grey_takes_under_9_bytes_a_pixel(files: Path):
    """The float path the 64 K table replaced held 15 bytes a pixel (600 MB at 40 MP); the table about 7."""
    _, peak, _ = measure(files / "grey16.png", "fast", 3)
    assert peak < 9 * W * H


def test_an_image_over_the_limit_is_refused_before_decoding():
    data = encode(Image.new("RGBA", (2000, 1500), (1, 2, 3, 4)), "PNG")
    reserved: list[int] = []
    with pytest.raises(ImageTooLarge, match=r"needs about \d+ MiB; the limit is 16 MiB"):
        decode(data, limits=Limits(max_decode_bytes=16 * MB), reserve=reserved.append)
    assert reserved == []  # refused from the header: nothing reserved, nothing decoded
    decode(data, limits=Limits(max_decode_bytes=64 * MB), reserve=reserved.append)
    assert 12 * MB < reserved[0] < 64 * MB


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "WEBP"), ("I", "TIFF"), ("CMYK", "JPEG")])
def test_default_budget_takes_every_image_the_pixel_limit_lets_through(mode: str, fmt: str):
    """At the default 40 MP and 1 GiB, the costliest paths fit: an RGBA WebP (two decoder canvases), a
    rotated 32-bit TIFF (scaled in floats), a progressive CMYK JPEG decoded at full size (coefficients)."""
    settings = Settings()
    limits = Limits.from_settings(settings)
    side = int(settings.max_image_pixels**0.5)
    img = Image.new(mode, (side, side))
    img.info["exif"] = b"Exif"  # an EXIF block: a rotated copy may be made
    try:
        need = decode_bytes(img, fmt, b"", 3, side * side, multi_scan=fmt == "JPEG")
    finally:
        img.close()
    assert 500 * MB < need < limits.max_decode_bytes == settings.decode_memory_mb * MB


# -- the budget itself, with real threads ----


def test_budget_waits_for_room_serves_in_arrival_order_and_honours_deadlines():
    seen: list[int] = []  # what the metrics gauge is set to, change by change
    budget = MemoryBudget(100, seen.append)
    budget.acquire(70)

    def queued(n: int) -> None:
        for _ in range(500):
            if budget.waiting == n:
                return
            time.sleep(0.01)
        raise AssertionError(f"{budget.waiting} waiting, not {n}")

    big = threading.Thread(target=budget.acquire, args=(60, time.monotonic() + 10))
    big.start()
    queued(1)
    small = threading.Thread(target=budget.acquire, args=(10, time.monotonic() + 10))
    small.start()  # 70 + 10 would fit, but `big` came first
    queued(2)
    with pytest.raises(DeadlineExceeded, match="waiting for decode memory"):
        budget.acquire(1, time.monotonic() + 0.05)
    assert seen == [70] and budget.waiting == 2
    budget.release(70)
    big.join(10)
    small.join(10)
    assert seen == [70, 0, 60, 70]  # `big` was served first, then `small`
    assert budget.used == 70 and budget.peak == 70 and budget.waiting == 0
    with pytest.raises(ImageTooLarge, match="the limit is"):
        budget.acquire(101)


def test_a_hold_gives_back_its_reservation_on_errors_too():
    budget = MemoryBudget(100)
    with pytest.raises(RuntimeError, match="reserves once"), budget.holding() as hold:
        hold.reserve(40)
        hold.reserve(10)
    with pytest.raises(ValueError), budget.holding() as hold:
        hold.reserve(30)
        raise ValueError("the decoder failed")
    assert budget.used == 0


# -- through the core: a real model, concurrent callers ----


def _pngs(n: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return [encode(Image.fromarray(np.roll(pixels, i, axis=1)), "PNG", compress_level=1) for i in range(n)]


@contextmanager
def tiny_core(repo: Path, **settings: int) -> Iterator[InferenceCore]:
    core = InferenceCore(Settings(repository=str(repo), models=("tiny",), **settings))
    core.load()
    try:
        yield core
    finally:
        core.close()


def test_core_never_holds_more_than_its_budget_and_answers_everything(tiny_repo: Path):
    """1.4 MP PNGs need about 14 MiB each to decode: a 32 MiB budget lets two of four threads at once."""
    with tiny_core(tiny_repo, decode_threads=4, decode_memory_mb=32) as core:
        images = _pngs(16, 1200)
        one: list[int] = []
        decode(images[0], limits=core.limits, reserve=one.append)
        assert 12 * MB < one[0] < 16 * MB
        with concurrent.futures.ThreadPoolExecutor(8) as callers:
            results = list(callers.map(lambda d: classify_now(core, [d], model="tiny")[0], images))
        assert all(isinstance(r, Prediction) for r in results)
        assert 2 * one[0] <= core.decode_memory.peak <= 32 * MB  # two at once, never a third
        assert decode_memory_released(core)


def test_core_refuses_an_image_over_its_budget_and_keeps_serving(tiny_repo: Path):
    with tiny_core(tiny_repo, decode_memory_mb=16) as core:
        big, small = _pngs(1, 1500)[0], _pngs(1, 200)[0]
        over, ok = classify_now(core, [big, small], model="tiny")
        assert isinstance(over, ImageTooLarge) and "the limit is 16 MiB" in over.message
        assert isinstance(ok, Prediction)
        assert decode_memory_released(core)


def test_no_room_before_the_deadline_is_deadline_exceeded(tiny_repo: Path):
    with tiny_core(tiny_repo, decode_memory_mb=16) as core:
        core.decode_memory.acquire(15 * MB)  # another decode holding nearly all of it
        (answer,) = classify_now(core, _pngs(1, 200), model="tiny", deadline=time.monotonic() + 0.3)
        assert isinstance(answer, DeadlineExceeded)
        core.decode_memory.release(15 * MB)
        (answer,) = classify_now(core, _pngs(1, 200), model="tiny")
        assert isinstance(answer, Prediction)
