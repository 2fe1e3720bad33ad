"""torch -> ONNX (fp32 and an fp16 twin with fp32 I/O), checked by `onnx.checker` and shape inference.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the exporter PyTorch maintains;
the TorchScript exporter is deprecated and is used only as a fallback when torch.export cannot trace a model.
The card records which one produced the graph.

Saved graphs are optimised offline by ONNX Runtime at the BASIC level only (constant folding, redundant node
removal): those rewrites are standard ONNX and run on every execution provider. EXTENDED / ALL rewrites insert
provider-specific fused kernels (and NCHWc layouts tied to the CPU that saved them), so the serving side
applies them in memory per provider when it creates a session instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .errors import ExportError

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_BATCH = 4096


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings to stdout/stderr; keep the CLI's output to its own lines."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        try:
            yield buf
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        optimize=True,
        verbose=False,
    )
    program.save(str(path))


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
    )


def check(path: Path) -> onnx.ModelProto:
    """Full checker plus strict shape inference; the graph must have a dynamic batch axis."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0][:200]}") from None
    return model


def export_fp32(model: nn.Module, input_shape: tuple[int, int, int], out: Path, workdir: Path) -> dict:
    """Export `model` to `out` (dynamic batch, opset OPSET), optimise at BASIC level, check. Returns facts."""
    model = model.eval()
    example = torch.randn(2, *input_shape)
    raw = workdir / "raw.onnx"
    exporter = "dynamo"
    errors = []
    with _quiet():
        try:
            _export_dynamo(model, example, raw)
        except Exception as e:  # torch.export could not trace it: fall back, say so in the card
            errors.append(f"dynamo: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            exporter = "torchscript"
            try:
                _export_torchscript(model, example, raw)
            except Exception as e2:
                errors.append(f"torchscript: {type(e2).__name__}: {str(e2).splitlines()[0][:200]}")
                raise ExportError("ONNX export failed; " + " | ".join(errors)) from None
    try:
        _optimize_basic(raw, out)
    except ExportError:
        check(raw)  # the checker's message names the broken node; ONNX Runtime's often does not
        raise
    raw.unlink(missing_ok=True)
    for extra in workdir.glob("raw.onnx*"):
        extra.unlink()
    proto = check(out)
    _require_dynamic_batch(proto, out)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"exporter": exporter, "opset": int(opset), "fallback_reason": errors[0] if errors else None}


def _optimize_basic(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(
            f"ONNX Runtime cannot load the exported graph: {str(e).splitlines()[0][:200]}"
        ) from None


def _require_dynamic_batch(proto: onnx.ModelProto, path: Path) -> None:
    inp = proto.graph.input[0].type.tensor_type.shape.dim
    if not inp or inp[0].dim_value not in (0,) or not inp[0].dim_param:
        raise ExportError(f"{path.name}: the input has no dynamic batch axis")


def export_fp16(fp32_path: Path, out: Path) -> dict:
    """fp16 weights and activations, fp32 inputs and outputs (a Cast at each end)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        try:
            model16 = convert_float_to_float16(
                onnx.load(str(fp32_path)), keep_io_types=True, disable_shape_infer=False
            )
        except Exception as e:
            raise ExportError(f"fp16 conversion failed: {str(e).splitlines()[0][:200]}") from None
    _toposort(model16.graph)
    onnx.save(model16, str(out))
    check(out)
    return {"precision": "fp16", "io": "fp32"}


def _toposort(graph: onnx.GraphProto) -> None:
    """The fp16 converter appends its input Casts after their consumers; the checker wants them first."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(n in available for n in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or an outer-scope name: keep the remaining order
            ordered.extend(rest)
            break
        pending = rest
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def file_facts(path: Path) -> dict:
    return {"bytes": os.path.getsize(path)}
