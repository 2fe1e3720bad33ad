"""`python -m service.score` end to end: real ONNX Runtime model, real image files, real processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.core import InferenceCore
from service.score import main
from service.scoring.results import ResultStore
from tests.conftest import classify_now, write_tiny_model
from tests.score_helpers import image_folder, jpeg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tiny_repo) -> Path:
    """conftest's generated repository; `tiny` resolves to its latest version, 2."""
    return tiny_repo


def score(args: list[str], repo: Path) -> int:
    return main([*args, "--model", "tiny", "--repository", str(repo), "--no-progress"])


def score_cmd(inp: Path, out: Path, repo: Path, model: str, *extra: str) -> list[str]:
    """`python -m service.score` as a separate process, for tests that signal it or drop its privileges."""
    cmd = [sys.executable, "-m", "service.score", str(inp), "--model", model, "--out", str(out)]
    return [*cmd, "--repository", str(repo), *extra]


def rows_of(out: Path) -> list[dict]:
    return ResultStore(str(out)).read_all()


def test_folder_to_parquet_matches_the_core_and_bad_files_get_rows(tmp_path, repo, capsys):
    images = image_folder(tmp_path / "in", 10)
    (tmp_path / "in" / "notes.jpg").write_text("this is text, not a picture")
    (tmp_path / "in" / "cut.jpg").write_bytes(images[0].read_bytes()[:300])  # truncated JPEG
    out = tmp_path / "out.parquet"
    rc = score(
        [
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--top-k",
            "3",
            "--workers",
            "2",
            "--batch-size",
            "4",
            "--chunk-size",
            "4",
        ],
        repo,
    )
    assert rc == 1  # some images failed
    summary = capsys.readouterr().out
    assert "scored 10, failed 2" in summary and "images/s" in summary
    rows = {r["path"]: r for r in rows_of(out)}
    assert len(rows) == 12 and len(ResultStore(str(out)).parts()) == 3
    assert rows[str(tmp_path / "in" / "notes.jpg")]["error"].startswith("unsupported_format:")
    assert rows[str(tmp_path / "in" / "cut.jpg")]["error"].startswith("invalid_image:")
    core = InferenceCore(Settings(repository=str(repo)))
    core.load()
    expected = classify_now(core, [p.read_bytes() for p in images], model="tiny", top_k=3)
    for path, prediction in zip(images, expected, strict=True):
        row = rows[str(path)]
        assert row["error"] == "" and row["model"] == "tiny" and row["version"] == "2"
        assert row["top_k_ids"] == [c.id for c in prediction.top_k]
        assert row["top_k_labels"] == [c.label for c in prediction.top_k]
        np.testing.assert_allclose(
            row["top_k_probabilities"], [c.probability for c in prediction.top_k], atol=1e-5
        )
        assert row["size"] == path.stat().st_size


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_glob_and_manifest_inputs_to_csv_and_jsonl(tmp_path, repo, ext):
    images = image_folder(tmp_path / "in", 5)
    out = tmp_path / f"out.{ext}"
    assert score([str(tmp_path / "in" / "set0" / "*.jpg"), "--out", str(out), "--workers", "0"], repo) == 0
    globbed = sorted(str(p) for p in images if p.parent.name == "set0" and p.suffix == ".jpg")
    assert sorted(r["path"] for r in rows_of(out)) == globbed
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,note\n" + "".join(f"{p.relative_to(tmp_path)},x\n" for p in images))
    out2 = tmp_path / f"all.{ext}"
    assert score([str(manifest), "--out", str(out2), "--workers", "1", "--top-k", "2"], repo) == 0
    rows = rows_of(out2)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images)
    assert all(
        len(r["top_k_ids"]) == 2 and r["top_k_probabilities"][0] >= r["top_k_probabilities"][1] for r in rows
    )


