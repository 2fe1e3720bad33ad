"""The typed model card: one reader, one validator and one set of defaults for export and service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import repository as export_repository
from export.errors import ExportError
from service.card import (
    DEFAULT_CROP_PCT,
    CardError,
    ModelCard,
    Preprocessing,
    check_version,
    is_version,
    read_card,
    write_card,
)
from service.repository import scan
from tests.conftest import write_tiny_model

BASE = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}


def test_resize_and_crop_pct_follow_from_each_other_with_one_default() -> None:
    assert Preprocessing.from_dict(BASE).resize == int(224 / DEFAULT_CROP_PCT) == 256
    assert Preprocessing.from_dict({**BASE, "crop_pct": 0.8743}).resize == 256
    assert Preprocessing.from_dict({**BASE, "input_size": [3, 299, 299], "crop_pct": 0.875}).resize == 341
    given = Preprocessing.from_dict({**BASE, "resize": 232})
    assert given.resize == 232 and given.crop_pct == round(224 / 232, 4)
    assert Preprocessing.from_dict(BASE).interpolation == "bilinear"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resize": 0}, "resize must be a positive size"),
        ({"crop_pct": 1.5}, "crop_pct must be in (0, 1]"),
        ({"channels": 1}, "channels must be 1 or 3"),
        ({"std": [0.5, 0, 0.5]}, "std must not be 0"),
        ({"mean": [0.5]}, "mean/std need 3 values"),
        ({"interpolation": "cubic-ish"}, "unknown interpolation"),
        ({"invert": "false"}, "invert must be true or false"),
        ({"input_size": [3, 224]}, "bad field"),
    ],
)
def test_bad_preprocessing_is_refused_with_its_reason(change: dict, message: str) -> None:
    with pytest.raises(CardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Preprocessing.from_dict({**BASE, **change})


def test_versions_are_plain_positive_integers_for_export_and_service(tmp_path: Path) -> None:
    assert [v for v in ("1", "12", "01", "0", "²", "-1", "1.0") if is_version(v)] == ["1", "12"]
    with pytest.raises(CardError, match="positive integers"):
        check_version("07")
    with pytest.raises(ExportError, match="positive integers"):
        export_repository.check_version("07")
    for v in ("1", "2", "07", "x"):
        (tmp_path / "m" / v).mkdir(parents=True)
    assert scan(tmp_path) == {"m": ["1", "2"]}
    assert export_repository.next_version(tmp_path, "m") == "3"


def test_a_card_round_trips_and_keeps_what_it_does_not_type(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "tiny", "3", channels=1, classes=4)
    card = read_card(folder)
    assert (card.name, card.version, card.path) == ("tiny", "3", folder)
    assert card.preprocessing.channels == 1 and card.num_classes == 4 and card.output_kind == "logits"
    assert card.extra["opset"] == 17 and card.file("fp32") == folder / "model.onnx"
    assert card.read_verified("model.onnx") == (folder / "model.onnx").read_bytes()
    again = ModelCard.from_dict(json.loads((folder / "model.json").read_text()), name="tiny", version="3")
    assert again.to_dict() == card.to_dict()


def test_a_card_without_layout_offset_or_batch_fields_reads_with_the_defaults(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "tiny", "1", classes=4)
    data = json.loads((folder / "model.json").read_text())
    data["input"].pop("layout")
    (folder / "model.json").write_text(json.dumps(data))
    card = read_card(folder)
    assert card.layout == "NCHW" and card.output.label_offset == 0 and card.fixed_batch is None
    assert "label_offset" not in card.to_dict()["output"]  # cards without one are written as they were
    data["input"].update(layout="NHWC", shape=[1, 32, 32, 3])
    data["output"].update(label_offset=1, shape=[1, 5, 1, 1])
    data["labels"] = []
    typed = ModelCard.from_dict(data)
    assert typed.layout == "NHWC" and typed.fixed_batch == 1 and typed.num_classes == 4
    assert ModelCard.from_dict(typed.to_dict()).to_dict() == typed.to_dict()


def test_the_folder_names_the_model_and_wins_on_the_version(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "tiny", "1")
    data = json.loads((folder / "model.json").read_text())
    (tmp_path / "tiny" / "2").mkdir()
    (tmp_path / "tiny" / "2" / "model.json").write_text(json.dumps(data))
    assert read_card(tmp_path / "tiny" / "2").version == "2"
    (tmp_path / "other" / "1").mkdir(parents=True)
    (tmp_path / "other" / "1" / "model.json").write_text(json.dumps(data))
    with pytest.raises(CardError, match="differs from folder"):
        read_card(tmp_path / "other" / "1")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("files"), "lacks 'files'"),
        (lambda c: c["output"].update(kind="scores"), "output kind"),
        (lambda c: c["input"].update(shape=[-1, 3]), "input shape"),
        (lambda c: c["files"]["model.onnx"].update(precision="int8"), "precision"),
        (lambda c: c.update(labels=[{"index": "one"}]), "malformed"),
        (lambda c: c["input"].update(layout="CHWN"), "input layout must be one of"),
        (lambda c: c["input"].update(shape=[0, 3, 32, 32]), "input batch must be -1"),
        (lambda c: c["output"].update(label_offset=-1), "label_offset must be 0 or more"),
        (lambda c: c["output"].update(shape=[-1, 10, 2, 2]), r"\[N, classes, 1, 1\]"),
    ],
)
def test_the_service_and_export_refuse_the_same_bad_cards(tmp_path: Path, edit, message: str) -> None:
    folder = write_tiny_model(tmp_path, "tiny", "1")
    data = json.loads((folder / "model.json").read_text())
    edit(data)
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(CardError, match=message):
        read_card(folder)
    with pytest.raises(ExportError, match=message):
        export_repository.write_card(tmp_path, data)


def test_a_checksum_mismatch_is_refused_before_onnx_runtime_sees_the_file(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "tiny", "1")
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(CardError, match="sha256 mismatch"):
        read_card(folder).read_verified("model.onnx")


def test_write_card_leaves_no_temporary_file(tmp_path: Path) -> None:
    card = read_card(write_tiny_model(tmp_path, "tiny", "1"))
    write_card(tmp_path, card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "tiny"]


def test_the_pipeline_is_the_cores_path_and_travels_to_worker_processes(
    tiny_repo: Path, chelsea_jpeg: bytes
) -> None:
    """Batch scoring pickles the pipeline into its decoding processes; what it prepares and finishes there
    is what the core answers for the same bytes."""
    import pickle

    import numpy as np

    from service.config import Settings
    from service.core import InferenceCore
    from service.scoring.runner import ModelRunner
    from tests.conftest import classify_now

    settings = Settings(repository=str(tiny_repo))
    runner = ModelRunner(settings, "tiny")
    pipeline = pickle.loads(pickle.dumps(runner.pipeline))
    views = pipeline.prepare(chelsea_jpeg, "flip")
    assert views.shape == (2, 3, 32, 32)
    (answer,) = pipeline.finish(runner.session.run(views), [len(views)], 3)
    core = InferenceCore(settings)
    core.load()
    try:
        (prediction,) = classify_now(core, [chelsea_jpeg], model="tiny", top_k=3, tta="flip")
    finally:
        core.close()
    np.testing.assert_allclose(answer.probabilities, prediction.probabilities, rtol=0, atol=1e-6)
    assert [(c.index, c.label) for c in answer.top_k] == [(c.index, c.label) for c in prediction.top_k]
