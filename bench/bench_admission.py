"""Hostile load against a real server (`python -m service serve`, efficientnet_lite0, CPU, loopback).

Prints three figures:

- fairness: a lone client's latency (p50, p99) alone, then while flood clients send 13-image multiscale
  batches (390 views each) back to back, in the same run; the target is p99 with the flood within 3x p99
  without it;
- overload: 200 clients of 4 images each, then 200 clients of one image with a 1 s deadline, each request
  written whole on its own connection, all at once: how many were answered 200/503/504, the server-side
  duration of the 503s (the access log's `duration_ms`, from the request's headers, its body's arrival
  included; target p99 under 20 ms) and the client-side p99 of the 200s;
- memory: the worker's resident size after warm-up, at the peak of a burst (multiscale batches and the
  200-client overload) and 5, 30 and 60 s after it, for allocator choices side by side (servers run at
  once, each with its own variables): glibc's defaults, MALLOC_ARENA_MAX=2, and each with and without the
  idle trim (`memory_trim_idle_s`).

    python bench/bench_admission.py [--part fairness,overload,memory] [--checkout PATH]

`--checkout` serves another checkout's code (its `service/` first on the path), to compare with this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from skimage import data as photos

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ports import free_port  # noqa: E402 - ROOT first, when run as a script


def jpeg(arr: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


class Service:
    """One server process with its own environment; its log is the access log the 503 durations come from."""

    def __init__(self, checkout: Path, env_extra: dict[str, str], work: Path, name: str) -> None:
        self.port, self.grpc = free_port(), free_port()
        self.log_path = work / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_SERVE_", "PROMETHEUS_"))}
        env.update(env_extra)
        env["PYTHONPATH"] = str(checkout)
        env["BENTOML_HOME"] = str(work / f"bentoml-{name}")
        cmd = [sys.executable, "-m", "service", "serve", "--repository", str(ROOT / "models")]
        cmd += ["--models", "efficientnet_lite0", "--host", "127.0.0.1"]
        cmd += ["--http-port", str(self.port), "--grpc-port", str(self.grpc)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log_path.read_text()[-3000:])

    def worker_rss_mb(self) -> float:
        """The resident size of the worker holding the model (the largest of the server's processes) and of
        its children: the processes that decode its images and parse large JSON bodies."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return float("nan")
        sizes = {}
        for p in procs:
            try:
                sizes[p.pid] = p.memory_info().rss
            except psutil.Error:
                pass
        if not sizes:
            return float("nan")
        worker = max(sizes, key=sizes.__getitem__)
        try:
            children = [c.pid for c in psutil.Process(worker).children(recursive=True)]
        except psutil.Error:
            children = []
        return (sizes[worker] + sum(sizes.get(c, 0) for c in children)) / 2**20

    def durations(self, status: int, since: int, probes: bool = False) -> list[float]:
        """Server-side durations (ms) of the access log lines with this status, from byte offset `since`."""
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            for line in f:
                if b'"type": "access"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("status") == status and rec.get("path", "").startswith("/classify"):
                    if str(rec.get("request_id", "")).startswith("probe-") == probes:
                        out.append(float(rec["duration_ms"]))
        return out

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        children = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass


def multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]


def lone_latencies(url: str, image: bytes, n: int, failed: dict[int, int] | None = None) -> list[float]:
    """Milliseconds of each of n requests sent one after the other (a failed one counts with its time)."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/classify", content=image, headers={"content-type": "image/jpeg"})
            out.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200 and failed is not None:
                failed[r.status_code] = failed.get(r.status_code, 0) + 1
    return out


def flood(url: str, images: list[bytes], stop: threading.Event, counts: dict) -> None:
    with httpx.Client(base_url=url, timeout=300) as c:
        while not stop.is_set():
            try:
                r = c.post("/classify_batch", params={"tta": "multiscale"}, files=multipart(images))
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                continue
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            if r.status_code == 503:  # a well-behaved client waits as told
                stop.wait(float(r.headers.get("retry-after", "1")))


def fairness(svc: Service, requests: int, flooders: int) -> None:
    lone = jpeg(photos.chelsea(), (320, 240))
    tiny = [jpeg(np.roll(photos.astronaut(), 9 * i, axis=1), (48, 48)) for i in range(13)]
    lone_latencies(svc.url, lone, 5)  # warm
    alone = lone_latencies(svc.url, lone, requests)
    stop, counts = threading.Event(), {}  # type: ignore[var-annotated]
    threads = [threading.Thread(target=flood, args=(svc.url, tiny, stop, counts)) for _ in range(flooders)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood is under way
    failed: dict[int, int] = {}
    flooded = lone_latencies(svc.url, lone, requests, failed)
    stop.set()
    for t in threads:
        t.join()
    p99a, p99f = pctl(alone, 99), pctl(flooded, 99)
    print(f"fairness: lone client, {requests} requests each, flood = {flooders} clients of 13x multiscale")
    print(f"  alone        p50 {pctl(alone, 50):8.1f} ms  p99 {p99a:8.1f} ms")
    print(f"  with flood   p50 {pctl(flooded, 50):8.1f} ms  p99 {p99f:8.1f} ms  (flood answers: {counts})")
    print(f"  p99 ratio    {p99f / p99a:.2f}x (target <= 3x); lone requests failed: {failed or 'none'}")


def multipart_body(images: list[bytes]) -> tuple[str, bytes]:
    """A multipart/form-data body of `files` parts, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


