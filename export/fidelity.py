"""The measured agreement a model card records: how often the service's preprocessing gives the model's own
answer, its answer under the card's evaluation transform as torchvision runs it.

The inputs are deterministic and need no download: crops and mirrors of the photos scikit-image and
scikit-learn ship, scaled with resamplers other than the ones under test (Lanczos up, box down) to longer
sides of 224 to 4000 px, JPEG at qualities 70 to 95, baseline or progressive, 4:2:0 or 4:4:4.
`export defaults` records the default mode's agreement in the trained EfficientNet-Lite0's card;
`bench/bench_fidelity.py` measures every lever of the fast path on the same inputs.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from service.card import Preprocessing, PreprocessingAgreement, read_card, write_card
from service.config import Settings
from service.decoding import Limits
from service.pipeline import Pipeline

Render = Callable[[bytes], np.ndarray]
INPUTS = 1000  # what a card's agreement is measured on


def source_photos() -> list[tuple[str, np.ndarray]]:
    """Colour photos shipped by installed packages (no downloads)."""
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    named = [("motorcycle_left", left), ("motorcycle_right", right)]
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
    ):
        named.append((name, getattr(data, name)()))
    named.append(("camera", data.camera()))  # a grey photo, as RGB
    out = [(name, arr[..., :3] if arr.ndim == 3 else np.stack([arr] * 3, -1)) for name, arr in named]
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        out += [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images, strict=True)]
    except ImportError:
        pass
    return out


def make_input(photo: np.ndarray, rng: np.random.Generator, long_side: int) -> bytes:
    """One input: a crop of `photo`, maybe mirrored, scaled so its longer side is `long_side` (shorter side at
    least 224), JPEG at a random quality, progressive or baseline, 4:2:0 or 4:4:4."""
    img = Image.fromarray(photo)
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    s = long_side / max(cw, ch)
    size = (max(224, round(cw * s)), max(224, round(ch * s)))
    up = size[0] * size[1] > cw * ch
    img = img.resize(size, Image.Resampling.LANCZOS if up else Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(
        buf,
        "JPEG",
        quality=int(rng.integers(70, 96)),
        progressive=bool(rng.random() < 0.5),
        subsampling=int(rng.choice([0, 2])),  # 4:4:4 or 4:2:0
    )
    return buf.getvalue()


def input_set(n: int, seed: int = 0) -> list[bytes]:
    """`n` inputs: longer sides log-uniform from 224 to 2400 px, and one in eight at 12 megapixels (4000x3000
    crops are cut to that aspect first)."""
    photos = source_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)][1]
        if i % 8 == 7:
            long_side = 4000
            h, w = photo.shape[:2]
            photo = photo[: max(1, int(w * 3 / 4))] if w >= h else photo[:, : max(1, int(h * 3 / 4))]
        else:
            long_side = int(np.exp(rng.uniform(np.log(224), np.log(2400))))
        out.append(make_input(photo, rng, long_side))
    return out


def torchvision_render(spec: Preprocessing) -> Render:
    """The card's evaluation transform as torchvision runs it on a PIL image decoded at full size."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(spec.resize, interpolation=T.InterpolationMode(spec.interpolation)),
            T.CenterCrop((spec.height, spec.width)),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    mode = "L" if spec.channels == 1 else "RGB"

    def render(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return tf(img.convert(mode)).numpy()

    return render


def service_render(spec: Preprocessing, mode: str) -> Render:
    """The service's own path: `Pipeline.prepare` in `mode`, as every request runs it."""
    pipeline = Pipeline(spec, Limits(), mode)
    return lambda data: pipeline.prepare(data)[0]


def logits_of(session, tensors: np.ndarray, batch: int = 32) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: tensors[i : i + batch]})[0] for i in range(0, len(tensors), batch)]
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def compare(probs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, top-5 set agreement (mean |top5 ∩ top5_ref| / 5), mean L1 of the probabilities, and
    at each disagreement how far the reference's own top-1 led the class picked (median, largest)."""
    top1 = float((probs.argmax(1) == ref.argmax(1)).mean())
    a, b = np.argsort(-probs, 1)[:, :5], np.argsort(-ref, 1)[:, :5]
    top5 = float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b, strict=True)]))
    pick, own = probs.argmax(1), ref.argmax(1)
    gaps = [float(r[o] - r[p]) for r, p, o in zip(ref, pick, own, strict=True) if p != o]
    return {
        "top1": top1,
        "top5": top5,
        "l1": float(np.abs(probs - ref).sum(1).mean()),
        "gap": float(np.median(gaps)) if gaps else 0.0,
        "gap_max": max(gaps, default=0.0),
    }


def session_for(version: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(version / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def measure(version: Path, inputs: int | None = None, mode: str | None = None) -> PreprocessingAgreement:
    """`mode`'s (the default's when None) agreement with the card's evaluation transform, over `inputs`
    (`INPUTS` when None)."""
    mode = mode or Settings().preprocess_mode
    inputs = inputs or INPUTS
    spec = read_card(version).preprocessing
    session = session_for(version)
    images = input_set(inputs)
    reference, ours = torchvision_render(spec), service_render(spec, mode)
    ref = softmax(logits_of(session, np.stack([reference(d) for d in images])))
    row = compare(softmax(logits_of(session, np.stack([ours(d) for d in images]))), ref)
    return PreprocessingAgreement(
        mode=mode,
        top1=round(row["top1"], 4),
        top5=round(row["top5"], 4),
        inputs=len(images),
        reference="torchvision evaluation transform",
        measured=time.strftime("%Y-%m-%d"),
    )


def record(version: Path, agreement: PreprocessingAgreement) -> None:
    """Write the agreement into the version's card."""
    write_card(version, replace(read_card(version), preprocessing_agreement=agreement))
