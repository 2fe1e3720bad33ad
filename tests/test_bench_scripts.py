"""The scripts in `bench/` that print the benchmark figures run end to end, briefly, and print every figure.

The figures themselves are the benchmarks' to report, never asserted here: a timed test on a shared CI
machine would measure the machine. What is asserted is that each script still runs against the real
repository and servers, and that no request it sent failed. (`bench_gpu.py` and `bench_decode_memory.py`
have tests of their own; `bench_export.py` is left out, as one ResNet-50 export and validation alone takes a
minute here; `tests/test_export.py` runs the same pipeline on smaller nets.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_bench(script: str, *args: str, exit_codes: tuple[int, ...] = (0,)) -> str:
    """The script's output; `exit_codes` besides 0 for a script that exits 1 when its figure misses its target
    (a few images measure start-up, not throughput)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode in exit_codes, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # a crash exits 1 too
    return proc.stdout


def test_bench_core_prints_every_figure(model_repo: Path) -> None:
    out = run_bench(
        "bench_core.py", "--repository", str(model_repo), "--runs", "6", "--rounds", "1", "--agreement", "8",
        "--skip-resnet", "--decode-processes",
    )  # fmt: skip
    assert re.search(rf"fast {NUMBER} ms, torchvision eval transform {NUMBER} ms, speed-up {NUMBER}x", out)
    assert re.search(rf"on the reference machine: this host {NUMBER}x slower", out)
    for config in ("default: 1 worker x 2 threads", "CPU profile", "default, decoding in child processes"):
        assert re.search(rf"single classify bytes->top5 efficientnet_lite0, {config}.*: p50 {NUMBER} ms", out)
        assert re.search(rf"throughput efficientnet_lite0, {config}.*ratio {NUMBER}x", out), out
    # the lone call's peer (the stages inline, no service), its breakdown interleaved with the calls, then
    # each stage warm, for each configuration
    assert len(re.findall(rf"peer: .* no service: p50 {NUMBER} ms; the service adds -?{NUMBER} ms", out)) == 3
    assert len(re.findall(rf"where it goes .*hand-offs and the rest -?{NUMBER}", out)) == 3
    assert len(re.findall(rf"each stage warm, back to back .*sum {NUMBER}", out)) == 3
    assert re.search(rf"efficientnet_lite0 top-1 agreement: [0-9]+/8 = {NUMBER}%", out), out


def test_bench_serving_measures_every_server_without_errors(model_repo: Path, tmp_path: Path) -> None:
    out = run_bench(
        "bench_serving.py", "--models", "efficientnet_lite0", "--clients", "1,4", "--requests", "8",
        "--rounds", "1", "--source", str(model_repo), "--work", str(tmp_path),
    )  # fmt: skip
    rows = re.findall(
        r"^(cnn-serve HTTP|cnn-serve gRPC|FastAPI\+PyTorch ref) +efficientnet_lite0 +(\d+) .* (\d+) +(\d+)$",
        out,
        re.M,
    )
    assert sorted((server, clients) for server, clients, _, _ in rows) == sorted(
        (s, c) for s in ("cnn-serve HTTP", "cnn-serve gRPC", "FastAPI+PyTorch ref") for c in ("1", "4")
    ), out
    assert all(n == "8" and err == "0" for _, _, n, err in rows), out  # every request answered, none failed
    assert re.search(rf"HTTP images/s {NUMBER}x the reference", out), out
    assert (tmp_path / "results.json").is_file()


def test_bench_score_prints_ours_and_the_peer(model_repo: Path, tmp_path: Path) -> None:
    out = run_bench(
        "bench_score.py", "--images", "24", "--models", "efficientnet_lite0", "--no-ray",
        "--repository", str(model_repo), "--work", str(tmp_path), exit_codes=(0, 1),
    )  # fmt: skip
    assert re.search(rf"service\.score \(local.*: +{NUMBER} images/s", out), out
    assert re.search(rf"torch DataLoader \+ eager +: +{NUMBER} images/s", out), out
    assert re.search(rf"ratio ours / torch +: +{NUMBER}x", out), out


