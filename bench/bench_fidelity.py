"""Preprocessing fidelity: how often the service's preprocessing gives the model's own answer, and how fast.

The reference is the model card's evaluation transform as torchvision runs it (PIL full-size decode,
`Resize(resize, interp) + CenterCrop + ToTensor + Normalize`), which the service's `exact` mode reproduces.
Each lever of the fast path is measured against it on efficientnet_lite0 (trained weights):

- the JPEG draft margin: decode (DCT scaling) at no less than m x the resize target (m = 1 decodes just
  above it; "off" decodes at full size),
- how the card's filter then resizes: crop-then-resize (`resize(box=...)`) with or without Pillow's
  `reducing_gap` box pre-reduction, or resize-then-crop,
- and the service's own modes (`fast`, `exact`) through `Pipeline.prepare`, the path requests take.

`--fallback-leads` measures one more lever: answer from `fast`, and redo an input in `exact` (preprocessing
and a second inference) where `fast`'s top-1 leads its second class by less than a probability threshold.
For each threshold it prints how many inputs fall back, and among the answers kept from `fast` the top-1
disagreements and the answers that `bench/bench_serving.py` would count as disagreeing with an exact peer
(a top-5 probability more than its --tolerance, 0.01, apart).

Printed per row: top-1 agreement, top-5 set agreement (mean |top5 ∩ top5_ref| / 5), mean L1 distance of the
probabilities, mean absolute difference of the input tensors, and ms per image (bytes -> tensor, median) on a
12-megapixel JPEG and a 1920x1280 JPEG with the ratio of torchvision's time to it, timed side by side.
For the registry's other preprocessing presets (Inception 299, bilinear, crop_pct 1.0, LeNet's 32 px grey) the
mean absolute difference between the `fast` and `exact` input tensors.

The inputs (deterministic): the photos that installed packages ship (scikit-image's data, scikit-learn's
sample images), cropped, flipped, scaled (Lanczos up, box down: not the resamplers under test) to sizes
from 224 px to 4000x3000, encoded by Pillow at JPEG quality 70..95, baseline or progressive, 4:2:0 or 4:4:4.

Usage: python bench/bench_fidelity.py [--repository models] [--inputs 1000] [--fallback-leads 0.05,0.1]
    [--record-card]
`--record-card` writes the default mode's measured agreement into the model's card (`model.json`,
`preprocessing_agreement`) through `service.card`.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.fidelity import (  # noqa: E402
    Render,
    compare,
    input_set,
    logits_of,
    record,
    service_render,
    softmax,
    torchvision_render,
)
from service.card import Preprocessing, PreprocessingAgreement, read_card  # noqa: E402
from service.config import Settings  # noqa: E402
from service.decoding import decode, source_geometry  # noqa: E402
from service.preprocessing import INTERPOLATION, Preprocessor, center_box, resized_size  # noqa: E402


# -- the preprocessing variants (inputs, reference, service path: export/fidelity.py) ----
def lever_render(spec: Preprocessing, margin: float | None, method: str, geometry: str = "source") -> Render:
    """Draft to `margin` x the resize target (None: full decode), then `method`: `box` (crop then resize with
    the card's filter), `box_gap3` (the same with Pillow's reducing_gap=3 pre-reduction) or `resize_crop`.
    `geometry`: `source` places the crop by the full-size image, as the reference does, and maps it into the
    drafted pixels (the scale is exactly 1/2, 1/4 or 1/8); `drafted` places it by the drafted image's own
    size, whose rounding (`ceil(W / a)`) shifts and scales the crop slightly."""
    resample = INTERPOLATION[spec.interpolation]
    pre = Preprocessor(spec, "exact")  # its normalization; the resize is done here

    def render(data: bytes) -> np.ndarray:
        img = decode(
            data,
            channels=spec.channels,
            min_short_side=spec.resize,
            draft=margin is not None,
            draft_margin=margin or 1.0,
        )
        if geometry == "source":
            (w, h), (bx, by, bx1, by1) = source_geometry(img)
        else:
            (w, h), (bx, by, bx1, by1) = img.size, (0.0, 0.0, float(img.width), float(img.height))
        rw, rh = resized_size(w, h, spec.resize)
        left, top = center_box(rw, rh, spec.width, spec.height)
        sx, sy = (bx1 - bx) / rw, (by1 - by) / rh
        if method == "resize_crop" or rw > w or rw < spec.width or rh < spec.height:
            full = img.resize((rw, rh), resample, box=(bx, by, bx1, by1))
            crop = full.crop((left, top, left + spec.width, top + spec.height))
        else:
            box = (
                bx + left * sx,
                by + top * sy,
                bx + (left + spec.width) * sx,
                by + (top + spec.height) * sy,
            )
            gap = 3.0 if method == "box_gap3" else None
            crop = img.resize((spec.width, spec.height), resample, box=box, reducing_gap=gap)
        arr = np.asarray(crop, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return (arr.astype(np.float32) / np.float32(255.0) - pre._mean) / pre._std

    return render


def variants(spec: Preprocessing) -> dict[tuple[str, str], Render]:
    out: dict[tuple[str, str], Render] = {}
    out[("service", "fast")] = service_render(spec, "fast")
    out[("service", "exact")] = service_render(spec, "exact")
    # the fast mode as it was: crop placed by the drafted size, draft just above the target, reducing_gap 3
    out[("lever", "draft 1x, drafted geometry, box + reducing_gap 3")] = lever_render(
        spec, 1.0, "box_gap3", "drafted"
    )
    out[("lever", "draft 1x, drafted geometry, box")] = lever_render(spec, 1.0, "box", "drafted")
    out[("lever", "draft 2x, drafted geometry, box")] = lever_render(spec, 2.0, "box", "drafted")
    for m in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
        out[("lever", f"draft {m:g}x, box")] = lever_render(spec, m, "box")
    out[("lever", "draft 2x, box + reducing_gap 3")] = lever_render(spec, 2.0, "box_gap3")
    out[("lever", "draft 2x, resize then crop")] = lever_render(spec, 2.0, "resize_crop")
    out[("lever", "full decode, box")] = lever_render(spec, None, "box")
    return out


# -- agreement ----
def agreement(
    session,
    images: list[bytes],
    renders: dict[tuple[str, str], Render],
    reference: Render,
    probabilities: dict[tuple[str, str], np.ndarray] | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """One row per render; `probabilities`, when given, receives each render's softmax (the reference's
    under the key ("torchvision", "reference"))."""
    ref_x = np.stack([reference(d) for d in images])
    ref_p = softmax(logits_of(session, ref_x))
    top2 = np.sort(ref_p, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    print(
        "reference top-1 lead over its top-2 (probability): "
        + ", ".join(f"< {t:g}: {int((margin < t).sum())}" for t in (0.001, 0.005, 0.01, 0.05))
        + f" of {len(images)} inputs"
    )
    out = {}
    if probabilities is not None:
        probabilities[("torchvision", "reference")] = ref_p
    for key, render in renders.items():
        print(f"  {key[0]}: {key[1]}", file=sys.stderr, flush=True)
        x = np.stack([render(d) for d in images])
        probs = softmax(logits_of(session, x))
        if probabilities is not None:
            probabilities[key] = probs
        row = compare(probs, ref_p)
        row["mad"] = float(np.abs(x - ref_x).mean())
        out[key] = row
    return out


def top5(p: np.ndarray) -> dict[int, float]:
    return {int(c): float(p[c]) for c in np.argsort(-p)[:5]}


def fallback_table(
    fast: np.ndarray,
    ref: np.ndarray,
    leads: list[float],
    tolerance: float,
    ms: dict[str, tuple[float, float]],
) -> None:
    """`fast`'s answer where its lead is at least the threshold, else `exact`'s (equal to the reference's)."""
    from bench_serving import top5_difference  # the serving bench's own measure of agreement

    ordered = np.sort(fast, 1)
    lead = ordered[:, -1] - ordered[:, -2]
    flipped = fast.argmax(1) != ref.argmax(1)
    pairs = [(top5(a), top5(b)) for a, b in zip(fast, ref, strict=True)]
    apart = np.array([max(top5_difference(a, b), top5_difference(b, a)) for a, b in pairs])
    (f12, f19), (e12, e19) = ms["fast"], ms["exact"]
    print(
        f"\n`fast` where its top-1 leads by the threshold or more, else `exact` and a second inference "
        f"({len(fast)} inputs); ms: preprocessing per image, fast plus the fallbacks' share of exact"
    )
    print(
        "| lead threshold | fall back % | kept: top-1 disagreements | kept: same top-1, a top-5 probability "
        f"over {tolerance:g} apart | kept: largest top-5 difference | ms 12 MP | ms 1920x1280 |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in leads:
        kept = lead >= t
        share = float((~kept).mean())
        over = int(((apart > tolerance) & kept & ~flipped).sum())
        largest = float(apart[kept].max(initial=0.0))
        print(
            f"| {t:g} | {100 * share:.1f} | {int((flipped & kept).sum())} | {over} | {largest:.4f} | "
            f"{f12 + share * e12:.1f} | {f19 + share * e19:.1f} |"
        )


# -- speed ----
def photo_jpeg(size: tuple[int, int]) -> bytes:
    """A camera-like JPEG: a photo enlarged (Lanczos) to `size`, quality 90, 4:2:0, baseline."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def speed(renders: dict[str, Render], data: bytes, rounds: int) -> dict[str, float]:
    """Median ms per call of each render, the renders interleaved round by round (one warm-up call each)."""
    times: dict[str, list[float]] = {k: [] for k in renders}
    for render in renders.values():
        render(data)
    for _ in range(rounds):
        for k, render in renders.items():
            t = time.perf_counter()
            render(data)
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def decode_table(spec: Preprocessing, rounds_12mp: int, rounds_1920: int) -> None:
    """What `exact` decodes: Pillow's whole decode against the part of the JPEG the card's center crop reads
    (`service.jpeg_region`), and the whole image through the same part decoder, interleaved."""
    from service import augmentation, decoding, jpeg_region
    from service.preprocessing import Preprocessor

    preprocessor = Preprocessor(spec, "exact")

    def center(size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        return preprocessor.reads(augmentation.plan_views(spec, "none", size), size)

    decodes: dict[str, Render] = {
        "Pillow, whole": lambda data: decoding.decode(data, draft=False).close(),
        "part decoder, the center crop's part": lambda data: decoding.decode(
            data, draft=False, part=center
        ).close(),
        "part decoder, whole": lambda data: decoding.decode(
            data, draft=False, part=lambda s: (0, 0, *s)
        ).close(),
    }
    print(f"\nDecoding for `exact` (ms, medians of {rounds_12mp} and {rounds_1920} interleaved rounds)")
    if not jpeg_region.available():
        print("(the part decoder is not built or not usable here: `make jpeg-region`)")
        return
    big, mid = (
        speed(decodes, photo_jpeg(size), n)
        for size, n in (((4000, 3000), rounds_12mp), ((1920, 1280), rounds_1920))
    )
    print("| decode | ms 12 MP | x Pillow | ms 1920x1280 | x Pillow |")
    print("|---|---|---|---|---|")
    for k in decodes:
        pb, pm = big["Pillow, whole"], mid["Pillow, whole"]
        print(f"| {k} | {big[k]:.1f} | {pb / big[k]:.2f} | {mid[k]:.1f} | {pm / mid[k]:.2f} |")


# -- other presets ----
PRESETS = {
    "inception 299 bicubic": {
        "input_size": [3, 299, 299],
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "bilinear 224": {
        "input_size": [3, 224, 224],
        "resize": 256,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    "crop_pct 1.0 bicubic": {
        "input_size": [3, 224, 224],
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "lenet 32 grey": {
        "input_size": [1, 32, 32],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": [0.1307],
        "std": [0.3081],
        "channels": 1,
    },
}


def preset_differences(images: list[bytes]) -> None:
    print(
        f"\nOther presets, fast vs exact input tensors over {len(images)} inputs (normalized units; "
        "grey levels)"
    )
    print("| preset | mean abs diff | in 8-bit grey levels | max abs diff |")
    print("|---|---|---|---|")
    for name, pre in PRESETS.items():
        spec = Preprocessing.from_dict(pre)
        fast, exact = service_render(spec, "fast"), service_render(spec, "exact")
        diffs = [np.abs(fast(d) - exact(d)) for d in images]
        mad = float(np.mean([d.mean() for d in diffs]))
        levels = mad * 255.0 * float(np.mean(spec.std))
        print(f"| {name} | {mad:.4f} | {levels:.2f} | {max(float(d.max()) for d in diffs):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(ROOT / "models"))
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--preset-inputs", type=int, default=120)
    ap.add_argument("--rounds-12mp", type=int, default=7)
    ap.add_argument("--rounds-1920", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime's threads")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's threads for torchvision's ToTensor and Normalize (on a busy host a pool of 2 waits "
        "tens of ms for its second thread, which is not the transform's cost)",
    )
    ap.add_argument("--speed-only", action="store_true", help="only the timings (no inputs, no agreement)")
    ap.add_argument("--only", default="", help="a regular expression: measure only the settings it matches")
    ap.add_argument(
        "--fallback-leads",
        default="",
        help="comma-separated lead thresholds (probability) for the fast-then-exact lever, e.g. 0.05,0.1",
    )
    ap.add_argument("--tolerance", type=float, default=0.01, help="the serving bench's top-5 tolerance")
    ap.add_argument(
        "--record-card", action="store_true", help="write the default mode's agreement into the card"
    )
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.torch_threads)

    folder = Path(args.repository) / args.model
    version = max((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    card = read_card(version)
    spec = card.preprocessing
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(version / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    renders = {k: r for k, r in variants(spec).items() if re.search(args.only, k[1])}
    reference = torchvision_render(spec)
    images: list[bytes] = []
    table: dict[tuple[str, str], dict[str, float]] = {}
    probabilities: dict[tuple[str, str], np.ndarray] = {}
    leads = [float(v) for v in args.fallback_leads.split(",") if v]
    if leads and not {("service", "fast"), ("service", "exact")} <= renders.keys():
        ap.error("--fallback-leads needs both service modes among the settings --only keeps")
    if not args.speed_only:
        t0 = time.perf_counter()
        images = input_set(args.inputs)
        sizes = [Image.open(io.BytesIO(d)).size for d in images]
        n4000 = sum(1 for w, h in sizes if max(w, h) >= 4000)
        n12 = sum(1 for w, h in sizes if w * h >= 11_000_000)
        print(
            f"{len(images)} inputs, shorter sides {min(map(min, sizes))} to {max(map(min, sizes))} px, "
            f"{n4000} at 4000 px on the longer side ({n12} of them >= 11 MP), built in "
            f"{time.perf_counter() - t0:.0f} s; {args.model}, preprocessing {spec.to_dict()}"
        )
        t0 = time.perf_counter()
        table = agreement(session, images, renders, reference, probabilities)
        print(f"agreement measured in {time.perf_counter() - t0:.0f} s")

    timed = {"torchvision": reference} | {f"{a}: {b}": r for (a, b), r in renders.items()}
    big = speed(timed, photo_jpeg((4000, 3000)), args.rounds_12mp)
    mid = speed(timed, photo_jpeg((1920, 1280)), args.rounds_1920)
    print(
        f"\nAgreement with torchvision's evaluation transform ({len(images)} inputs), speed bytes -> tensor "
        f"(medians of {args.rounds_12mp} and {args.rounds_1920} interleaved rounds)"
    )
    print(
        "| mode | setting | top-1 % | top-5 % | mean prob L1 | tensor MAD | lead at flips | ms 12 MP | x tv "
        "| ms 1920x1280 | x tv |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tv12, tv19 = big["torchvision"], mid["torchvision"]
    print(f"| torchvision | reference | 100 | 100 | 0 | 0 | | {tv12:.1f} | 1.00 | {tv19:.1f} | 1.00 |")
    for kind, setting in renders:
        k, row = f"{kind}: {setting}", table.get((kind, setting))
        figures = "| | | | | |"
        if row:
            figures = (
                f"| {100 * row['top1']:.1f} | {100 * row['top5']:.1f} | {row['l1']:.4f} | {row['mad']:.4f} | "
                f"{row['gap']:.3f} / {row['gap_max']:.3f} |"
            )
        print(
            f"| {kind} | {setting} {figures} {big[k]:.1f} | {tv12 / big[k]:.2f} | {mid[k]:.1f} | "
            f"{tv19 / mid[k]:.2f} |"
        )
    decode_table(card.preprocessing, args.rounds_12mp, args.rounds_1920)
    if args.speed_only:
        return
    if leads:
        ms = {m: (big[f"service: {m}"], mid[f"service: {m}"]) for m in ("fast", "exact")}
        fast, ref = probabilities[("service", "fast")], probabilities[("torchvision", "reference")]
        fallback_table(fast, ref, leads, args.tolerance, ms)
    preset_differences(images[: args.preset_inputs])

    default = table[("service", Settings().preprocess_mode)]
    if args.record_card:
        measured = PreprocessingAgreement(
            mode=Settings().preprocess_mode,
            top1=round(default["top1"], 4),
            top5=round(default["top5"], 4),
            inputs=len(images),
            reference="torchvision evaluation transform",
            measured=time.strftime("%Y-%m-%d"),
        )
        record(version, measured)
        print(f"\nwrote {measured.to_dict()} into {version / 'model.json'}")


if __name__ == "__main__":
    main()
