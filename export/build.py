"""The export pipeline: registry entry + weights -> ONNX fp32/fp16 -> validation -> model folder + card."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch import nn

from . import onnx_export, registry, repository, validate
from .errors import ExportError
from .labels import label_set
from .weights import build_with_weights


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def calibrate_batchnorm(model: nn.Module, inputs: np.ndarray, batch: int = 16, limit: int = 16) -> bool:
    """Random init only: set BatchNorm running statistics from real photos (weights stay random).

    Freshly initialised BN layers have mean 0 / var 1, so in eval mode activations vanish or explode
    with depth: GoogLeNet and Inception-v4 give the same logits for every image and Inception v3 overflows
    fp16. With statistics measured on real inputs the logits depend on the image and the validation means
    something. Returns whether the model has BN layers.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, min(limit, len(inputs)), batch):
            model(torch.from_numpy(inputs[i : i + batch]))
    model.eval()
    return True


def export_model(
    model: nn.Module,
    arch: registry.Arch,
    folder: Path,
    *,
    trained: bool,
    inputs: np.ndarray | None = None,
    samples: int = validate.MIN_FP16_SAMPLES,
    fp16: bool = True,
) -> dict:
    """Write model.onnx (+ model.fp16.onnx) into `folder`, validate them; return the card's graph facts."""
    pre = arch.preprocessing()
    shape = tuple(pre["input_size"])
    if inputs is None:
        inputs = validate.make_inputs(pre, n=samples)
    calibrated = False if trained else calibrate_batchnorm(model, validate.make_inputs(pre, n=16, seed=7))
    t0 = time.perf_counter()
    facts = onnx_export.export_fp32(model, shape, folder / "model.onnx", folder)
    if fp16:
        onnx_export.export_fp16(folder / "model.onnx", folder / "model.fp16.onnx")
    t_export = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = validate.validate(
        model, folder / "model.onnx", folder / "model.fp16.onnx" if fp16 else None, inputs, trained
    )
    report["bn_calibrated"] = calibrated
    report["seconds"] = {"export": round(t_export, 2), "validation": round(time.perf_counter() - t1, 2)}
    files = {"model.onnx": repository.file_entry(folder / "model.onnx", "fp32")}
    if fp16:
        files["model.fp16.onnx"] = repository.file_entry(folder / "model.fp16.onnx", "fp16")
    return {"facts": facts, "validation": report, "files": files, "preprocessing": pre}


def card_for(
    arch: registry.Arch,
    name: str,
    version: str,
    exported: dict,
    *,
    trained: bool,
    weights: dict | None,
    accuracy: float | None = None,
    description: str | None = None,
) -> dict:
    pre = exported["preprocessing"]
    labels = label_set(arch.labels)
    return {
        "name": name,
        "version": version,
        "architecture": arch.name,
        "source": arch.source,
        "trained": trained,
        "description": description or arch.description,
        "input": {
            "name": onnx_export.INPUT_NAME,
            "shape": [-1, *pre["input_size"]],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": {"name": onnx_export.OUTPUT_NAME, "shape": [-1, len(labels)], "kind": "logits"},
        "preprocessing": repository.preprocessing(pre),
        "labels": labels,
        "files": exported["files"],
        "opset": exported["facts"]["opset"],
        "exporter": exported["facts"]["exporter"],
        "tools": tool_versions(),
        "weights": weights,
        "validation": exported["validation"],
        "accuracy": accuracy,
    }


def build(
    arch_name: str | registry.Arch,
    repo: str | Path,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    name: str | None = None,
    version: str | None = None,
    samples: int = validate.MIN_FP16_SAMPLES,
    model: nn.Module | None = None,
    inputs: np.ndarray | None = None,
    accuracy: float | None = None,
    weights_entry: dict | None = None,
    description: str | None = None,
) -> Path:
    """`python -m export build`: the whole pipeline; returns the new model folder.

    `model` lets a caller pass an already-loaded module (the defaults do, after remapping or training).
    """
    arch = arch_name if isinstance(arch_name, registry.Arch) else registry.get(arch_name)
    if model is None:
        if weights is None and not random_init:
            raise ExportError(
                f"no weights for {arch.name}: pass --weights FILE (.pth/.pt/.safetensors) or --random-init "
                "(untrained, benchmarks only)"
            )
        if weights is not None and random_init:
            raise ExportError("--weights and --random-init exclude each other")
        model, weights_entry = build_with_weights(arch, weights)
    trained = weights_entry is not None
    name = repository.check_name(name or arch.name)
    repo = repository.location(repo)
    version = repository.check_version(version) if version else repository.next_version(repo, name)
    with repository.staged(repo, name, version) as stage:
        exported = export_model(model, arch, stage, trained=trained, inputs=inputs, samples=samples)
        card = card_for(
            arch,
            name,
            version,
            exported,
            trained=trained,
            weights=weights_entry,
            accuracy=accuracy,
            description=description,
        )
        repository.write_card(stage, card)
    return stage if isinstance(repo, str) else repo / name / version  # a bucket's: the local copy