def test_bench_remote_compares_read_threads(model_repo: Path) -> None:
    out = run_bench(
        "bench_remote.py", "--images", "12", "--delay-ms", "5", "--rounds", "1", "--model", "lenet5",
        "--repository", str(model_repo),
    )  # fmt: skip
    rates = rf"--read-threads 8 {NUMBER} images/s, --read-threads 1 {NUMBER} images/s, ratio {NUMBER}x"
    assert re.search(f"remote inputs: {rates}", out), out


def test_bench_swap_prints_both_figures_and_loses_no_request(model_repo: Path) -> None:
    out = run_bench("bench_swap.py", "--repository", str(model_repo), "--clients", "4", "--seconds", "1")
    assert re.search(rf"folder appeared -> first answer of version 2: {NUMBER} s", out), out
    assert re.search(rf"without a swap +p50 +{NUMBER} ms +p99 +{NUMBER} ms", out), out
    assert re.search(rf"during the swap +p50 +{NUMBER} ms +p99 +{NUMBER} ms", out), out
    assert "failed requests: 0" in out


MLSERVER = ROOT / "build" / "mlserver" / "bin" / "mlserver"


@pytest.mark.skipif(not MLSERVER.is_file(), reason="no MLServer in build/mlserver: `make mlserver` builds it")
def test_bench_serving_measures_mlserver_and_compares_every_answer(model_repo: Path, tmp_path: Path) -> None:
    out = run_bench(
        "bench_serving.py", "--models", "efficientnet_lite0", "--clients", "1,2", "--requests", "6",
        "--rounds", "1", "--no-grpc", "--peers", "mlserver", "--source", str(model_repo),
        "--work", str(tmp_path),
    )  # fmt: skip
    rows = re.findall(
        r"^(cnn-serve HTTP|MLServer workers=1) +efficientnet_lite0 +(\d+) .* (\d+) +(\d+)$", out, re.M
    )
    assert sorted((server, clients) for server, clients, _, _ in rows) == sorted(
        (s, c) for s in ("cnn-serve HTTP", "MLServer workers=1") for c in ("1", "2")
    ), out
    assert all(n == "6" and err == "0" for _, _, n, err in rows), out
    assert re.search(rf"HTTP images/s {NUMBER}x MLServer workers=1 .*p99", out), out
    # every answer of both sides compared: 2 levels x 6 requests each way
    found = re.search(r"answers against MLServer workers=1: (\d+) of (\d+) requests disagree", out)
    assert found and found.group(2) == "24", out
    assert re.search(r"target against MLServer workers=1 .*: (met|NOT met)", out), out
    # the photo mix holds the camera-sized JPEGs
    assert "coffee 4000x3000" in out and "chelsea 1920x1280" in out, out


# Every kind of abuse but test-time augmentation batches, whose hold on the cores and the queue is the
# admission's to bound, not the connections' and the bodies' rules that this run checks (`big_form`'s
# batches are refused for their views once the form is split: what they cost is the body and the split).
HOSTILE_KINDS = (
    "json_bomb", "big_json", "disconnect", "short_body", "slowloris", "idle", "flood",
    "big_form", "grpc_fields", "grpc_idle", "grpc_flood", "grpc_held", "held_bodies", "grpc_held_messages",
)  # fmt: skip