async def burst(url: str, clients: int, images: list[bytes], deadline_ms: int | None) -> dict:
    """`clients` connections opened first, then each request written whole at once on its own connection:
    a burst from many machines. (An HTTP client library in this process would take the cores the server
    needs and send each request in pieces, spread over the time it takes to run.)"""
    host, port = url.removeprefix("http://").split(":")
    if len(images) == 1:
        path, ctype, body = "/classify", "image/jpeg", images[0]
    else:
        path, (ctype, body) = "/classify_batch", multipart_body(images)
    extra = f"x-request-timeout-ms: {deadline_ms}\r\n" if deadline_ms else ""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body
    statuses: dict[int | str, int] = {}
    ok_ms: list[float] = []
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.perf_counter()
        status: int | str
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n")
            status = int(head.split(b" ", 2)[1])
            # the rest, to the close; a request refused from its headers leaves its body unread, and the
            # server's close then resets the connection
            with contextlib.suppress(OSError):
                await reader.read()
        except (OSError, asyncio.IncompleteReadError) as exc:  # no answer: counted as a client saw it
            status = type(exc).__name__
        finally:
            writer.close()
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            ok_ms.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(one(r, w) for r, w in connections))
    return {"statuses": statuses, "ok_p99": pctl(ok_ms, 99)}


def probe(url: str, n: int, stop: threading.Event) -> None:
    """Requests that promise a 4 MB body with a 1 s deadline and send none: over their headers alone, what
    the overloaded server answers (a server that read the body first would wait for it and time out). The
    first is sent once the burst is under way: one sent to an idle server is let in and waits for its body."""
    host, port = url.removeprefix("http://").split(":")
    if stop.wait(0.3):
        return
    for i in range(n):
        if stop.is_set():
            return
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                (
                    f"POST /classify_batch HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: 4000000\r\nx-request-timeout-ms: 1000\r\n"
                    f"x-request-id: probe-{i}\r\n\r\n"
                ).encode()
            )
            try:
                sock.recv(4096)
            except TimeoutError:
                pass
        time.sleep(0.05)


def overload(svc: Service, clients: int) -> None:
    four = [jpeg(np.roll(photos.coffee(), 11 * i, axis=1), (400, 300)) for i in range(4)]
    one = [jpeg(photos.chelsea(), (400, 300))]
    lone_latencies(svc.url, one[0], 5)
    cases = ((f"{clients} x 4 images", four, None), (f"{clients} x 1 image, 1 s deadline", one, 1000))
    for name, images, deadline in cases:
        mark = svc.log_size()
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(svc.url, 40, stop))
        prober.start()
        r = asyncio.run(burst(svc.url, clients, images, deadline))
        stop.set()
        prober.join()
        time.sleep(0.5)
        shed = svc.durations(503, mark)
        probes = svc.durations(503, mark, probes=True)
        print(f"overload: {name}: {r['statuses']}, client p99 of 200s {r['ok_p99']:.0f} ms")
        if shed:
            print(
                f"  503 server-side: p50 {pctl(shed, 50):.1f} ms  p99 {pctl(shed, 99):.1f} ms  "
                f"max {max(shed):.1f} ms (target p99 < 20 ms); over 20 ms: {sum(d > 20 for d in shed)} of "
                f"{len(shed)}"
            )
        if probes:
            print(
                f"  503 to header-only probes during the burst ({len(probes)}): "
                f"p50 {pctl(probes, 50):.1f} ms  "
                f"p99 {pctl(probes, 99):.1f} ms"
            )


