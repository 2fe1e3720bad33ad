"""Hostile-client soak: normal clients' latency and failures with and without abuse, in one run.

Starts the service (default settings, one model), then runs normal clients (persistent HTTP connections,
`POST /classify` of a photo) for half of `--duration` alone and for the other half beside the abusers, and
prints, side by side:
- normal clients' p50/p99 without and with abuse (and their ratio), and their failed requests (goal 0);
- the RSS of the server's worker processes (the worker and its children, decoding and parsing): baseline
  before the abuse, peak during it, final once it stopped and the connections' timeouts have passed;
- the event loop's lag (the service's `cnn_serve_event_loop_lag_*` metrics; goal < 50 ms), and its late
  samples by cause: the garbage collector (`gc`), the loop's thread waiting for a core (`core_wait`),
  running its own callbacks (`callbacks`) or blocked on the interpreter lock another thread held (`lock`),
  beside the share of the time the loop waited for a core, the worker's full garbage collections, the host's
  stolen CPU time, and the cores the server and the clients used;
- the server-side latency of its 503 answers (from its access log) and the connections refused at accept;
- what each kind of abuse received, how many connections were still open after the abuse stopped, and how
  long the abusers took to stop (a stall of the server or of the script shows there).

Abuse (`--abuse`, comma-separated; default all): `json_bomb` (one image and millions of `{}` under an unknown
key, 12 MB), `big_json` (a valid 12 MB JSON FP32 tensor), `disconnect` (chunked upload, client gone after 0.5
s), `short_body` (Content-Length larger than what is sent), `slowloris` (50 connections, a header byte a
second), `idle` (500 connections that send nothing), `flood` (connections past `max_connections` every 10 s),
`tta_batch` (batches of 64 images with ten-crop test-time augmentation). Not in the default set, so that soaks
compare with the ones before it: `big_form` (multipart batches of 48 photos, 27 MB, refused for their views
once the form is read: what reading and splitting a large form costs the loop), `grpc_fields` (gRPC
`ModelInfer` messages of 300,000 `parameters` entries, 4 MB, refused before they are parsed: parsed on the
event loop, each would hold it; `bench_messages.py` says for how long), `grpc_idle` (500 connections to the
gRPC port that never send the HTTP/2 preface) and `grpc_flood` (connections past `grpc_max_connections` every
10 s, with calls on new connections timed to their UNAVAILABLE), `grpc_held` (up to 2,000 `ModelInfer` calls
kept open on one connection that never send their message), `held_bodies` (100 connections each sending 30 MiB
of a 32 MiB body, then a byte every 5 s) and `grpc_held_messages` (100 `ModelInfer` calls on two raw HTTP/2
connections each sending all but the last byte of a 30 MiB message as fast as the server lets it): the request
bytes a worker holds while they arrive (`receive_memory_mb`).

The normal clients send from 127.0.0.2, the abusers from 127.0.0.1: two clients to the server, each with its
share of the receive budget (`client_share`), as an abuser and the clients it hurts would be.

The clients share the host's cores with the server, and the script prints the share each side used. Linux
divides the cores between autogroups first (one per `setsid`), so a thread's nice value counts only against
the threads of its own autogroup: `--client-niceness 10` runs the script in an autogroup of its own and
lowers it (`/proc/self/autogroup`) as well as its threads, to tell the lag the service causes itself from the
lag of a host whose cores its clients take. The clients it lowers also send less of what costs them CPU (a
12 MB body's copy through loopback is the sender's): `--rate KIND=PER_SECOND` caps a kind's requests, all its
clients together, so that two runs compare at the same volume (the script prints the rate each kind reached).

    python bench/bench_hostile.py [--duration 600] [--clients 4] [--model efficientnet_lite0]
        [--repository models] [--abuse json_bomb,...] [--work bench/out/hostile] [--warm 20]
        [--client-niceness 0] [--rate json_bomb=4 ...] [--server-args "--worker-niceness 0"]
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from skimage import data as photos

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ports import free_port  # noqa: E402 - ROOT first, when run as a script

KINDS = ("json_bomb", "big_json", "disconnect", "short_body", "slowloris", "idle", "flood", "tta_batch")
EXTRA_KINDS = (  # chosen by name only
    "big_form",
    "grpc_fields",
    "grpc_idle",
    "grpc_flood",
    "grpc_held",
    "held_bodies",
    "grpc_held_messages",
)
PACED = (
    "json_bomb",
    "big_json",
    "disconnect",
    "short_body",
    "tta_batch",
    "big_form",
    "grpc_fields",
)  # they loop on requests
# The normal clients' address: a client of their own, the abusers being 127.0.0.1 (`client_share`).
NORMAL_CLIENT = "127.0.0.2"
SETTLE_S = 15.0  # after the abuse: longer than the default idle (5 s) and header (10 s) timeouts
WARM_S = 20.0  # before the first phase: longer than the lag gauge's window (10 to 20 s)


def jpeg(array: np.ndarray, size: int | None = None) -> bytes:
    image = Image.fromarray(array).convert("RGB")
    if size:
        image = image.resize((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Server:
    def __init__(self, repository: str, model: str, work: Path, extra: list[str]) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "PROMETHEUS_"))}
        env["BENTOML_HOME"] = str(work / "bentoml")
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"server-{self.port}.log"
        cmd = [
            sys.executable, "-m", "service", "serve", "--repository", repository, "--models", model,
            "--default-model", model, "--host", "127.0.0.1", "--http-port", str(self.port),
            "--grpc-port", str(self.grpc_port), *extra,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()  # its arbiter would go on restarting a worker that fails at start-up
                raise TimeoutError(f"server not ready:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def rss(self) -> int:
        total = 0
        for p in self.workers():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def rss_parts(self) -> dict[str, int]:
        """RSS by kind of process: the worker, its children (decoding, parsing), the rest (arbiter...)."""
        parts: collections.Counter[str] = collections.Counter()
        for p in self.workers():
            try:
                line = " ".join(p.cmdline())
                kind = (
                    "children"
                    if "spawn_main" in line
                    else "worker"
                    if "_bentoml_impl.worker" in line
                    else "other"
                )
                parts[kind] += p.memory_info().rss
            except psutil.Error:
                pass
        return dict(parts)

    def open_connections(self, port: int | None = None) -> int:
        """Established TCP connections on the HTTP port (or `port`), counted on the server's side."""
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{port or self.port} )"],
            capture_output=True,
            text=True,
        ).stdout
        return len([line for line in out.splitlines() if line.strip()])

    def cpu_seconds(self) -> float:
        """CPU time of the server's processes so far (the arbiter, the worker and its children)."""
        total = 0.0
        for pid in (self.proc.pid, *(p.pid for p in self.workers())):
            try:
                total += process_cpu_seconds(psutil.Process(pid))
            except psutil.Error:  # gone meanwhile
                pass
        return total

    def metrics(self) -> str:
        """The server's metrics; a scrape the server closes unanswered is tried twice more, so that one lost
        connection does not lose a whole run's report (the failures go to stderr)."""
        for _ in range(2):
            try:
                return httpx.get(self.url + "/metrics", timeout=30).text
            except httpx.TransportError as exc:
                print(f"scraping /metrics failed ({type(exc).__name__}: {exc}); again", file=sys.stderr)
                time.sleep(2)
        return httpx.get(self.url + "/metrics", timeout=30).text

    def access(self) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"ts"')]

    def stop(self) -> None:
        children = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


