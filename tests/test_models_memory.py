"""Loading and unloading a model again and again leaves no memory behind: unloaded sessions are released."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import psutil
from PIL import Image

from service.config import Settings
from service.core import InferenceCore
from tests.conftest import encode

MODEL = "efficientnet_lite0"
CYCLES = 50
LIMIT_MB = 50


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_fifty_load_unload_cycles_keep_memory_flat(
    model_repo: Path, tmp_path: Path, chelsea: Image.Image
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(model_repo / MODEL, repo / MODEL)
    settings = Settings(
        repository=str(repo),
        default_model=MODEL,
        model_control="explicit",
        max_batch_size=1,  # a short warm-up: one bucket
        intra_op_threads=1,
    )
    core = InferenceCore(settings)
    core.load()
    photo = encode(chelsea, "JPEG", quality=90)
    sizes: list[float] = [rss_mb()]

    async def cycles() -> None:
        for _ in range(CYCLES):
            await core.load_model(MODEL)
            (answer,) = await core.classify([photo])
            assert not isinstance(answer, Exception) and answer.version == "1"
            await core.unload_model(MODEL)
            assert core.models() == []
            sizes.append(rss_mb())

    try:
        asyncio.run(cycles())
    finally:
        core.close()
    # The first cycle sets up what every later one reuses (ONNX Runtime's globals, the allocator's arenas).
    growth = sizes[-1] - sizes[1]
    print(
        f"\nRSS over {CYCLES} load/unload cycles of {MODEL}: {sizes[0]:.0f} MiB before, {sizes[1]:.0f} "
        f"after the first, {sizes[-1]:.0f} after the last: +{growth:.1f} MiB over the last {CYCLES - 1} "
        f"(limit {LIMIT_MB}); peak {max(sizes):.0f} MiB"
    )
    assert growth <= LIMIT_MB, sizes
