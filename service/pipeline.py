"""One path from bytes to answer, shared by every caller: the inference core (HTTP, gRPC, the Open Inference
Protocol) and batch scoring run the same two steps around their ONNX Runtime session.

- `Pipeline.prepare`: bytes -> an upright image decoded within the limits (`service.decoding`) -> the views
  of the test-time augmentation mode (`service.augmentation`) rendered per the card (`service.preprocessing`).
- `Pipeline.finish`: network outputs -> probabilities (a background column dropped, softmax unless the graph
  gives them) averaged over each image's views -> the k best classes (`service.postprocessing`).

A `Pipeline` is built from a card and the settings, is immutable and picklable: batch scoring hands it to its
decoding processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np

from service import augmentation, decoding, postprocessing
from service.card import Label, ModelCard, Preprocessing
from service.errors import InvalidArgument
from service.postprocessing import ClassScore
from service.preprocessing import PartMissed, Preprocessor


@dataclass(frozen=True)
class Answer:
    """One image's result: the averaged probability vector and its k best classes."""

    probabilities: np.ndarray = field(repr=False)
    top_k: list[ClassScore]


@dataclass(frozen=True)
class Pipeline:
    preprocessing: Preprocessing
    limits: decoding.Limits
    mode: str = "exact"  # Settings.preprocess_mode
    output_kind: str = "logits"
    labels: tuple[Label, ...] = field(default=(), repr=False)
    num_classes: int = 0
    label_offset: int = 0  # leading output columns that are no label (a background class)

    @classmethod
    def for_card(cls, card: ModelCard, limits: decoding.Limits, mode: str) -> Pipeline:
        pipeline = cls(
            card.preprocessing,
            limits,
            mode,
            card.output_kind,
            card.labels,
            card.num_classes,
            card.output.label_offset,
        )
        pipeline.preprocessor  # noqa: B018 - a bad mode fails here, when the model loads
        return pipeline

    @cached_property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocessing, self.mode)

    def prepare(
        self, data: bytes, tta: str = "none", reserve: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(views, C, H, W) float32 for one image. `reserve` is called with the decode's estimated peak
        before any pixel is decoded (the core's decode memory budget)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("each image must be bytes")
        data = bytes(data)
        try:
            return self._prepare(data, tta, reserve, part=True)
        except PartMissed:  # not expected: the part asked for is what rendering reads
            return self._prepare(data, tta, reserve=None, part=False)

    def _prepare(
        self, data: bytes, tta: str, reserve: Callable[[int], None] | None, part: bool
    ) -> np.ndarray:
        spec, preprocessor = self.preprocessing, self.preprocessor
        # the views, planned once on the upright size: for the decoder's part, then for rendering
        views = cache(lambda size: augmentation.plan_views(spec, tta, size))
        img = decoding.decode(
            data,
            channels=spec.channels,
            limits=self.limits,
            min_short_side=augmentation.max_short_side(spec, tta),
            draft=preprocessor.decode_draft,
            draft_margin=preprocessor.draft_margin,
            reserve=reserve,
            # only the pixels the views read, where the decoder can (exact mode's JPEGs)
            part=(lambda size: preprocessor.reads(views(size), size)) if part else None,
        )
        try:
            return preprocessor(img, views(decoding.source_geometry(img)[0]))
        finally:
            img.close()  # give the pixels back now, not when the collector gets to them

    def finish(self, outputs: np.ndarray, counts: Sequence[int], k: int) -> list[Answer]:
        """Answers for images whose views are `counts` consecutive rows of `outputs` each."""
        probabilities = postprocessing.to_probabilities(outputs, self.output_kind, self.label_offset)
        return [
            Answer(p, postprocessing.top_k(p, k, self.labels))
            for p in postprocessing.average_views(probabilities, counts)
        ]

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Per-row probabilities of an already-preprocessed tensor's outputs (no views to average)."""
        return postprocessing.to_probabilities(outputs, self.output_kind, self.label_offset)
