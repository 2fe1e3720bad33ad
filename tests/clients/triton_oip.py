"""Talk to the service with NVIDIA's own Triton client (`tritonclient`), over HTTP and gRPC.

Run by `tests/test_oip_triton_client.py` with the interpreter of build/tritonclient (its own virtualenv:
tritonclient pins protobuf < 7, which the service's stubs outgrow). The script only calls the client and
records what came back, as JSON on stdout; the test judges it.

    python tests/clients/triton_oip.py --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 \
        --model efficientnet_lite0 --image cat.jpg --image coffee.png --tensor input.npy
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def _error(exc: InferenceServerException) -> dict[str, Any]:
    return {"error": exc.message(), "status": exc.status()}


def _outputs(result: Any, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            out[name] = None
        elif array.dtype == np.object_:
            out[name] = {
                "shape": list(array.shape),
                "data": [e.decode() if isinstance(e, bytes) else e for e in array.ravel()],
            }
        else:
            out[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "argmax": array.argmax(1).tolist(),
            }
    return out


def run(client_module: Any, url: str, model: str, images: list[bytes], tensor: np.ndarray) -> dict[str, Any]:
    """The same calls through one transport; each recorded under its own key, errors included."""
    client = client_module.InferenceServerClient(url=url)
    grpc = client_module is grpcclient
    rec: dict[str, Any] = {}

    def call(key: str, fn: Any) -> None:
        try:
            rec[key] = fn()
        except InferenceServerException as exc:
            rec[key] = _error(exc)

    def meta(value: Any) -> Any:
        return json.loads(json.dumps(value)) if not grpc else value

    kw = {"as_json": True} if grpc else {}
    call("live", client.is_server_live)
    call("ready", client.is_server_ready)
    call("model_ready", lambda: client.is_model_ready(model))
    call("model_ready_v1", lambda: client.is_model_ready(model, "1"))
    call("unknown_model_ready", lambda: client.is_model_ready("no_such_model"))
    call("server_metadata", lambda: meta(client.get_server_metadata(**kw)))
    call("model_metadata", lambda: meta(client.get_model_metadata(model, **kw)))
    call("unknown_model_metadata", lambda: meta(client.get_model_metadata("no_such_model", **kw)))

    def image_input(binary: bool = True) -> Any:
        inp = client_module.InferInput("image", [len(images)], "BYTES")
        if grpc:
            inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        elif binary:
            inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        else:  # JSON text cannot hold raw image bytes: the service takes base64 strings there
            encoded = [base64.b64encode(i).decode() for i in images]
            inp.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
        return inp

    def requested(name: str, binary: bool = True, class_count: int = 0) -> Any:
        if grpc:
            return client_module.InferRequestedOutput(name, class_count=class_count)
        return client_module.InferRequestedOutput(name, binary_data=binary, class_count=class_count)

    def infer(
        inputs: list[Any], outputs: list[Any] | None, names: list[str], model_name: str = model, **extra: Any
    ) -> dict[str, Any]:
        result = client.infer(model_name, inputs, outputs=outputs, **extra)
        response = result.get_response(as_json=True) if grpc else result.get_response()
        return {
            "model_name": response["model_name"],
            "model_version": response["model_version"],
            "id": response.get("id", ""),
            **_outputs(result, names),
        }

    names = ["probabilities", "top_k"]
    call(
        "images_binary",
        lambda: infer([image_input()], [requested(n) for n in names], names, request_id="r-1"),
    )
    if not grpc:
        call("images_json", lambda: infer([image_input(False)], [requested(n, False) for n in names], names))
    call("images_all_outputs", lambda: infer([image_input()], None, names))
    call(
        "images_top3_tta_flip",
        lambda: infer(
            [image_input()], [requested("top_k")], ["top_k"], parameters={"top_k": 3, "tta": "flip"}
        ),
    )
    if grpc:
        call("compressed_gzip", lambda: infer([image_input()], None, names, compression_algorithm="gzip"))
    else:
        for algorithm in ("gzip", "deflate"):
            call(
                f"compressed_{algorithm}",
                lambda a=algorithm: infer(
                    [image_input()],
                    None,
                    names,
                    request_compression_algorithm=a,
                    response_compression_algorithm=a,
                ),
            )
    call(
        "images_version_1",
        lambda: infer([image_input()], [requested("top_k")], ["top_k"], model_version="1"),
    )
    for binary in (True, False) if not grpc else (True,):
        call(
            f"classification_extension{'' if binary else '_json'}",
            lambda b=binary: infer(
                [image_input(b)], [requested("probabilities", b, class_count=3)], ["probabilities"]
            ),
        )
    call(
        "classification_of_top_k",
        lambda: infer([image_input()], [requested("top_k", class_count=3)], ["top_k"]),
    )
    call(
        "classification_over_class_count",
        lambda: infer([image_input()], [requested("probabilities", class_count=1001)], ["probabilities"]),
    )

    def tensor_call() -> dict[str, Any]:
        inp = client_module.InferInput(tensor_name, list(tensor.shape), "FP32")
        inp.set_data_from_numpy(tensor)
        return infer([inp], [requested("probabilities")], ["probabilities"])

    tensor_name = next(
        (i["name"] for i in rec.get("model_metadata", {}).get("inputs", []) if i["name"] != "image"), "input"
    )
    call("tensor", tensor_call)

    # Errors: each must come back as the client's exception, with the server's message.
    call("unknown_model", lambda: infer([image_input()], None, names, model_name="no_such_model"))
    call("bad_top_k", lambda: infer([image_input()], None, names, parameters={"top_k": 0}))
    call("unknown_tta", lambda: infer([image_input()], None, names, parameters={"tta": "sideways"}))

    def not_an_image() -> dict[str, Any]:
        inp = client_module.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"this is not an image"], dtype=np.object_))
        return infer([inp], None, names)

    call("not_an_image", not_an_image)
    call("ready_after_errors", lambda: client.is_model_ready(model))
    client.close()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--tensor", required=True, help=".npy file of a preprocessed float32 batch")
    args = ap.parse_args()
    images = [Path(p).read_bytes() for p in args.image]
    tensor = np.load(args.tensor, allow_pickle=False).astype(np.float32)
    report = {
        "http": run(httpclient, args.http, args.model, images, tensor),
        "grpc": run(grpcclient, args.grpc, args.model, images, tensor),
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
