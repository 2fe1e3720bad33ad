"""`python -m export architectures`: every registry entry (random init) exported, validated and measured,
each in its own subprocess and temporary folder (deleted afterwards), then one table in docs/ARCHITECTURES.md.

Results are also kept as JSON beside the table, so an interrupted run resumes where it stopped (`--only`
redoes a subset).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ExportError


def measure_one(name: str, samples: int) -> dict:
    """Runs in the child process: export + validate + measure one entry; returns one JSON-able row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from . import registry, validate
    from .build import export_model

    torch.set_num_threads(2)
    arch = registry.get(name)
    t0 = time.perf_counter()
    model = arch.build()
    params = sum(p.numel() for p in model.parameters())
    c, h, w = arch.input_shape()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, c, h, w))
    flops = fc.get_total_flops()
    tmp = Path(tempfile.mkdtemp(prefix=f"cnn-arch-{name}-"))
    try:
        exported = export_model(model, arch, tmp, trained=False, samples=samples)
        sizes = {f: (tmp / f).stat().st_size for f in ("model.onnx", "model.fp16.onnx")}
        sess = validate.ort_session(tmp / "model.onnx", threads=2)
        inp = sess.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((1, c, h, w)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {inp: x})
        times = []
        deadline = time.perf_counter() + 10.0
        while len(times) < 5 or (len(times) < 30 and time.perf_counter() < deadline):
            t = time.perf_counter()
            sess.run(None, {inp: x})
            times.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    v = exported["validation"]
    clear = v["fp32"]["samples"] - v["fp32"]["near_ties_skipped"]
    return {
        "name": name,
        "source": arch.source,
        "input": f"{c}x{h}x{w}",
        "params_m": round(params / 1e6, 2),
        "gflops": float(f"{flops / 1e9:.3g}"),
        "onnx_mb": round(sizes["model.onnx"] / 2**20, 1),
        "fp16_mb": round(sizes["model.fp16.onnx"] / 2**20, 1),
        "exporter": exported["facts"]["exporter"],
        "opset": exported["facts"]["opset"],
        "fp32_rel_err": v["fp32"]["rel_err"],
        "fp32_top1_clear": f"{v['fp32']['top1_agree_clear']}/{clear}",
        "near_ties": v["fp32"]["near_ties_skipped"],
        "fp16_top1": v["fp16"]["top1_agreement"],
        "fp16_top5": v["fp16"]["top5_overlap"],
        "samples": v["fp32"]["samples"],
        "latency_ms_b1": round(statistics.median(times) * 1000, 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": True,
    }


def run(out: str | Path, only: list[str] | None = None, samples: int = 64, timeout: int = 1500) -> None:
    from . import registry

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    store = out.with_suffix(".json")
    rows: dict[str, dict] = {}
    if store.is_file():
        try:
            rows = {r["name"]: r for r in json.loads(store.read_text())["rows"]}
        except (ValueError, KeyError, TypeError):
            rows = {}
    todo = only or [n for n in registry.names() if not rows.get(n, {}).get("ok")]
    for n in todo:
        registry.get(n)  # unknown names fail before any work
    for name in todo:
        t = time.perf_counter()
        print(f"{name}: exporting ...", flush=True)
        cmd = [sys.executable, "-m", "export", "architectures", "--one", name, "--samples", str(samples)]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"name": name, "ok": False, "error": err[:300]}
        except subprocess.TimeoutExpired:
            row = {"name": name, "ok": False, "error": f"timed out after {timeout} s"}
        rows[name] = row
        status = "ok" if row.get("ok") else f"FAILED: {row.get('error')}"
        print(f"{name}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
        _write(out, store, rows, samples)
    _write(out, store, rows, samples)


def _write(out: Path, store: Path, rows: dict[str, dict], samples: int) -> None:
    from . import registry
    from .build import tool_versions

    ordered = [rows[n] for n in registry.names() if n in rows]
    store.write_text(json.dumps({"rows": ordered}, indent=1) + "\n")
    tools = tool_versions()
    lines = [
        "# Architectures",
        "",
        "Every registry entry, exported with random initialisation by `make architectures` "
        "(`python -m export architectures --out docs/ARCHITECTURES.md`): each in its own subprocess and "
        "temporary folder, validated against PyTorch, measured, deleted.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {tools.get('torch')}, "
        f"onnxruntime {tools.get('onnxruntime')}, timm {tools.get('timm')}, onnx {tools.get('onnx')}. "
        f"Written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{os.getloadavg()[1]:.1f} over its last 5 minutes (a load above the core count means other work "
        "shared the cores: the latencies are then inflated).",
        "",
        "- **GFLOPs**: floating-point operations of one image at the listed input size "
        "(`torch.utils.flop_counter`, a multiply-add counts 2).",
        "- **fp32 rel err**: max|ORT - torch| / max|torch| over the first 64 validation inputs (limit 1e-4); "
        "**top-1**: agreement on inputs with a clear top-2 margin / such inputs (near-ties skipped).",
        f"- **fp16 top-1 / top-5**: agreement and overlap with the fp32 graph (itself checked against "
        f"PyTorch) over {samples} inputs (real "
        "photos and augmentations of them). Random weights give nearly flat logits, so these figures are "
        "reported, not enforced; trained exports must reach 99% top-1 over at least 256 inputs.",
        "- **latency**: ONNX Runtime CPU, batch 1, 2 intra-op threads, median.",
        "",
        "| architecture | source | input | params (M) | GFLOPs | ONNX MB (fp32 / fp16) | exporter | "
        "fp32 rel err | fp32 top-1 | fp16 top-1 | fp16 top-5 | latency b1 (ms) |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in ordered:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | failed: {r.get('error', '')} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['source']} | {r['input']} | {r['params_m']} | {r['gflops']} | "
            f"{r['onnx_mb']} / {r['fp16_mb']} | {r['exporter']} | {r['fp32_rel_err']:.1e} | "
            f"{r['fp32_top1_clear']} | {r['fp16_top1']:.1%} | {r['fp16_top5']:.1%} | {r['latency_ms_b1']} |"
        )
    missing = [n for n in registry.names() if n not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