@pytest.mark.parametrize("workers", ["0", "2"])
def test_memory_filesystem_input_and_output(tmp_path, repo, workers):
    fs = fsspec.filesystem("memory")
    images = image_folder(tmp_path / "in", 4)
    for p in images:
        fs.pipe(f"/bucket{workers}/{p.name}", p.read_bytes())
    fs.pipe(f"/bucket{workers}/broken.png", b"\x89PNG\r\n\x1a\nnot really")
    try:
        out = f"memory://results{workers}.jsonl"
        rc = score([f"memory://bucket{workers}", "--out", out, "--workers", workers], repo)
        assert rc == 1
        rows = ResultStore(f"memory://results{workers}.jsonl").read_all()
        assert len(rows) == 5
        assert [r["path"] for r in rows if r["error"]] == [f"memory:///bucket{workers}/broken.png"]
    finally:
        fs.rm(f"/bucket{workers}", recursive=True)
        fs.rm(f"/results{workers}.jsonl", recursive=True)


def test_rerun_scores_only_missing_and_changed_files(tmp_path, repo, capsys):
    images = image_folder(tmp_path / "in", 6)
    out = tmp_path / "out.parquet"
    args = [str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--chunk-size", "2"]
    assert score(args, repo) == 0
    before = {r["path"]: r for r in rows_of(out)}
    capsys.readouterr()
    assert score(args, repo) == 0
    assert "scored 0, failed 0, skipped (already done) 6" in capsys.readouterr().out
    changed = images[2]
    changed.write_bytes(jpeg(np.full((64, 80, 3), 200, np.uint8)))
    os.utime(changed, (time.time() + 5, time.time() + 5))
    new = tmp_path / "in" / "set0" / "new.jpg"
    new.write_bytes(images[0].read_bytes())
    assert score(args, repo) == 0
    assert "scored 2, failed 0, skipped (already done) 5" in capsys.readouterr().out
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted({*before, str(new)})  # every image exactly once
    row = next(r for r in rows if r["path"] == str(changed))
    assert row["size"] == changed.stat().st_size != before[str(changed)]["size"]


def test_limits_vanished_and_unknown_inputs_give_error_rows(tmp_path, repo):
    images = image_folder(tmp_path / "in", 3)
    big = tmp_path / "in" / "big.png"
    from PIL import Image

    Image.new("RGB", (900, 900), (10, 20, 30)).save(big)
    manifest = tmp_path / "list.txt"
    listed = [*map(str, images), str(big), str(tmp_path / "gone.jpg"), str(tmp_path / "in")]
    manifest.write_text("\n".join(listed))
    out = tmp_path / "out.jsonl"
    rc = score([str(manifest), "--out", str(out), "--workers", "1", "--max-image-pixels", "500000"], repo)
    assert rc == 1
    errors = {Path(r["path"]).name: r["error"] for r in rows_of(out)}
    assert errors["big.png"].startswith("image_too_large:")
    assert errors["gone.jpg"].startswith("not_found:")
    assert errors["in"].startswith("unreadable:")
    assert [errors[p.name] for p in images] == ["", "", ""]


def test_decode_memory_limit_gives_an_error_row(tmp_path, repo):
    """The serving budget's per-image rule holds in batch jobs too: an image whose decode alone needs more
    than --decode-memory-mb is an image_too_large row, and the others are scored."""
    images = image_folder(tmp_path / "in", 2)
    Image.new("RGBA", (1500, 1500), (10, 20, 30, 40)).save(tmp_path / "in" / "big.png")
    out = tmp_path / "out.jsonl"
    rc = score([str(tmp_path / "in"), "--out", str(out), "--workers", "1", "--decode-memory-mb", "16"], repo)
    assert rc == 1
    errors = {Path(r["path"]).name: r["error"] for r in rows_of(out)}
    assert errors["big.png"].startswith("image_too_large:") and "the limit is 16 MiB" in errors["big.png"]
    assert [errors[p.name] for p in images] == ["", ""]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_fifo_or_device_gets_an_error_row_instead_of_hanging_the_run(tmp_path, repo, workers):
    """Opening a FIFO for reading waits for a writer that never comes, and `/dev/zero` never ends: both
    once stalled the run. Only regular files are read; the others get an `unreadable` row at once."""
    images = image_folder(tmp_path / "in", 2)
    fifo = tmp_path / "in" / "pipe.jpg"
    os.mkfifo(fifo)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([*map(str, images), str(fifo), "/dev/zero"]))
    out = tmp_path / "out.jsonl"
    assert score([str(manifest), "--out", str(out), "--workers", workers], repo) == 1
    errors = {r["path"]: r["error"] for r in rows_of(out)}
    for path in (str(fifo), "/dev/zero"):
        assert errors[path].startswith("unreadable:") and "not a regular file" in errors[path], errors[path]
    assert [errors[str(p)] for p in images] == ["", ""]
    # a folder INPUT lists the FIFO too, with the same row
    listed = tmp_path / "dir.jsonl"
    assert score([str(tmp_path / "in"), "--out", str(listed), "--workers", workers], repo) == 1
    assert "not a regular file" in {r["path"]: r["error"] for r in rows_of(listed)}[str(fifo)]


