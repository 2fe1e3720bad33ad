"""Batch scoring throughput: `python -m service.score` against what a user would otherwise write.

The peer is a torch DataLoader (num_workers=2, batch 32, torchvision's Resize/CenterCrop/ToTensor/Normalize
from the model card) feeding the same weights in PyTorch eager (`torch.set_num_threads(2)`,
`inference_mode`). Both run on the same generated JPEGs (mixed sizes) in this run, on the same 2 cores;
the figure is images/s over the scoring loop (model loading excluded for both), the ratio ours / peer. The
Ray engine's figure is printed beside it (it includes starting Ray and its actors), and ResNet-50 (random
init, exported here into bench/out) is reported without a threshold.

    python bench/bench_score.py                 # 2,000 images, efficientnet_lite0 and resnet50, Ray
    python bench/bench_score.py --images 300 --models efficientnet_lite0 --no-ray
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 2.0


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of mixed sizes (shorter side 160..1200) from scikit-image's photos; reused if present."""
    from PIL import Image
    from skimage import data as skdata

    stamp = folder / f".count-{count}-{seed}"
    files = sorted(folder.glob("*.jpg"))
    if stamp.exists() and len(files) == count:
        return files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [
        Image.fromarray(getattr(skdata, n)()).convert("RGB")
        for n in ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry")
    ]
    for i in range(count):
        img = photos[i % len(photos)]
        short = int(rng.integers(160, 1200))
        aspect = float(rng.uniform(0.6, 1.8))
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        quality = int(rng.integers(75, 95))
        img.resize(size, Image.Resampling.BILINEAR).save(folder / f"img{i:05d}.jpg", quality=quality)
    stamp.write_text("")
    return sorted(folder.glob("*.jpg"))


def ensure_resnet50(repo: Path) -> None:
    """ResNet-50 with random init (speed only), exported by this project's export stage."""
    if (repo / "resnet50").is_dir():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "build",
            "resnet50",
            "--random-init",
            "--repository",
            str(repo),
            "--samples",
            "8",
        ],
        cwd=ROOT,
        check=True,
    )


def run_ours(images: Path, repo: Path, model: str, out: Path, extra: list[str], source: Path = ROOT) -> dict:
    """`python -m service.score` of the checkout `source` (this one by default)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "service.score",
        str(images),
        "--model",
        model,
        "--repository",
        str(repo),
        "--out",
        str(out),
        "--batch-size",
        "32",
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "CNN_SERVE_INTRA_OP_THREADS": "2"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=source, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = re.search(r"scored (\d+), failed (\d+).*?([\d.]+) images/s", proc.stdout)
    assert match, proc.stdout
    return {
        "images_per_s": float(match.group(3)),
        "scored": int(match.group(1)),
        "failed": int(match.group(2)),
        "wall_s": wall,
        "command": " ".join(cmd[1:]),
    }


def torch_model(model: str, repo: Path):
    """The same weights in PyTorch eager: the export stage's builder and checkpoint (checked by sha256)."""
    import torch
    import torchvision

    if model == "resnet50":
        return torchvision.models.resnet50(weights=None).eval()
    card = json.loads((repo / model / "1" / "model.json").read_text())
    from export import defaults, registry, weights

    ckpt = defaults.lite0_checkpoint()
    if weights.sha256_file(ckpt) != card["weights"]["sha256"]:
        raise SystemExit("the installed EfficientNet-Lite0 checkpoint is not the ONNX model's")
    arch = defaults.lite0_arch_for(card["source"].split(":", 1)[1])
    net = arch.build()
    weights.load_into(net, registry.remap_efficientnet_pytorch(weights.read_state_dict(ckpt)), arch.name)
    torch.set_grad_enabled(False)
    return net.eval()


