"""Real image files for the batch scoring tests (the model repository is conftest's `tiny_repo`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat")


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def image_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEG/PNG files: scikit-image photos, crops of them and generated pictures, in subfolders."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skdata, name)() for name in PHOTOS]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
        crop = photo[top : top + h // 2 + 20, left : left + w // 2 + 20]
        sub = folder / f"set{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 4 == 3:
            path = sub / f"img{i:04d}.png"
            Image.fromarray(crop).save(path)
        else:
            path = sub / f"img{i:04d}.jpg"
            path.write_bytes(jpeg(crop))
        paths.append(path)
    return paths