def test_bad_arguments_and_unwritable_output_exit_with_a_clear_error(tmp_path, repo, capsys):
    image_folder(tmp_path / "in", 2)
    assert score([str(tmp_path / "in"), "--out", str(tmp_path / "o.parquet"), "--tta", "sideways"], repo) == 2
    assert "unknown tta" in capsys.readouterr().err
    assert (
        main(
            [
                str(tmp_path / "in"),
                "--model",
                "nope",
                "--out",
                str(tmp_path / "o.csv"),
                "--repository",
                str(repo),
            ]
        )
        == 2
    )
    assert "unknown model" in capsys.readouterr().err
    assert score([str(tmp_path / "missing"), "--out", str(tmp_path / "o.csv")], repo) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert score([str(tmp_path / "in"), "--out", str(tmp_path / "file" / "o.csv")], repo) == 3
    assert "cannot write results" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a read-only tmpfs")
def test_read_only_output_filesystem(tmp_path, repo, capsys):
    image_folder(tmp_path / "in", 2)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("tmpfs mount refused")
    try:
        assert score([str(tmp_path / "in"), "--out", str(mnt / "o.parquet")], repo) == 3
        assert "Read-only file system" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mnt)])


def test_permission_denied_file_gets_an_error_row(tmp_path, repo):
    """As root (which reads every file) the run drops the capabilities that bypass file permissions."""
    images = image_folder(tmp_path / "in", 3)
    locked = images[1]
    locked.chmod(0)
    out = tmp_path / "out.csv"
    cmd = score_cmd(tmp_path / "in", out, repo, "tiny", "--workers", "1", "--no-progress")
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: every file is readable")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", "--bounding-set", drop, "--inh-caps", drop, *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = {Path(r["path"]).name: r["error"] for r in rows_of(out)}
    assert errors[locked.name].startswith("permission_denied:")
    assert sorted(e for e in errors.values() if not e) == ["", ""]


