"""`bench/bench_core.py`, the script that prints issue 3's figures, runs end to end on the real repository and
prints every figure. The figures themselves are the benchmark's to report, never asserted here: a timed
test on a shared CI machine would measure the machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_core.py"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def test_bench_core_prints_every_figure(model_repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--repository", str(model_repo)]
        + ["--runs", "6", "--rounds", "1", "--agreement", "8", "--skip-resnet"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(rf"fast {NUMBER} ms, torchvision eval transform {NUMBER} ms, speed-up {NUMBER}x", out)
    for config in ("default: 1 worker x 2 threads", "CPU profile"):
        assert re.search(rf"single classify bytes->top5 efficientnet_lite0, {config}.*: p50 {NUMBER} ms", out)
        assert re.search(rf"throughput efficientnet_lite0, {config}.*ratio {NUMBER}x", out), out
    # the lone call's breakdown: interleaved with the calls, then each stage warm, for both configurations
    assert len(re.findall(rf"where it goes .*hand-offs and the rest -?{NUMBER}", out)) == 2
    assert len(re.findall(rf"each stage warm, back to back .*sum {NUMBER}", out)) == 2
    assert re.search(rf"efficientnet_lite0 top-1 agreement: [0-9]+/8 = {NUMBER}%", out), out
