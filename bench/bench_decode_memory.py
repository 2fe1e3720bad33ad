"""Decode memory: what each decode reserves from the budget against the memory it really takes; printed.

For every format and mode the service decodes, a fresh process decodes and preprocesses one generated file
(default 40 MP, the default pixel limit) as the core does, and prints the estimate `decoding.decode_bytes`
reserves, the measured peak (the process's VmHWM above its baseline), their ratio, bytes per pixel and the
time. tests/test_decoding_memory.py runs the same measurement at 6 MP and checks the bounds.

Usage: python bench/bench_decode_memory.py [--megapixels 40]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import decoding  # noqa: E402
from service.card import Preprocessing  # noqa: E402
from service.preprocessing import Preprocessor  # noqa: E402

# (file, preprocessing mode, model channels): every decode path with its own memory profile
CASES = [
    ("baseline.jpg", "fast", 3),
    ("baseline.jpg", "exact", 3),
    ("progressive.jpg", "fast", 3),
    ("progressive444.jpg", "exact", 3),
    ("cmyk.jpg", "exact", 3),
    ("rotated.jpg", "exact", 3),
    ("rgb.png", "fast", 3),
    ("rgb.png", "fast", 1),
    ("rgba.png", "fast", 3),
    ("la.png", "fast", 3),
    ("palette-trns.png", "fast", 3),
    ("grey16.png", "fast", 3),
    ("grey16.png", "fast", 1),
    ("grey16-key.png", "fast", 3),
    ("lossy.webp", "fast", 3),
    ("rgba.webp", "fast", 3),
    ("palette.gif", "fast", 3),
    ("rgb.bmp", "fast", 3),
    ("rgb.tif", "fast", 3),
    ("int32.tif", "fast", 3),
]


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_files(folder: Path, width: int, height: int) -> None:
    """Smooth generated pictures (quick to encode at any size) in each format and mode of CASES."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = Image.fromarray(
        np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // width], -1).astype(np.uint8)
    )
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((x % 256).astype(np.uint8)))
    grey16 = Image.fromarray((x * 65535 // width).astype(np.uint16))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the decoder makes an upright copy
    files = {
        "baseline.jpg": _encode(rgb, "JPEG", quality=90),
        "progressive.jpg": _encode(rgb, "JPEG", quality=90, progressive=True),
        "progressive444.jpg": _encode(rgb, "JPEG", quality=90, progressive=True, subsampling=0),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "rotated.jpg": _encode(rgb, "JPEG", quality=90, exif=exif.tobytes()),
        "rgb.png": _encode(rgb, "PNG", compress_level=1),
        "rgba.png": _encode(rgba, "PNG", compress_level=1),
        "la.png": _encode(rgba.convert("LA"), "PNG", compress_level=1),
        "palette-trns.png": _encode(palette, "PNG", compress_level=1),
        "grey16.png": _encode(grey16, "PNG", compress_level=1),
        "grey16-key.png": _encode(
            grey16, "PNG", compress_level=1, transparency=int(np.asarray(grey16)[0, 5])
        ),
        "lossy.webp": _encode(rgb, "WEBP", quality=80, method=0),
        "rgba.webp": _encode(rgba, "WEBP", quality=80, method=0),
        "palette.gif": _encode(rgb.convert("P"), "GIF"),
        "rgb.bmp": _encode(rgb, "BMP"),
        "rgb.tif": _encode(rgb, "TIFF"),
        "int32.tif": _encode(Image.fromarray(np.asarray(grey16).astype(np.int32)), "TIFF"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def _high_water() -> int:
    """VmHWM, not ru_maxrss: exec keeps the parent's high-water mark in ru_maxrss; a new process image
    starts its own VmHWM."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _one(path: str, mode: str, channels: int) -> None:
    """In the child: decode and preprocess as the core does; print estimate, peak and seconds."""
    spec = Preprocessing(channels, 224, 224, 256, "bicubic", (0.5,) * channels, (0.25,) * channels)
    pre = Preprocessor(spec, mode)
    data = Path(path).read_bytes()
    base = _resident()
    need: list[int] = []
    t0 = time.perf_counter()
    img = decoding.decode(
        data,
        channels=channels,
        limits=decoding.Limits(max_pixels=1 << 40, max_decode_bytes=1 << 40),
        min_short_side=spec.resize,
        draft=pre.decode_draft,
        draft_margin=pre.draft_margin,
        reserve=need.append,
    )
    pre(img, None)
    print(need[0], _high_water() - base, time.perf_counter() - t0)


def measure(path: Path, mode: str, channels: int) -> tuple[int, int, float]:
    """(estimate bytes, peak bytes, seconds) of decoding `path` in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(path), mode, str(channels)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", type=float, default=40.0)
    ap.add_argument("--one", nargs=3, metavar=("PATH", "MODE", "CHANNELS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args.one[0], args.one[1], int(args.one[2]))
        return
    side = int((args.megapixels * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="bench-decode-memory-") as tmp:
        folder = Path(tmp)
        make_files(folder, side, side)
        mp = side * side / 1e6
        print(f"decode memory, {side}x{side} = {mp:.1f} MP: decode + preprocess, a fresh process each")
        head = f"{'file':20s} {'mode':5s} ch {'KB':>8s} {'estimate MB':>12s} {'peak MB':>8s}"
        print(f"{head} ratio  B/px  seconds")
        for name, mode, channels in CASES:
            estimate, peak, seconds = measure(folder / name, mode, channels)
            size = (folder / name).stat().st_size / 1e3
            print(
                f"{name:20s} {mode:5s} {channels}  {size:8.0f} {estimate / 1e6:12.1f} {peak / 1e6:8.1f} "
                f"{estimate / peak:5.2f} {peak / side**2:5.1f} {seconds:8.2f}"
            )


if __name__ == "__main__":
    main()
