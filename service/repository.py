"""The model repository on disk: `models/<name>/<version>/{model.json, model.onnx, model.fp16.onnx}`.

Which models and versions exist, and where their folders are. Each folder's card is read and checked by
`service.card` (files against the card's sha256 before ONNX Runtime sees them).
"""

from __future__ import annotations

from pathlib import Path

from service.card import CARD_FILE, CardError, ModelCard, RepositoryError, is_version, read_card
from service.errors import ModelNotFound

__all__ = [
    "CARD_FILE",
    "CardError",
    "ModelCard",
    "RepositoryError",
    "entry_path",
    "read_card",
    "resolve",
    "scan",
    "versions_of",
]


def entry_path(repository: str | Path, name: str, version: str) -> Path:
    """The folder of one model version."""
    return Path(repository) / name / version


def versions_of(model_dir: Path) -> list[str]:
    """A model folder's versions, ascending: plain positive integers only (`service.card.VERSION_RE`)."""
    if not model_dir.is_dir():
        return []
    return sorted((p.name for p in model_dir.iterdir() if p.is_dir() and is_version(p.name)), key=int)


def scan(root: str | Path) -> dict[str, list[str]]:
    """Model name -> its versions, ascending. Dot-folders (a write's staging area) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {str(root)!r} does not exist")
    out: dict[str, list[str]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = versions_of(model_dir)
        if versions:
            out[model_dir.name] = versions
    return out


def resolve(versions: dict[str, list[str]], name: str, version: str | None) -> str:
    """The version to serve: the one asked for, or the latest; ModelNotFound otherwise (its message lists
    nothing of the repository: `ModelNotFound.of`)."""
    if name not in versions:
        raise ModelNotFound.of(name)
    if version in (None, "", "latest"):
        return versions[name][-1]
    version = str(version)
    if version not in versions[name]:
        raise ModelNotFound.of(name, version)
    return version
