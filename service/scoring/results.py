"""Results as a folder of part files, each complete or absent, which is also the resume state.

PATH (`out.parquet`, `out.csv`, `out.jsonl`) is a folder; every chunk of rows is written to a hidden temp file
beside the parts, flushed and fsync-ed, then renamed to `part-<run>-<seq>.<ext>`. A crash leaves at worst a
hidden temp file (deleted by the next run, ignored by readers such as `pyarrow.dataset`), never half a part.
The rows already there say which (path, size, mtime) are done.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from service.postprocessing import ClassScore
from service.scoring.sources import SourceFile

if TYPE_CHECKING:
    from service.scoring.runner import ModelRunner

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
LIST_COLUMNS = ("top_k_indices", "top_k_ids", "top_k_labels", "top_k_probabilities")
COLUMNS = ("path", "size", "mtime", "model", "version", *LIST_COLUMNS, "error")
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("top_k_indices", pa.list_(pa.int32())),
        ("top_k_ids", pa.list_(pa.string())),
        ("top_k_labels", pa.list_(pa.string())),
        ("top_k_probabilities", pa.list_(pa.float64())),
        ("error", pa.string()),
    ]
)


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  # already done by an earlier run
    failed_before: int = 0  # of those, rows with an error (rerun with --retry-failed to try again)
    scored: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    parts: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "interrupted" if self.interrupted else "done"
        earlier = f" ({self.failed_before} failed in earlier runs)" if self.failed_before else ""
        return (
            f"{state}: scored {self.scored}, failed {self.failed}, skipped (already done) "
            f"{self.skipped}{earlier}, {self.images_per_s:.1f} images/s over {self.seconds:.1f} s"
        )


def result_row(
    source: SourceFile, runner: ModelRunner, top: list[ClassScore] | None, error: str
) -> dict[str, Any]:
    """One file's row: its top-k, or its error."""
    return {
        "path": source.name,
        "size": source.size,
        "mtime": source.mtime,
        "model": runner.name,
        "version": runner.version,
        "top_k_indices": [int(c.index) for c in top] if top else [],
        "top_k_ids": [str(c.id) for c in top] if top else [],
        "top_k_labels": [str(c.label) for c in top] if top else [],
        "top_k_probabilities": [float(c.probability) for c in top] if top else [],
        "error": error,
    }


TEMP_PREFIX = ".tmp-"


class OutputError(OSError):
    """The output cannot be written (unwritable place, full disk); what was written before stays readable."""


def output_format(path: str) -> str:
    """The format named by PATH's extension."""
    lowered = path.rstrip("/").lower()
    for ext, fmt in FORMATS.items():
        if lowered.endswith(ext):
            return fmt
    raise ValueError(f"--out {path!r}: the extension must be one of {', '.join(FORMATS)}")


def encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    """Rows in the part file's format (lists as JSON arrays in CSV)."""
    if fmt == "parquet":
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    if fmt == "jsonl":
        return "".join(json.dumps({c: row[c] for c in COLUMNS}) + "\n" for row in rows).encode()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([json.dumps(row[c]) if c in LIST_COLUMNS else row[c] for c in COLUMNS])
    return text.getvalue().encode()


