"""Batch scoring from a remote store: files read many at a time (`--read-threads 8`, the default) against one
at a time (`--read-threads 1`).

An object store answers each request after a round trip. A loopback HTTP server, in a process of its own,
stands in for it: it holds every request `--delay-ms` before answering. The input is a manifest of its URLs;
each run is the whole `python -m service.score` command (listing, reading, scoring), and the two settings
alternate for `--rounds` rounds; medians are printed with their ratio.

    python bench/bench_remote.py [--images 200] [--delay-ms 50] [--rounds 3] [--model lenet5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER = """
import sys, time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
delay = float(sys.argv[2]) / 1000.0
class Slow(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def send_head(self):
        time.sleep(delay)
        return super().send_head()
server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Slow, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=50.0, help="the store's answer time per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--repository", default=str(ROOT / "models"))
    args = ap.parse_args()

    from tests.score_helpers import image_folder

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    server = None
    try:
        images = image_folder(work / "www", args.images)
        cmd = [sys.executable, "-c", SERVER, str(work / "www"), str(args.delay_ms)]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        manifest = work / "urls.txt"
        names = [p.relative_to(work / "www").as_posix() for p in images]
        manifest.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in names))
        print(
            f"bench_remote: {args.images} images over loopback HTTP, {args.delay_ms:.0f} ms per request, "
            f"model {args.model}, 2 decode workers, whole command"
        )
        rates: dict[int, list[float]] = {1: [], 8: []}
        for r in range(args.rounds):
            for threads in rates:
                out = work / f"out-{r}-{threads}.jsonl"
                score = [sys.executable, "-m", "service.score", str(manifest), "--model", args.model]
                score += ["--repository", args.repository, "--out", str(out), "--no-progress"]
                t0 = time.perf_counter()
                done = subprocess.run(
                    [*score, "--read-threads", str(threads)], capture_output=True, text=True
                )
                seconds = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.exit(f"score failed: {done.stderr[-2000:]}")
                rates[threads].append(args.images / seconds)
                print(f"  round {r + 1}, --read-threads {threads}: {args.images / seconds:.1f} images/s")
        one, many = statistics.median(rates[1]), statistics.median(rates[8])
        print(
            f"remote inputs: --read-threads 8 {many:.1f} images/s, --read-threads 1 {one:.1f} images/s, "
            f"ratio {many / one:.2f}x (medians of {args.rounds} alternating rounds)"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
