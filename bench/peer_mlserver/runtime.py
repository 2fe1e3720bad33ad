"""The MLServer custom runtime `bench/bench_serving.py` measures as a peer: what a user would write for this
model following MLServer's custom runtime docs (an `MLModel` subclass with `load` and `predict`).

It runs in MLServer's own virtualenv (`make mlserver`: build/mlserver, pins in requirements/mlserver.txt),
never in the service's, so it imports nothing from `service/`: the model card's preprocessing is written out
here the way the card describes it. One request input, `image`, BYTES, each element an encoded image (base64
in the V2 JSON body); with adaptive batching on, MLServer hands `predict` several requests merged along that
first dimension. Each image is decoded by Pillow at full size, its shorter side resized with the card's filter
(torchvision's `Resize(int)` size rounding), center-cropped and normalized in NumPy; the batch goes through
one ONNX Runtime call on the same `model.onnx` the service serves, with ONNX Runtime's default session
options. Two outputs per image: `top_k_indices` (INT64) and `top_k_probabilities` (FP32), the softmax's top 5.

model-settings.json: `"implementation": "runtime.CardClassifier"` and `parameters.uri` the model's version
folder (model.onnx and model.json).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import Base64Codec, NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from PIL import Image, ImageOps

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
TOP_K = 5


class CardClassifier(MLModel):
    """An ONNX image classifier with its model card's preprocessing."""

    async def load(self) -> bool:
        folder = Path(await get_model_uri(self._settings))
        card = json.loads((folder / "model.json").read_text())
        pre = card["preprocessing"]
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.logits = card["output"].get("kind", "logits") == "logits"
        self.resize = int(pre["resize"])
        self.crop_h, self.crop_w = int(pre["input_size"][1]), int(pre["input_size"][2])
        self.filter = FILTERS[pre["interpolation"]]
        self.mode = "L" if pre.get("channels", 3) == 1 else "RGB"
        self.invert = bool(pre.get("invert", False))
        self.mean = np.asarray(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
        return True

    def preprocess(self, data: bytes) -> np.ndarray:
        """Bytes -> (C, H, W) float32: full-size decode, shorter side resized, center crop, normalize."""
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(self.mode)
        except Exception as exc:
            raise InferenceError(f"not an image: {exc}") from None
        w, h = image.size
        size = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
        image = image.resize(size, self.filter)
        left = int(round((size[0] - self.crop_w) / 2.0))
        top = int(round((size[1] - self.crop_h) / 2.0))
        arr = np.asarray(image, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = arr[top : top + self.crop_h, left : left + self.crop_w].transpose(2, 0, 1)
        x = arr.astype(np.float32) / np.float32(255.0)
        if self.invert:
            x = np.float32(1.0) - x
        return (x - self.mean) / self.std

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = Base64Codec.decode_input(payload.inputs[0])
        batch = np.stack([self.preprocess(data) for data in images])
        out = self.session.run(None, {self.input_name: batch})[0]
        if self.logits:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        top = np.argsort(-out, axis=1, kind="stable")[:, :TOP_K]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output("top_k_indices", top.astype(np.int64)),
                NumpyCodec.encode_output(
                    "top_k_probabilities", np.take_along_axis(out, top, axis=1).astype(np.float32)
                ),
            ],
        )