LAG_BOUNDS = ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0")


def lag_buckets(text: str) -> dict[str, float]:
    """The event loop lag histogram so far: samples at or under each bound, and "+Inf" (all of them)."""
    out = {b: sample(text, "cnn_serve_event_loop_lag_seconds_bucket", le=b) for b in LAG_BOUNDS}
    out["+Inf"] = sample(text, "cnn_serve_event_loop_lag_seconds_count")
    return out


def lag_figures(before: dict[str, float], after: dict[str, float]) -> tuple[int, int, int, str]:
    """Between two histograms: (samples, samples over 25 ms, over 50 ms, the bound the largest sample was
    under). Those over 25 ms are the finer figure: a run has only a few over 50 ms."""
    total = after["+Inf"] - before["+Inf"]
    over_25 = total - (after["0.025"] - before["0.025"])
    over = total - (after["0.05"] - before["0.05"])
    largest = next((b for b in LAG_BOUNDS if after[b] - before[b] == total), "+Inf")
    shown = f"{float(largest) * 1000:g} ms" if largest != "+Inf" else "more than 5 s"
    return int(total), int(over_25), int(over), shown


CAUSES = ("gc", "core_wait", "callbacks", "lock", "unknown")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far, all cores together: used by the server's processes, by this script (the normal
    clients and the abusers), by the whole host, and stolen by the hypervisor (it ran something else on the
    host's virtual CPUs)."""

    server: float
    script: float
    host: float
    stolen: float

    @classmethod
    def take(cls, server: Server) -> CpuSample:
        with open("/proc/stat") as f:  # user nice system idle iowait irq softirq steal, in ticks
            ticks = [int(x) for x in f.readline().split()[1:9]]
        ticks += [0] * (8 - len(ticks))
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(ticks) - ticks[3] - ticks[4] - ticks[7]
        return cls(server.cpu_seconds(), process_cpu_seconds(psutil.Process()), busy / tick, ticks[7] / tick)


def process_cpu_seconds(p: psutil.Process) -> float:
    """A process's CPU time, with that of its children it has waited for."""
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_use(before: CpuSample, after: CpuSample, seconds: float) -> str:
    """Cores used on average between two samples, by side, in words."""
    cores = os.cpu_count() or 1
    server, script = after.server - before.server, after.script - before.script
    rest = max(0.0, after.host - before.host - server - script)
    return (
        f"the server's processes {server / seconds:.2f} cores, this script's clients {script / seconds:.2f}, "
        f"the rest of the host {rest / seconds:.2f}, of {cores}"
    )


def lag_causes(before: str, after: str, seconds: float) -> str:
    """Between two metrics texts: late samples by cause (`service.looplag`) and the loop's wait for a core."""
    parts = []
    for over in ("0.025", "0.05"):
        counts = {
            c: sample(after, "cnn_serve_event_loop_late_samples_total", cause=c, over=over)
            - sample(before, "cnn_serve_event_loop_late_samples_total", cause=c, over=over)
            for c in CAUSES
        }
        shown = ", ".join(f"{c} {n:.0f}" for c, n in counts.items() if n or c != "unknown")
        parts.append(f"over {float(over) * 1000:g} ms: {shown}")
    name = "cnn_serve_event_loop_core_wait_seconds_total"
    waited = sample(after, name) - sample(before, name)
    full = {
        kind: sample(after, f"cnn_serve_gc_{kind}_total", generation="2")
        - sample(before, f"cnn_serve_gc_{kind}_total", generation="2")
        for kind in ("collections", "seconds")
    }
    return "; ".join(parts) + (
        f"; the loop's thread waited for a core {waited / seconds:.1%} of the time; full garbage collections "
        f"{full['collections']:.0f}, {full['seconds'] * 1000:.0f} ms in all"
    )


class Phase:
    """What the normal clients and the samplers saw during one phase."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.rss_peak = 0
        self.lag_max = 0.0

    def summary(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return f"{self.name}: no request answered"
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return f"{self.name}: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms ({len(lat)} requests)"


def reason(answer: httpx.Response) -> str:
    """An error answer's message, its numbers folded (`N`): refusals for one reason count as one."""
    try:
        message = str(answer.json().get("message", ""))
    except (ValueError, AttributeError):  # not JSON, or not the service's error object
        message = answer.text
    return re.sub(r"\d+(\.\d+)?", "N", message)[:120]


def normal_client(
    server: Server, photo: bytes, phase: Callable[[], Phase | None], stop: threading.Event
) -> None:
    transport = httpx.HTTPTransport(local_address=NORMAL_CLIENT)
    with httpx.Client(base_url=server.url, timeout=60, transport=transport) as client:
        while not stop.is_set():
            current = phase()
            start = time.perf_counter()
            try:
                r = client.post("/classify", content=photo, headers={"content-type": "image/jpeg"})
                status = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {reason(r)}"
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - start
            if current is not None:
                if status == "200":
                    current.latencies.append(elapsed)
                else:
                    current.failures[status] += 1


class Abuse:
    """The abusers: each kind a thread that loops until `stop`, counting what it received."""

    def __init__(
        self, server: Server, kinds: list[str], photo: bytes, rates: dict[str, float] | None = None
    ) -> None:
        self.server, self.kinds, self.photo = server, kinds, photo
        self.stop = threading.Event()
        self.received: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in kinds}
        self.sent: collections.Counter[str] = collections.Counter()
        self.threads: list[threading.Thread] = []
        self.host, self.port = "127.0.0.1", server.port
        self.rates = rates or {}
        self._slots = {kind: time.monotonic() for kind in self.rates}
        self._slot_lock = threading.Lock()
        self.started = self.seconds = 0.0  # when the abuse started, and for how long it ran
        self.stopping_s = 0.0  # how long its clients took to stop: a stalled server or script shows here

    def _turn(self, kind: str) -> bool:
        """Whether `kind` sends again: at once, or at its next slot of `--rate`; False once stopped."""
        rate = self.rates.get(kind)
        if rate:
            with self._slot_lock:
                slot = max(self._slots[kind], time.monotonic())
                self._slots[kind] = slot + 1.0 / rate
            self.stop.wait(max(0.0, slot - time.monotonic()))
        if self.stop.is_set():
            return False
        self.sent[kind] += 1
        return True

    def start(self) -> None:
        self.started = time.monotonic()
        for kind in self.kinds:
            workers = {"json_bomb": 2, "short_body": 4, "disconnect": 2}.get(kind, 1)
            for _ in range(workers):
                t = threading.Thread(target=getattr(self, kind), daemon=True)
                t.start()
                self.threads.append(t)

    def join(self) -> None:
        self.seconds = time.monotonic() - self.started
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.stopping_s = time.monotonic() - self.started - self.seconds

    def _connect(self, port: int | None = None) -> socket.socket:
        return socket.create_connection((self.host, port or self.port), timeout=30)

    def _post(self, kind: str, path: str, body: bytes, ctype: str = "application/json") -> None:
        try:
            r = httpx.post(self.server.url + path, content=body, headers={"content-type": ctype}, timeout=120)
            self.received[kind][str(r.status_code)] += 1
        except httpx.HTTPError as exc:
            self.received[kind][type(exc).__name__] += 1

    def json_bomb(self) -> None:
        image = base64.b64encode(self.photo).decode().encode()
        body = (
            b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":["'
            + image
            + b'"]}],"junk":['
            + b"{}," * 4_000_000
            + b"{}]}"
        )
        while self._turn("json_bomb"):
            self._post("json_bomb", "/v2/models/{model}/infer".replace("{model}", self.model), body)

    def big_json(self) -> None:
        data = np.random.default_rng(0).standard_normal(4 * 3 * 224 * 224).astype(np.float32).tolist()
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 3, 224, 224], "data": data}]}
        body = json.dumps(doc).encode()
        while self._turn("big_json"):
            self._post("big_json", f"/v2/models/{self.model}/infer", body)

    def tta_batch(self) -> None:
        small = jpeg(photos.coffee(), 256)
        self._batches("tta_batch", [("files", (f"{i}.jpg", small, "image/jpeg")) for i in range(64)])

    def big_form(self) -> None:
        noise = jpeg(np.random.default_rng(1).integers(0, 256, (800, 800, 3), dtype=np.uint8))  # 570 KB
        self._batches("big_form", [("files", (f"{i}.jpg", noise, "image/jpeg")) for i in range(48)])

    def grpc_fields(self) -> None:
        import grpc  # noqa: PLC0415 - only this kind speaks gRPC
        from bench_messages import map_entries  # noqa: PLC0415 - beside this script; imports the service

        body = map_entries(300_000, self.model)
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}", options=options) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=None,
                response_deserializer=None,
            )
            while self._turn("grpc_fields"):
                try:
                    infer(body, timeout=120)
                    self.received["grpc_fields"]["OK"] += 1
                except grpc.RpcError as exc:
                    self.received["grpc_fields"][exc.code().name] += 1

    def _batches(self, kind: str, files: list[tuple[str, tuple[str, bytes, str]]]) -> None:
        """`/classify_batch` of `files` with ten-crop augmentation, again and again."""
        while self._turn(kind):
            try:
                r = httpx.post(
                    self.server.url + "/classify_batch", files=files, params={"tta": "ten_crop"}, timeout=120
                )
                self.received[kind][str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                self.received[kind][type(exc).__name__] += 1

    def _status_of(self, sock: socket.socket, timeout: float) -> str:
        sock.settimeout(timeout)
        try:
            data = sock.recv(4096)
        except (TimeoutError, OSError):
            return "no answer"
        if not data:
            return "closed"
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "garbage"

    def disconnect(self) -> None:
        head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
        while self._turn("disconnect"):
            try:
                with self._connect() as sock:
                    half = self.photo[: len(self.photo) // 2]
                    sock.sendall(head.encode() + f"{len(half):x}\r\n".encode() + half + b"\r\n")
                    time.sleep(0.5)
                self.received["disconnect"]["sent"] += 1
            except OSError as exc:
                self.received["disconnect"][type(exc).__name__] += 1

    def short_body(self) -> None:
        while self._turn("short_body"):
            try:
                with self._connect() as sock:
                    head = (
                        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(self.photo) + 10_000}\r\n\r\n"
                    )
                    sock.sendall(head.encode() + self.photo)
                    start = time.monotonic()
                    status = self._status_of(sock, 60)
                    self.received["short_body"][status] += 1
                    self.received["short_body"][f"answered within {int(time.monotonic() - start) + 1} s"] += 1
            except OSError as exc:
                self.received["short_body"][type(exc).__name__] += 1

    def _held(
        self, kind: str, count: int, feed: Callable[[socket.socket, int], bool], port: int | None = None
    ) -> None:
        """`count` connections kept open (reopened when the server closes one); `feed` sends to each every
        second and says whether it is still open. On the gRPC port (`port`) what the server sends before it
        closes (its HTTP/2 settings, then GOAWAY) is read and passed over."""
        socks: list[socket.socket | None] = [None] * count
        sent: list[int] = [0] * count
        opened: list[float] = [0.0] * count
        while not self.stop.is_set():
            tick = time.monotonic()
            for i in range(count):
                if socks[i] is None:
                    try:
                        socks[i] = self._connect(port)
                        socks[i].setblocking(False)  # type: ignore[union-attr]
                        sent[i], opened[i] = 0, time.monotonic()
                        self.received[kind]["opened"] += 1
                    except OSError as exc:
                        self.received[kind][type(exc).__name__] += 1
                        continue
                sock = socks[i]
                assert sock is not None
                try:
                    data = sock.recv(4096)
                    while data and port is not None:  # gRPC: the server's frames, until it closes
                        data = sock.recv(4096)
                    if data:  # an answer: the server's verdict, then it closes
                        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "?"
                        self.received[kind][status] += 1
                    else:
                        self.received[kind]["closed by the server"] += 1
                    lived = time.monotonic() - opened[i]
                    self.received[kind][f"lived {int(lived)}-{int(lived) + 1} s"] += 1
                    sock.close()
                    socks[i] = None
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    socks[i] = None
                    continue
                if not feed(sock, sent[i]):
                    sock.close()
                    socks[i] = None
                sent[i] += 1
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - tick)))
        for sock in socks:
            if sock is not None:
                sock.close()

    def slowloris(self) -> None:
        head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000

        def one_byte(sock: socket.socket, i: int) -> bool:
            try:
                sock.send(head[i : i + 1])
                return True
            except OSError:
                return False

        self._held("slowloris", 50, one_byte)

    def idle(self) -> None:
        self._held("idle", 500, lambda sock, i: True)

    def grpc_idle(self) -> None:
        """500 connections to the gRPC port that never send the HTTP/2 preface."""
        self._held("grpc_idle", 500, lambda sock, i: True, port=self.server.grpc_port)

    def grpc_held(self) -> None:
        """Up to 2,000 `ModelInfer` calls kept open on one connection, none of which sends its message, 100
        more every half second; each that ends is counted by its status and seconds, and another is opened."""
        import grpc  # noqa: PLC0415 - only the gRPC kinds speak gRPC

        never = threading.Event()

        def nothing() -> Iterator[bytes]:
            never.wait()
            yield from ()

        kind = "grpc_held"
        with grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}") as channel:
            infer = channel.stream_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=None,
                response_deserializer=None,
            )
            open_calls: dict[grpc.Future, float] = {}
            while not self.stop.is_set():
                # At most 100 more a tick: each call takes a thread of grpc's client until it ends, and
                # calls refused at once would be opened again by the thousand.
                for _ in range(min(100, 2000 - len(open_calls))):
                    open_calls[infer.future(nothing(), timeout=600)] = time.monotonic()
                for call in [c for c in open_calls if c.done()]:
                    lived = time.monotonic() - open_calls.pop(call)
                    err = call.exception()
                    self.received[kind][err.code().name if err is not None else "OK"] += 1
                    self.received[kind][f"lived {int(lived) // 10 * 10}-{int(lived) // 10 * 10 + 10} s"] += 1
                self.stop.wait(0.5)
            self.received[kind]["still open at the end"] += len(open_calls)
            never.set()
            for call in open_calls:
                call.cancel()

    def held_bodies(self) -> None:
        """100 connections, each sending 30 MiB of a 32 MiB body as fast as the server reads it, then a byte
        every 5 s (within `body_timeout_s`) until answered; answered ones are counted and opened again."""
        kind, count, declared, sent_at_most = "held_bodies", 100, 32 << 20, 30 << 20
        chunk = b"\0" * (1 << 16)
        socks: dict[int, tuple[socket.socket, list[int]]] = {}
        while not self.stop.is_set():
            for i in range(count):
                if i not in socks:
                    try:
                        sock = self._connect()
                        sock.sendall(
                            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                            + f"Content-Length: {declared}\r\n\r\n".encode()
                        )
                        sock.setblocking(False)
                        socks[i] = (sock, [0, 0])  # bytes sent, when the last trickled byte went
                    except OSError as exc:
                        self.received[kind][type(exc).__name__] += 1
                        continue
                sock, state = socks[i]
                try:
                    answer = sock.recv(4096)
                    answered = answer.startswith(b"HTTP/1.1 ")
                    status = answer.split(b" ", 2)[1].decode() if answered else "closed"
                    self.received[kind][status] += 1
                    sock.close()
                    del socks[i]
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    self.received[kind][type(exc).__name__] += 1
                    sock.close()
                    del socks[i]
                    continue
                try:
                    if state[0] < sent_at_most:
                        state[0] += sock.send(chunk[: sent_at_most - state[0]])
                    elif time.monotonic() - state[1] > 5:
                        state[0] += sock.send(b"\0")
                        state[1] = int(time.monotonic())
                except BlockingIOError:
                    pass  # the server reads no more of it for now
                except OSError as exc:
                    self.received[kind][type(exc).__name__] += 1
                    sock.close()
                    del socks[i]
            self.stop.wait(0.01)
        for sock, _ in socks.values():
            sock.close()

    def grpc_held_messages(self) -> None:
        """Two raw HTTP/2 connections of 50 `ModelInfer` calls each, every call sending all but the last byte
        of a 30 MiB message as fast as the server's flow control lets it; a connection whose calls have all
        ended, or that the server closed, is opened again."""
        sys.path.insert(0, str(ROOT))
        from bench.raw_http2 import RawCalls  # noqa: PLC0415 - only this kind speaks raw HTTP/2

        kind = "grpc_held_messages"
        path = "/inference.GRPCInferenceService/ModelInfer"
        conns: list[RawCalls | None] = [None, None]
        while not self.stop.is_set():
            for i, conn in enumerate(conns):
                try:
                    if conn is None:
                        conns[i] = conn = RawCalls(self.host, self.server.grpc_port, path, 50, 30 << 20)
                        self.received[kind]["connections opened"] += 1
                    conn.run(0.05)
                    if len(conn.ended) == len(conn.window):
                        self.received[kind]["calls ended by the server"] += len(conn.ended)
                        conn.close()
                        conns[i] = None
                except OSError as exc:
                    self.received[kind][type(exc).__name__] += 1
                    if conn is not None:
                        self.received[kind]["calls ended by the server"] += len(conn.ended)
                        conn.close()
                    conns[i] = None
        for conn in conns:
            if conn is not None:
                conn.close()

    def grpc_flood(self) -> None:
        """`_flood` on the gRPC port; its probes are calls, each on a connection of its own, timed to their
        UNAVAILABLE (`grpc_refusal_seconds`)."""
        import grpc  # noqa: PLC0415 - only the gRPC kinds speak gRPC

        port = self.server.grpc_port
        options = [("grpc.use_local_subchannel_pool", 1)]  # channels of one target share connections else
        live = "/inference.GRPCInferenceService/ServerLive"

        def probe() -> None:
            start = time.perf_counter()
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                call = channel.unary_unary(live, request_serializer=None, response_deserializer=None)
                try:
                    call(b"", timeout=5)
                    self.received["grpc_flood"]["probe OK"] += 1
                except grpc.RpcError as exc:
                    self.received["grpc_flood"][f"probe {exc.code().name}"] += 1
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self.grpc_refusal_seconds.append(time.perf_counter() - start)

        def state(sock: socket.socket) -> str:
            """Closed, or (BlockingIOError) still open: what the server sent first (its settings) is read."""
            while sock.recv(4096):
                pass
            return "closed"

        self._flood("grpc_flood", port, probe, state)

    def flood(self) -> None:
        """`_flood` on the HTTP port (past the default max_connections of 1000); its probes are connections
        timed from connect to their 503 (`refusal_seconds`)."""

        def probe() -> None:
            start = time.perf_counter()
            try:
                with self._connect() as sock:
                    status = self._status_of(sock, 5)
            except OSError:
                status = "error"
            if status == "503":
                self.refusal_seconds.append(time.perf_counter() - start)

        def state(sock: socket.socket) -> str:
            data = sock.recv(4096)
            return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"

        self._flood("flood", None, probe, state)

    def _flood(
        self,
        kind: str,
        port: int | None,
        probe: Callable[[], None],
        state: Callable[[socket.socket], str],
    ) -> None:
        """Every 10 s, 1100 connections at once (past a limit of 1000) for 2 s, `probe()` every 0.2 s
        meanwhile; then each connection counted by `state` (its answer, or "closed"), "accepted" if still
        open."""
        while not self.stop.is_set():
            socks = []
            for _ in range(1100):
                try:
                    socks.append(self._connect(port))
                except OSError as exc:
                    self.received[kind][type(exc).__name__] += 1
            for sock in socks:
                sock.setblocking(False)
            probe_end = time.monotonic() + 2
            while time.monotonic() < probe_end:
                probe()
                time.sleep(0.2)
            for sock in socks:
                try:
                    status = state(sock)
                except BlockingIOError:
                    status = "accepted"
                except OSError:
                    status = "reset"
                self.received[kind][status] += 1
                sock.close()
            self.stop.wait(8)

    model = ""
    refusal_seconds: list[float] = []
    grpc_refusal_seconds: list[float] = []


