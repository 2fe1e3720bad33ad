"""The same scoring job on Ray Data: the listed files spread over an actor pool that holds the session.

Ray's own readers are not used. Its image reader applies no EXIF orientation or size limits, and one bad file
fails the whole job; its binary reader reads each file whole, waits forever on a FIFO, and fails the job on a
file deleted after listing. Here the dataset is the listing itself (path, size, mtime), and each actor reads
every file with the local engine's bounded, concurrent read (`runner.read_files`), so both engines give
every file the same row. This is the only module that imports Ray; nothing on the serving path imports it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from service.config import Settings
from service.postprocessing import check_top_k
from service.scoring.results import SCHEMA, ResultStore, Summary, result_row
from service.scoring.runner import ModelRunner, PrepareSpec, prepare_files
from service.scoring.sources import SourceFile


def _encode(path: str) -> bytes:
    """A path as bytes, so that a Linux name that is not UTF-8 (surrogate escapes) survives Arrow."""
    return path.encode("utf-8", "surrogateescape")


def _decode(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


class RayScorer:
    """One actor: loads the model once, then reads, decodes and scores the listed files Ray hands it."""

    def __init__(self, spec: PrepareSpec, top_k: int, batch_size: int) -> None:
        self.spec = spec
        self.top_k = top_k
        self.batch_size = batch_size
        self.runner = ModelRunner(spec.settings, spec.model, spec.version, batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = [
            SourceFile(_decode(path), size, mtime)
            for path, size, mtime in zip(
                batch.column("path").to_pylist(),
                batch.column("size").to_pylist(),
                batch.column("mtime").to_pylist(),
                strict=True,
            )
        ]
        rows: list[dict[str, Any]] = []
        ready: list[tuple[SourceFile, np.ndarray]] = []
        prepared = prepare_files([s.path for s in sources], self.spec)
        for source, (views, error) in zip(sources, prepared, strict=True):
            if views is None:
                rows.append(result_row(source, self.runner, None, error))
            else:
                ready.append((source, views))
        for start in range(0, len(ready), max(1, self.batch_size)):
            group = ready[start : start + self.batch_size]
            tops = self.runner.score([v for _, v in group], self.top_k)
            for (source, _), top in zip(group, tops, strict=True):
                rows.append(result_row(source, self.runner, top, ""))
        return pa.Table.from_pylist(rows, schema=SCHEMA)


def score_ray(
    todo: list[SourceFile],
    store: ResultStore,
    settings: Settings,
    *,
    model: str,
    version: str | None,
    top_k: int | None,
    tta: str,
    batch_size: int,
    actors: int,
    address: str | None,
    chunk_size: int,
    read_threads: int,
) -> Summary:
    """Score `todo` on Ray (a new local Ray, or the cluster at `address`) and write Parquet into the store.

    The listing is cut into blocks of at most `chunk_size` files (and at least four blocks per actor, so that
    a slow block does not leave the others idle at the end); each block's rows are written as it finishes,
    so an interrupted job keeps them and a rerun resumes after them."""
    import ray

    if store.format != "parquet":
        raise ValueError("--engine ray writes Parquet: give --out a .parquet folder")
    summary = Summary(total=len(todo))
    started = time.perf_counter()
    runner = ModelRunner(settings, model, version, batch_size)  # fails fast (unknown model) before Ray starts
    top_k = check_top_k(top_k, runner.card.num_classes, settings.max_top_k, what="--top-k")
    spec = PrepareSpec.for_runner(runner, settings, tta, read_threads)
    if todo:
        if not ray.is_initialized():
            # a local Ray's GCS server gets 30 s to start by default: a busy machine can take longer
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        pool = max(1, actors)
        listing = [{"path": _encode(f.path), "size": f.size, "mtime": f.mtime} for f in todo]
        blocks = max(1, min(len(todo), max(pool * 4, -(-len(todo) // max(1, chunk_size)))))
        dataset = ray.data.from_items(listing, override_num_blocks=blocks)
        scored = dataset.map_batches(
            RayScorer,
            fn_constructor_kwargs={"spec": spec, "top_k": top_k, "batch_size": batch_size},
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=pool,
        )
        # writing Parquet is I/O: it takes no CPU slot, so that a pool holding every CPU does not stall it
        scored.write_parquet(store.out, ray_remote_args={"num_cpus": 0}, concurrency=pool)
    done = store.done()
    for f in todo:
        row = done.get(f.name)
        if row is None or row["error"]:
            summary.failed += 1
        else:
            summary.scored += 1
    summary.seconds = time.perf_counter() - started
    return summary
