"""Drive the model repository extension with NVIDIA's Triton client (`tritonclient`), over HTTP and gRPC.

Run by `tests/test_live_models.py` with the interpreter of build/tritonclient (its own virtualenv; see
tests/clients/triton_oip.py). It calls index, load, unload and ready, with and without the admin token, and
records what came back as JSON on stdout; the test judges it.

    python tests/clients/triton_repository.py --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 \
        --model tiny --admin-token secret
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def run(client_module: Any, url: str, model: str, token: str, inference_token: str) -> dict[str, Any]:
    """The same calls through one transport; each recorded under its own key, errors included."""
    client = client_module.InferenceServerClient(url=url)
    grpc = client_module is grpcclient
    rec: dict[str, Any] = {}
    inference = {"authorization": f"Bearer {inference_token}"} if inference_token else {}
    admin = {"authorization": f"Bearer {token}"}
    wrong = {"authorization": "Bearer not-the-admin-token"}  # gRPC metadata keys are lower case

    def call(key: str, fn: Any) -> None:
        try:
            value = fn()
            rec[key] = True if value is None else value
        except InferenceServerException as exc:
            rec[key] = {"error": exc.message(), "status": str(exc.status())}

    def index(**kw: Any) -> list[dict[str, str]]:
        if grpc:
            rows = client.get_model_repository_index(headers=inference, as_json=True, **kw).get("models", [])
            return [{k: r.get(k, "") for k in ("name", "version", "state", "reason")} for r in rows]
        return client.get_model_repository_index(headers=inference, **kw)

    def ready(version: str = "") -> Any:
        return client.is_model_ready(model, version, headers=inference)

    call("index_before", index)
    call("ready_before", ready)
    call("load_no_token", lambda: client.load_model(model))
    call("load_wrong_token", lambda: client.load_model(model, headers=wrong))
    call("load_inference_token", lambda: client.load_model(model, headers=inference))
    call("load", lambda: client.load_model(model, headers=admin))
    call("ready_after_load", ready)
    call("ready_v1_after_load", lambda: ready("1"))
    call("index_after_load", index)
    call("load_unknown", lambda: client.load_model("no_such_model", headers=admin))
    call("unload_unknown", lambda: client.unload_model("no_such_model", headers=admin))
    call("load_dotdot", lambda: client.load_model("..", headers=admin))
    call("load_long", lambda: client.load_model("x" * 300, headers=admin))
    call("unload_wrong_token", lambda: client.unload_model(model, headers=wrong))
    call("ready_after_refused_unload", ready)
    call("unload", lambda: client.unload_model(model, headers=admin))
    call("ready_after_unload", ready)
    call("index_after_unload", index)
    call("load_again", lambda: client.load_model(model, headers=admin))
    call("ready_after_load_again", ready)
    call("unload_end", lambda: client.unload_model(model, headers=admin))
    client.close()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--admin-token", default="")
    ap.add_argument("--inference-token", default="")
    args = ap.parse_args()
    report = {
        "http": run(httpclient, args.http, args.model, args.admin_token, args.inference_token),
        "grpc": run(grpcclient, args.grpc, args.model, args.admin_token, args.inference_token),
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
