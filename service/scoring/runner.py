"""Batch scoring's side of the one path from bytes to answer (`service.pipeline`): files are read here, with
bounded concurrent reads, prepared by the model's `Pipeline` in decoding processes (everything a worker needs
is in the picklable `PrepareSpec`), and finished by the same `Pipeline` after the main process's session run.
"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import augmentation, repository
from service.config import Settings
from service.decoding import Limits
from service.errors import ImageTooLarge, ServiceError
from service.pipeline import Pipeline
from service.postprocessing import ClassScore
from service.scoring.sources import open_bytes
from service.sessions import ModelSession

READ_THREADS = 8  # files each process reads at once: object stores answer slowly, not busily


@dataclass(frozen=True)
class PrepareSpec:
    """Everything a decoding worker needs (picklable): the model's pipeline, the TTA mode, the read limits."""

    settings: Settings
    model: str
    version: str
    pipeline: Pipeline
    tta: str = "none"
    read_threads: int = READ_THREADS  # files each process reads at once

    @classmethod
    def for_runner(
        cls, runner: ModelRunner, settings: Settings, tta: str, read_threads: int = READ_THREADS
    ) -> PrepareSpec:
        """The spec of the model `runner` loaded, checked: a bad --tta fails before any worker starts."""
        augmentation.check_mode(tta)
        return cls(settings, runner.name, runner.version, runner.pipeline, tta, read_threads)


def describe(exc: BaseException) -> str:
    """The `error` column: a stable code, then a message for people."""
    if isinstance(exc, ServiceError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, FileNotFoundError):
        return "not_found: the file does not exist (deleted or moved after listing)"
    if isinstance(exc, PermissionError):
        return "permission_denied: the file cannot be read (permission denied)"
    if isinstance(exc, IsADirectoryError):
        return "unreadable: the path is a folder"
    if isinstance(exc, OSError):
        return f"unreadable: {exc.strerror or errno.errorcode.get(exc.errno or 0, '') or exc}"
    return f"internal: {type(exc).__name__}: {exc}"


def prepare_bytes(data: bytes, spec: PrepareSpec) -> tuple[np.ndarray | None, str]:
    """(views tensor (V, C, H, W), "") or (None, error) for one image's bytes."""
    try:
        if len(data) > spec.settings.max_request_bytes:
            raise ImageTooLarge(f"file is larger than {spec.settings.max_request_bytes} bytes")
        return spec.pipeline.prepare(data, spec.tta), ""
    except Exception as exc:  # one bad image becomes one error row, never a failed run
        return None, describe(exc)


_READERS: dict[int, ThreadPoolExecutor] = {}  # per thread count, in this process


def read_files(paths: list[str], max_bytes: int, threads: int = READ_THREADS) -> list[bytes | str]:
    """Each file's bytes (at most `max_bytes` + 1), or its error row's text, read `threads` at a time: a
    remote file costs a round trip (tens of ms on an object store), a local one a system call; in order."""

    def read(path: str) -> bytes | str:
        try:
            return open_bytes(path, max_bytes)
        except Exception as exc:  # deleted after listing, a FIFO, no permission: a row, never a failed run
            return describe(exc)

    if len(paths) == 1 or threads <= 1:
        return [read(path) for path in paths]
    if threads not in _READERS:
        _READERS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="read")
    return list(_READERS[threads].map(read, paths))


def prepare_payloads(payloads: list[bytes | str], spec: PrepareSpec) -> list[tuple[np.ndarray | None, str]]:
    """`read_files`' results prepared: bytes decoded into views, an error text passed on as the row's."""
    return [prepare_bytes(p, spec) if isinstance(p, bytes) else (None, p) for p in payloads]


def prepare_files(paths: list[str], spec: PrepareSpec) -> list[tuple[np.ndarray | None, str]]:
    """Read (concurrently) and prepare files; errors become the rows' `error`."""
    return prepare_payloads(read_files(paths, spec.settings.max_request_bytes, spec.read_threads), spec)


class ModelRunner:
    """One model version's session (the core's `ModelSession`: providers, GPU, precision) in this process."""

    def __init__(
        self, settings: Settings, model: str, version: str | None = None, batch_size: int = 32
    ) -> None:
        store = repository.store_for(settings)  # a folder, or a bucket read through the model cache
        self.version = repository.resolve(repository.scan(store), model, version)
        self.name = model
        self.card = repository.load_card(store, model, self.version)
        self.pipeline = Pipeline.for_card(self.card, Limits.from_settings(settings), settings.preprocess_mode)
        # Scoring never runs a batch alone: no solo session (a second copy of the weights for nothing).
        self.session = ModelSession(
            self.card, settings.replace(max_batch_size=max(1, batch_size), solo_threads=0)
        )

    def score(self, views: list[np.ndarray], k: int) -> list[list[ClassScore]]:
        """Top-k per image of one session run over every view of `views` (softmax averaged per image)."""
        outputs = self.session.run(np.concatenate(views, axis=0))
        return [answer.top_k for answer in self.pipeline.finish(outputs, [len(v) for v in views], k)]
