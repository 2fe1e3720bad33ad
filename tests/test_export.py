"""Export stage: small nets end to end, the ONNX files' properties, aux-head checkpoints, atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import registry, repository, validate
from export.__main__ import main
from export.build import build, export_model
from export.errors import ExportError
from export.nets import LeNet5, ZFNet
from export.weights import build_with_weights, sha256_file

pytestmark = pytest.mark.slow


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_model_folder(folder: Path, arch: str, trained: bool) -> dict:
    card = json.loads((folder / "model.json").read_text())
    assert card["schema"] == 1 and card["architecture"] == arch and card["trained"] is trained
    assert card["version"] == folder.name and card["name"] == folder.parent.name
    assert set(card["files"]) == {"model.onnx", "model.fp16.onnx"}
    for f, entry in card["files"].items():
        assert sha256_file(folder / f) == entry["sha256"]
        assert (folder / f).stat().st_size == entry["bytes"]
        assert entry["optimization"] in ("basic", "extended") and entry["provider"] == "any"
    assert card["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime"} <= set(card["tools"])
    assert card["validation"]["fp32"]["passed"] and card["validation"]["fp32"]["rel_err"] <= 1e-4
    assert card["validation"]["fp16"]["samples"] >= 1 and "top5_overlap" in card["validation"]["fp16"]
    assert len(card["labels"]) == card["output"]["shape"][1]
    assert card["preprocessing"]["input_size"] == card["input"]["shape"][1:]
    # Dynamic batch: batches of 1 and 3 both run, fp16 keeps fp32 inputs and outputs.
    c, h, w = card["preprocessing"]["input_size"]
    for f in ("model.onnx", "model.fp16.onnx"):
        proto = onnx.load(str(folder / f))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "provider-specific ops saved"
        for n in (1, 3):
            y = ort_run(folder / f, np.random.default_rng(n).standard_normal((n, c, h, w)).astype(np.float32))
            assert y.shape == (n, len(card["labels"])) and y.dtype == np.float32
    fp16 = onnx.load(str(folder / "model.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    return card


def test_lenet5_random_init_end_to_end(tmp_path: Path) -> None:
    folder = build("lenet5", tmp_path, random_init=True)
    card = check_model_folder(folder, "lenet5", trained=False)
    assert card["weights"] is None
    assert [x["id"] for x in card["labels"]] == [str(i) for i in range(10)]
    assert card["preprocessing"]["channels"] == 1 and card["preprocessing"]["input_size"] == [1, 32, 32]
    fp16, fp32 = card["validation"]["fp16"], card["validation"]["fp32"]
    assert fp16["samples"] >= 256 and fp16["reference"] == "onnx fp32"
    # fp32 is checked against PyTorch on the first inputs, and so is fp16's agreement with PyTorch itself.
    assert fp32["samples"] == fp16["torch_samples"] == 64 and 0.0 <= fp16["top1_agreement_torch"] <= 1.0


def test_fp32_validation_fails_the_export_on_a_wrong_graph(tmp_path: Path) -> None:
    """A graph that differs from PyTorch fails at the fp32 check, before any fp16 work."""
    from export import onnx_export

    torch.manual_seed(0)
    model = LeNet5().eval()
    onnx_export.export_fp32(model, (1, 32, 32), tmp_path / "model.onnx", tmp_path)
    with torch.no_grad():
        model.classifier[-1].bias[3] += 1.0  # PyTorch now computes something else than the saved graph
    x = np.random.default_rng(0).standard_normal((80, 1, 32, 32)).astype(np.float32)
    with pytest.raises(ExportError, match=r"validation failed \(fp32\)"):
        validate.validate(model, tmp_path / "model.onnx", tmp_path / "missing.fp16.onnx", x, trained=True)


def test_lenet5_with_weights_safetensors_via_cli(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    w = tmp_path / "lenet.safetensors"
    save_file(LeNet5().state_dict(), str(w))
    rc = main(
        ["build", "lenet5", "--weights", str(w), "--repository", str(tmp_path / "m"), "--name", "digits"]
    )
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "m" / "digits" / "1"
    card = check_model_folder(folder, "lenet5", trained=True)
    assert card["weights"] == {"file": "lenet.safetensors", "sha256": sha256_file(w)}
    assert card["validation"]["fp16"]["enforced"] is True
    assert "digits/1" in capsys.readouterr().out
    # The next build goes to version 2 and leaves version 1 alone.
    before = (folder / "model.onnx").read_bytes()
    assert (
        main(
            ["build", "lenet5", "--weights", str(w), "--repository", str(tmp_path / "m"), "--name", "digits"]
        )
        == 0
    )
    assert (tmp_path / "m" / "digits" / "2" / "model.json").is_file()
    assert (folder / "model.onnx").read_bytes() == before


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_nets(tmp_path: Path, name: str) -> None:
    folder = build(name, tmp_path, random_init=True, samples=32)
    card = check_model_folder(folder, name, trained=False)
    assert card["source"] == f"torchvision:{name}"
    assert card["preprocessing"]["resize"] == 256 and card["preprocessing"]["interpolation"] == "bilinear"
    assert len(card["labels"]) == 1000 and card["labels"][281]["id"] == "n02123045"


def test_zfnet_at_a_small_input(tmp_path: Path) -> None:
    """ZFNet's layer table, exported at 112x112 to keep the test quick (the adaptive pool takes any size)."""
    model = ZFNet().eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (96, (7, 7), (2, 2)),
        (256, (5, 5), (2, 2)),
        (512, (3, 3), (1, 1)),
        (1024, (3, 3), (1, 1)),
        (512, (3, 3), (1, 1)),
    ]
    base = registry.get("zfnet")
    small = dataclasses.replace(
        base, preprocessing_fn=lambda: {**base.preprocessing(), "input_size": [3, 112, 112]}
    )
    out = export_model(model, small, tmp_path, trained=False, samples=16)
    assert out["validation"]["fp32"]["passed"] and out["facts"]["opset"] >= 17


