"""Writes `models/<name>/<version>/` atomically: everything goes into a staging folder on the same filesystem
(a dot-folder inside the repository, which readers skip) and is renamed into place only when complete. Any
failure removes the staging folder and whatever this write created, so the repository stays as it was.

A repository in object storage (`s3://bucket/prefix`, `gs://`, `az://`, `file://`; `service.storage`) gets
the same guarantee: the version is written to a local staging folder, its files uploaded to a temporary
prefix and copied into `<name>/<version>/`, and the card uploaded last; the service lists a version only once
its card is there, so a reader never sees half a version. Credentials and endpoint come from the standard
places (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*).

The card's format, names, versions and checks are the service's (`service.card`): a card written here is one
the service serves.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service import card as cards
from service.repository import RepositoryError, Store, is_url, redact, versions_of
from service.storage import RemoteStore

from .errors import ExportError
from .weights import sha256_file

CARD = cards.CARD_FILE
SCHEMA = cards.SCHEMA


def check_name(name: str) -> str:
    try:
        return cards.check_name(name)
    except cards.CardError as e:
        raise ExportError(str(e)) from None


def check_version(version: str | int) -> str:
    try:
        return cards.check_version(version)
    except cards.CardError as e:
        raise ExportError(str(e)) from None


def location(repo: str | Path) -> str | Path:
    """A URL stays a string (a Path would fold its `//`); anything else is a local folder."""
    return str(repo) if is_url(str(repo)) else Path(repo)


def remote_store(url: str) -> Store:
    """The bucket to publish to (nothing is cached: publishing only lists and uploads)."""
    try:
        return RemoteStore(url, tempfile.gettempdir())
    except RepositoryError as e:
        raise ExportError(str(e)) from None


def versions(repo: str | Path, name: str) -> list[int]:
    if is_url(str(repo)):
        try:
            return [int(v) for v in remote_store(str(repo)).versions(name)]
        except RepositoryError as e:
            if "does not exist" in str(e):
                return []
            raise ExportError(str(e)) from None
    return [int(v) for v in versions_of(Path(repo) / name)]


def next_version(repo: str | Path, name: str) -> str:
    v = versions(repo, name)
    return str(v[-1] + 1 if v else 1)


def _first_missing_parent(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a failed write must remove)."""
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


@contextlib.contextmanager
def staged(repo: str | Path, name: str, version: str) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit it becomes `<repo>/<name>/<version>`."""
    check_name(name)
    version = check_version(version)
    if is_url(str(repo)):
        with _published(str(repo), name, version) as stage:
            yield stage
        return
    repo = Path(repo)
    final = repo / name / version
    if final.exists():
        raise ExportError(
            f"{final} already exists: pick another --version (next free: {next_version(repo, name)})"
        )
    created = _first_missing_parent(repo / name)
    try:
        repo.mkdir(parents=True, exist_ok=True)
        stage = repo / f".staging-{name}-{version}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
    except OSError as e:
        _remove_created(created)
        raise ExportError(f"cannot write to the model repository {str(repo)!r}: {e.strerror or e}") from None
    try:
        yield stage
        (repo / name).mkdir(exist_ok=True)
        if final.exists():
            raise ExportError(f"{final} appeared while exporting; nothing written")
        os.rename(stage, final)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_created(created)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {final}: {e.strerror or e}") from None
        raise


_LOCAL_COPIES: list[str] = []
atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _LOCAL_COPIES])


@contextlib.contextmanager
def _published(url: str, name: str, version: str) -> Iterator[Path]:
    """`staged` for a bucket: a local staging folder, uploaded on normal exit (`RemoteStore.publish`: files
    to a temporary prefix, copied into place, the card last). The local copy stays until the process ends,
    for the summary printed from it."""
    store = remote_store(url)
    if int(version) in versions(url, name):
        raise ExportError(
            f"{redact(url)}/{name}/{version} already exists: pick another --version "
            f"(next free: {next_version(url, name)})"
        )
    root = tempfile.mkdtemp(prefix="cnn-export-")
    _LOCAL_COPIES.append(root)
    stage = Path(root) / name / version
    stage.mkdir(parents=True)
    try:
        yield stage
        store.publish(stage, name, version)  # type: ignore[attr-defined]
    except RepositoryError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise ExportError(f"cannot publish {name}/{version}: {e}") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _remove_created(created: Path | None) -> None:
    """Remove the folders this export created, but only while they are empty: a concurrent export may have
    put a finished version in `<repo>/<name>` meanwhile, and a failed export must never take it away."""
    if created is None or not created.exists():
        return
    for folder in sorted((p for p in created.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty
    with contextlib.suppress(OSError):
        created.rmdir()


def file_entry(path: Path, precision: str, optimization: str = "basic") -> dict:
    entry = cards.FileEntry(sha256_file(path), path.stat().st_size, precision, "any", optimization)
    return entry.to_dict()


def preprocessing(pre: dict[str, Any]) -> dict[str, Any]:
    """A preprocessing object checked and completed by the service's rules (resize from crop_pct and back)."""
    try:
        return cards.Preprocessing.from_dict(pre).to_dict()
    except cards.CardError as e:
        raise ExportError(str(e)) from None


def write_card(folder: Path, card: dict) -> Path:
    """Check the card as the service will read it, then write it (atomically, the last file of a version)."""
    card = dict(card)
    card.setdefault("created", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        typed = cards.ModelCard.from_dict(card)
    except cards.CardError as e:
        raise ExportError(f"the card would not serve: {e}") from None
    return cards.write_card(folder, typed)


def read_card(folder: Path) -> cards.ModelCard:
    """The card of a written version, typed (the service's reader)."""
    return cards.read_card(folder)


def is_valid(folder: Path) -> bool:
    """True when the folder holds a card whose every listed file exists with the recorded sha256."""
    try:
        card = read_card(folder)
        if not card.files:
            return False
        return all(sha256_file(Path(folder) / f) == entry.sha256 for f, entry in card.files.items())
    except (OSError, cards.RepositoryError):
        return False
