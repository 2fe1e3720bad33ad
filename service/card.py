"""The model card (`models/<name>/<version>/model.json`), typed: what export writes and serving reads.

One reader (`read_card`), one validator (`ModelCard.from_dict`, `Preprocessing.from_dict`) and one set of
defaults, like timm's `PretrainedCfg`: preprocessing, augmentation, sessions and the transports read these
fields, never the JSON. It lives on the serving side (no torch); `export/` imports it to build and check the
cards it writes, so a card export accepts is a card the service serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("service.card")

CARD_FILE = "model.json"
SCHEMA = 1
# Versions are plain positive integers: `07` would be a second `7`, and Unicode digits such as `²` are not
# digits to `int()`.
VERSION_RE = re.compile("[1-9][0-9]*")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
OUTPUT_KINDS = ("logits", "probabilities")
LAYOUTS = ("NCHW", "NHWC")  # NHWC: graphs converted from TensorFlow/Keras
PRECISIONS = ("fp32", "fp16")
DEFAULT_CROP_PCT = 0.875  # torchvision's and timm's evaluation default: resize 256, crop 224
DEFAULT_INTERPOLATION = "bilinear"  # torchvision's Resize default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepositoryError(Exception):
    """A model repository or folder that cannot be served (missing, bad card, missing file, checksum)."""


class CardError(RepositoryError, ValueError):
    """A card that cannot be served or written: the message says which field and why."""


def is_version(text: str) -> bool:
    return bool(VERSION_RE.fullmatch(text))


def check_version(version: str | int) -> str:
    v = str(version)
    if not is_version(v):
        raise CardError(f"invalid version {v!r}: versions are positive integers (1, 2, ...; not 01)")
    return v


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise CardError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    return name


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform of a model: resize the shorter side to `resize`, center-crop `height` x
    `width`, scale to [0, 1] (inverted for light-on-dark digits), normalize by `mean` and `std`."""

    channels: int
    height: int
    width: int
    resize: int
    interpolation: str = DEFAULT_INTERPOLATION
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    invert: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise CardError(f"preprocessing: channels must be 1 or 3, not {self.channels}")
        if self.height < 1 or self.width < 1:
            raise CardError("preprocessing: input_size must be positive")
        if self.resize < 1:
            raise CardError(f"preprocessing: resize must be a positive size, not {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise CardError(
                f"preprocessing: unknown interpolation {self.interpolation!r}; "
                f"one of {', '.join(INTERPOLATIONS)}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise CardError(f"preprocessing: mean/std need {self.channels} values, one per channel")
        if any(s == 0 for s in self.std):
            raise CardError("preprocessing: std must not be 0")
        if not isinstance(self.invert, bool):
            raise CardError("preprocessing: invert must be true or false (JSON booleans, not strings)")

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def crop_pct(self) -> float:
        return round(self.height / self.resize, 4)

    @classmethod
    def from_dict(cls, pre: Any) -> Preprocessing:
        """The card's `preprocessing` object, checked. `resize` missing: `floor(height / crop_pct)`, with
        crop_pct 0.875 when the card gives neither."""
        if not isinstance(pre, dict):
            raise CardError("preprocessing must be an object")
        try:
            c, h, w = (int(v) for v in pre["input_size"])
            channels = int(pre.get("channels", c))
            crop_pct = float(pre.get("crop_pct", DEFAULT_CROP_PCT))
            if not 0 < crop_pct <= 1:
                raise CardError("preprocessing: crop_pct must be in (0, 1]")
            resize = pre.get("resize")
            resize = int(h / crop_pct) if resize is None else int(resize)
            interpolation = str(pre.get("interpolation", DEFAULT_INTERPOLATION)).lower()
            mean = tuple(float(v) for v in pre.get("mean", [0.0] * channels))
            std = tuple(float(v) for v in pre.get("std", [1.0] * channels))
        except CardError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"preprocessing: bad field ({type(e).__name__}: {e})") from None
        if channels != c:
            raise CardError(
                f"preprocessing: channels must be 1 or 3 and match input_size ({channels} vs {c})"
            )
        return cls(channels, h, w, resize, interpolation, mean, std, pre.get("invert", False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "invert": self.invert,
        }


PREPROCESS_MODES = ("fast", "exact")


@dataclass(frozen=True)
class PreprocessingAgreement:
    """How often a preprocessing mode gives the model's own answer: the share of `inputs` photos whose top-1
    class (`top1`) and top-5 set (`top5`, mean overlap) equal those under the `reference` transform.
    Measured by `bench/bench_fidelity.py` for the mode the service serves by default, so clients can see
    how far its answers may stray from a notebook's."""

    mode: str
    top1: float
    top5: float
    inputs: int
    reference: str = "torchvision evaluation transform"
    measured: str = ""  # date (YYYY-MM-DD)

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise CardError(
                f"preprocessing_agreement: mode must be one of {PREPROCESS_MODES}, not {self.mode!r}"
            )
        if not (0.0 <= self.top1 <= 1.0 and 0.0 <= self.top5 <= 1.0):
            raise CardError("preprocessing_agreement: top1 and top5 are fractions in [0, 1]")
        if self.inputs < 1:
            raise CardError("preprocessing_agreement: inputs must be a positive count")

    @classmethod
    def from_dict(cls, data: Any) -> PreprocessingAgreement:
        if not isinstance(data, dict):
            raise CardError("preprocessing_agreement must be an object")
        try:
            return cls(
                str(data["mode"]),
                float(data["top1"]),
                float(data["top5"]),
                int(data["inputs"]),
                str(data.get("reference", "torchvision evaluation transform")),
                str(data.get("measured", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"preprocessing_agreement: bad field ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Label:
    index: int
    id: str
    name: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "name": self.name}


def label_for(labels: tuple[Label, ...], index: int) -> Label:
    """The class's label; a class the card names no label for is its index (ids and names alike)."""
    return labels[index] if 0 <= index < len(labels) else Label(index, str(index), str(index))


@dataclass(frozen=True)
class TensorSpec:
    """The graph's input or output: name, shape (-1 for a dynamic batch, 1 for a graph fixed to one image),
    and what it holds. An input's `layout` says where the channels are (the service prepares NCHW and
    transposes for an NHWC graph); an output's `kind` says whether a softmax is still to apply, and its
    `label_offset` how many leading columns are no label (1: TensorFlow-slim's background class at 0),
    dropped before the probabilities. An output shaped [N, C, 1, 1] is read as [N, C]."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = ""  # input only: NCHW | NHWC
    kind: str = ""  # output only: logits | probabilities
    label_offset: int = 0  # output only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.kind:
            out["kind"] = self.kind
            if self.label_offset:
                out["label_offset"] = self.label_offset
        else:
            out.update({"dtype": self.dtype, "layout": self.layout or "NCHW"})
        return out

    @property
    def columns(self) -> int:
        """An output's values per image (the product of its non-batch dimensions); 0 when one is dynamic."""
        n = 1
        for d in self.shape[1:]:
            if d < 1:
                return 0
            n *= d
        return n if len(self.shape) > 1 else 0


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int = 0
    precision: str = "fp32"
    provider: str = "any"
    optimization: str = "basic"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Keys the typed fields cover; the card's other keys (tools, validation, weights, ...) are kept as they are.
_TYPED = (
    "schema",
    "name",
    "version",
    "architecture",
    "source",
    "trained",
    "description",
    "input",
    "output",
    "preprocessing",
    "preprocessing_agreement",
    "labels",
    "files",
)


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing
    files: dict[str, FileEntry]
    labels: tuple[Label, ...] = ()
    architecture: str = ""  # registry name, or "imported"
    source: str = ""  # where the graph came from (timm:..., torchvision:..., onnx:<file>)
    trained: bool = False  # False: random weights, for benchmarks only
    description: str = ""
    # the default preprocessing mode's measured agreement with the reference transform, where measured
    preprocessing_agreement: PreprocessingAgreement | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # opset, tools, weights, validation, ...
    path: Path | None = field(default=None, compare=False)  # the folder it was read from

    # -- reading ----
    @classmethod
    def from_dict(cls, data: Any, *, name: str | None = None, version: str | None = None) -> ModelCard:
        """Check a card's JSON object; `name` and `version` (the folder's) win over the card's own."""
        if not isinstance(data, dict):
            raise CardError(f"{CARD_FILE} is not an object")
        for key in ("input", "output", "preprocessing", "files"):
            if key not in data:
                raise CardError(f"{CARD_FILE} lacks {key!r}")
        try:
            inp, out = data["input"], data["output"]
            input_spec = TensorSpec(
                str(inp.get("name", "input")),
                tuple(int(d) for d in inp.get("shape", ())),
                str(inp.get("dtype", "float32")),
                str(inp.get("layout", "NCHW")),
            )
            output_spec = TensorSpec(
                str(out.get("name", "output")),
                tuple(int(d) for d in out.get("shape", ())),
                kind=str(out.get("kind", "logits")),
                label_offset=int(out.get("label_offset", 0)),
            )
            files = {
                str(f): FileEntry(
                    sha256=str(m.get("sha256", "")).lower(),
                    bytes=int(m.get("bytes") or 0),
                    precision=str(m.get("precision", "fp32")),
                    provider=str(m.get("provider", "any")),
                    optimization=str(m.get("optimization", "basic")),
                )
                for f, m in (data["files"] or {}).items()
            }
            labels = tuple(
                Label(int(e.get("index", i)), str(e.get("id", i)), str(e.get("name", e.get("label", i))))
                for i, e in enumerate(data.get("labels") or ())
            )
        except (AttributeError, TypeError, ValueError) as e:
            raise CardError(f"{CARD_FILE} has a malformed field ({type(e).__name__}: {e})") from None
        if output_spec.kind not in OUTPUT_KINDS:
            raise CardError(f"output kind must be one of {OUTPUT_KINDS}, not {output_spec.kind!r}")
        if input_spec.layout not in LAYOUTS:
            raise CardError(f"input layout must be one of {LAYOUTS}, not {input_spec.layout!r}")
        if len(input_spec.shape) != 4:
            raise CardError(f"input shape must be [N, C, H, W] or [N, H, W, C], not {list(input_spec.shape)}")
        if input_spec.shape[0] == 0 or input_spec.shape[0] < -1:
            raise CardError(f"input batch must be -1 (dynamic) or a fixed size, not {input_spec.shape[0]}")
        if len(output_spec.shape) == 4 and any(d not in (-1, 1) for d in output_spec.shape[2:]):
            raise CardError(
                f"output shape must be [N, classes] or [N, classes, 1, 1], not {list(output_spec.shape)}"
            )
        if output_spec.label_offset < 0:
            raise CardError(f"output label_offset must be 0 or more, not {output_spec.label_offset}")
        for f, entry in files.items():
            if entry.precision not in PRECISIONS:
                raise CardError(f"{f}: precision must be one of {PRECISIONS}, not {entry.precision!r}")
        return cls(
            name=str(name if name is not None else data.get("name", "")),
            version=str(version if version is not None else data.get("version", "")),
            input=input_spec,
            output=output_spec,
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            files=files,
            labels=labels,
            architecture=str(data.get("architecture", "")),
            source=str(data.get("source", "")),
            trained=bool(data.get("trained", False)),
            description=str(data.get("description", "")),
            preprocessing_agreement=(
                None
                if data.get("preprocessing_agreement") is None
                else PreprocessingAgreement.from_dict(data["preprocessing_agreement"])
            ),
            extra={k: v for k, v in data.items() if k not in _TYPED},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to `model.json` (and, without paths, shown to clients)."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "source": self.source,
            "trained": self.trained,
            "description": self.description,
        }
        out.update({k: v for k, v in self.extra.items() if k not in ("created",)})
        out.update(
            {
                "input": self.input.to_dict(),
                "output": self.output.to_dict(),
                "preprocessing": self.preprocessing.to_dict(),
                "preprocessing_agreement": (
                    self.preprocessing_agreement.to_dict() if self.preprocessing_agreement else None
                ),
                "labels": [label.to_dict() for label in self.labels],
                "files": {f: e.to_dict() for f, e in self.files.items()},
            }
        )
        if "created" in self.extra:
            out["created"] = self.extra["created"]
        return out

    # -- what serving asks of it ----
    @property
    def num_classes(self) -> int:
        """Classes answered: the labels, or the output's columns less the leading ones that are no label."""
        if self.labels:
            return len(self.labels)
        return max(0, self.output.columns - self.output.label_offset)

    @property
    def fixed_batch(self) -> int | None:
        """1 for a graph that takes one image per run (older exports), None for a dynamic batch."""
        return self.input.shape[0] if self.input.shape[0] > 0 else None

    @property
    def layout(self) -> str:
        return self.input.layout or "NCHW"

    @property
    def output_kind(self) -> str:
        return self.output.kind

    @property
    def input_name(self) -> str:
        return self.input.name

    def file(self, precision: str) -> Path | None:
        """The graph file of that precision (`fp32` or `fp16`) named in the card, or None."""
        fname = next((f for f, e in self.files.items() if e.precision == precision), None)
        return None if fname is None else (self.path or Path()) / fname

    def read_verified(self, fname: str) -> bytes:
        """One file's bytes, checked against the card's size and sha256. The bytes checked are the bytes
        returned (ONNX Runtime is handed them, not the path): a file swapped after the check is never run."""
        entry = self.files.get(fname)
        if entry is None:
            raise CardError(f"{fname} is not listed in {CARD_FILE}")
        if self.path is None:
            raise CardError(f"{fname}: the card was not read from a folder")
        p = self.path / fname
        if not p.is_file():
            raise CardError(f"{fname} is missing")
        if not entry.sha256:
            raise CardError(f"{fname} has no sha256 in {CARD_FILE}")
        size = p.stat().st_size
        if entry.bytes and size != entry.bytes:
            raise CardError(f"{fname} is {size} bytes, the card says {entry.bytes}")
        data = p.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            raise CardError(f"{fname} sha256 mismatch: card {entry.sha256[:12]}..., file {actual[:12]}...")
        return data

    def metadata(self) -> dict[str, Any]:
        """The card's content that clients may see (no paths)."""
        return self.to_dict()


def write_card(folder: str | Path, card: ModelCard) -> Path:
    """Write `folder/model.json` atomically (a reader sees the old card or the new one, never half)."""
    path = Path(folder) / CARD_FILE
    tmp = path.with_name(CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_card(folder: str | Path) -> ModelCard:
    """Parse and check `folder/model.json`; the folder names give name and version. The card must agree on
    the name; on the version the folder wins (copying folder 1 to 2 is how repositories grow)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / CARD_FILE).read_text())
    except FileNotFoundError:
        raise CardError(f"{CARD_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CardError(f"{CARD_FILE} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise CardError(f"{CARD_FILE} is not an object")
    name, version = folder.parent.name, folder.name
    if str(data.get("name", name)) != name:
        raise CardError(f"card name {data.get('name')!r} differs from folder {name!r}")
    if str(data.get("version", version)) != version:
        log.warning(
            "%s/%s: the card says version %r; the folder's %r is served",
            name,
            version,
            data.get("version"),
            version,
        )
    return replace(ModelCard.from_dict(data, name=name, version=version), path=folder)
