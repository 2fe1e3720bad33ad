"""`bench/bench_gpu.py` runs end to end: on the CPU here (every variant checked against PyTorch, then timed),
on CUDA where onnxruntime-gpu and a GPU are there. The figures are the benchmark's to print, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu.py"


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not any((tmp_path / "work").iterdir()), "the exported graphs are left behind"
    return json.loads(out.read_text()), proc.stdout


def test_cpu_smoke_run_checks_and_times_every_variant(tmp_path):
    report, stdout = _run(
        tmp_path, "--device", "cpu", "--models", "lenet5", "--batches", "1,3",
        "--seconds", "0.1", "--random-weights", "--samples", "16",
    )  # fmt: skip
    model = report["models"]["lenet5"]
    assert model["trained"] is False and model["gflop_per_image"] > 0
    variants = model["variants"]
    assert set(variants) == {
        "PyTorch eager fp32",
        "ORT CPU fp32",
        "service session (fp32, host I/O)",
        "uint8 host input, normalized in the graph (fp32)",
    }
    for name, rows in variants.items():
        assert set(rows) == {"1", "3"}, name
        for batch, row in rows.items():
            assert "error" not in row, (name, batch, row)
            assert row["rel_err"] < 1e-3 and row["images_per_s"] > 0 and row["iterations"] >= 10
    agreement = model["fp16_agreement"]
    assert agreement["inputs"] == 256 and 0.0 <= agreement["top1_agreement"] <= 1.0
    assert "| batch | PyTorch eager fp32 | ORT CPU fp32 |" in stdout
    assert "fp16 vs fp32 graph top-1 agreement" in stdout


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU"
)
def test_cuda_run_checks_and_times_every_variant(tmp_path):
    report, _ = _run(tmp_path, "--device", "cuda", "--models", "efficientnet_lite0", "--batches", "1,8")
    variants = report["models"]["efficientnet_lite0"]["variants"]
    assert len(variants) == 6
    for name, rows in variants.items():
        for batch, row in rows.items():
            assert "WRONG" not in row.get("error", ""), (name, batch, row)
    model = report["models"]["efficientnet_lite0"]
    if model["trained"]:  # the 99% rule holds for trained weights; random ones have near-ties
        assert model["fp16_agreement"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("channels,invert", [(3, False), (1, True)])
def test_uint8_graph_equals_the_services_preprocessing_then_the_model(tmp_path, channels, invert):
    """The lever's graph (uint8 NHWC pixels in, normalization as ONNX ops) computes what the service computes:
    its fast preprocessing in NumPy, then the fp32 graph."""
    from PIL import Image

    from service.card import Preprocessing
    from service.preprocessing import Preprocessor
    from tests.conftest import write_tiny_model

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import to_pixels, uint8_graph

    folder = write_tiny_model(tmp_path, "tiny", "1", channels=channels, seed=5)
    spec = Preprocessing(
        channels,
        32,
        32,
        32,
        "bilinear",
        (0.485, 0.456, 0.406)[:channels],
        (0.229, 0.224, 0.225)[:channels],
        invert,
    )
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 32, 32, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    pre = Preprocessor(spec, "fast")
    normalized = np.concatenate([pre(Image.fromarray(p.squeeze(), mode)) for p in pixels])
    np.testing.assert_array_equal(to_pixels(normalized, spec), pixels)
    reference = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(
        uint8_graph(str(folder / "model.onnx"), spec), providers=["CPUExecutionProvider"]
    )
    want = reference.run(None, {"input": normalized})[0]
    got = fused.run(None, {"pixels": pixels})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
