"""Bad inputs leave nothing behind: resident memory grows by at most 50 MB over 1,000 rejected inputs."""

from __future__ import annotations

import gc
import io
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from service.config import Settings
from service.core import InferenceCore
from service.errors import ServiceError
from tests.conftest import classify_now, encode


def _bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(b"\x00" * (width + 1)) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _bad_inputs(chelsea: Image.Image) -> list[bytes]:
    jpeg = encode(chelsea, "JPEG", quality=90)
    png = encode(chelsea.resize((200, 150)), "PNG")
    buf = io.BytesIO()
    Image.new("RGB", (2000, 20)).save(buf, "PNG")
    return [
        b"",
        np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes(),
        jpeg[: len(jpeg) // 2],
        png[: len(png) // 2],
        b"just some text\n" * 20,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        b"%PDF-1.7\n%%EOF",
        _bomb(20000, 20000),
        buf.getvalue(),  # aspect ratio 100
    ]


@pytest.mark.slow
def test_rss_stable_over_1000_bad_inputs(tiny_repo: Path, chelsea: Image.Image) -> None:
    core = InferenceCore(Settings(repository=str(tiny_repo), default_model="tiny"))
    core.load()
    bad = _bad_inputs(chelsea)
    proc = psutil.Process()
    try:
        good = encode(chelsea, "JPEG")
        classify_now(core, [good] + bad)  # warm every code path once
        for kwargs in ({"top_k": 0}, {"tta": "nope"}, {"model": "nope"}, {"version": "99"}):
            with pytest.raises(ServiceError):
                classify_now(core, [good], **kwargs)
        gc.collect()
        before = proc.memory_info().rss
        done = 0
        while done < 1000:
            results = classify_now(core, bad)
            assert all(isinstance(r, ServiceError) for r in results)
            done += len(bad)
            for kwargs in ({"top_k": 0}, {"tta": "nope"}, {"model": "nope"}, {"version": "99"}):
                with pytest.raises(ServiceError):
                    classify_now(core, [good], **kwargs)
                done += 1
        gc.collect()
        grown = (proc.memory_info().rss - before) / 2**20
        assert grown <= 50, f"RSS grew by {grown:.1f} MB over {done} bad inputs"
    finally:
        core.close()


_LOAD_RSS = """
import json, sys
import psutil
from service import sessions
from service.config import Settings
from service.core import InferenceCore

sessions.pick_batch = lambda per_image, tolerance=0.0: 4  # what warm-up picks on a small CPU, made certain
before = psutil.Process().memory_info().rss
core = InferenceCore(Settings(repository=sys.argv[1], models=("efficientnet_lite0",), max_batch_size=32,
                              intra_op_threads=1, inference_workers=2, solo_threads=int(sys.argv[2])))
core.load()
print(json.dumps({"mb": (psutil.Process().memory_info().rss - before) / 2**20,
                  "preferred": core.model_info("efficientnet_lite0").runtime["preferred_batch"]}))
core.close()
"""


def test_a_loaded_model_keeps_no_memory_for_batches_it_will_not_run(model_repo: Path) -> None:
    """Warm-up runs every bucket up to max_batch_size (32), but the batcher runs at most the preferred batch
    (4 here): the activation memory of the larger ones goes back (it was about 400 MB of 500 for
    efficientnet_lite0), and the solo session costs about its weights and a small batch, not a second
    32-image arena."""
    import json
    import subprocess
    import sys

    loaded = {}
    for solo in (0, 2):
        out = subprocess.run(
            [sys.executable, "-c", _LOAD_RSS, str(model_repo), str(solo)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parents[1],
            check=True,
        )
        loaded[solo] = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(r["preferred"] == 4 for r in loaded.values()), loaded
    assert loaded[0]["mb"] < 250, loaded
    assert loaded[2]["mb"] - loaded[0]["mb"] < 150, loaded


_ARENA_RSS = """
import json, sys, time
import numpy as np
import psutil
from service import sessions
from service.config import Settings
from service.core import InferenceCore

sessions.pick_batch = lambda per_image, tolerance=0.0: 4
proc = psutil.Process()
core = InferenceCore(Settings(repository=sys.argv[1], models=("efficientnet_lite0",), max_batch_size=4,
                              intra_op_threads=1, solo_threads=1, memory_trim_idle_s=0.2))
core.load()
session = core.model_set.entries()[0].session
loaded = proc.memory_info().rss
batch = np.zeros((24, 3, 224, 224), np.float32)
session.run(batch)  # what concurrent runs under a burst add up to: a larger arena, kept after the run
session.run(batch[:8], alone=True)
del batch
grown = proc.memory_info().rss
core.trim.poke()
until = time.monotonic() + 30
while core.trim.trims == 0 and time.monotonic() < until:
    time.sleep(0.05)
time.sleep(0.2)
print(json.dumps({"trims": core.trim.trims, "grown_mb": (grown - loaded) / 2**20,
                  "left_mb": (proc.memory_info().rss - loaded) / 2**20}))
core.close()
"""


def test_the_idle_trim_gives_back_what_the_arenas_grew_to(model_repo: Path) -> None:
    """ONNX Runtime's arena keeps the largest activations a session has run (under a burst, the sum of the
    runs at once) until told to shrink: the idle trim shrinks each session's arena to one image's run."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _ARENA_RSS, str(model_repo)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["trims"] == 1, r
    assert r["grown_mb"] > 150, r  # the runs above did grow the arenas
    assert r["left_mb"] < 40, r


def test_a_shrunk_arena_answers_as_before(tiny_repo: Path) -> None:
    """Shrinking frees only what no run holds: both sessions answer the same after it, and again after a
    concurrent-size run grows them back."""
    from service.card import read_card
    from service.sessions import ModelSession

    session = ModelSession(read_card(tiny_repo / "tiny" / "1"), Settings(solo_threads=1))
    batch = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)
    before = session.run(batch), session.run(batch[:1], alone=True)
    session.release_arena()
    np.testing.assert_array_equal(session.run(batch[:1], alone=True), before[1])
    np.testing.assert_array_equal(session.run(batch), before[0])
    session.release_arena()
    np.testing.assert_array_equal(session.run(batch), before[0])
