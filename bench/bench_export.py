"""Export-stage figures, printed (not timed tests).

1. ResNet-50 (random init) built, exported and validated as `python -m export build resnet50 --random-init`
   does it (fp32 on 64 inputs, fp16 on 256), files and card written: wall time, target < 60 s on
   2 cores.
2. ONNX Runtime CPU images/s against PyTorch eager on the same weights, batch 1 and 8, medians:
   `torch.set_num_threads(2)` + `inference_mode` against an ORT session with 2 intra-op threads (all graph
   optimisations in memory, as the service creates it). Target >= 1.5x for EfficientNet-Lite0 (trained
   weights, the exported default); ResNet-50 reported.

Usage: `.venv/bin/python bench/bench_export.py [--seconds S] [--export-runs N]`; figures also go to
bench/out/bench_export.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import registry, repository  # noqa: E402
from export.build import build, export_model  # noqa: E402
from export.defaults import lite0_checkpoint  # noqa: E402
from export.weights import load_into, read_state_dict  # noqa: E402

THREADS = 2


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def images_per_s(fn, batch: int, seconds: float) -> float:
    """Median images/s over repeated calls (after warm-up), for about `seconds`."""
    for _ in range(3):
        fn()
    rates = []
    end = time.perf_counter() + seconds
    while len(rates) < 5 or (time.perf_counter() < end and len(rates) < 500):
        t = time.perf_counter()
        fn()
        rates.append(batch / (time.perf_counter() - t))
    return statistics.median(rates)


def compare(name: str, model: torch.nn.Module, onnx_path: Path, shape, seconds: float) -> dict:
    sess = ort_session(onnx_path)
    inp = sess.get_inputs()[0].name
    out = {}
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        xt = torch.from_numpy(x)

        def run_torch(xt=xt):
            with torch.inference_mode():
                model(xt)

        def run_ort(x=x):
            sess.run(None, {inp: x})

        pt = images_per_s(run_torch, batch, seconds)
        rt = images_per_s(run_ort, batch, seconds)
        out[f"batch{batch}"] = {
            "torch_img_s": round(pt, 1),
            "ort_img_s": round(rt, 1),
            "speedup": round(rt / pt, 2),
        }
        print(
            f"{name:20s} batch {batch}: ORT {rt:8.1f} img/s   PyTorch eager {pt:8.1f} img/s   "
            f"speedup {rt / pt:.2f}x",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--export-runs", type=int, default=3, help="ResNet-50 exports timed; median reported")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    results: dict = {"threads": THREADS, "torch": torch.__version__, "onnxruntime": ort.__version__}

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        # 1. ResNet-50: build + export + validation, wall time.
        arch = registry.get("resnet50")
        walls = []
        for _ in range(args.export_runs):
            t0 = time.perf_counter()
            resnet = arch.build()
            # What `python -m export build resnet50 --random-init` runs.
            folder = build(arch, tmp / "repo", model=resnet)
            walls.append(time.perf_counter() - t0)
            report = repository.read_card(folder).extra["validation"]
            secs = report["seconds"]
            print(
                f"resnet50 build + export + validation: {walls[-1]:.1f} s wall (export {secs['export']} s, "
                f"validation {secs['validation']} s: fp32 on {report['fp32']['samples']} inputs, fp16 on "
                f"{report['fp16']['samples']})",
                flush=True,
            )
        wall = statistics.median(walls)
        results["resnet50_export_validate_s"] = round(wall, 1)
        results["resnet50_export_validate_runs_s"] = [round(w, 1) for w in walls]
        print(f"resnet50 build + export + validation, median of {len(walls)}: {wall:.1f} s (target < 60 s)")

        # 2. EfficientNet-Lite0 with its trained weights: the default repository's file when it is built.
        lite = registry.get("efficientnet_lite0")
        lite_model = lite.build()
        load_into(
            lite_model, registry.remap_efficientnet_pytorch(read_state_dict(lite0_checkpoint())), lite.name
        )
        default = ROOT / "models" / "efficientnet_lite0" / "1"
        if repository.is_valid(default):
            lite_onnx = default / "model.onnx"
        else:
            (tmp / "lite").mkdir()
            export_model(lite_model, lite, tmp / "lite", trained=True)
            lite_onnx = tmp / "lite" / "model.onnx"
        results["efficientnet_lite0"] = compare(
            "efficientnet_lite0", lite_model, lite_onnx, (3, 224, 224), args.seconds
        )
        results["resnet50"] = compare("resnet50", resnet, folder / "model.onnx", (3, 224, 224), args.seconds)

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_export.json").write_text(json.dumps(results, indent=1) + "\n")
    lite_min = min(v["speedup"] for v in results["efficientnet_lite0"].values())
    print(f"efficientnet_lite0 ORT/PyTorch speedup (min over batch 1, 8): {lite_min:.2f}x (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