def test_bench_hostile_prints_every_figure_and_fails_no_normal_request(
    model_repo: Path, tmp_path: Path
) -> None:
    out = run_bench(
        "bench_hostile.py", "--repository", str(model_repo), "--model", "lenet5", "--duration", "8",
        "--warm", "2", "--clients", "2", "--work", str(tmp_path), "--abuse", ",".join(HOSTILE_KINDS),
        "--client-niceness", "5", "--rate", "json_bomb=2",
    )  # fmt: skip
    # The clients run below the server: Linux weighs autogroups against each other before threads, so the
    # script's own autogroup is what it lowers, where the kernel groups so.
    autogroups = Path("/proc/sys/kernel/sched_autogroup_enabled")
    grouped = autogroups.is_file() and autogroups.read_text().strip() == "1"
    lowered = r"clients at nice [0-9]+" + (r", their autogroup-[0-9]+ nice 5" if grouped else "")
    assert re.search(lowered, out), out
    for phase in ("without abuse", "with abuse"):
        assert re.search(rf"normal clients {phase}: p50 {NUMBER} ms, p99 {NUMBER} ms", out), out
    assert re.search(rf"with abuse / without: p50 {NUMBER}x, p99 {NUMBER}x", out), out
    assert "normal requests failed: 0 (goal 0)" in out, out
    assert re.search(rf"RSS .*: baseline {NUMBER} MiB, peak {NUMBER} MiB .* final {NUMBER} MiB", out), out
    assert re.search(
        rf"event loop lag \(goal < 50 ms\): max {NUMBER} ms without abuse, {NUMBER} ms with", out
    )
    for phase in ("without abuse", "with abuse"):
        assert re.search(
            rf"late lag samples by cause, {phase}: over 25 ms: gc [0-9]+, core_wait [0-9]+, callbacks "
            rf"[0-9]+, lock [0-9]+; over 50 ms: gc [0-9]+, core_wait [0-9]+, callbacks [0-9]+, lock [0-9]+; "
            rf"the loop's thread waited for a core {NUMBER}% of the time; full garbage collections [0-9]+, "
            rf"[0-9]+ ms in all; host CPU stolen by the hypervisor {NUMBER}%",
            out,
        ), out
        assert re.search(
            rf"CPU used, {phase}: the server's processes {NUMBER} cores, this script's clients {NUMBER}, "
            rf"the rest of the host {NUMBER}, of [0-9]+",
            out,
        ), out
    assert re.search(r"503 answered by routes: [0-9]+", out), out
    assert re.search(rf"connections refused at accept .*: {NUMBER}", out), out
    for kind in HOSTILE_KINDS:
        paced = rf"( \([0-9]+ sent, {NUMBER} a second(, capped at 2)?\))?"
        assert re.search(rf"^  {kind}{paced}: ", out, re.M), out
    # The capped kind sent no more than its rate over the abuse's 4 s or more (its first slot at the start).
    bombs = re.search(rf"json_bomb \(([0-9]+) sent, ({NUMBER}) a second, capped at 2\)", out)
    assert bombs is not None and int(bombs[1]) >= 1 and float(bombs[2]) <= 2 + 1 / 4 + 0.01, out
    assert re.search(r"connections still open 15 s after the abuse stopped: HTTP [0-9]+, gRPC [0-9]+", out)
    assert re.search(rf"the abusers stopped {NUMBER} s after the abuse's end", out), out
    full = rf"gRPC calls on a new connection while the port was full: UNAVAILABLE, .* {NUMBER} ms"
    assert re.search(full, out), out


def test_bench_admission_prints_every_figure(model_repo: Path) -> None:
    args = ("--requests", "4", "--clients", "8", "--marks", "1", "--variants", "default+trim")
    out = run_bench("bench_admission.py", *args)
    assert re.search(rf"alone +p50 +{NUMBER} ms +p99 +{NUMBER} ms", out), out
    assert re.search(rf"with flood +p50 +{NUMBER} ms +p99 +{NUMBER} ms", out), out
    assert re.search(rf"p99 ratio +{NUMBER}x", out), out
    assert re.search(r"overload: 8 x 4 images: \{", out), out
    assert re.search(r"overload: 8 x 1 image, 1 s deadline: \{", out), out
    assert re.search(rf"default\+trim +{NUMBER} +{NUMBER} +{NUMBER} +-?{NUMBER}", out), out


def test_bench_messages_prints_the_parse_and_the_count_of_each_message() -> None:
    out = run_bench("bench_messages.py", "--entries", "20000", "--contents", "30000", "--rounds", "1")
    names = ("20,000 map entries in key order", "20,000 map entries as protobuf writes them")
    for name in (*names, "30,000 empty raw_input_contents"):
        assert re.search(rf"^{name} \| {NUMBER} MB \| [0-9,.]+ ms \| {NUMBER} ms$", out, re.M), out


def test_bench_window_prints_each_size_and_delay_with_the_probe_off_and_on(
    model_repo: Path, tmp_path: Path
) -> None:
    out = run_bench(
        "bench_window.py", "--repository", str(model_repo), "--work", str(tmp_path), "--sizes-mib", "0.5,2",
        "--delay-ms", "0,2", "--rounds", "1",
    )  # fmt: skip
    for size in ("0.5", "2"):
        for delay in ("0", "2"):
            assert re.search(
                rf"^  {size} MiB, {delay} ms each way: grpc_bdp_probe off {NUMBER} s, on {NUMBER} s, "
                rf"off / on {NUMBER}x$",
                out,
                re.M,
            ), out