def _like_a_terminal_command() -> None:
    """SIGINT neither ignored nor blocked, as a shell starts a foreground command.

    A disposition of SIG_IGN and the signal mask both survive exec, and the test process (with the gRPC
    clients and multiprocessing pools of earlier tests) is no shell: in full-suite runs the child ran to the
    end untouched by the SIGINT below (exit 0, one part written when it was sent), never when this file ran
    alone.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _run_and_interrupt(tmp_path: Path, repo: Path, sig: int, chunk: str) -> tuple[Path, list[Path], list]:
    # The real EfficientNet-Lite0, not the tiny test net, which scored the rest in well under a second after
    # its first part appeared: here the run lasts seconds past the signal even on a loaded machine.
    images = image_folder(tmp_path / "in", 160)
    out = tmp_path / "out.parquet"
    extra = ("--workers", "1", "--batch-size", "2", "--chunk-size", chunk, "--no-progress")
    cmd = score_cmd(tmp_path / "in", out, repo, "efficientnet_lite0", *extra)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_like_a_terminal_command,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(n.startswith("part-") for n in os.listdir(out)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    parts_at_signal = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    status = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ln.startswith("Sig")]
    mine = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Sig")]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (
            proc.returncode,
            parts_at_signal,
            status,
            mine,
            stdout[-2000:],
            stderr[-2000:],
        )
    return out, images, cmd


def _check_resume(out: Path, images: list[Path], cmd: list[str]) -> int:
    partial = len(ResultStore(str(out)).read_all())
    assert 0 < partial < len(images)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped (already done) {partial}" in proc.stdout
    paths = [r["path"] for r in ResultStore(str(out)).read_all()]
    assert sorted(paths) == sorted(str(p) for p in images)  # every image exactly once
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    return partial


def test_ctrl_c_keeps_scored_rows_and_the_rerun_completes(tmp_path, model_repo):
    out, images, cmd = _run_and_interrupt(tmp_path, model_repo, signal.SIGINT, "10")
    _check_resume(out, images, cmd)


def test_sigkill_in_the_middle_of_a_chunk_then_resume(tmp_path, model_repo):
    out, images, cmd = _run_and_interrupt(tmp_path, model_repo, signal.SIGKILL, "10")
    partial = _check_resume(out, images, cmd)
    assert partial % 10 == 0  # only complete chunks survived the kill


def test_tta_and_progress_bar(tmp_path, repo):
    images = image_folder(tmp_path / "in", 4)
    out = tmp_path / "out.jsonl"
    cmd = score_cmd(tmp_path / "in", out, repo, "tiny", "--workers", "1", "--tta", "flip", "--top-k", "4")
    # The bar is drawn only on a terminal: stderr is a pseudo-terminal here, then a plain pipe.
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 0-column tty draws nothing
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
    os.close(slave)
    drawn = b""
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not block:
            break
        drawn += block
    os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    assert b"img/s" in drawn and b"4/4" in drawn  # tqdm: rate, count (and ETA while running)
    assert "scored 4, failed 0" in proc.stdout
    piped = subprocess.run(cmd + ["--retry-failed"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "img/s" not in piped.stderr, piped.stderr  # no bar in a log file
    core = InferenceCore(Settings(repository=str(repo)))
    core.load()
    expected = classify_now(core, [p.read_bytes() for p in images], model="tiny", top_k=4, tta="flip")
    rows = {r["path"]: r for r in rows_of(out)}
    for path, prediction in zip(images, expected, strict=True):
        assert rows[str(path)]["top_k_ids"] == [c.id for c in prediction.top_k]
        np.testing.assert_allclose(
            rows[str(path)]["top_k_probabilities"], [c.probability for c in prediction.top_k], atol=1e-5
        )


@pytest.mark.gpu
def test_gpu_session_when_present(tmp_path, repo, capsys):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider (onnxruntime-gpu and a GPU needed)")
    image_folder(tmp_path / "in", 4)
    assert score([str(tmp_path / "in"), "--out", str(tmp_path / "o.parquet"), "--require-gpu"], repo) == 0
    assert len(rows_of(tmp_path / "o.parquet")) == 4


def test_odd_names_score_and_bad_setups_exit_2(tmp_path, repo, capsys):
    """A Latin-1 file name is scored (its name escaped in the output) and the rerun skips it; setups that
    cannot work exit 2 with one line, not a traceback and 1 ("some images failed")."""
    images = image_folder(tmp_path / "in", 2)
    raw = os.path.join(os.fsencode(tmp_path / "in"), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write(images[0].read_bytes())
    out = tmp_path / "out.parquet"
    assert score([str(tmp_path / "in"), "--out", str(out), "--workers", "0"], repo) == 0
    names = {r["path"].rsplit("/", 1)[-1] for r in rows_of(out)}
    assert names == {images[0].name, images[1].name, "caf\\xe9.jpg"}
    assert score([str(tmp_path / "in"), "--out", str(out), "--workers", "0"], repo) == 0
    assert "scored 0, failed 0, skipped (already done) 3" in capsys.readouterr().out
    for args in (
        ["foo://x", "--out", str(tmp_path / "o.jsonl")],
        [str(tmp_path / "in"), "--out", "foo://o.jsonl"],
        [str(tmp_path / "in"), "--out", str(tmp_path / "o.csv"), "--engine", "ray"],
        [str(tmp_path / "in"), "--out", str(tmp_path / "o.jsonl"), "--top-k", "11"],  # tiny has 10 classes
    ):
        assert score(args, repo) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
    args = [str(tmp_path / "in"), "--out", str(tmp_path / "o.jsonl"), "--model", "tiny", "--no-progress"]
    assert main([*args, "--repository", "/nonexistent"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_an_unreadable_part_is_set_aside_and_its_files_scored_again(tmp_path, repo, capsys, ext):
    """Resume once crashed on a part a killed writer left half-written (Ray's parts are not renamed in)."""
    image_folder(tmp_path / "in", 6)
    out = tmp_path / f"out.{ext}"
    args = [str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--chunk-size", "3"]
    assert score(args, repo) == 0
    first = sorted(p for p in out.iterdir() if p.name.startswith("part-"))[0]
    first.write_bytes(first.read_bytes()[:50])
    capsys.readouterr()
    assert score(args, repo) == 0
    captured = capsys.readouterr()
    assert "is unreadable" in captured.err and "scored 3, failed 0, skipped (already done) 3" in captured.out
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(p) for p in (tmp_path / "in").rglob("*.*"))
    assert (out / f".corrupt-{first.name}").exists()


@pytest.mark.timeout(180)
def test_a_killed_worker_ends_the_run_instead_of_hanging_it(tmp_path, repo, capsys, monkeypatch):
    """A decoding worker killed (the OOM killer, a crashing decoder) once left the run waiting forever for
    its task, deaf to Ctrl-C. Now the run keeps what it scored, says why, exits 1, and a rerun completes."""
    import psutil

    from service.scoring.runner import ModelRunner

    # The worker dies while the first batch is scored. Then 10 tasks of 8 files are in hand and the main
    # process gives the workers at most 5 at a time, so tasks are still to come however fast the machine is:
    # the run cannot end well, whether the executor fails a task it holds or refuses the next one.
    images = image_folder(tmp_path / "in", 80)
    out = tmp_path / "out.jsonl"
    args = [str(tmp_path / "in"), "--out", str(out), "--workers", "2"]
    args += ["--chunk-size", "4", "--batch-size", "4"]
    here = psutil.Process()
    others = {c.pid for c in here.children()}
    killed: list[int] = []
    score_views = ModelRunner.score

    def kill_a_worker_then_score(self, views, k):
        if not killed:
            worker = next(
                c
                for c in here.children()
                if c.pid not in others
                and "spawn_main" in " ".join(c.cmdline())
                and "resource_tracker" not in " ".join(c.cmdline())
            )
            worker.kill()
            deadline = time.monotonic() + 10
            # Dead, but not reaped here: the executor must see its own child's exit.
            while time.monotonic() < deadline:
                try:
                    if worker.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:  # the executor reaped it already
                    break
                time.sleep(0.01)
            killed.append(worker.pid)
        return score_views(self, views, k)

    monkeypatch.setattr(ModelRunner, "score", kill_a_worker_then_score)
    assert score(args, repo) == 1
    assert killed and "worker process died" in capsys.readouterr().err
    kept = rows_of(out)
    assert 4 <= len(kept) < len(images)  # the first batch's rows at least
    monkeypatch.setattr(ModelRunner, "score", score_views)
    assert score(args, repo) == 0
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(p) for p in images)


