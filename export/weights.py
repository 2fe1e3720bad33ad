"""Safe state-dict loading: `torch.load(weights_only=True)` or safetensors, then strict key and shape checks.

Nothing here ever unpickles an arbitrary object: a pickle holding anything but tensors and plain containers is
refused by `weights_only=True`, and anything that is not a flat mapping of names to tensors is refused here.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .registry import Arch

_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a .pth/.pt (weights_only) or .safetensors file; else a one-line ExportError."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"weights file {str(p)!r} does not exist or is not a file")
    if p.suffix not in _SUFFIXES:
        raise ExportError(f"weights file {p.name!r}: expected one of {', '.join(_SUFFIXES)}")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise ExportError(f"weights file {p.name!r} is corrupt or truncated (safetensors: {e})") from None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ExportError(_unpickling_message(p, str(e))) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExportError(f"weights file {p.name!r} is corrupt or truncated ({msg[:160]})") from None
    if not isinstance(state, dict) or not state:
        raise ExportError(
            f"weights file {p.name!r} is not a plain state dict (found {type(state).__name__}, "
            "expected a mapping of parameter names to tensors)"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(state.get(k), dict)]
        hint = f"; it nests a dict under {nested[0]!r}: save that dict alone" if nested else ""
        raise ExportError(
            f"weights file {p.name!r} is not a plain state dict: {len(bad)} entries are not tensors "
            f"({_short([str(k) for k in bad], 4)}){hint}"
        )
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module.".
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _unpickling_message(p: Path, err: str) -> str:
    """Tell a refused object (a whole module, an exploit) from bytes that are not a checkpoint at all."""
    with open(p, "rb") as f:
        head = f.read(4)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", err)
    if found:
        return (
            f"weights file {p.name!r} is not a plain state dict: it pickles {found.group(1)}, which "
            "weights_only loading refuses (save model.state_dict() instead)"
        )
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a raw pickle stream
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", err)
        why = detail.group(1).strip()[:120] if detail else "refused by weights_only loading"
        return f"weights file {p.name!r} is not a plain state dict ({why})"
    return f"weights file {p.name!r} is corrupt or truncated (not a torch.save zip or pickle)"


def load_into(model: nn.Module, state: dict[str, torch.Tensor], arch_name: str) -> None:
    """Strict loading with one readable line for every kind of mismatch (keys, shapes, class count)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if shapes:
            desc = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in shapes]
            parts.append(f"{len(shapes)} shape mismatches: {_short(desc, 3)}")
        classes = _class_count(state)
        if classes is not None and classes != _class_count(expected):
            parts.append(f"the weights have {classes} classes, {arch_name} has {_class_count(expected)}")
        raise ExportError(f"weights do not fit {arch_name}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other problems the checks above did not catch
        raise ExportError(f"weights do not fit {arch_name}: {str(e).splitlines()[0]}") from None


def _class_count(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last 2-D (or 1x1 conv) weight: the class count of an ImageNet-style classifier."""
    last = None
    for k, v in state.items():
        if k.endswith("weight") and v.dim() in (2, 4) and (v.dim() == 2 or v.shape[-1] == 1):
            last = int(v.shape[0])
    return last


def build_with_weights(arch: Arch, weights: str | Path | None) -> tuple[nn.Module, dict | None]:
    """Build `arch`, load `weights` strictly if given (aux heads built first, then dropped).

    Returns the eval-mode model and the card's `weights` entry (None for random init).
    """
    if weights is None:
        model = arch.build(with_aux=False)
        return model.eval(), None
    state = read_state_dict(weights)
    if arch.remap is not None:
        state = arch.remap(state)
    model = arch.build(with_aux=arch.has_aux)
    if arch.has_aux and not any(("aux" in k.lower()) for k in state):
        # A checkpoint saved after the aux heads were dropped: accept it against the aux-free model.
        model = arch.build(with_aux=False)
    load_into(model, state, arch.name)
    if arch.finalize is not None:
        model = arch.finalize(model)
    p = Path(weights)
    return model.eval(), {"file": p.name, "sha256": sha256_file(p)}
