"""The same scoring job on Ray Data: files read as bytes with their paths, an actor pool holding the session.

Ray's own image reader is not used: it applies no EXIF orientation or size limits, and one bad file fails the
whole job. Here each actor decodes with this project's core, so a bad file becomes a row with its error. This
is the only module that imports Ray; nothing on the serving path imports it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from service.config import Settings
from service.scoring.local import Summary, result_row
from service.scoring.pipeline import (
    ModelRunner,
    PrepareSpec,
    describe,
    file_too_large,
    prepare_bytes,
    prepare_file,
)
from service.scoring.results import SCHEMA, ResultStore
from service.scoring.sources import SourceFile, is_special_local


class RayScorer:
    """One actor: loads the model once, then decodes and scores the batches Ray Data hands it."""

    def __init__(
        self, spec: PrepareSpec, top_k: int, batch_size: int, keys: dict[str, tuple[str, int, float]]
    ) -> None:
        self.spec = spec
        self.top_k = top_k
        self.batch_size = batch_size
        self.keys = keys  # Ray's path (protocol stripped) -> (path as listed, size, mtime)
        self.runner = ModelRunner(spec.settings, spec.model, spec.version, batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        ready: list[tuple[SourceFile, np.ndarray]] = []
        columns = (batch.column("bytes").to_pylist(), batch.column("path").to_pylist())
        for data, ray_path in zip(*columns, strict=True):
            path, size, mtime = self.keys.get(ray_path, (ray_path, len(data), -1.0))
            source = SourceFile(path, size, mtime)
            views, error = prepare_bytes(data, self.spec)
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


def _ray_path(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def score_ray(
    todo: list[SourceFile],
    store: ResultStore,
    settings: Settings,
    *,
    model: str,
    version: str | None,
    top_k: int,
    tta: str,
    batch_size: int,
    actors: int,
    address: str | None,
) -> Summary:
    """Score `todo` on Ray (a new local Ray, or the cluster at `address`) and write Parquet into the store."""
    import ray

    if store.format != "parquet":
        raise ValueError("--engine ray writes Parquet: give --out a .parquet folder")
    summary = Summary(total=len(todo))
    started = time.perf_counter()
    runner = ModelRunner(settings, model, version, batch_size)  # fails fast (unknown model) before Ray starts
    spec = PrepareSpec.for_runner(runner, settings, tta)
    missing = [f for f in todo if f.size < 0]
    if missing:  # vanished before listing finished: Ray could not read them, record them here
        store.write_chunk(
            [result_row(f, runner, None, "not_found: file does not exist or cannot be read") for f in missing]
        )
    # Ray reads each file whole before any check: a file listed larger than the limit is refused here
    # unread, as the local engine refuses it after reading at most the limit + 1 bytes.
    oversized = [f for f in todo if f.size > settings.max_request_bytes]
    if oversized:
        error = describe(file_too_large(settings.max_request_bytes))
        store.write_chunk([result_row(f, runner, None, error) for f in oversized])
    present = [f for f in todo if 0 <= f.size <= settings.max_request_bytes]
    # Names Ray's file reader mangles (it drops a newline) or cannot carry (not UTF-8), and local FIFOs and
    # devices (Ray would wait on a FIFO forever): scored here, on the driver, with the same runner and the
    # same checks as the local engine, so that both engines give every file its row.
    awkward = [f for f in present if "\n" in f.path or f.name != f.path or is_special_local(f.path)]
    if awkward:
        rows = []
        for f in awkward:
            views, error = prepare_file(f.path, spec)
            top = runner.score([views], top_k)[0] if views is not None else None
            rows.append(result_row(f, runner, top, error))
        store.write_chunk(rows)
        present = [f for f in present if f not in awkward]
    if present:
        if not ray.is_initialized():
            # a local Ray's GCS server gets 30 s to start by default: a busy machine can take longer
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        keys = {_ray_path(f.path): (f.name, f.size, f.mtime) for f in present}
        # Reading bytes and writing Parquet are I/O: they take no CPU slot, so that a pool holding every CPU
        # (one actor per core) does not starve them and stall the pipeline. A zero-CPU task is not limited
        # by the CPUs either, though: without a cap Ray ran every read task at once, each in a freshly started
        # worker process (about 100 on 2 cores), and those start-ups took the CPUs from the actors.
        pool = max(1, actors)  # inference actors, and as many read and write tasks at a time
        dataset = ray.data.read_binary_files(
            [f.path for f in present], include_paths=True, num_cpus=0, concurrency=pool
        )
        scored = dataset.map_batches(
            RayScorer,
            fn_constructor_kwargs={"spec": spec, "top_k": top_k, "batch_size": batch_size, "keys": keys},
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=pool,
        )
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
