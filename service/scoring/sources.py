"""Turn the user's INPUT (folder, glob, manifest; local or any fsspec filesystem) into a list of files.

Each file carries its size and modification time: together with the path they key finished work, so a rerun
skips what is done and scores a changed file again.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_SUFFIXES = (".txt", ".csv", ".lst", ".manifest")
GLOB_CHARS = ("*", "?", "[")
STAT_THREADS = 16  # manifest entries stat-ed at once


class NotRegularFile(OSError):
    """A listed path that is a FIFO, socket or device: never opened for reading."""


class InputError(ValueError):
    """The INPUT itself cannot be listed (missing folder, empty glob, unreadable manifest)."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # fully qualified (protocol included for non-local filesystems), as written to the output
    size: int  # -1 when the file could not be stat-ed (it then gets an error row)
    mtime: float  # seconds since the epoch, -1.0 when unknown

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.name, self.size, self.mtime)

    @property
    def name(self) -> str:
        """The path as written to the output and matched on resume: `path`, unless it is not valid UTF-8
        (Latin-1 bytes in a Linux file name), whose odd bytes are then written as `\\xe9` escapes."""
        return printable(self.path)


def printable(path: str) -> str:
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return -1.0


def _entry(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any] | None) -> SourceFile:
    if info is None:
        try:
            info = fs.info(path)
        except (OSError, ValueError):
            return SourceFile(_qualify(fs, path), -1, -1.0)
    return SourceFile(_qualify(fs, path), int(info.get("size") or 0), _mtime(info))


def _is_image(path: str, all_files: bool) -> bool:
    return all_files or path.lower().endswith(IMAGE_SUFFIXES)


def read_manifest(text: str, is_csv: bool | None = None) -> list[str]:
    """Paths from a manifest: one per line, or a CSV whose `path` column (else first column) holds them.

    `is_csv`: from the file's `.csv` suffix; None guesses from a comma in the first line. A header cell
    `path` marks a header in either form (a one-column CSV has no comma)."""
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Excel writes
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return []
    if is_csv is None:
        is_csv = "," in lines[0]
    if not is_csv:
        body = lines[1:] if lines[0].strip().lower() == "path" else lines
        return [line.strip() for line in body]  # one path per line, commas and all
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header = [cell.strip().lower() for cell in rows[0]]
    column = header.index("path") if "path" in header else 0
    body_rows = rows[1:] if "path" in header else rows
    return [row[column].strip() for row in body_rows if len(row) > column and row[column].strip()]


def list_inputs(
    spec: str,
    *,
    manifest: bool | None = None,
    all_files: bool = False,
    storage_options: dict[str, Any] | None = None,
    exclude: str | None = None,
) -> list[SourceFile]:
    """Every file INPUT names, sorted by path and without duplicates.

    A folder is walked recursively (image suffixes only unless `all_files`), a glob is expanded, a manifest
    (`.txt`/`.csv`, or `manifest=True`) lists paths relative to its own folder or absolute/URL. Files under
    `exclude` (the output folder) and hidden temp files are never listed: the results are not inputs.
    """
    fs, root = url_to_fs(spec, **(storage_options or {}))
    if any(ch in spec for ch in GLOB_CHARS) and not fs.exists(root):  # "photos [2024]" is a folder
        found = fs.glob(root, detail=True)
        files = [_entry(fs, p, i) for p, i in found.items() if i.get("type") != "directory"]
        if not files:
            raise InputError(f"the glob {spec!r} matches no file")
        return _dedupe(files)
    if not fs.exists(root):
        raise InputError(f"input {spec!r} does not exist")
    if fs.isdir(root):
        found = fs.find(root, detail=True)
        files = [
            _entry(fs, p, i)
            for p, i in found.items()
            if _is_image(p, all_files) and not _excluded(p, exclude)
        ]
        if not files:
            raise InputError(f"the folder {spec!r} holds no image file")
        return _dedupe(files)
    if manifest or (manifest is None and root.lower().endswith(MANIFEST_SUFFIXES)):
        try:
            with fs.open(root, "rt", encoding="utf-8") as handle:
                names = read_manifest(handle.read(), is_csv=root.lower().endswith(".csv"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the manifest {spec!r}: {exc}") from None
        base = root.rsplit("/", 1)[0] if "/" in root else ""
        targets = []
        for name in names:
            if "://" in name:
                targets.append(url_to_fs(name, **(storage_options or {})))
            else:
                path = name if name.startswith("/") or not base else f"{base}/{name}"
                targets.append((fs, posixpath.normpath(path)))  # ./a.jpg is a.jpg
        # one stat per file: a round trip each on an object store, so many at once
        with ThreadPoolExecutor(STAT_THREADS, thread_name_prefix="stat") as pool:
            files = list(pool.map(lambda target: _entry(target[0], target[1], None), targets))
        if not files:
            raise InputError(f"the manifest {spec!r} lists no path")
        return _dedupe(files)
    return [_entry(fs, root, None)]


def _excluded(path: str, exclude: str | None) -> bool:
    name = path.rsplit("/", 1)[-1]
    if name.startswith(".tmp-"):
        return True
    if not exclude:
        return False
    out = exclude.rstrip("/")
    return path == out or path.startswith(out + "/")


def _dedupe(files: list[SourceFile]) -> list[SourceFile]:
    unique = {f.path: f for f in files}
    return [unique[p] for p in sorted(unique)]


def open_bytes(path: str, max_bytes: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """The file's bytes, at most `max_bytes + 1` of them (the caller refuses the oversized ones)."""
    if "://" in path or ("::" in path and not os.path.exists(path)):
        fs, local = url_to_fs(path, **(storage_options or {}))
        if not _is_local(fs):
            with fs.open(local, "rb") as handle:
                return handle.read(max_bytes + 1)
    else:  # a local path is never parsed as a URL ("a::b.jpg" is a file name, not fsspec's chaining)
        local = path
    return _read_regular(local, max_bytes)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def _read_regular(path: str, max_bytes: int) -> bytes:
    """A local file's bytes; anything but a regular file is refused before a byte is read. Opening a FIFO
    would wait forever for a writer, and a device (`/dev/zero`, `/dev/stdin` in a manifest) never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{printable(path)!r} is not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            return handle.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
