"""Network outputs -> probabilities -> ranked top-k, like Keras' `decode_predictions`.

Ties are broken by class index (stable sort), so the same probabilities always give the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.card import Label, label_for
from service.errors import InvalidArgument, shown


@dataclass(frozen=True)
class ClassScore:
    index: int
    id: str
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "label": self.label, "probability": self.probability}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (max subtracted)."""
    x = np.asarray(x, dtype=np.float32)
    z = x - x.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def to_probabilities(outputs: np.ndarray, kind: str, label_offset: int = 0) -> np.ndarray:
    """Softmax unless the card says the graph already outputs probabilities. The `label_offset` leading
    columns (a background class) are dropped first, so the answer is a distribution over the labels: the
    softmax of the remaining logits, or the remaining probabilities renormalised (the same numbers)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if label_offset:
        outputs = outputs[:, label_offset:]
        if kind == "probabilities":
            return outputs / outputs.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    if kind == "probabilities":
        return outputs
    return softmax(outputs)


def average_views(probabilities: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Split a (sum(counts), classes) array per image and average each image's views."""
    out, start = [], 0
    for n in counts:
        if n == 1:  # the common case (no test-time augmentation): nothing to average
            out.append(probabilities[start])
        else:
            out.append(probabilities[start : start + n].mean(axis=0, dtype=np.float64).astype(np.float32))
        start += n
    return out


DEFAULT_TOP_K = 5  # Keras' decode_predictions default
# An integer in ASCII digits: int() alone also takes "٣" and "1_000", and raises on 5,000 digits
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,100}\s*")


def check_top_k(
    top_k: Any, classes: int, limit: int | None = None, *, what: str = "top_k", cap: bool = False
) -> int:
    """The k to answer, the one rule of every transport and of batch scoring. None (the caller did not ask)
    is 5, or every class of a model with fewer: a default must never be an error. A string of decimal digits
    (a query string, a form field, a string parameter) is that integer. `what` names the value in messages;
    `cap` answers a k above the bound with the bound instead of refusing it (Triton's classification
    extension does so for a class count above the model's)."""
    upper = min(classes, limit) if limit is not None else classes
    if top_k is None:
        return max(1, min(DEFAULT_TOP_K, upper))
    if isinstance(top_k, str):
        if not _INTEGER.fullmatch(top_k):
            raise InvalidArgument(f"{what} must be an integer, not {shown(top_k)}")
        top_k = int(top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise InvalidArgument(f"{what} must be an integer, not {shown(top_k)}")
    k = int(top_k)
    if cap and k > upper >= 1:
        return upper
    if not 1 <= k <= upper:
        raise InvalidArgument(f"{what} must be between 1 and {upper}, got {k}")
    return k


def top_k(probabilities: np.ndarray, k: int, labels: tuple[Label, ...]) -> list[ClassScore]:
    """The k most probable classes, best first; equal probabilities in ascending class index. A class the card
    has no label for is named by its index (`service.card.label_for`)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    result = []
    for i in order:
        label = label_for(labels, int(i))
        result.append(ClassScore(int(i), label.id, label.name, float(probabilities[i])))
    return result
