"""Whether the files each ready model version was loaded from are still the files it serves.

A version serves from memory: its graph was read, checked against the card's sha256 and handed to ONNX
Runtime at load. The files can change under it afterwards (`model.onnx` overwritten, the version's folder
deleted, the repository unmounted or unreadable). The version rightly serves on, but nothing would show it
until the next restart fails to load it, or loads something else. `FileCheck` compares, every
`model_check_interval_s`, the two files a ready version serves from with what it serves: the card
(`model.json`, read again and compared with the card in memory) and the graph (its sha256 against the card's,
which the bytes loaded matched). Cheap first: a file whose size and modification time are those last seen
intact is not read again; only a changed one is hashed (the graph) or parsed (the card).

A version of a remote repository (`service.storage`) was loaded from its copy in the model cache, so that
copy is what is checked: local, cheap, and what a reload would read first. The bucket is not polled for it;
a version changed in the bucket is the poller's business (poll mode), and a damaged cached file is fetched
again at the next load.

A version's state (`files_intact`, with `files_problem` saying why not) is on its `LoadedModel`, so `/models`
shows it (`ModelInfo.to_dict`); each change of state is logged once and reported to the core's observer
(`model_files_intact`, the `cnn_serve_model_files_intact{model,version}` gauge). Readiness does not change:
the version in memory is good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.card import CARD_FILE, CardError, read_card
from service.models import READY
from service.storage import sha256_of

if TYPE_CHECKING:
    from service.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    """What one loaded version's check remembers: each file's (size, mtime) when last found intact, and
    when last found changed (with the problem), so that neither is read again until it changes again."""

    intact: bool | None = None
    problem: str = ""
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    changed: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)


def file_stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def served_files(entry: LoadedModel) -> tuple[Path, str] | None:
    """The folder a ready version was read from and the graph file its session runs; None for a version
    that serves nothing (loading, unavailable) or was not read from a folder."""
    card, session = entry.card, entry.session
    if card is None or session is None or card.path is None or not getattr(session, "file", ""):
        return None
    return card.path, session.file


def loaded_stats(entry: LoadedModel) -> dict[str, tuple[int, int]]:
    """Size and mtime of the version's files as the load saw them before reading them (the model set's
    fingerprint): a file still so needs no hash at the first check."""
    return {name: (size, mtime) for name, size, mtime in entry.fingerprint}


def check(entry: LoadedModel, seen: _Seen) -> str:
    """ "" when the files match what `entry` serves, else the problem; `seen.stats` learns intact files."""
    files = served_files(entry)
    if files is None:
        return ""
    folder, graph = files
    where = f"{entry.name}/{entry.version}"
    try:
        if not folder.is_dir():
            return f"its folder {where} is gone" if not folder.exists() else f"{where} is not a folder"
        for name in (CARD_FILE, graph):
            path = folder / name
            try:
                stat = file_stat(path)
            except FileNotFoundError:
                return f"{name} is gone"
            if seen.stats.get(name) == stat:
                continue
            last = seen.changed.get(name)
            if last is not None and last[0] == stat:
                return last[1]
            problem = _compare(entry, folder, name, graph)
            if problem:
                seen.changed[name] = (stat, problem)
                return problem
            seen.stats[name] = stat
            seen.changed.pop(name, None)
    except OSError as e:  # the repository unreadable, unmounted, its disk failing
        return f"cannot read {where}: {e.strerror or type(e).__name__}"
    return ""


def _compare(entry: LoadedModel, folder: Path, name: str, graph: str) -> str:
    """The full comparison of one file whose size or mtime changed: "" when it still matches."""
    assert entry.card is not None
    if name == CARD_FILE:
        try:
            same = read_card(folder) == entry.card
        except CardError as e:  # its message may hold the folder's path: the version's name stands for it
            reason = str(e).replace(str(folder), f"{entry.name}/{entry.version}")
            return f"{CARD_FILE} no longer loads: {reason}"
        return "" if same else f"{CARD_FILE} differs from the card served"
    if sha256_of(folder / name) != entry.card.files[graph].sha256:
        return f"{graph} differs from the graph served (sha256)"
    return ""


class FileCheck:
    """Checks the ready versions of `entries()` every `interval_s` seconds on a thread of its own."""

    def __init__(
        self, entries: Callable[[], Sequence[LoadedModel]], observer: Any, interval_s: float
    ) -> None:
        self.entries = entries
        self.observer = observer
        self.interval_s = interval_s
        self._seen: dict[tuple[str, str, int], _Seen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-files", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.check_all()
            except Exception:  # noqa: BLE001 - the check never dies: the next round tries again
                log.exception("model file check failed")
            if self._stop.wait(self.interval_s):
                return

    def check_all(self) -> None:
        """One round over the ready versions; versions no longer ready are forgotten (their gauge reads 1:
        nothing served from them can differ any more)."""
        current = {e.key: e for e in self.entries() if e.state == READY and served_files(e) is not None}
        for key in set(self._seen) - set(current):
            if self._seen.pop(key).intact is False:
                self.observer.model_files_intact(key[0], key[1], True)
        for key, entry in current.items():
            seen = self._seen.get(key)
            if seen is None:
                seen = self._seen[key] = _Seen(stats=loaded_stats(entry))
            problem = check(entry, seen)
            self._record(entry, seen, problem)

    def _record(self, entry: LoadedModel, seen: _Seen, problem: str) -> None:
        intact = not problem
        entry.files_intact, entry.files_problem = intact, problem
        if (seen.intact, seen.problem) == (intact, problem):
            return
        first = seen.intact is None
        seen.intact, seen.problem = intact, problem
        self.observer.model_files_intact(entry.name, entry.version, intact)
        if not intact:
            log.warning(
                "model %s:%s: %s; it serves on from memory, but a restart would not load the same model",
                entry.name,
                entry.version,
                problem,
            )
        elif not first:
            log.info("model %s:%s: its files match what it serves again", entry.name, entry.version)