def decode(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """Rows of one part file (the inverse of `encode`)."""
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    rows = []
    for raw in csv.DictReader(io.StringIO(data.decode())):
        row: dict[str, Any] = dict(raw)
        for c in LIST_COLUMNS:
            row[c] = json.loads(row[c])
        row["size"] = int(row["size"])
        row["mtime"] = float(row["mtime"])
        rows.append(row)
    return rows


class ResultStore:
    """The output folder: lists finished keys, writes chunks atomically, drops superseded rows."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None) -> None:
        self.out = out.rstrip("/")
        self.format = output_format(self.out)
        self.ext = "." + {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}[self.format]
        self.fs, self.root = url_to_fs(self.out, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.sequence = 0
        self.written_parts = 0

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder, clear temp files left by a killed run, and prove the folder is writable."""
        try:
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise OutputError(f"output {self.out!r} exists and is a file; results go to a folder")
            self.fs.makedirs(self.root, exist_ok=True)
            for name in self._names():
                if name.startswith(TEMP_PREFIX):
                    self.fs.rm(f"{self.root}/{name}")
            self._write_atomic(f"{TEMP_PREFIX}probe", b"probe", final=None)
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write results to {self.out!r}: {exc.strerror or exc}") from None

    def _names(self) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def parts(self) -> list[str]:
        """Finished part files: ours (`part-*`) and Ray's `write_parquet` ones (any non-hidden name)."""
        return [n for n in self._names() if not n.startswith((".", "_")) and n.endswith(self.ext)]

    # -- reading --------------------------------------------------------------------------------------------
    def read_part(self, name: str) -> list[dict[str, Any]]:
        with self.fs.open(f"{self.root}/{name}", "rb") as handle:
            return decode(handle.read(), self.format)

    def read_all(self) -> list[dict[str, Any]]:
        return [row for name in self.parts() for row in self.read_part(name)]

    def done(self) -> dict[str, dict[str, Any]]:
        """path → {size, mtime, error, part} of every row already written."""
        done: dict[str, dict[str, Any]] = {}
        for name in self.parts():
            try:
                rows = self.read_part(name)
            except Exception as exc:  # noqa: BLE001 - a part a killed writer (Ray's) left half-written
                self._set_aside(name, exc)
                continue
            for row in rows:
                done[row["path"]] = {
                    "size": row["size"],
                    "mtime": row["mtime"],
                    "error": row["error"],
                    "part": name,
                }
        return done

    def _set_aside(self, name: str, exc: BaseException) -> None:
        """Rename an unreadable part to a hidden `.corrupt-` name (kept for inspection, ignored by readers):
        its files are then scored again, and the run says so."""
        hidden = f".corrupt-{name}"
        print(
            f"warning: {self.out}/{name} is unreadable ({type(exc).__name__}); set aside as {hidden}, "
            "its files are scored again",
            file=sys.stderr,
        )
        self.fs.mv(f"{self.root}/{name}", f"{self.root}/{hidden}")

    def drop(self, paths: Iterable[str], done: dict[str, dict[str, Any]]) -> int:
        """Rewrite (atomically) the parts holding rows for `paths`, without them.

        A changed file is scored again and must not appear twice."""
        by_part: dict[str, set[str]] = {}
        for path in paths:
            by_part.setdefault(done[path]["part"], set()).add(path)
        dropped = 0
        for name, stale in by_part.items():
            kept = [row for row in self.read_part(name) if row["path"] not in stale]
            dropped += len(stale)
            if kept:
                self._write_atomic(f"{TEMP_PREFIX}{name}", encode(kept, self.format), final=name)
            else:
                self.fs.rm(f"{self.root}/{name}")
        return dropped

    # -- writing --------------------------------------------------------------------------------------------
    def write_chunk(self, rows: list[dict[str, Any]]) -> str:
        """One complete part file for `rows`; raises OutputError (nothing half-written) when it cannot."""
        if not rows:
            return ""
        self.sequence += 1
        name = f"part-{self.run_id}-{self.sequence:05d}{self.ext}"
        try:
            self._write_atomic(f"{TEMP_PREFIX}{name}", encode(rows, self.format), final=name)
        except OSError as exc:
            raise OutputError(
                f"cannot write results to {self.out!r}: {exc.strerror or exc}. The {self.written_parts} part "
                f"file(s) written by this run (and those of earlier runs) are complete and readable; fix the "
                f"cause and rerun the same command to score only what is missing"
            ) from None
        self.written_parts += 1
        return name

    def _write_atomic(self, temp: str, data: bytes, final: str | None) -> None:
        temp_path = f"{self.root}/{temp}"
        if self.local:
            try:
                with open(temp_path, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if final is None:
                    os.unlink(temp_path)
                    return
                os.replace(temp_path, f"{self.root}/{final}")
                fd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                if os.path.exists(temp_path):
                    try:
                        os.unlink(temp_path)
                    except OSError:
                        pass
                raise
            return
        with self.fs.open(temp_path, "wb") as handle:
            handle.write(data)
        if final is None:
            self.fs.rm(temp_path)
        else:
            self.fs.mv(temp_path, f"{self.root}/{final}")