def test_lenet5_layer_table() -> None:
    m = LeNet5()
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    fcs = [x for x in m.classifier if isinstance(x, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84), (84, 10)]
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_registry_names_and_preprocessing() -> None:
    names = registry.names()
    assert len(names) == len(set(names)) == 38
    for n in (
        "lenet5",
        "zfnet",
        "googlenet",
        "inception_v4",
        "senet154",
        "efficientnet_lite0",
        "squeezenet1_1",
    ):
        assert n in names
    tm = registry.get("inception_resnet_v2").preprocessing()
    assert tm["crop_pct"] == 0.8975 and tm["mean"] == [0.5, 0.5, 0.5] and tm["input_size"] == [3, 299, 299]
    assert registry.get("inception_v3").preprocessing()["resize"] == 342
    assert registry.get("seresnet50").preprocessing()["crop_pct"] == 0.95  # timm's value, not torchvision's
    lite = registry.get("efficientnet_lite0")
    assert lite.source == "timm:tf_efficientnet_lite0" and lite.preprocessing()["interpolation"] == "bicubic"


@pytest.mark.parametrize(
    ("name", "aux_attr"),
    [("googlenet", ("aux1", "aux2")), ("inception_v3", ("AuxLogits",))],
)
def test_published_aux_head_checkpoint_loads_strictly_then_drops_heads(
    tmp_path: Path, name: str, aux_attr: tuple[str, ...]
) -> None:
    """The published checkpoints carry aux-head weights: make one with that key layout and load it."""
    import torchvision

    torch.manual_seed(0)
    published = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=True)
    state = published.state_dict()
    assert any("aux" in k.lower() for k in state)
    ckpt = tmp_path / f"{name}.pth"
    torch.save(state, ckpt)
    model, entry = build_with_weights(registry.get(name), ckpt)
    assert entry["sha256"] == sha256_file(ckpt)
    assert all(getattr(model, a) is None for a in aux_attr) and model.aux_logits is False
    assert not any("aux" in k.lower() for k in model.state_dict())
    for k, v in model.state_dict().items():  # every remaining tensor came from the checkpoint
        assert torch.equal(v, state[k])
    size = 299 if name == "inception_v3" else 224
    with torch.inference_mode():
        y = model(torch.randn(1, 3, size, size))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 1000)
    # Missing one aux tensor is a strict-loading failure that names it.
    broken = {k: v for k, v in state.items() if k != next(k for k in state if "aux" in k.lower())}
    torch.save(broken, ckpt)
    with pytest.raises(ExportError, match="1 missing keys"):
        build_with_weights(registry.get(name), ckpt)


class Noisy(nn.Module):
    """Not deterministic: ONNX Runtime and PyTorch draw different noise, so validation must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.net = LeNet5()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + torch.rand_like(self.net(x)) * 10


def test_failed_validation_fails_the_export_and_leaves_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    keep = build("lenet5", repo, random_init=True, name="lenet5", samples=16)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match="validation failed"):
        build("lenet5", repo, model=Noisy().eval(), weights_entry={"file": "x", "sha256": "0"})
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == ["lenet5"]  # no staging folder left
    assert repository.versions(repo, "lenet5") == [1] and keep.is_dir()
    # A brand-new repository that fails is not left behind at all.
    fresh = tmp_path / "fresh" / "models"
    with pytest.raises(ExportError):
        build("lenet5", fresh, model=Noisy().eval(), weights_entry={"file": "x", "sha256": "0"})
    assert not (tmp_path / "fresh").exists()


def test_staged_write_renames_into_place(tmp_path: Path) -> None:
    with repository.staged(tmp_path, "m", "3") as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".staging-")
        (stage / "model.onnx").write_bytes(b"x")
        assert not (tmp_path / "m" / "3").exists()
    assert (tmp_path / "m" / "3" / "model.onnx").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_validation_inputs_are_real_photos() -> None:
    pre = registry.get("resnet18").preprocessing()
    x = validate.make_inputs(pre, n=256)
    assert x.shape == (256, 3, 224, 224) and x.dtype == np.float32
    assert len({hash(v.tobytes()) for v in x}) == 256  # all different views
    first = validate.preprocess(validate.photos()[0], pre)
    assert np.array_equal(x[0], first)


def test_random_init_batchnorm_calibration_makes_logits_depend_on_the_image() -> None:
    """Fresh BN statistics make GoogLeNet's output the same for every image; calibrated ones do not."""
    from export.build import calibrate_batchnorm

    arch = registry.get("googlenet")
    torch.manual_seed(0)
    model = arch.build()
    x = torch.from_numpy(validate.make_inputs(arch.preprocessing(), n=8, seed=3))
    with torch.inference_mode():
        before = model(x)
    assert float((before - before[0]).abs().max()) < 1e-3  # flat: nothing to validate
    assert calibrate_batchnorm(model, validate.make_inputs(arch.preprocessing(), n=32, seed=7), limit=32)
    assert not model.training
    with torch.inference_mode():
        after = model(x)
    assert len(set(after.argmax(1).tolist())) > 1
    assert not calibrate_batchnorm(LeNet5(), x[:, :1, :32, :32].numpy())  # no BN: untouched
