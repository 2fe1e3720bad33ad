"""`--engine ray` on a real single-node Ray gives the local engine's results (top-k, probabilities 1e-5),
and, like it, a row for every listed file: one deleted or grown past the limit after listing included."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray  # the `ray` extra, which `make test` installs: a missing Ray is a failure here, not a skip

from service.config import Settings
from service.score import main
from service.scoring.ray_engine import score_ray
from service.scoring.results import ResultStore
from service.scoring.sources import list_inputs
from tests.score_helpers import image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray waits 30 s for its GCS server to start; a fresh, busy CI machine once took longer
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a real Ray, not local mode
            break
        except Exception as e:  # noqa: BLE001 - Ray's own start-up, not the code under test
            # Once (2026-12-01, a slow phase of a shared host) the raylet never came up, not even its log
            # files, and ray.init gave up after its fixed 30 s; the next run of the suite started it at once.
            ray.shutdown()
            if attempt == 2:
                raise
            warnings.warn(f"ray.init failed ({type(e).__name__}: {e}); starting Ray again", stacklevel=1)
    yield
    ray.shutdown()


def _repo_and_model(tiny_repo: Path) -> tuple[Path, str]:
    models = Path(__file__).resolve().parents[1] / "models"
    if (models / "lenet5").is_dir():
        return models, "lenet5"
    return tiny_repo, "tiny"


def test_ray_engine_equals_local_engine(tmp_path, tiny_repo, ray_cluster):
    repo, model = _repo_and_model(tiny_repo)
    images = image_folder(tmp_path / "in", 20)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "in" / "new\nline.jpg").write_bytes(images[0].read_bytes())  # Ray's reader drops the newline
    latin1 = os.path.join(os.fsencode(tmp_path / "in"), b"caf\xe9.jpg")  # not UTF-8: Arrow cannot carry it
    Path(os.fsdecode(latin1)).write_bytes(images[1].read_bytes())
    # Ray's reader reads files whole, and waits on a FIFO forever: neither happens here
    (tmp_path / "in" / "huge.jpg").write_bytes(b"\xff\xd8\xff" + bytes(3_000_000))
    os.mkfifo(tmp_path / "in" / "pipe.jpg")
    common = [
        str(tmp_path / "in"),
        "--model",
        model,
        "--repository",
        str(repo),
        "--top-k",
        "3",
        "--no-progress",
        "--max-request-bytes",
        "2000000",
    ]
    assert main([*common, "--out", str(tmp_path / "local.parquet"), "--workers", "1"]) == 1
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "ray.parquet"),
                "--engine",
                "ray",
                "--ray-actors",
                "2",
                "--batch-size",
                "8",
            ]
        )
        == 1
    )
    local = {r["path"]: r for r in ResultStore(str(tmp_path / "local.parquet")).read_all()}
    remote = {r["path"]: r for r in ResultStore(str(tmp_path / "ray.parquet")).read_all()}
    assert sorted(local) == sorted(remote) and len(local) == 25
    assert not remote[str(tmp_path / "in" / "new\nline.jpg")]["error"]
    assert not remote[str(tmp_path / "in" / "caf\\xe9.jpg")]["error"]
    for path, row in local.items():
        other = remote[path]
        assert other["top_k_ids"] == row["top_k_ids"]
        assert other["error"].split(":")[0] == row["error"].split(":")[0]
        keys = ("size", "mtime", "version")
        assert [other[k] for k in keys] == [row[k] for k in keys]
        np.testing.assert_allclose(other["top_k_probabilities"], row["top_k_probabilities"], atol=1e-5)
    assert local[str(tmp_path / "in" / "broken.jpg")]["error"].startswith("invalid_image:")
    assert remote[str(tmp_path / "in" / "huge.jpg")]["error"].startswith("image_too_large:")
    assert "not a regular file" in remote[str(tmp_path / "in" / "pipe.jpg")]["error"]
    # resume: a rerun on Ray finds everything done
    assert main([*common, "--out", str(tmp_path / "ray.parquet"), "--engine", "ray"]) == 1
    assert len(ResultStore(str(tmp_path / "ray.parquet")).read_all()) == 25


def test_files_changed_after_listing_get_their_rows_and_the_job_finishes(tmp_path, tiny_repo, ray_cluster):
    """Between listing and reading, one file is deleted and one grows past the size limit: Ray's binary
    reader failed the whole job on the first and read the second whole; here each gets its error row."""
    repo, model = _repo_and_model(tiny_repo)
    images = image_folder(tmp_path / "in", 6)
    (tmp_path / "in" / "gone.jpg").write_bytes(images[0].read_bytes())
    (tmp_path / "in" / "grows.jpg").write_bytes(images[1].read_bytes())
    todo = list_inputs(str(tmp_path / "in"))
    (tmp_path / "in" / "gone.jpg").unlink()
    with (tmp_path / "in" / "grows.jpg").open("ab") as handle:
        handle.write(bytes(3_000_000))
    store = ResultStore(str(tmp_path / "out.parquet"))
    settings = Settings(repository=str(repo), max_request_bytes=2_000_000)
    summary = score_ray(
        todo, store, settings, model=model, version=None, top_k=3, tta="none", batch_size=1, actors=1,
        address=None, chunk_size=1, read_threads=8,
    )  # fmt: skip
    # --chunk-size bounds the rows per part file, as in the local engine: the unit an interrupted job keeps
    parts = sorted(pq.ParquetFile(p).metadata.num_rows for p in Path(store.out).glob("*.parquet"))
    assert parts == [1] * 8
    rows = {Path(r["path"]).name: r for r in store.read_all()}
    assert len(rows) == len(todo) == 8
    assert rows["gone.jpg"]["error"].startswith("not_found:")
    assert rows["grows.jpg"]["error"].startswith("image_too_large:")
    assert rows["grows.jpg"]["size"] == images[1].stat().st_size  # the row keeps the listed size
    assert all(not rows[p.name]["error"] and len(rows[p.name]["top_k_ids"]) == 3 for p in images)
    assert (summary.scored, summary.failed) == (6, 2)
