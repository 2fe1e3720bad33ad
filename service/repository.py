"""The model repository: `<root>/<name>/<version>/{model.json, model.onnx, model.fp16.onnx}`.

Which models and versions exist, and where their folders are. The root is a local folder or a URL of object
storage (`s3://`, `gs://`, `az://`, `file://`): `service.storage` reads either, copying a remote version's
files into the local model cache; this module is the service's one way to it. Each folder's card is read and
checked by `service.card` (files against the card's sha256 before ONNX Runtime sees them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.card import CARD_FILE, CardError, ModelCard, RepositoryError, read_card
from service.errors import ModelNotFound
from service.storage import LocalStore, Store, StoreUnreachable, is_url, open_store, redact

if TYPE_CHECKING:
    from service.config import Settings

__all__ = [
    "CARD_FILE",
    "CardError",
    "ModelCard",
    "RepositoryError",
    "Store",
    "StoreUnreachable",
    "entry_path",
    "is_url",
    "load_card",
    "read_card",
    "redact",
    "resolve",
    "scan",
    "store_for",
    "versions_of",
]


def store_for(settings: Settings) -> Store:
    """The store of `settings.repository`: the folder itself, or a URL read through the model cache."""
    return open_store(
        settings.repository,
        settings.model_cache,
        settings.storage_endpoint_url,
        settings.storage_timeout_s,
    )


def load_card(store: Store, name: str, version: str) -> ModelCard:
    """One version's card, read from a local folder (a remote version's files fetched and verified first)."""
    return read_card(store.folder(name, version))


def entry_path(repository: str | Path, name: str, version: str) -> Path:
    """The folder of one model version."""
    return Path(repository) / name / version


def versions_of(model_dir: Path) -> list[str]:
    """A local model folder's versions, ascending: plain positive integers only (`card.VERSION_RE`)."""
    return LocalStore(str(model_dir.parent)).versions(model_dir.name)


def scan(root: str | Path | Store) -> dict[str, list[str]]:
    """Model name -> its versions, ascending. Dot-folders (a write's staging area) are skipped; in object
    storage a version counts once its card is there (publishers write it last)."""
    store = root if isinstance(root, Store) else LocalStore(str(root))
    return store.scan()


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
