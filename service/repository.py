"""The model repository on disk: `models/<name>/<version>/{model.json, model.onnx, model.fp16.onnx}`.

Cards are read here and files are checked against the sha256 in the card before ONNX Runtime sees them, so a
truncated copy or a swapped file is refused with a reason instead of being served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from service.errors import ModelNotFound

log = logging.getLogger("service.repository")

CARD = "model.json"


class RepositoryError(Exception):
    """A model folder that cannot be served (bad card, missing file, checksum mismatch)."""


@dataclass
class ModelCard:
    """A parsed `model.json` plus the folder it came from."""

    name: str
    version: str
    path: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.data.get("preprocessing", {})

    @cached_property
    def labels(self) -> tuple[dict[str, Any], ...]:
        """Read once: every answer looks its classes up here."""
        return tuple(self.data.get("labels") or ())

    @property
    def num_classes(self) -> int:
        shape = self.data.get("output", {}).get("shape") or []
        if self.labels:
            return len(self.labels)
        return int(shape[-1]) if shape else 0

    @property
    def output_kind(self) -> str:
        return str(self.data.get("output", {}).get("kind", "logits"))

    @property
    def input_name(self) -> str:
        return str(self.data.get("input", {}).get("name", "input"))

    def file(self, precision: str) -> Path | None:
        """The graph file of that precision (`fp32` or `fp16`) named in the card, or None."""
        for fname, meta in (self.data.get("files") or {}).items():
            if (meta or {}).get("precision", "fp32") == precision:
                return self.path / fname
        return None

    def read_verified(self, fname: str) -> bytes:
        """One file's bytes, checked against the card's size and sha256. The bytes checked are the bytes
        returned (ONNX Runtime is handed them, not the path): a file swapped after the check is never run."""
        meta = (self.data.get("files") or {}).get(fname)
        if meta is None:
            raise RepositoryError(f"{fname} is not listed in {CARD}")
        p = self.path / fname
        if not p.is_file():
            raise RepositoryError(f"{fname} is missing")
        expected = str(meta.get("sha256", "")).lower()
        if not expected:
            raise RepositoryError(f"{fname} has no sha256 in {CARD}")
        if "bytes" in meta and meta["bytes"] and p.stat().st_size != int(meta["bytes"]):
            raise RepositoryError(f"{fname} is {p.stat().st_size} bytes, the card says {meta['bytes']}")
        data = p.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise RepositoryError(f"{fname} sha256 mismatch: card {expected[:12]}..., file {actual[:12]}...")
        return data

    def metadata(self) -> dict[str, Any]:
        """The card's content that clients may see (everything except absolute paths)."""
        out = {k: v for k, v in self.data.items()}
        out["name"] = self.name
        out["version"] = self.version
        return out


def read_card(folder: Path) -> ModelCard:
    """Parse `folder/model.json`; the folder names give name and version. The card must agree on the name; on
    the version the folder wins (copying folder 1 to 2 to make a new version is how repositories grow)."""
    try:
        data = json.loads((folder / CARD).read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{CARD} is missing") from None
    except (OSError, ValueError) as e:
        raise RepositoryError(f"{CARD} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{CARD} is not an object")
    name, version = folder.parent.name, folder.name
    if str(data.get("name", name)) != name:
        raise RepositoryError(f"card name {data.get('name')!r} differs from folder {name!r}")
    if str(data.get("version", version)) != version:  # a version folder copied to make the next one
        log.warning(
            "%s/%s: the card says version %r; the folder's %r is served",
            name,
            version,
            data.get("version"),
            version,
        )
    for key in ("input", "output", "preprocessing", "files"):
        if key not in data:
            raise RepositoryError(f"{CARD} lacks {key!r}")
    return ModelCard(name=name, version=version, path=folder, data=data)


_VERSION = re.compile("[1-9][0-9]*")


def scan(root: str | Path) -> dict[str, list[str]]:
    """Model name -> its versions, ascending. Only plain positive integers count as versions (`1`, `12`; not
    `01`, which would be a second `1`, nor Unicode digits such as `²`, which `int()` refuses)."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {str(root)!r} does not exist")
    out: dict[str, list[str]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [p.name for p in model_dir.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
        if versions:
            out[model_dir.name] = sorted(versions, key=int)
    return out


def resolve(versions: dict[str, list[str]], name: str, version: str | None) -> str:
    """The version to serve: the one asked for, or the latest; ModelNotFound otherwise."""
    if name not in versions:
        raise ModelNotFound(f"unknown model {name!r}; available: {sorted(versions)}")
    if version in (None, "", "latest"):
        return versions[name][-1]
    version = str(version)
    if version not in versions[name]:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {versions[name]}")
    return version
