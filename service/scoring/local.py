"""The single-machine engine: decode in worker processes, overlapped with batched ONNX Runtime inference.

Workers read and decode files (the core's decoding and preprocessing, so limits and EXIF apply) while the
main process runs the session on full batches; a bounded window of outstanding work keeps memory flat when
decoding outruns inference. Rows are handed to the result store in chunks, each written atomically.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from service.scoring.results import ResultStore, Summary, result_row
from service.scoring.runner import ModelRunner, PrepareSpec, prepare_files, prepare_payloads, read_files
from service.scoring.sources import SourceFile

TASK_FILES = 4  # files per worker task: amortizes inter-process overhead without starving the batcher
PROCESS_LOCAL = ("memory://",)  # filesystems whose files exist only in this process


_WORKER_SPEC: PrepareSpec | None = None


def _init_worker(spec: PrepareSpec) -> None:
    """Workers ignore Ctrl-C: the main process decides what to keep and stops them. They end when it dies
    (killed, say): each holds both ends of the task queue, so no end of file would ever tell them, and
    they would hold the run's output pipes open."""
    global _WORKER_SPEC
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_SPEC = spec
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _end_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


Prepared = tuple[np.ndarray | None, str]


def _prepare_many(files: list[SourceFile], payloads: list[bytes | str] | None) -> list[Prepared]:
    """Worker task: read (unless the main process already did) and prepare a few files."""
    assert _WORKER_SPEC is not None
    if payloads is None:
        return prepare_files([f.path for f in files], _WORKER_SPEC)
    return prepare_payloads(payloads, _WORKER_SPEC)


def _read_here(files: list[SourceFile], spec: PrepareSpec) -> list[bytes | str] | None:
    """Bytes (or an error) of files on a filesystem other processes cannot see (`memory://`); else None."""
    if not any(f.path.startswith(PROCESS_LOCAL) for f in files):
        return None
    return read_files([f.path for f in files], spec.settings.max_request_bytes, spec.read_threads)


class _Batch:
    """Views waiting for one session run; `owners` maps each file to its rows in the stacked tensor."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.owners: list[tuple[SourceFile, int]] = []
        self.views = 0

    def add(self, source: SourceFile, views: np.ndarray) -> None:
        self.arrays.append(views)
        self.owners.append((source, len(views)))
        self.views += len(views)


class WorkerLost(RuntimeError):
    """A decoding worker process died (killed, out of memory, a crashing decoder): its task never returns."""


RESULT_POLL_S = 1.0  # how often the main process, waiting for a task, looks up (Ctrl-C is seen then)


def _result(handle: Future, pool: ProcessPoolExecutor) -> Any:
    """The task's result, waited for in steps so that Ctrl-C and a dead worker are seen. The executor finds a
    dead worker itself, except when the worker died writing a result: its thread then waits for the rest of
    that message, which the other workers' open ends of the pipe keep from ever ending."""
    while True:
        try:
            return handle.result(timeout=RESULT_POLL_S)
        except TimeoutError:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            if any(process.exitcode is not None for process in processes):
                raise BrokenProcessPool("a worker process ended") from None


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the workers now, whatever they hold: what is left of the run is redone on resume."""
    processes = list(pool._processes.values())  # type: ignore[attr-defined]
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)


def score_local(
    files: list[SourceFile],
    store: ResultStore,
    runner: ModelRunner,
    spec: PrepareSpec,
    *,
    top_k: int,
    batch_size: int,
    workers: int,
    chunk_size: int,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Score `files` (all still to do) and write their rows; Ctrl-C keeps every row scored so far."""
    summary = Summary(total=len(files))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    batch = _Batch()

    def flush_rows(force: bool = False) -> None:
        nonlocal rows
        while rows and (force or len(rows) >= chunk_size):
            chunk, rows = rows[:chunk_size], rows[chunk_size:]
            summary.parts.append(store.write_chunk(chunk))

    def run_batch() -> None:
        nonlocal batch
        if not batch.owners:
            return
        for (source, _), top in zip(batch.owners, runner.score(batch.arrays, top_k), strict=True):
            rows.append(result_row(source, runner, top, ""))
            summary.scored += 1
        if progress:
            progress(len(batch.owners))
        batch = _Batch()
        flush_rows()

    def take(source: SourceFile, views: np.ndarray | None, error: str) -> None:
        if views is None:
            rows.append(result_row(source, runner, None, error))
            summary.failed += 1
            if progress:
                progress(1)
            flush_rows()
            return
        batch.add(source, views)
        if batch.views >= batch_size:
            run_batch()

    per_task = max(TASK_FILES, spec.read_threads)  # a task's files are read at once: keep every thread busy
    tasks = [files[i : i + per_task] for i in range(0, len(files), per_task)]
    pool = None
    try:
        if workers <= 0:
            for task in tasks:
                for source, prepared in zip(task, prepare_files([f.path for f in task], spec), strict=True):
                    take(source, *prepared)
        else:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(spec,)
            )
            window = max(2, (batch_size * 2) // per_task + workers * 2)
            pending: deque = deque()
            next_task = 0
            while next_task < len(tasks) or pending:
                while next_task < len(tasks) and len(pending) < window:
                    task = tasks[next_task]
                    pending.append((task, pool.submit(_prepare_many, task, _read_here(task, spec))))
                    next_task += 1
                task, handle = pending.popleft()
                for source, (views, error) in zip(task, _result(handle, pool), strict=True):
                    take(source, views, error)
        run_batch()
        flush_rows(force=True)
    except KeyboardInterrupt:
        summary.interrupted = True
        flush_rows(force=True)  # rows already scored are complete: keep them, the rest is redone on resume
    except BrokenProcessPool:
        # A worker died: the executor fails every task it holds, refuses new ones and ends the other workers
        # itself (`multiprocessing.Pool` waited forever for a queue lock that a worker killed idle held).
        flush_rows(force=True)
        raise WorkerLost(
            "a decoding worker process died (killed, or out of memory); the rows scored so far are kept: "
            "rerun the same command to score the rest"
        ) from None
    finally:
        if pool is not None:
            _stop(pool)
        summary.seconds = time.perf_counter() - started
    return summary
