"""Remote inputs (a manifest of URLs, read through fsspec) are stat-ed and read many at a time: on an object
store each file costs a round trip, and one at a time the job would wait on the network, not the CPU.

A real HTTP server on loopback stands in for the store; each request waits a while before it is answered,
and the server counts how many requests it holds at once (GETs apart: listing asks HEAD, reading GET)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.score import main
from service.scoring.results import ResultStore
from service.scoring.sources import list_inputs
from tests.score_helpers import image_folder

DELAY_S = 0.1


class SlowStore:
    def __init__(self, root: Path) -> None:
        self.active = {"HEAD": 0, "GET": 0}
        self.peak = {"HEAD": 0, "GET": 0}
        self.lock = threading.Lock()
        store = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send_head(self):  # type: ignore[no-untyped-def]
                method = self.command
                with store.lock:
                    store.active[method] += 1
                    store.peak[method] = max(store.peak[method], store.active[method])
                try:
                    time.sleep(DELAY_S)
                    return super().send_head()
                finally:
                    with store.lock:
                        store.active[method] -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.peak = {"HEAD": 0, "GET": 0}


@pytest.fixture
def store(tmp_path) -> Iterator[SlowStore]:
    (tmp_path / "www").mkdir()
    slow = SlowStore(tmp_path / "www")
    thread = threading.Thread(target=slow.server.serve_forever, daemon=True)
    thread.start()
    yield slow
    slow.server.shutdown()
    slow.server.server_close()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_manifest_of_urls_is_listed_and_read_many_at_a_time(tmp_path, store, tiny_repo, workers):
    images = image_folder(tmp_path / "www", 12)
    names = [p.relative_to(tmp_path / "www").as_posix() for p in images]
    manifest = tmp_path / "urls.txt"
    manifest.write_text("".join(f"{store.url}/{name}\n" for name in [*names, "missing.jpg"]))

    listed = list_inputs(str(manifest))
    assert len(listed) == 13 and store.peak["HEAD"] >= 4, store.peak  # 13 stats, not one after another
    store.reset()
    out = tmp_path / f"remote{workers}.jsonl"
    common = ["--model", "tiny", "--repository", str(tiny_repo), "--no-progress", "--workers", workers]
    assert main([str(manifest), "--out", str(out), *common]) == 1  # one file is missing
    assert store.peak["GET"] >= 4, store.peak
    rows = {r["path"]: r for r in ResultStore(str(out)).read_all()}
    assert rows[f"{store.url}/missing.jpg"]["error"].startswith("not_found:")
    # the same scores as the same files read from disk
    local = tmp_path / f"local{workers}.jsonl"
    assert main([str(tmp_path / "www"), "--out", str(local), *common]) == 0
    for row in ResultStore(str(local)).read_all():
        name = Path(row["path"]).relative_to(tmp_path / "www").as_posix()
        remote = rows[f"{store.url}/{name}"]
        assert not remote["error"] and remote["top_k_ids"] == row["top_k_ids"], name
        assert remote["size"] == row["size"]


def test_read_threads_1_reads_one_file_at_a_time(tmp_path, store, tiny_repo):
    """--read-threads is the knob: 1 is the old behaviour, kept for stores that limit concurrent requests."""
    image_folder(tmp_path / "www", 6)
    manifest = tmp_path / "urls.txt"
    names = sorted(p.relative_to(tmp_path / "www").as_posix() for p in (tmp_path / "www").rglob("*.*"))
    manifest.write_text("".join(f"{store.url}/{name}\n" for name in names))
    list_inputs(str(manifest))
    store.reset()
    args = ["--model", "tiny", "--repository", str(tiny_repo), "--no-progress", "--workers", "0"]
    assert main([str(manifest), "--out", str(tmp_path / "o.jsonl"), "--read-threads", "1", *args]) == 0
    assert store.peak["GET"] == 1, store.peak
    for bad in ("0", "257"):
        assert main([str(manifest), "--out", str(tmp_path / "p.jsonl"), "--read-threads", bad, *args]) == 2
