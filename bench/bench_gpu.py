"""GPU model path: ONNX Runtime on CUDA against PyTorch eager fp16 channels_last, per batch size.

For each model the script builds one PyTorch module (seeded random weights, or the trained default's when its
weights package is installed), exports it with this project's exporter (`export.build`: fp32 graph and its
fp16 twin, validated) so that both sides run the very same weights, then prints side by side, per batch size,
images/s (the median of timed iterations) of:

- PyTorch eager, fp16, channels_last, inputs already on the GPU (the peer);
- ONNX Runtime CUDA, the fp16 graph, NCHW, inputs and outputs bound on the GPU (I/O binding, no copies);
- the same with the CUDA provider's `prefer_nhwc` (cuDNN in NHWC);
- the same with a CUDA graph (`enable_cuda_graph`: one session per batch size, fixed shapes and buffers);
- this service's own session (`service.sessions.ModelSession`: fp32 host input, bound output), copies
  included, which is what a request pays;
- the same I/O, but uint8 pixels in and the normalization as ONNX ops in front of the graph: a quarter of
  the bytes over PCIe, the arithmetic on the device (the preprocessing-on-device lever; resizing stays on
  the host, where decoding already shrinks JPEGs).

Every variant is first checked: its outputs on real photos (scikit-image's) against PyTorch fp32 on the CPU,
‖out - ref‖ / ‖ref‖, the output buffer poisoned with NaN beforehand; a variant over the tolerance is marked
WRONG and not timed. Timing: warm-up first, inputs rotated over three random
buffers (one for the CUDA graph, whose addresses are fixed), never zeros, the median of many iterations,
device events for PyTorch and synchronous runs for ONNX Runtime. Also printed: the FLOPs per image (PyTorch's
FlopCounterMode), the device's measured fp16 matrix rate, the best TFLOP/s reached, the provider options the
CUDA sessions really got (cuDNN search and workspace: checked, not assumed), and the fp16 graph's top-1
agreement with the fp32 graph over 256 inputs on this device.

    python bench/bench_gpu.py --json gpu.json                       # on a CUDA host (about 5 minutes)
    python bench/bench_gpu.py --device cpu --models efficientnet_lite0 --batches 1,2 --seconds 0.2 \\
        --random-weights --samples 16                                 # the CPU smoke run CI makes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
BUFFERS = 3  # input sets rotated through, so repeated runs do not measure a warm cache
CHECK_ROWS = 8  # real photos in each variant's correctness check
TOLERANCE = {"fp16": 5e-2, "fp32": 1e-3}  # ‖out - ref‖ / ‖ref‖ against PyTorch fp32


@dataclass
class Variant:
    """One way of running a model: `make(batch)` returns a runner (or raises why it cannot)."""

    name: str
    precision: str
    make: Callable[[int], Runner]
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Runner:
    """`step(i)` runs the model once on input set i % BUFFERS; `check(x)` runs it on given host inputs."""

    step: Callable[[int], None]
    check: Callable[[np.ndarray], np.ndarray]
    sync: Callable[[], None] = lambda: None
    info: dict[str, str] = field(default_factory=dict)
    device_events: bool = False  # time with device events (PyTorch, asynchronous); else the host clock


# -- models -------------------------------------------------------------------------------------------


def torch_module(name: str, random_weights: bool) -> tuple[Any, Any, bool]:
    """(module, registry Arch, trained): the trained default's weights when available and asked for."""
    import torch

    from export import registry

    torch.manual_seed(0)
    if name == "efficientnet_lite0" and not random_weights:
        try:
            from export import defaults
            from export.weights import load_into, read_state_dict

            state = read_state_dict(defaults.lite0_checkpoint())
            chosen, _ = defaults.choose_lite0(state)
            arch = defaults.lite0_arch_for(chosen)
            model = arch.build()
            load_into(model, registry.remap_efficientnet_pytorch(state), arch.name)
            return model.eval(), arch, True
        except Exception as exc:  # noqa: BLE001 - the weights package is optional on the GPU machine
            print(f"  {name}: trained weights unavailable ({exc}); random weights")
    arch = registry.get(name)
    return arch.build().eval(), arch, False