def run_phase(server: Server, phase: Phase, seconds: float, stop: threading.Event) -> None:
    """Sample RSS and the lag gauge every second while `phase` runs."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        phase.rss_peak = max(phase.rss_peak, server.rss())
        try:
            text = server.metrics()
            phase.lag_max = max(phase.lag_max, sample(text, "cnn_serve_event_loop_lag_max_seconds"))
        except httpx.HTTPError:
            pass
        time.sleep(1.0)


def rerun_in_own_autogroup() -> int:
    """This script again, in an autogroup of its own (`setsid`): lowering that autogroup then lowers this
    script's clients alone, not the shell it was started from and everything else in the shell's group."""
    child = subprocess.Popen([sys.executable, *sys.argv], start_new_session=True)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()


def lower_clients(niceness: int) -> str:
    """Run this script's threads (the clients, started after) below the server: the nice value of the calling
    thread, which the threads it starts inherit, and of this script's autogroup, which is what Linux weighs
    against the server's autogroup when it divides the cores. What was lowered, in words."""
    os.nice(niceness)
    lowered = f"clients at nice {os.nice(0)}"
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            enabled = f.read().strip() == "1"
        if enabled:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(niceness))
            with open("/proc/self/autogroup") as f:
                lowered += f", their {f.read().strip().lstrip('/')}"
    except OSError as e:
        lowered += f", their autogroup not lowered ({e.strerror})"
    return lowered


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds, both phases together")
    parser.add_argument("--clients", type=int, default=4, help="normal clients")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--repository", default=str(ROOT / "models"))
    parser.add_argument(
        "--abuse", default=",".join(KINDS), help=f"kinds of abuse: {', '.join(KINDS + EXTRA_KINDS)}"
    )
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "hostile"))
    parser.add_argument(
        "--warm",
        type=float,
        default=WARM_S,
        help="seconds before the first phase (past the lag gauge's window)",
    )
    parser.add_argument(
        "--client-niceness",
        type=int,
        default=0,
        help="Linux nice value of this script's clients and of their autogroup (the server keeps "
        "its own): above 0 tells the service's own lag from the lag of a host whose cores the clients share",
    )
    parser.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="KIND=PER_SECOND",
        help=f"most requests a second of one kind of abuse ({', '.join(PACED)}), all its clients together; "
        "the others send as fast as they are answered",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help='more flags for `python -m service serve` (one string, e.g. "--worker-niceness 0")',
    )
    args = parser.parse_args()
    kinds = [k.strip() for k in args.abuse.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS + EXTRA_KINDS)
    if unknown:
        parser.error(f"unknown abuse {sorted(unknown)}; choose from {', '.join(KINDS + EXTRA_KINDS)}")
    args.rates = {}
    for item in args.rate:
        kind, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if kind not in PACED or rate <= 0:
            parser.error(f"--rate {item!r}: KIND=PER_SECOND with KIND one of {', '.join(PACED)}, rate > 0")
        args.rates[kind] = rate
    if args.client_niceness > 0 and os.getsid(0) != os.getpid():
        try:
            os.setsid()
        except PermissionError:  # a process group's leader (started from a shell) cannot call setsid
            return rerun_in_own_autogroup()
    half = args.duration / 2
    photo = jpeg(photos.chelsea())
    server = Server(args.repository, args.model, Path(args.work), shlex.split(args.server_args))
    if args.client_niceness > 0:
        print(lower_clients(args.client_niceness), flush=True)
    try:
        return soak(server, args, kinds, half, photo)
    finally:
        server.stop()


