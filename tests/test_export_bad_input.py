"""Every bad input of the export stage: one clear line, a non-zero exit, and the repository as it was."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.__main__ import main
from export.nets import LeNet5

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repository that already holds one model, to show that failures leave it untouched."""
    r = tmp_path / "models"
    (r / "keep" / "1").mkdir(parents=True)
    (r / "keep" / "1" / "model.json").write_text('{"name": "keep"}\n')
    return r


@pytest.fixture(scope="module")
def lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return LeNet5().state_dict()


def test_unknown_architecture_lists_valid_and_closest(capsys, repo: Path) -> None:
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "resnet5O", "--random-init", "--repository", str(repo))
    line = one_error_line(err)
    assert rc != 0
    assert "unknown architecture 'resnet5O'" in line
    assert "closest: resnet50" in line
    assert "valid names:" in line and "lenet5" in line and "shufflenet_v2_x1_0" in line
    assert snapshot(repo) == before


def test_unknown_architecture_exit_code_from_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "build", "vgg17", "--random-init", "--repository", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert "closest: vgg11" in line or "closest: vgg16" in line or "closest: vgg19" in line
    assert not out.exists()


def test_no_weights_is_refused_without_random_init(capsys, repo: Path) -> None:
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--repository", str(repo))
    assert rc != 0
    assert "--random-init" in one_error_line(err)
    assert snapshot(repo) == before


def test_corrupt_weights_file(capsys, repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint" + os.urandom(4096))
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(bad), "--repository", str(repo))
    assert rc != 0
    assert "corrupt or truncated" in one_error_line(err)
    assert snapshot(repo) == before


def test_truncated_weights_file(capsys, repo: Path, tmp_path: Path, lenet_state) -> None:
    good = tmp_path / "lenet.pth"
    torch.save(lenet_state, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(cut), "--repository", str(repo))
    assert rc != 0
    assert "corrupt or truncated" in one_error_line(err)
    assert snapshot(repo) == before


def test_truncated_safetensors(capsys, repo: Path, tmp_path: Path, lenet_state) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "lenet.safetensors"
    save_file(lenet_state, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(cut), "--repository", str(repo))
    assert rc != 0
    assert "corrupt or truncated" in one_error_line(err)
    assert snapshot(repo) == before


def test_weights_of_another_architecture(capsys, repo: Path, tmp_path: Path) -> None:
    import torchvision

    other = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), other)
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(other), "--repository", str(repo))
    line = one_error_line(err)
    assert rc != 0
    assert "weights do not fit lenet5" in line
    assert "6 missing keys: features.3.weight" in line
    assert "unexpected keys: features.3.squeeze.weight" in line
    assert "the weights have 1000 classes, lenet5 has 10" in line
    assert snapshot(repo) == before


def test_weights_with_another_class_count(capsys, repo: Path, tmp_path: Path) -> None:
    seven = tmp_path / "lenet7.pth"
    torch.save(LeNet5(num_classes=7).state_dict(), seven)
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(seven), "--repository", str(repo))
    line = one_error_line(err)
    assert rc != 0
    assert "shape mismatches: classifier.5.weight [7, 84] vs [10, 84]" in line
    assert "the weights have 7 classes, lenet5 has 10" in line
    assert snapshot(repo) == before


class _Exploit:
    """A pickle that runs a command when unpickled: weights_only loading must refuse it, never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_is_not_a_state_dict_is_never_executed(capsys, repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"conv.weight": _Exploit(marker)}, f)
    before = snapshot(repo)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(evil), "--repository", str(repo))
    assert rc != 0
    assert "not a plain state dict" in one_error_line(err)
    assert not marker.exists()
    assert snapshot(repo) == before


def test_pickled_module_is_not_a_plain_state_dict(capsys, repo: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole_model.pt"
    torch.save(LeNet5(), whole)  # the whole nn.Module, as some people save "checkpoints"
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(whole), "--repository", str(repo))
    assert rc != 0
    assert "not a plain state dict" in one_error_line(err)


def test_nested_checkpoint_is_not_a_plain_state_dict(capsys, repo: Path, tmp_path: Path, lenet_state):
    nested = tmp_path / "ckpt.pth"
    torch.save({"state_dict": lenet_state, "epoch": torch.tensor(3)}, nested)
    rc, err = run_cli(capsys, "build", "lenet5", "--weights", str(nested), "--repository", str(repo))
    line = one_error_line(err)
    assert rc != 0
    assert "not a plain state dict" in line and "'state_dict'" in line


def test_unwritable_output_folder(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    target = blocker / "models"
    rc, err = run_cli(capsys, "build", "lenet5", "--random-init", "--repository", str(target))
    assert rc != 0
    assert "cannot write to the model repository" in one_error_line(err)
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_repository(capsys, repo: Path) -> None:
    before = snapshot(repo)
    repo.chmod(0o555)
    try:
        rc, err = run_cli(capsys, "build", "lenet5", "--random-init", "--repository", str(repo))
    finally:
        repo.chmod(0o755)
    assert rc != 0
    assert "cannot write" in one_error_line(err)
    assert snapshot(repo) == before


def test_existing_version_is_not_overwritten(capsys, repo: Path) -> None:
    before = snapshot(repo)
    args = ["build", "lenet5", "--random-init", "--repository", str(repo), "--name", "keep", "--version", "1"]
    rc, err = run_cli(capsys, *args)
    assert rc != 0
    assert "already exists" in one_error_line(err)
    assert snapshot(repo) == before


def test_bad_name_and_version(capsys, repo: Path) -> None:
    base = ["build", "lenet5", "--random-init", "--repository", str(repo)]
    rc, err = run_cli(capsys, *base, "--name", "../x")
    assert rc != 0 and "invalid model name" in one_error_line(err)
    rc, err = run_cli(capsys, *base, "--version", "v2")
    assert rc != 0 and "invalid version" in one_error_line(err)


def test_a_failed_export_never_removes_what_another_export_wrote(tmp_path: Path) -> None:
    """The folders a failed export created are removed only while empty: a concurrent export may have put a
    finished version there meanwhile (it once deleted it)."""
    from export.errors import ExportError
    from export.repository import staged

    repo = tmp_path / "models"
    with pytest.raises(RuntimeError), staged(repo, "racenet", "1") as stage:
        (stage / "model.onnx").write_bytes(b"x")
        (repo / "racenet" / "2").mkdir(parents=True)  # the other export's finished version
        (repo / "racenet" / "2" / "model.json").write_text("{}")
        raise RuntimeError("this export fails")
    assert (repo / "racenet" / "2" / "model.json").exists()
    assert [p.name for p in repo.iterdir()] == ["racenet"]  # the staging folder itself is gone
    with pytest.raises(RuntimeError), staged(tmp_path / "fresh", "n", "1"):
        raise RuntimeError("nothing else was written")
    assert not (tmp_path / "fresh").exists()  # empty folders it created are removed
    with pytest.raises(ExportError, match="not 01"):
        with staged(repo, "racenet", "01"):
            pass
