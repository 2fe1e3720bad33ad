"""The two trained defaults of `make models`: EfficientNet-Lite0 on photos, and the graph choice behind it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from export import defaults, registry, repository, validate
from export.weights import read_state_dict, sha256_file


def card_of(repo: Path, name: str) -> tuple[Path, dict]:
    folder = repo / name / "1"
    return folder, json.loads((folder / "model.json").read_text())


def classify(folder: Path, card: dict, img: Image.Image, file: str = "model.onnx") -> list[str]:
    """Through the exported ONNX with the card's own preprocessing; top-3 label names."""
    x = validate.preprocess(img, card["preprocessing"])[None]
    sess = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {card["input"]["name"]: x})[0][0]
    return [card["labels"][i]["name"] for i in np.argsort(-logits)[:3]]


@pytest.mark.parametrize("file", ["model.onnx", "model.fp16.onnx"])
def test_efficientnet_lite0_recognises_the_photos(model_repo: Path, chelsea, coffee, file: str) -> None:
    folder, card = card_of(model_repo, "efficientnet_lite0")
    assert classify(folder, card, chelsea, file)[0] in ("tabby", "tiger cat", "Egyptian cat")
    assert classify(folder, card, coffee, file)[0] == "espresso"


def test_efficientnet_lite0_card(model_repo: Path) -> None:
    folder, card = card_of(model_repo, "efficientnet_lite0")
    assert repository.is_valid(folder)
    assert card["trained"] is True and card["source"] == "timm:tf_efficientnet_lite0"
    pre = card["preprocessing"]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5]
    assert pre["interpolation"] == "bicubic" and pre["crop_pct"] == 0.875 and pre["resize"] == 256
    ckpt = defaults.lite0_checkpoint()
    assert ckpt.name == "efficientnet-lite0-57934424.pth"
    assert card["weights"]["file"] == ckpt.name and card["weights"]["sha256"] == sha256_file(ckpt)
    fp16 = card["validation"]["fp16"]
    assert fp16["enforced"] and fp16["samples"] >= 256 and fp16["top1_agreement"] >= 0.99
    assert card["validation"]["fp32"]["rel_err"] <= 1e-4
    ev = card["weights"]["variant_evidence"]
    assert ev["tf_efficientnet_lite0"]["bn_drift"] < ev["efficientnet_lite0"]["bn_drift"]


@pytest.mark.slow
def test_checkpoint_itself_picks_the_tensorflow_graph() -> None:
    """Same shapes, different graphs: the BN statistics of the checkpoint tell which one trained it."""
    state = read_state_dict(defaults.lite0_checkpoint())
    assert len(state) == 296 and "_blocks.0._bn1.running_var" in state
    chosen, evidence = defaults.choose_lite0(state)
    assert chosen == "tf_efficientnet_lite0"
    tf, pt = evidence["tf_efficientnet_lite0"], evidence["efficientnet_lite0"]
    assert tf["bn_drift"] < 0.8 * pt["bn_drift"]
    assert tf["top1"]["coffee"]["label"] == "espresso"
    assert tf["top1"]["coffee"]["probability"] > pt["top1"]["coffee"]["probability"]
    # Every one of the 296 tensors lands somewhere in timm's graph (strict load, no leftovers).
    remapped = registry.remap_efficientnet_pytorch(state)
    assert set(remapped) == set(registry.get("efficientnet_lite0").build().state_dict())


def test_lenet5_card_and_digits(model_repo: Path) -> None:
    folder, card = card_of(model_repo, "lenet5")
    assert repository.is_valid(folder)
    assert card["trained"] is True and card["accuracy"] >= 0.97
    assert [x["name"] for x in card["labels"]] == [str(i) for i in range(10)]
    assert card["preprocessing"]["channels"] == 1 and card["preprocessing"]["invert"] is True
    assert (
        card["validation"]["fp16"]["samples"] >= 256 and card["validation"]["fp16"]["top1_agreement"] >= 0.99
    )
    # Held-out digits through the ONNX file agree with the card's accuracy.
    from export.train_lenet import split

    _, xte, _, yte = split()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": ((xte - 0.5) / 0.5).astype(np.float32)})[0].argmax(1)
    assert abs(float((pred == yte).mean()) - card["accuracy"]) < 1e-6


def test_defaults_rerun_skips_valid_models(model_repo: Path, tmp_path: Path, capsys) -> None:
    """Rerun on a copy of the built repository: nothing is rebuilt (this is what keeps `make serve` fast)."""
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(model_repo, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert defaults.build_defaults(copy) == []
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before


def test_a_failed_rebuild_puts_the_old_version_back(model_repo: Path, tmp_path: Path, monkeypatch) -> None:
    """A stale default is set aside, not deleted: an interrupted or failed rebuild once lost it."""
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(model_repo / "lenet5", copy / "lenet5")
    (copy / "lenet5" / "1" / "model.onnx").write_bytes(b"modified")  # stale: the sha256 no longer matches
    before = sorted(p.name for p in (copy / "lenet5" / "1").iterdir())

    def interrupted(repo: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(defaults, "build_lenet", interrupted)
    monkeypatch.setattr(defaults, "_up_to_date", lambda repo, name: repo if name != "lenet5" else None)
    monkeypatch.setattr(defaults, "MEASURED", ())  # no card to measure in this stand-in for a built one
    with pytest.raises(KeyboardInterrupt):
        defaults.build_defaults(copy)
    assert sorted(p.name for p in (copy / "lenet5" / "1").iterdir()) == before
    assert [p.name for p in copy.iterdir()] == ["lenet5"]  # nothing left aside


def test_defaults_record_the_measured_agreement_of_the_default_preprocessing(
    model_repo: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The trained EfficientNet-Lite0's card says how often the default preprocessing gives the model's own
    answer, measured on photos against torchvision's transform; a rerun measures it for a card without it."""
    import shutil
    from dataclasses import replace

    from export import fidelity
    from service.card import read_card, write_card
    from service.config import Settings

    copy = tmp_path / "models"
    shutil.copytree(model_repo, copy)
    folder = copy / "efficientnet_lite0" / "1"
    write_card(folder, replace(read_card(folder), preprocessing_agreement=None))
    monkeypatch.setattr(fidelity, "INPUTS", 16)  # the photos of the 1,000, for a quick check
    capsys.readouterr()
    assert defaults.build_defaults(copy) == []
    out = capsys.readouterr().out
    agreement = read_card(folder).preprocessing_agreement
    assert agreement is not None and agreement.inputs == 16
    assert agreement.mode == Settings().preprocess_mode == "exact"
    assert (agreement.top1, agreement.top5) == (1.0, 1.0)  # exact mode is the model's own answer
    assert "exact preprocessing agrees on top-1 for 100.0% of the photos" in out
    assert read_card(copy / "lenet5" / "1").preprocessing_agreement is None  # digits, not photos
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert defaults.build_defaults(copy) == []  # recorded once: a rerun leaves it
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before
