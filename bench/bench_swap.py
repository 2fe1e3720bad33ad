"""Live model set figures (poll mode, on the inference core as the servers call it): printed, never asserted.

1. Time from a version's folder appearing in the repository (one rename, as export writes it) to its first
   answer: the wait for the next scan, then reading, sha256-checking, opening and warming the session up
   beside the callers' traffic.
2. Latency of classify requests from N concurrent callers during a swap against the same callers without
   one, in the same run: p50 and p99. The swap window runs from the folder's appearance until the old
   version has drained and been released.
Every request must succeed: a failed one is printed and makes the exit status 1.

Usage: python bench/bench_swap.py [--repository models] [--model efficientnet_lite0] [--clients 8]
       [--poll-interval-s 1] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402
from service.core import InferenceCore  # noqa: E402
from tests.conftest import encode  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def link_version(source: Path, target: Path) -> None:
    """A copy of a version folder made of hard links (no second copy of the graph on disk)."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            try:
                os.link(f, target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)


async def measure(args: argparse.Namespace, repo: Path, photo: bytes) -> int:
    settings = Settings(
        repository=str(repo),
        default_model=args.model,
        model_control="poll",
        poll_interval_s=args.poll_interval_s,
    )
    core = InferenceCore(settings)
    await core.start()
    records: list[tuple[float, float, str]] = []  # (start, seconds, version)
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            (answer,) = await core.classify([photo], model=args.model)
            if isinstance(answer, Exception):
                failures.append(repr(answer))
            else:
                records.append((t0, time.monotonic() - t0, answer.version))

    callers = [asyncio.ensure_future(caller()) for _ in range(args.clients)]
    try:
        await asyncio.sleep(1.0)  # settle
        quiet_from = time.monotonic()
        await asyncio.sleep(args.seconds)
        quiet_to = time.monotonic()

        stage = repo / ".stage-2"
        link_version(repo / args.model / "1", stage / args.model / "2")
        appeared = time.monotonic()
        os.rename(stage / args.model / "2", repo / args.model / "2")
        while not any(v == "2" for _, _, v in records[-args.clients :]):
            await asyncio.sleep(0.005)
        first = min(t + s for t, s, v in records if v == "2")
        shutil.rmtree(repo / args.model / "1")  # the old version leaves: drained, then released
        while any(m.version == "1" for m in core.models()):
            await asyncio.sleep(0.01)
        swapped_to = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await core.stop()

    quiet = [s for t, s, _ in records if quiet_from <= t < quiet_to]
    swap = [s for t, s, _ in records if appeared <= t < swapped_to]
    print(f"model {args.model}, {args.clients} concurrent callers, poll interval {args.poll_interval_s:g} s")
    print(f"1. folder appeared -> first answer of version 2: {first - appeared:.2f} s")
    window = swapped_to - appeared
    print(f"2. swap window {window:.2f} s ({len(swap)} requests), against {len(quiet)} without a swap:")
    for name, values in (("without a swap", quiet), ("during the swap", swap)):
        print(
            f"   {name:16s} p50 {1000 * statistics.median(values):7.1f} ms   "
            f"p99 {1000 * percentile(values, 99):7.1f} ms"
        )
    print(f"   failed requests: {len(failures)}")
    for f in failures[:10]:
        print("   ", f)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", default=str(ROOT / "models"))
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--poll-interval-s", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the measurement without a swap")
    args = ap.parse_args()
    from PIL import Image
    from skimage import data as photos

    photo = encode(Image.fromarray(photos.chelsea()), "JPEG", quality=90)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        link_version(Path(args.repository) / args.model / "1", repo / args.model / "1")
        return asyncio.run(measure(args, repo, photo))


if __name__ == "__main__":
    sys.exit(main())