def soak(server: Server, args: argparse.Namespace, kinds: list[str], half: float, photo: bytes) -> int:
    clean, abused = Phase("without abuse"), Phase("with abuse")
    current: list[Phase | None] = [None]
    stop = threading.Event()
    clients = [
        threading.Thread(target=normal_client, args=(server, photo, lambda: current[0], stop), daemon=True)
        for _ in range(args.clients)
    ]
    for t in clients:
        t.start()
    time.sleep(args.warm)  # connections open, the model warm, start-up out of the lag gauge's window
    baseline_rss = server.rss()
    text_start, cpu_start, t_start = server.metrics(), CpuSample.take(server), time.monotonic()
    current[0] = clean
    run_phase(server, clean, half, stop)
    text_clean, cpu_clean, t_clean = server.metrics(), CpuSample.take(server), time.monotonic()
    abuse = Abuse(server, kinds, photo, args.rates)
    abuse.model = args.model
    abuse.refusal_seconds, abuse.grpc_refusal_seconds = [], []
    current[0] = abused
    access_before = len(server.access())
    abuse.start()
    run_phase(server, abused, half, stop)
    current[0] = None
    abuse.join()
    text_abuse, cpu_abuse, t_abuse = server.metrics(), CpuSample.take(server), time.monotonic()
    stop.set()
    for t in clients:
        t.join(120)
    time.sleep(SETTLE_S)
    final_rss = server.rss()
    parts = server.rss_parts()
    still_open, grpc_still_open = server.open_connections(), server.open_connections(server.grpc_port)
    text = server.metrics()
    lines = server.access()[access_before:]
    unavailable = sorted(
        float(e["duration_ms"]) for e in lines if e.get("status") == 503 and e.get("duration_ms") is not None
    )

    mib = 1 << 20
    print(
        f"hostile soak: {args.model}, {half:.0f} s without abuse, then {half:.0f} s with {', '.join(kinds)}"
    )
    print(
        f"host: {os.cpu_count()} cores, shared with other work; {args.clients} normal clients, one JPEG each"
    )
    print("normal clients " + clean.summary())
    print("normal clients " + abused.summary())
    if clean.latencies and abused.latencies:
        c, a = sorted(clean.latencies), sorted(abused.latencies)
        p50 = statistics.median(a) / statistics.median(c)
        p99 = a[int(len(a) * 0.99) - 1 if len(a) > 1 else 0] / c[int(len(c) * 0.99) - 1 if len(c) > 1 else 0]
        print(f"normal clients with abuse / without: p50 {p50:.2f}x, p99 {p99:.2f}x")
    failed = sum(clean.failures.values()) + sum(abused.failures.values())
    print(
        f"normal requests failed: {failed} (goal 0); without abuse {dict(clean.failures)}, "
        f"with abuse {dict(abused.failures)}"
    )
    print(
        f"RSS of the server's worker processes: baseline {baseline_rss / mib:.0f} MiB, peak "
        f"{max(clean.rss_peak, abused.rss_peak) / mib:.0f} MiB (with abuse {abused.rss_peak / mib:.0f}), "
        f"final {final_rss / mib:.0f} MiB ({SETTLE_S:.0f} s after the abuse stopped: "
        + ", ".join(f"{k} {v / mib:.0f}" for k, v in sorted(parts.items()))
        + ")"
    )
    lag_start, lag_clean, lag_abuse = (lag_buckets(t) for t in (text_start, text_clean, text_abuse))
    n_clean, over25_clean, over_clean, under_clean = lag_figures(lag_start, lag_clean)
    n_abuse, over25_abuse, over_abuse, under_abuse = lag_figures(lag_clean, lag_abuse)
    print(
        f"event loop lag (goal < 50 ms): max {clean.lag_max * 1000:.0f} ms without abuse, "
        f"{abused.lag_max * 1000:.0f} ms with; samples over 50 ms: {over_clean} of {n_clean} without, "
        f"{over_abuse} of {n_abuse} with; over 25 ms: {over25_clean} without, {over25_abuse} with; "
        f"largest under {under_clean} without, {under_abuse} with"
    )
    cpus = os.cpu_count() or 1
    for name, (t0, t1), (c0, c1), (w0, w1) in (
        ("without abuse", (text_start, text_clean), (cpu_start, cpu_clean), (t_start, t_clean)),
        ("with abuse", (text_clean, text_abuse), (cpu_clean, cpu_abuse), (t_clean, t_abuse)),
    ):
        print(
            f"late lag samples by cause, {name}: {lag_causes(t0, t1, w1 - w0)}; "
            f"host CPU stolen by the hypervisor {(c1.stolen - c0.stolen) / (cpus * (w1 - w0)):.1%}"
        )
        print(f"CPU used, {name}: {cpu_use(c0, c1, w1 - w0)}")
    if unavailable:
        p50 = unavailable[len(unavailable) // 2]
        p99 = unavailable[min(len(unavailable) - 1, int(len(unavailable) * 0.99))]
        print(f"503 answered by routes: {len(unavailable)}, server-side p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    else:
        print("503 answered by routes: 0")
    refused = sample(text, "cnn_serve_http_connections_refused_total")
    timed = sorted(abuse.refusal_seconds)
    when = (
        f"; connect to 503, client-side, while full: p50 {timed[len(timed) // 2] * 1000:.1f} ms, max "
        f"{timed[-1] * 1000:.1f} ms ({len(timed)} probes)"
        if timed
        else ""
    )
    print(f"connections refused at accept (503, max_connections): {refused:.0f}{when}")
    print(
        "connections closed by timeouts: idle "
        f"{sample(text, 'cnn_serve_http_connections_timed_out_total', reason='idle'):.0f}, headers "
        f"{sample(text, 'cnn_serve_http_connections_timed_out_total', reason='headers'):.0f}"
    )
    statuses = collections.Counter(str(e.get("status")) for e in lines)
    print(f"access log statuses during the abuse: {dict(sorted(statuses.items()))}")
    for kind in kinds:
        got = dict(sorted(abuse.received[kind].items(), key=lambda kv: (-kv[1], kv[0])))
        pace = ""
        if kind in PACED:
            cap = f", capped at {abuse.rates[kind]:g}" if kind in abuse.rates else ""
            pace = f" ({abuse.sent[kind]} sent, {abuse.sent[kind] / abuse.seconds:.2f} a second{cap})"
        print(f"  {kind}{pace}: {got}")
    if abuse.grpc_refusal_seconds:
        timed = sorted(abuse.grpc_refusal_seconds)
        print(
            f"gRPC calls on a new connection while the port was full: UNAVAILABLE, client-side p50 "
            f"{timed[len(timed) // 2] * 1000:.1f} ms, max {timed[-1] * 1000:.1f} ms ({len(timed)} probes)"
        )
    print(
        f"connections still open {SETTLE_S:.0f} s after the abuse stopped: HTTP {still_open}, "
        f"gRPC {grpc_still_open}"
    )
    print(f"the abusers stopped {abuse.stopping_s:.1f} s after the abuse's end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