VARIANTS = {
    # glibc's defaults or MALLOC_ARENA_MAX=2; the idle trim (gc + malloc_trim) off or after 1 s
    "default": {"CNN_SERVE_MEMORY_TRIM_IDLE_S": "0"},
    "default+trim": {"CNN_SERVE_MEMORY_TRIM_IDLE_S": "1"},
    "arena2": {"MALLOC_ARENA_MAX": "2", "CNN_SERVE_MEMORY_TRIM_IDLE_S": "0"},
    "arena2+trim": {"MALLOC_ARENA_MAX": "2", "CNN_SERVE_MEMORY_TRIM_IDLE_S": "1"},
}


def memory(checkout: Path, work: Path, clients: int, marks: tuple[int, ...], variants: list[str]) -> None:
    tiny = [jpeg(np.roll(photos.astronaut(), 9 * i, axis=1), (48, 48)) for i in range(13)]
    four = [jpeg(np.roll(photos.coffee(), 11 * i, axis=1), (400, 300)) for i in range(4)]
    lone = jpeg(photos.chelsea(), (320, 240))
    services = {name: Service(checkout, VARIANTS[name], work, f"mem{i}") for i, name in enumerate(variants)}
    try:
        for s in services.values():
            s.wait_ready()
        rows: dict[str, dict[str, float]] = {}
        for name, s in services.items():  # one burst at a time: each has the machine to itself
            lone_latencies(s.url, lone, 10)
            time.sleep(2)
            row = {"warm": s.worker_rss_mb(), "peak": 0.0}
            done = threading.Event()

            def sample(s: Service = s, row: dict = row, done: threading.Event = done) -> None:
                while not done.is_set():
                    row["peak"] = max(row["peak"], s.worker_rss_mb())
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            stop, counts = threading.Event(), {}
            floods = [threading.Thread(target=flood, args=(s.url, tiny, stop, counts)) for _ in range(3)]
            for t in floods:
                t.start()
            try:
                asyncio.run(burst(s.url, clients, four, None))
                time.sleep(3)
            finally:
                stop.set()
                for t in floods:
                    t.join()
                done.set()
                sampler.join()
            row["end"] = time.monotonic()
            rows[name] = row
        for m in marks:  # the servers idle together after their bursts
            for name, s in services.items():
                left = rows[name]["end"] + m - time.monotonic()
                if left > 0:
                    time.sleep(left)
                rows[name][f"+{m}s"] = s.worker_rss_mb()
        print(
            f"memory: worker and its children, RSS in MB (burst: 3 clients of 13x multiscale for ~3 s, "
            f"{clients} clients x 4 images)"
        )
        keys = ("warm", "peak", *(f"+{m}s" for m in marks))
        head = " ".join(f"{k:>7s}" for k in keys)
        print(f"  {'variant':32s} {head} {'last-warm':>9s}")
        for name, r in rows.items():
            cells = " ".join(f"{r[k]:7.0f}" for k in keys)
            print(f"  {name:32s} {cells} {r[keys[-1]] - r['warm']:9.0f}")
    finally:
        for s in services.values():
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="fairness,overload,memory")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose service runs")
    ap.add_argument("--requests", type=int, default=40, help="lone client's requests per phase")
    ap.add_argument("--flooders", type=int, default=2)
    ap.add_argument("--clients", type=int, default=200, help="clients of the overload bursts")
    ap.add_argument("--marks", default="5,30,60", help="seconds after a burst when memory is read")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="allocator variants, by name")
    args = ap.parse_args()
    parts = set(args.part.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"checkout {args.checkout}, {os.cpu_count()} CPUs, {when}")
    try:
        if parts & {"fairness", "overload"}:
            svc = Service(args.checkout, {}, work, "main")
            try:
                svc.wait_ready()
                if "fairness" in parts:
                    fairness(svc, args.requests, args.flooders)
                if "overload" in parts:
                    overload(svc, args.clients)
            finally:
                svc.stop()
        if "memory" in parts:
            marks = tuple(int(m) for m in args.marks.split(","))
            memory(args.checkout, work, args.clients, marks, args.variants.split(","))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