def export_pair(model: Any, arch: Any, name: str, trained: bool, work: Path, samples: int) -> Path:
    """Export `model` itself (so ONNX Runtime and PyTorch share its weights) into a fresh repository."""
    from export.build import build

    repo = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    weights = {"file": None, "sha256": None, "trained_here": "bench_gpu"} if trained else None
    return build(arch, repo, model=model, name=name, version="1", samples=samples, weights_entry=weights)


def flops_per_image(model: Any, shape: tuple[int, ...]) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.randn(1, *shape))
    return float(counter.get_total_flops())


def matmul_tflops(device: str) -> float:
    """The device's measured dense matrix rate: fp16 8192^3 on a GPU, fp32 2048^3 on a CPU."""
    import torch

    n, dtype = (8192, torch.float16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        t = time_once(device, lambda: torch.matmul(a, b))
        if i >= 3:
            times.append(t)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_once(device: str, fn: Callable[[], Any]) -> float:
    """Seconds of one call: device events on a GPU, the host clock (the call is synchronous) on a CPU."""
    import torch

    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- variants ------------------------------------------------------------------------------------------


def torch_variant(model: Any, shape: tuple[int, ...], device: str) -> Variant:
    import torch

    half = device == "cuda"
    net = model.to(device)
    if half:
        net = net.half().to(memory_format=torch.channels_last)
    dtype = torch.float16 if half else torch.float32
    fmt = torch.channels_last if half else torch.contiguous_format

    def make(batch: int) -> Runner:
        xs = [
            torch.randn(batch, *shape, device=device, dtype=dtype).to(memory_format=fmt)
            for _ in range(BUFFERS)
        ]

        def step(i: int) -> None:
            with torch.inference_mode():
                net(xs[i % BUFFERS])

        def check(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(x).to(device=device, dtype=dtype).to(memory_format=fmt)
                return net(t).float().cpu().numpy()

        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        return Runner(step, check, sync, device_events=True)

    name = "PyTorch eager fp16 channels_last" if half else "PyTorch eager fp32"
    return Variant(name, "fp16" if half else "fp32", make)


def ort_variant(
    folder: Path, device: str, label: str, options: dict[str, str], graph: bool = False
) -> Variant:
    """ONNX Runtime with device-resident input and output (I/O binding on OrtValues)."""
    import onnxruntime as ort

    from service.repository import read_card

    card = read_card(folder)
    precision = "fp16" if device == "cuda" else "fp32"
    path = str(card.file(precision) or card.file("fp32"))
    classes = card.num_classes
    shape = card.input.shape[1:]
    where = "cuda" if device == "cuda" else "cpu"
    sessions: dict[int, Any] = {}  # one for all batch sizes; a CUDA graph needs one per batch size

    def open_session() -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if device == "cuda":
            providers: list[Any] = [
                (CUDA, {"device_id": "0", **options, **({"enable_cuda_graph": "1"} if graph else {})})
            ]
        else:
            providers = [CPU]
        sess = ort.InferenceSession(path, so, providers=providers)
        if device == "cuda" and sess.get_providers()[0] != CUDA:
            raise RuntimeError(f"the session fell back to {sess.get_providers()[0]}")
        return sess

    def make(batch: int) -> Runner:
        key = batch if graph else 0
        if key not in sessions:
            sessions.clear()  # a CUDA graph's session of the last batch size is done with: free its memory
            sessions[key] = open_session()
        sess = sessions[key]
        in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        rng = np.random.default_rng(batch)
        count = 1 if graph else BUFFERS
        xs = [
            ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((batch, *shape), dtype=np.float32), where, 0)
            for _ in range(count)
        ]
        out = ort.OrtValue.ortvalue_from_numpy(np.full((batch, classes), np.nan, np.float32), where, 0)
        binding = sess.io_binding()
        binding.bind_ortvalue_output(out_name, out)
        binding.bind_ortvalue_input(in_name, xs[0])

        def step(i: int) -> None:
            if count > 1:
                binding.bind_ortvalue_input(in_name, xs[i % count])
            sess.run_with_iobinding(binding)

        def check(x: np.ndarray) -> np.ndarray:
            xs[0].update_inplace(np.ascontiguousarray(x, dtype=np.float32))  # the graph's captured buffer
            binding.bind_ortvalue_input(in_name, xs[0])
            poison = np.full((batch, classes), np.nan, np.float32)
            out.update_inplace(poison)
            sess.run_with_iobinding(binding)
            return out.numpy()

        got = sess.get_provider_options().get(CUDA, {})
        keys = ("cudnn_conv_algo_search", "cudnn_conv_use_max_workspace", "prefer_nhwc", "enable_cuda_graph")
        return Runner(step, check, info={k: got[k] for k in keys if k in got})

    return Variant(label, precision, make)


def service_variant(folder: Path, device: str, max_batch: int) -> Variant:
    """The service's own session: what a request pays, host copies included."""
    from service.config import Settings
    from service.repository import read_card
    from service.sessions import ModelSession

    card = read_card(folder)
    providers = (CUDA, CPU) if device == "cuda" else (CPU,)
    session = ModelSession(
        card, Settings(repository=str(folder.parent.parent), max_batch_size=max_batch, providers=providers)
    )
    shape = session.input_shape

    def make(batch: int) -> Runner:
        rng = np.random.default_rng(batch)
        xs = [rng.standard_normal((batch, *shape), dtype=np.float32) for _ in range(BUFFERS)]
        return Runner(
            lambda i: session.run(xs[i % BUFFERS]),
            lambda x: session.run(x),
            info={"provider": session.provider},
        )

    label = f"service session ({session.precision}, host I/O)"
    return Variant(label, session.precision, make)


def uint8_graph(path: str, spec: Any) -> bytes:
    """The graph at `path` behind its own preprocessing's last step: uint8 NHWC crops in, cast, transposed
    and normalized (`Preprocessor`'s fast mode, `invert` folded in) by ONNX ops, so that a quarter of the
    fp32 input's bytes crosses PCIe and the device does the arithmetic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    old = graph.input[0]
    c = spec.channels
    scale, offset = affine(spec)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale.astype(np.float32), "pixels_scale"),
            numpy_helper.from_array(offset.astype(np.float32), "pixels_offset"),
        ]
    )
    front = [
        helper.make_node("Cast", ["pixels"], ["pixels_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pixels_f"], ["pixels_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["pixels_nchw", "pixels_scale"], ["pixels_scaled"]),
        helper.make_node("Add", ["pixels_scaled", "pixels_offset"], [old.name]),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(front + nodes)
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", spec.height, spec.width, c])
    graph.input.remove(old)
    graph.input.insert(0, pixels)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def affine(spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), shaped (1, C, 1, 1): normalized = pixel * scale + offset, as the service's fast
    preprocessing computes it (x / 255, then (x - mean) / std), with `invert` (255 - pixel) folded in."""
    from service.preprocessing import Preprocessor

    pre = Preprocessor(spec, "fast")
    scale, offset = pre.scale[None], pre.offset[None]
    if spec.invert:
        scale, offset = -scale, 255.0 * scale + offset
    return scale.astype(np.float32), offset.astype(np.float32)


def to_pixels(x: np.ndarray, spec: Any) -> np.ndarray:
    """Normalized NCHW float32 back to the uint8 NHWC pixels it came from (exact for `quantized` inputs)."""
    scale, offset = affine(spec)
    p = np.clip(np.rint((x - offset) / scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(p.transpose(0, 2, 3, 1))


def quantized(x: np.ndarray, spec: Any) -> np.ndarray:
    """The inputs every variant sees: real photos as uint8 pixels, normalized as the service does."""
    scale, offset = affine(spec)
    return (to_pixels(x, spec).transpose(0, 3, 1, 2) * scale + offset).astype(np.float32)


def uint8_variant(folder: Path, device: str) -> Variant:
    """Like the service's session (host input, output bound on the device and copied back), but the input
    is uint8 pixels and the normalization runs in the graph: the preprocessing-on-device lever."""
    import onnxruntime as ort

    from service.repository import read_card

    card = read_card(folder)
    spec = card.preprocessing
    precision = "fp16" if device == "cuda" else "fp32"
    graph = uint8_graph(str(card.file(precision)), spec)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = [(CUDA, {"device_id": "0"})] if device == "cuda" else [CPU]
    sess = ort.InferenceSession(graph, so, providers=providers)
    out_name = sess.get_outputs()[0].name

    def run(pixels: np.ndarray) -> np.ndarray:
        binding = sess.io_binding()
        binding.bind_cpu_input("pixels", pixels)
        binding.bind_output(out_name, "cuda" if device == "cuda" else "cpu")
        sess.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def make(batch: int) -> Runner:
        rng = np.random.default_rng(batch)
        shape = (batch, spec.height, spec.width, spec.channels)
        xs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(BUFFERS)]
        return Runner(lambda i: run(xs[i % BUFFERS]), lambda x: run(to_pixels(x, spec)))

    return Variant(f"uint8 host input, normalized in the graph ({precision})", precision, make)


# -- measuring -----------------------------------------------------------------------------------------


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def measure(
    variant: Variant, batch: int, device: str, seconds: float, photos: np.ndarray, ref: np.ndarray
) -> dict[str, Any]:
    try:
        runner = variant.make(batch)
    except Exception as exc:  # noqa: BLE001 - a lever this build lacks is a row, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    reps = -(-batch // len(photos))
    x = np.concatenate([photos] * reps)[:batch]
    rows = min(batch, len(photos))
    err = relative_error(runner.check(x)[:rows], ref[:rows])
    row: dict[str, Any] = {"rel_err": err, **runner.info}
    if err > TOLERANCE[variant.precision]:
        row["error"] = f"WRONG: rel err {err:.2e} > {TOLERANCE[variant.precision]:.0e}"
        return row
    for i in range(5):  # warm-up: cuDNN's algorithm search, arenas, graph capture
        runner.step(i)
    runner.sync()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    clock = device if runner.device_events else "cpu"  # ONNX Runtime's Run returns when the device is done
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 2000):
        times.append(time_once(clock, lambda i=i: runner.step(i)))
        i += 1
    median = statistics.median(times)
    row.update(images_per_s=batch / median, median_ms=median * 1000, iterations=len(times))
    return row


def agreement(folder: Path, device: str, n: int = 256) -> dict[str, Any]:
    """Top-1 agreement of the fp16 graph with the fp32 graph on this device, over n real-photo inputs."""
    import onnxruntime as ort

    from export import validate
    from service.repository import read_card

    card = read_card(folder)
    x = validate.make_inputs(card.preprocessing.to_dict(), n=n, seed=3)
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    outs = {}
    for precision in ("fp32", "fp16"):
        sess = ort.InferenceSession(str(card.file(precision)), providers=providers)
        name = sess.get_inputs()[0].name
        outs[precision] = np.concatenate([sess.run(None, {name: x[i : i + 32]})[0] for i in range(0, n, 32)])
    agree = float((outs["fp16"].argmax(1) == outs["fp32"].argmax(1)).mean())
    return {"inputs": n, "top1_agreement": agree, "provider": providers[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--models", default="resnet50,efficientnet_lite0")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant and batch size")
    ap.add_argument("--samples", type=int, default=256, help="the exporter's validation inputs")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights for every model")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "gpu"))
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from export import validate
    from service.card import Preprocessing

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and CUDA in ort.get_available_providers() else "cpu"
    if device == "cuda" and CUDA not in ort.get_available_providers():
        sys.exit(
            "--device cuda: this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu needed)"
        )
    batches = [int(b) for b in args.batches.split(",")]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.work)  # the exported graphs
    work = Path(scratch.name)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    rate = matmul_tflops(device)
    print(
        f"bench_gpu: {gpu}; onnxruntime {ort.__version__}, torch {torch.__version__}; measured "
        f"{'fp16' if device == 'cuda' else 'fp32'} matmul {rate:.1f} TFLOP/s"
    )
    report: dict[str, Any] = {"device": gpu, "matmul_tflops": rate, "models": {}}
    tables = []
    for name in args.models.split(","):
        model, arch, trained = torch_module(name, args.random_weights)
        shape = tuple(int(d) for d in arch.preprocessing()["input_size"])
        flops = flops_per_image(model, shape)
        t0 = time.perf_counter()
        folder = export_pair(model, arch, name, trained, work, args.samples)
        print(
            f"  {name}: exported in {time.perf_counter() - t0:.0f} s to {folder}; "
            f"{flops / 1e9:.2f} GFLOP/image"
        )
        spec = Preprocessing.from_dict(arch.preprocessing())
        photos = quantized(validate.make_inputs(arch.preprocessing(), n=CHECK_ROWS, seed=5), spec)
        with torch.inference_mode():
            ref = model.float().cpu()(torch.from_numpy(photos)).numpy()
        variants = [torch_variant(model, shape, device)]
        if device == "cuda":
            variants += [
                ort_variant(folder, device, "ORT CUDA fp16 NCHW", {}),
                ort_variant(folder, device, "ORT CUDA fp16 NHWC", {"prefer_nhwc": "1"}),
                ort_variant(
                    folder, device, "ORT CUDA fp16 NHWC + CUDA graph", {"prefer_nhwc": "1"}, graph=True
                ),
            ]
        else:
            variants.append(ort_variant(folder, device, "ORT CPU fp32", {}))
        variants += [service_variant(folder, device, max(batches)), uint8_variant(folder, device)]
        for batch in batches:
            for v in variants:
                v.rows[batch] = row = measure(v, batch, device, args.seconds, photos, ref)
                done = f"{row['images_per_s']:,.0f} images/s" if "images_per_s" in row else row["error"]
                print(f"  {name} batch {batch} {v.name}: {done}", flush=True)  # partial results, if cut
        agree = agreement(folder, device)
        report["models"][name] = {
            "trained": trained,
            "gflop_per_image": flops / 1e9,
            "fp16_agreement": agree,
            "variants": {v.name: {str(b): r for b, r in v.rows.items()} for v in variants},
        }
        tables.append(table(name, trained, flops, rate, batches, variants, agree))
    scratch.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("\n\n".join(tables))


def table(
    name: str,
    trained: bool,
    flops: float,
    rate: float,
    batches: list[int],
    variants: list[Variant],
    agree: dict,
) -> str:
    peer = variants[0]
    head = ["batch", *(v.name for v in variants), "best ORT / PyTorch"]
    lines = [
        f"== {name} ({'trained' if trained else 'random'} weights), {flops / 1e9:.2f} GFLOP/image, images/s "
        "(median iteration)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    best_tflops = 0.0
    for b in batches:
        cells, best = [str(b)], 0.0
        for v in variants:
            r = v.rows[b]
            if "images_per_s" in r:
                cells.append(f"{r['images_per_s']:,.0f} ({r['median_ms']:.2f} ms)")
                if v is not peer:
                    best = max(best, r["images_per_s"])
            else:
                cells.append(r.get("error", "-"))
        base = peer.rows[b].get("images_per_s")
        cells.append(f"{best / base:.2f}x" if base and best else "-")
        best_tflops = max(best_tflops, best * flops / 1e12)
        lines.append("| " + " | ".join(cells) + " |")
    errs = "; ".join(f"{v.name} {max(r.get('rel_err', 0) for r in v.rows.values()):.1e}" for v in variants)
    opts = {
        k: val
        for v in variants
        for r in v.rows.values()
        for k, val in r.items()
        if k.startswith(("cudnn", "prefer", "enable"))
    }
    lines += [
        f"best ONNX Runtime rate {best_tflops:.1f} TFLOP/s = {100 * best_tflops / rate:.1f}% of the measured "
        "matmul rate",
        f"rel err vs PyTorch fp32 on real photos (worst over batch sizes): {errs}",
        f"fp16 vs fp32 graph top-1 agreement on {agree['provider']}: {100 * agree['top1_agreement']:.1f}% "
        f"of {agree['inputs']} inputs",
    ]
    if opts:
        lines.append(f"CUDA provider options the sessions got: {opts}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
