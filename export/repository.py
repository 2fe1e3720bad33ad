"""Writes `models/<name>/<version>/` atomically: everything goes into a staging folder on the same filesystem
(a dot-folder inside the repository, which readers skip) and is renamed into place only when complete. Any
failure removes the staging folder and whatever this write created, so the repository stays as it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError
from .weights import sha256_file

CARD = "model.json"
SCHEMA = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    return name


_VERSION_RE = re.compile("[1-9][0-9]*")  # the service's rule: `07` or `²` is no version


def check_version(version: str | int) -> str:
    v = str(version)
    if not _VERSION_RE.fullmatch(v):
        raise ExportError(f"invalid version {v!r}: versions are positive integers (1, 2, ...; not 01)")
    return v


def versions(repo: Path, name: str) -> list[int]:
    d = Path(repo) / name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name))


def next_version(repo: Path, name: str) -> str:
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
    repo = Path(repo)
    check_name(name)
    version = check_version(version)
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
    return {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "precision": precision,
        "provider": "any",
        "optimization": optimization,
    }


def write_card(folder: Path, card: dict) -> Path:
    card = {"schema": SCHEMA, **card}
    card.setdefault("created", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    path = folder / CARD
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_card(folder: Path) -> dict:
    return json.loads((Path(folder) / CARD).read_text())


def is_valid(folder: Path) -> bool:
    """True when the folder holds a card whose every listed file exists with the recorded sha256."""
    try:
        card = read_card(folder)
        files = card["files"]
        if not files:
            return False
        return all(sha256_file(Path(folder) / f) == entry["sha256"] for f, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