@pytest.mark.timeout(60)
def test_a_dead_worker_ends_the_wait_even_where_the_executor_never_fails_the_task() -> None:
    """A worker killed while it writes a result leaves the executor's thread waiting for the rest of that
    message, and the task never fails: the run waited forever. The main process, waiting for a task, looks
    at the workers itself."""
    import multiprocessing
    import types
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from service.scoring import local

    context = multiprocessing.get_context("spawn")
    alive = context.Process(target=time.sleep, args=(30,))
    dead = context.Process(target=time.sleep, args=(0,))
    for process in (alive, dead):
        process.start()
    dead.join(30)
    try:
        pool = types.SimpleNamespace(_processes={alive.pid: alive, dead.pid: dead})
        never = Future()  # a task the executor never fails
        start = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            local._result(never, pool)
        assert time.monotonic() - start < 10 * local.RESULT_POLL_S
        done = Future()
        done.set_result("rows")  # a finished task is returned, dead worker or not
        assert local._result(done, pool) == "rows"
    finally:
        alive.kill()
        alive.join(5)


def test_default_top_k_is_every_class_of_a_smaller_model(tmp_path):
    """`--top-k` defaults to 5, or every class of a model with fewer; asked for, a k above them is refused."""
    write_tiny_model(tmp_path / "repo", "three", "1", classes=3)
    image_folder(tmp_path / "in", 2)
    repo = str(tmp_path / "repo")
    common = [str(tmp_path / "in"), "--model", "three", "--repository", repo, "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 0
    rows = rows_of(tmp_path / "o.jsonl")
    assert len(rows) == 2 and all(sorted(r["top_k_indices"]) == [0, 1, 2] for r in rows)
    assert main([*common, "--out", str(tmp_path / "p.jsonl"), "--workers", "0", "--top-k", "4"]) == 2
