"""Every export is checked against PyTorch on real photos before it is written to the repository.

Rule (a failed rule fails the export):
- fp32: max|ort - torch| / max|torch| <= 1e-4 over the first 64 inputs, and the same top-1 class on every
  one of them whose top-2 margin is clear (> 1e-3 of that input's max|logit|, ten times the allowed error);
  near-ties are skipped and counted.
- fp16: top-1 agreement with the fp32 graph >= 99% over >= 256 inputs when the weights are trained; for
  random-init nets (whose logits are nearly flat) the figures are reported but not enforced. Mean top-5
  overlap is reported, and top-1 agreement with PyTorch itself on the first 64 inputs.

Why two sizes: the fp32 check tests two implementations of one function for equality, which 64 varied
inputs settle; the fp16 check estimates a rate, which needs many inputs. Its reference is the fp32 graph,
just shown equal to PyTorch within 1e-4 (the two references can differ only on near-ties that fp16 error
dwarfs), because ONNX Runtime runs it in about half PyTorch's time: a ResNet-50 export on 2 cores saves 10 s.

Inputs: the colour photos shipped inside scikit-image's wheel, each preprocessed as the model card says, plus
seeded random crops, flips, rotations and colour changes of them until there are enough.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import nn

from .errors import ExportError

FP32_REL_TOL = 1e-4
TIE_REL = 1e-3
FP16_MIN_AGREEMENT = 0.99
MIN_FP16_SAMPLES = 256
FP32_SAMPLES = 64
PHOTOS = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def photos() -> list[Image.Image]:
    return list(_photos())


@functools.cache
def _photos() -> tuple[Image.Image, ...]:
    """Loaded once per process (0.6 s): every export reads them twice. Callers never modify them in place."""
    import skimage.data

    return tuple(Image.fromarray(np.asarray(getattr(skimage.data, n)())).convert("RGB") for n in PHOTOS)


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """The model card's preprocessing: shorter side to `resize`, centre crop, [0, 1], mean/std; CHW."""
    c, h, w = pre["input_size"]
    img = img.convert("L" if pre.get("channels", c) == 1 else "RGB")
    resample = _RESAMPLE[pre.get("interpolation", "bilinear")]
    resize = int(pre.get("resize", max(h, w)))
    iw, ih = img.size
    scale = resize / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    if pre.get("invert"):
        x = 1.0 - x
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    scale = rng.uniform(0.15, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(16, round(np.sqrt(scale * w * h * ratio)))))
    ch = int(min(h, max(16, round(np.sqrt(scale * w * h / ratio)))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        out = out.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.7, 1.3)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def make_inputs(pre: dict, n: int = MIN_FP16_SAMPLES, seed: int = 0) -> np.ndarray:
    """`n` preprocessed inputs: every photo whole, then seeded random augmentations of them.

    Augmentations start from copies shrunk to twice the model's resize size: the smallest crop then still
    has about the model's resolution, and enhancing a 1411x1411 retina photo 25 times is most of the time.
    """
    rng = np.random.default_rng(seed)
    base = photos()
    _, h, w = pre["input_size"]
    small = [_shrink(p, 2 * int(pre.get("resize", max(h, w)))) for p in base]
    views = list(base)
    while len(views) < n:
        views.append(_augment(small[len(views) % len(small)], rng))
    return np.stack([preprocess(v, pre) for v in views[:n]])


def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Batches of 8: on 2 cores eager PyTorch ran ResNet-50 faster at 4-8 than at 16 or more (cache)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).float().numpy())
    return np.concatenate(out)


def ort_session(path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _top1_stats(ref: np.ndarray, got: np.ndarray, tie_rel: float) -> dict:
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2]
    scale = np.maximum(np.abs(ref).max(axis=1), 1e-12)
    clear = margin > tie_rel * scale
    agree = ref.argmax(1) == got.argmax(1)
    return {
        "samples": int(len(ref)),
        "near_ties_skipped": int((~clear).sum()),
        "top1_agree_clear": int((agree & clear).sum()),
        "top1_disagree_clear": int((~agree & clear).sum()),
        "top1_agreement_all": round(float(agree.mean()), 6),
    }


def _top5_overlap(ref: np.ndarray, got: np.ndarray) -> float:
    k = min(5, ref.shape[1])
    a = np.argsort(-ref, axis=1)[:, :k]
    b = np.argsort(-got, axis=1)[:, :k]
    return round(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])), 6)


def validate(model: nn.Module, fp32_path, fp16_path, inputs: np.ndarray, trained: bool) -> dict:
    """Compare ORT fp32 with PyTorch, then fp16 with fp32; raise ExportError when the rule is broken."""
    torch_ref = torch_logits(model, inputs[:FP32_SAMPLES])
    full32 = ort_logits(fp32_path, inputs if fp16_path is not None else inputs[:FP32_SAMPLES])
    got32 = full32[:FP32_SAMPLES]
    if got32.shape != torch_ref.shape:
        raise ExportError(f"validation failed: ONNX output shape {got32.shape} != PyTorch {torch_ref.shape}")
    max_ref = float(np.abs(torch_ref).max())
    max_err = float(np.abs(got32 - torch_ref).max())
    rel = max_err / max(max_ref, 1e-12)
    fp32 = {
        "max_abs_err": max_err,
        "max_abs_torch": max_ref,
        "rel_err": rel,
        "rel_tol": FP32_REL_TOL,
        **_top1_stats(torch_ref, got32, TIE_REL),
        "top5_overlap": _top5_overlap(torch_ref, got32),
    }
    fp32["passed"] = bool(np.isfinite(rel) and rel <= FP32_REL_TOL and fp32["top1_disagree_clear"] == 0)
    if not fp32["passed"]:
        raise ExportError(
            f"validation failed (fp32): rel err {rel:.2e} (tol {FP32_REL_TOL:.0e}), "
            f"{fp32['top1_disagree_clear']} top-1 disagreements on clear-margin inputs"
        )
    result = {"fp32": fp32}
    if fp16_path is not None:
        got16 = ort_logits(fp16_path, inputs)
        finite = bool(np.isfinite(got16).all())
        agree = float((got16.argmax(1) == full32.argmax(1)).mean())
        fp16 = {
            "samples": int(len(full32)),
            "reference": "onnx fp32",
            "top1_agreement": round(agree, 6),
            "top5_overlap": _top5_overlap(full32, got16),
            "max_abs_err": float(np.abs(np.nan_to_num(got16) - full32).max()),
            "top1_agreement_torch": round(
                float((got16[:FP32_SAMPLES].argmax(1) == torch_ref.argmax(1)).mean()), 6
            ),
            "torch_samples": int(len(torch_ref)),
            "finite": finite,
            "min_agreement": FP16_MIN_AGREEMENT,
            "enforced": bool(trained),
        }
        fp16["passed"] = bool(finite and agree >= FP16_MIN_AGREEMENT and len(full32) >= MIN_FP16_SAMPLES)
        result["fp16"] = fp16
    if fp16_path is not None and trained and not result["fp16"]["passed"]:
        f = result["fp16"]
        raise ExportError(
            f"validation failed (fp16): top-1 agreement {f['top1_agreement']:.2%} over {f['samples']} "
            f"inputs (need >= {FP16_MIN_AGREEMENT:.0%} over >= {MIN_FP16_SAMPLES})"
        )
    return result