class PathsDataset:
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def run_torch(paths: list[Path], repo: Path, model: str) -> dict:
    import torch
    from torchvision import transforms

    torch.set_num_threads(2)
    card_dir = repo / model / "1"
    pre = json.loads((card_dir / "model.json").read_text())["preprocessing"]
    modes = transforms.InterpolationMode
    interp = {"bicubic": modes.BICUBIC, "bilinear": modes.BILINEAR}
    transform = transforms.Compose(
        [
            transforms.Resize(pre["resize"], interpolation=interp[pre["interpolation"]]),
            transforms.CenterCrop(pre["input_size"][1:]),
            transforms.ToTensor(),
            transforms.Normalize(pre["mean"], pre["std"]),
        ]
    )
    net = torch_model(model, repo)
    loader = torch.utils.data.DataLoader(PathsDataset(paths, transform), batch_size=32, num_workers=2)
    count = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            net(batch).softmax(-1).topk(5)
            count += len(batch)
    seconds = time.perf_counter() - started
    return {"images_per_s": count / seconds, "scored": count}


def compare_baseline(work: Path, repo: Path, model: str, baseline: Path, rounds: int) -> None:
    """This checkout against `baseline`, alternating (the machine's slow and fast phases hit both alike)."""
    ours, base = [], []
    for _ in range(max(1, rounds)):
        args = (work / "images", repo, model, work / f"{model}.parquet", ["--workers", "2"])
        ours.append(run_ours(*args)["images_per_s"])
        base.append(run_ours(*args, source=baseline)["images_per_s"])
    ratio = statistics.median(a / b for a, b in zip(ours, base, strict=True))
    print(
        f"this checkout against {baseline}: {statistics.median(ours):.1f} vs {statistics.median(base):.1f} "
        f"images/s (medians of {len(ours)} alternating runs), ratio {ratio:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--repository", default=str(ROOT / "models"))
    parser.add_argument("--work", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also score with another checkout's service.score (e.g. `git worktree add DIR main`), "
        "alternating with this one for --rounds rounds; medians and the median per-round ratio",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds against --baseline")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # figures for 2 cores; children inherit
    work = Path(args.work)
    paths = make_images(work / "images", args.images)
    print(f"{len(paths)} JPEGs (mixed sizes) in {work / 'images'}; cores: {len(os.sched_getaffinity(0))}")
    failed = False
    for model in args.models.split(","):
        repo = Path(args.repository)
        if model == "resnet50":
            repo = work / "models"
            ensure_resnet50(repo)
            (repo / "resnet50" / "1").exists() or sys.exit("resnet50 export failed")
        ours = run_ours(work / "images", repo, model, work / f"{model}.parquet", ["--workers", "2"])
        peer = run_torch(paths, repo, model)
        ratio = ours["images_per_s"] / peer["images_per_s"]
        print(f"\n== {model}, {len(paths)} images, 2 cores")
        print(
            f"service.score (local, 2 decode workers): {ours['images_per_s']:8.1f} images/s "
            f"(whole command incl. start-up: {ours['wall_s']:.1f} s)"
        )
        print(f"torch DataLoader + eager              : {peer['images_per_s']:8.1f} images/s")
        verdict = "" if model == "resnet50" else (" PASS" if ratio >= TARGET else " BELOW TARGET")
        target = "" if model == "resnet50" else f" (target >= {TARGET:.1f}x)"
        print(f"ratio ours / torch                    : {ratio:8.2f}x{target}{verdict}")
        if model != "resnet50" and ratio < TARGET:
            failed = True
        if args.baseline:
            compare_baseline(work, repo, model, args.baseline.resolve(), args.rounds)
        if not args.no_ray:
            ray = run_ours(
                work / "images",
                repo,
                model,
                work / f"{model}.ray.parquet",
                ["--engine", "ray", "--ray-actors", "2"],
            )
            print(
                f"service.score --engine ray (2 actors) : {ray['images_per_s']:8.1f} images/s "
                f"(incl. Ray start; whole command {ray['wall_s']:.1f} s)"
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
