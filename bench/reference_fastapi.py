"""The service a user would otherwise write: FastAPI + PyTorch eager, one image per request.

Same weights and the same preprocessing numbers as the ONNX model card (torchvision's transform), run the way
the usual tutorial does it: `torch.set_num_threads(2)`, `torch.inference_mode()`, a sync FastAPI endpoint (run
in FastAPI's thread pool), no batching. `bench/bench_serving.py` measures it in the same run as this service.

    python bench/reference_fastapi.py --card models/efficientnet_lite0/1/model.json --weights W --port 8099
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import registry  # noqa: E402
from export.weights import build_with_weights  # noqa: E402

INTERPOLATION = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "lanczos": transforms.InterpolationMode.LANCZOS,
}


def build_app(card_path: Path, weights: Path | None) -> FastAPI:
    card = json.loads(card_path.read_text())
    pre = card["preprocessing"]
    torch.set_num_threads(2)
    model, _ = build_with_weights(registry.get(card["architecture"]), weights)
    model.eval()
    labels = [entry["name"] for entry in card["labels"]]
    transform = transforms.Compose(
        [
            transforms.Resize(pre["resize"], interpolation=INTERPOLATION[pre["interpolation"]]),
            transforms.CenterCrop(pre["input_size"][1:]),
            transforms.ToTensor(),
            transforms.Normalize(pre["mean"], pre["std"]),
        ]
    )
    mode = "L" if pre.get("channels", 3) == 1 else "RGB"
    app = FastAPI()

    def predict(data: bytes) -> dict:
        try:
            image = Image.open(io.BytesIO(data)).convert(mode)
        except Exception as exc:
            raise HTTPException(400, f"not an image: {exc}") from None
        with torch.inference_mode():
            probs = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
            top = torch.topk(probs, 5)
        return {
            "model": card["name"],
            "predictions": [
                {"index": int(i), "label": labels[int(i)], "probability": float(p)}
                for p, i in zip(top.values, top.indices, strict=True)
            ],
        }

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        # The body is read on the event loop; PyTorch runs in FastAPI's thread pool, one image per call.
        return await run_in_threadpool(predict, await request.body())

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, required=True, help="the ONNX model's model.json")
    parser.add_argument("--weights", type=Path, default=None, help="the same state dict the export used")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    uvicorn.run(build_app(args.card, args.weights), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
