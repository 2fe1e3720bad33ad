"""The live model set: which model versions serve, their states, and how the set changes without losing a
request.

Each version is a `LoadedModel` in one of Triton's states: `loading` (being read, sha256-checked, opened and
warmed up, off the request path), `ready` (taking traffic), `unloading` (no new requests; the ones admitted
finish on it, then its session is released) or `unavailable` (with the reason). A request leases the version
that answers it (`acquire`/`release`): a swap or unload never pulls a session from under a request.

What changes the set is the control mode (`Settings.model_control`, Triton's names): `none` loads the
repository once; `poll` rescans it every `poll_interval_s`; `explicit` changes only on `load`/`unload`.
Which versions of a model serve is its version policy, `models/<name>/version_policy.json` (`VersionPolicy`).
A new version takes traffic only once it is ready, in one step under the lock; a version that fails keeps its
reason and never displaces one that serves. The core (`service.core`) delegates here; nothing here knows of
a transport.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.card import CardError, ModelCard, is_version
from service.config import Settings
from service.errors import InvalidArgument, ModelNotFound, ModelUnavailable, PermissionDenied, shown
from service.memory import return_memory
from service.pipeline import Pipeline
from service.priority import made_lowered
from service.repository import (
    RepositoryError,
    Store,
    StoreUnreachable,
    load_card,
    read_card,
    scan,
    store_for,
)
from service.sessions import GpuRequired, ModelSession

if TYPE_CHECKING:
    from service.decoding import Limits

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelSet", "VersionPolicy", "check_name"]

LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"
POLICY_FILE = "version_policy.json"
MAX_NAME = 255  # a file name's limit on every common file system
MAX_REASON = 500


def check_name(name: Any) -> str:
    """A model name as a client may send it: a plain folder name, never a path. InvalidArgument otherwise;
    whether the repository holds it is the caller's question (its listing, never the path)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a model name is required")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"model name is {len(name)} characters long; at most {MAX_NAME}")
    if "\x00" in name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise InvalidArgument(
            f"model name {name[:64]!r} is not a plain name: no '/', '\\', NUL or leading '.'"
        )
    return name


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model serve: the `latest` N (Triton's default form), `all`, or `specific` ones.

    The file holds Triton's JSON form: `{"latest": {"num_versions": 2}}`, `{"all": {}}` or
    `{"specific": {"versions": [1, 3]}}`. Without a file the latest version serves, as in Triton: a new
    version replaces the one before it rather than doubling the memory held.
    """

    kind: str = "latest"
    count: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def read(cls, model_dir: Path | tuple[Store, str]) -> VersionPolicy:
        """The policy of a local model folder, or of `(store, name)`; the default one without a file."""
        try:
            if isinstance(model_dir, tuple):
                store, name = model_dir
                text = store.read_text(f"{name}/{POLICY_FILE}")
            else:
                text = (model_dir / POLICY_FILE).read_text()
        except FileNotFoundError:
            text = None
        except StoreUnreachable:
            raise
        except OSError as e:
            raise CardError(f"{POLICY_FILE} is unreadable: {e.strerror}") from None
        if text is None:
            return cls()
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CardError(f"{POLICY_FILE} is not JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> VersionPolicy:
        if not isinstance(data, dict) or len(data) != 1:
            raise CardError(f"{POLICY_FILE} must hold one of 'latest', 'all' or 'specific'")
        ((kind, body),) = data.items()
        if not isinstance(body, dict):
            raise CardError(f"{POLICY_FILE}: {kind!r} must be an object")
        if kind == "all":
            return cls("all")
        if kind == "latest":
            n = body.get("num_versions", 1)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
                raise CardError(f"{POLICY_FILE}: latest.num_versions must be an integer from 1 to 1000")
            return cls("latest", count=n)
        if kind == "specific":
            vs = body.get("versions")
            if not isinstance(vs, list) or not vs:
                raise CardError(f"{POLICY_FILE}: specific.versions must be a non-empty list")
            text = [str(v) for v in vs if not isinstance(v, bool) and isinstance(v, int | str)]
            if len(text) != len(vs) or not all(is_version(v) for v in text):
                raise CardError(f"{POLICY_FILE}: specific.versions must be positive integers")
            return cls("specific", versions=tuple(sorted(set(text), key=int)))
        raise CardError(f"{POLICY_FILE}: unknown policy {kind!r}; latest, all or specific")

    def select(self, versions: Iterable[str]) -> list[str]:
        """The versions to serve out of those the repository holds (ascending)."""
        ordered = sorted(versions, key=int)
        if self.kind == "latest":
            return ordered[-self.count :]
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered


@dataclass(eq=False)
class LoadedModel:
    """One version of a model and its session. `generation` tells two loads of the same version apart (the
    batcher's key); `active` counts the requests that hold it."""

    name: str
    version: str
    card: ModelCard | None = None
    state: str = LOADING
    reason: str = ""
    session: ModelSession | None = None
    pipeline: Pipeline | None = None
    generation: int = 0
    active: int = 0
    fingerprint: tuple = field(default=(), repr=False)
    files_intact: bool | None = None  # its files still match what it serves (`service.integrity`)
    files_problem: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.name, self.version, self.generation)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON]


class ModelSet:
    """The versions that serve, the ones loading, draining or failed; the one place that changes them.

    Reads (`entry`, `acquire`, `by_key`, `entries`) take a short lock; changes (`start`, `load`, `unload`,
    `scan_once`) run one at a time on the caller's thread, the slow part (reading and warming a session)
    outside the lock."""

    def __init__(
        self,
        settings: Settings,
        limits: Limits,
        observer: Any,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.observer = observer
        self.on_change = on_change
        self.store = store_for(settings)  # the folder, or a URL read through the model cache
        self.root = self.store.describe()  # for messages: never a credential
        self._entries: dict[str, dict[str, LoadedModel]] = {}  # what /models and requests see
        self._by_key: dict[tuple[str, str, int], LoadedModel] = {}  # what the batcher may still run
        self._seen: dict[tuple[str, str], tuple] = {}  # folders skipped as incomplete, by fingerprint
        self._failed: dict[tuple[str, str], tuple] = {}  # failed versions: retried once their files change
        self._unloaded: set[str] = set()
        self._last_listing: dict[str, list[str]] = {}  # the repository at the last scan
        self._gauged: set[str] = set()  # models whose count of ready versions the observer has had
        self._lock = threading.Lock()
        self._changes = threading.RLock()
        self._generation = itertools.count(1)
        self._started = False  # start() has run: before it, every request is "starting"
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

    # -- reads ----
    def entries(self) -> list[LoadedModel]:
        """Every version reported, by name then version."""
        with self._lock:
            out = [e for versions in self._entries.values() for e in versions.values()]
        return sorted(out, key=lambda e: (e.name, int(e.version)))

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def default_model(self) -> str:
        with self._lock:
            if self.settings.default_model in self._entries or not self._entries:
                return self.settings.default_model
            return next(iter(self._entries))

    def entry(self, name: str | None, version: str | None, require_ready: bool = True) -> LoadedModel:
        """The version asked for, or the highest ready one; ModelNotFound, or ModelUnavailable (with the
        reason) when it is known and not ready."""
        with self._lock:
            return self._resolve(name, version, require_ready)

    def _resolve(self, name: str | None, version: str | None, require_ready: bool) -> LoadedModel:
        if not self._started:
            raise ModelUnavailable("no model is loaded yet: the service is starting")
        name = name or self.settings.default_model
        # A version that is unloading takes no new request: for those it is gone already.
        versions = {v: e for v, e in self._entries.get(name, {}).items() if e.state != UNLOADING}
        if not versions:  # the message lists nothing: the readiness probes answer it without a token
            if name in self._unloaded:
                raise ModelNotFound(f"model {shown(name)} is not loaded (it was unloaded)")
            raise ModelNotFound.of(name)
        if version in (None, "", "latest"):
            ready = [v for v, e in versions.items() if e.state == READY]
            if ready:
                return versions[max(ready, key=int)]
            chosen = versions[max(versions, key=int)]
        else:
            version = str(version)
            if version not in versions:
                raise ModelNotFound.of(name, version)
            chosen = versions[version]
        if require_ready and chosen.state != READY:
            raise ModelUnavailable(
                f"model {name!r} version {chosen.version} is {chosen.state}: {chosen.reason or 'not loaded'}"
            )
        return chosen

    def acquire(self, name: str | None, version: str | None) -> LoadedModel:
        """The ready version that answers a request, held until `release`: never released meanwhile."""
        with self._lock:
            entry = self._resolve(name, version, True)
            entry.active += 1
            return entry

    def release(self, entry: LoadedModel) -> None:
        with self._lock:
            entry.active -= 1
            done = entry.state == UNLOADING and entry.active <= 0
            if done:
                self._finish_locked(entry)
        if done:
            self._drained(entry)

    def by_key(self, key: Any) -> LoadedModel:
        """The version a batch runs on: ready or still draining."""
        with self._lock:
            entry = self._by_key.get(key)
        if entry is None or entry.session is None:
            raise ModelUnavailable(f"model {key[0]!r} version {key[1]} is no longer loaded")
        return entry

    def ready(self) -> bool:
        """Every model that should serve has a ready version (or, without strict readiness, any has one).

        Explicit mode with no model asked for is ready: there is nothing it should serve."""
        with self._lock:  # a model whose versions are all unloading is leaving: it no longer should serve
            served = [
                any(e.state == READY for e in vs.values())
                for vs in self._entries.values()
                if any(e.state != UNLOADING for e in vs.values())
            ]
        if not served:
            return self.settings.model_control == "explicit"
        return all(served) if self.settings.strict_readiness else any(served)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model of the repository and every version known, with its state
        (Triton's upper-case names) and the reason of one that is not ready."""
        try:  # a bucket is not listed per request: the last scan's listing answers
            repository = self._last_listing if self.store.remote else self._listing()
        except RepositoryError:
            repository = {}
        rows: list[dict[str, str]] = []
        reported = {(e.name, e.version) for e in self.entries()}
        for e in self.entries():
            rows.append({"name": e.name, "version": e.version, "state": e.state, "reason": e.reason})
        names = {name for name, _ in reported}
        for name in repository:
            if name not in names:
                unloaded = name in self._unloaded
                rows.append(
                    {
                        "name": name,
                        "version": "",
                        "state": UNAVAILABLE if unloaded else "",
                        "reason": "unloaded" if unloaded else "",
                    }
                )
        rows.sort(key=lambda r: (r["name"], int(r["version"] or 0)))
        if ready_only:
            rows = [r for r in rows if r["state"] == READY]
        return rows

    # -- changes ----
    def start(self) -> None:
        """The start set: the repository (mode none or poll, `models` filtering it) or `load_model`
        (explicit). Failures are kept with their reason; GpuRequired raises."""
        with self._changes:
            if self.settings.model_control == "explicit":
                listing = self._listing()
                for name in self.settings.load_model:
                    if name not in listing:
                        log.warning("load_model %r is not in the repository %s", name, self.root)
                        continue
                    self._sync(name, listing[name], pending_ok=False)
            else:
                try:
                    listing = self._listing()
                except StoreUnreachable as e:
                    if self.settings.model_control != "poll" or not self.store.remote:
                        raise
                    listing = {}
                    self._start_from_cache(e)
                if self.settings.models:
                    missing = [m for m in self.settings.models if m not in listing]
                    if missing:
                        log.warning("models %s are not in the repository %s", missing, self.root)
                for name, versions in listing.items():
                    self._sync(name, versions, pending_ok=False)
            self._started = True
        self._changed()
        if self.settings.model_control == "poll":
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()

    def _start_from_cache(self, problem: Exception) -> None:
        """Poll mode with the store out of reach at start: serve the versions that served last time from the
        model cache (verified again on load) while the poller keeps trying the store."""
        cached, listing = self.store.recall()
        if self.settings.models:
            cached = {k: v for k, v in cached.items() if k in self.settings.models}
            listing = {k: v for k, v in listing.items() if k in self.settings.models}
        self._last_listing = listing
        names = [f"{n}/{v}" for n, vs in sorted(cached.items()) for v in sorted(vs, key=int)]
        log.error("%s; serving from the model cache meanwhile: %s", problem, ", ".join(names) or "nothing")
        for name, versions in cached.items():
            for version, folder in versions.items():
                self._load_version(name, version, pending_ok=False, folder=folder)
        # What the repository held last time and the cache cannot serve: unavailable, saying why, so strict
        # readiness (and /models, the index) say what is missing until the poller reaches the store.
        reason = f"not in the model cache, and {problem}"[:MAX_REASON]
        with self._lock:
            for name, versions in listing.items():
                if name not in cached:
                    self._entries.setdefault(name, {})[versions[-1]] = LoadedModel(
                        name, versions[-1], state=UNAVAILABLE, reason=reason
                    )

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        self.loader.shutdown(wait=False, cancel_futures=True)

    def load(self, name: Any) -> None:
        """Explicit mode: load `name`'s versions by its policy (a loaded one stays; one no longer wanted is
        retired once a wanted one is ready). ModelNotFound for a name the repository does not list;
        ModelUnavailable, with the reasons, when a version failed (what served before still serves)."""
        self._explicit_only()
        name = check_name(name)
        with self._changes:
            listing = self._listing()
            if name not in listing:
                raise ModelNotFound.of(name)
            self._unloaded.discard(name)
            self._sync(name, listing[name], pending_ok=False)
            failed = [e for e in self._entries.get(name, {}).values() if e.state == UNAVAILABLE]
        self._changed()
        if failed:
            reasons = "; ".join(f"version {e.version}: {e.reason}" for e in failed)
            raise ModelUnavailable(f"model {name!r} failed to load: {reasons}")

    def unload(self, name: Any) -> None:
        """Explicit mode: retire every version of `name`; requests already admitted finish on it, later ones
        get ModelNotFound. A listed model that is not loaded is left as it is (Triton's answer too)."""
        self._explicit_only()
        name = check_name(name)
        with self._changes:
            with self._lock:
                versions = list(self._entries.get(name, {}).values())
            if not versions and name not in self._listing():
                raise ModelNotFound.of(name)
            for e in versions:
                self._retire(e, forget=True)
            self._unloaded.add(name)
        self._changed()

    def scan_once(self) -> None:
        """Poll mode's step: load new versions, retire removed ones (and the models removed entirely)."""
        with self._changes:
            try:
                listing = self._listing()
            except RepositoryError as e:
                log.error("repository scan failed, the models stay as they are: %s", e)
                return
            for name, versions in listing.items():
                self._sync(name, versions, pending_ok=True)
            for name in set(self.names()) - set(listing):
                log.info("model %s left the repository: unloading it", name)
                with self._lock:
                    gone = list(self._entries.get(name, {}).values())
                for e in gone:
                    self._retire(e, forget=True)
        self._changed()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.scan_once()
            except GpuRequired as e:  # a new version cannot change the providers of the ones serving
                log.error("repository scan: %s", e)
            except Exception:  # the poller never dies: the next scan tries again
                log.exception("repository scan failed")

    def _explicit_only(self) -> None:
        if self.settings.model_control != "explicit":
            raise PermissionDenied(
                f"models are loaded and unloaded on request only with --model-control explicit; "
                f"this server runs with {self.settings.model_control!r}"
            )

    def _listing(self) -> dict[str, list[str]]:
        listing = scan(self.store)
        if self.settings.models and self.settings.model_control != "explicit":
            listing = {k: v for k, v in listing.items() if k in self.settings.models}
        self._last_listing = listing
        return listing

    def _sync(self, name: str, versions: list[str], pending_ok: bool) -> None:
        """Bring one model to its policy over the versions the repository holds now."""
        try:
            wanted = VersionPolicy.read((self.store, name)).select(versions)
        except CardError as e:
            self._policy_failed(name, versions, str(e))
            return
        with self._lock:
            current = dict(self._entries.get(name, {}))
        for v in wanted:
            e = current.get(v)
            if e is not None and e.state == LOADING:
                continue
            files = self.store.fingerprint(name, v)
            if e is not None and e.state == READY and (not files or files == e.fingerprint):
                continue  # serving what its folder holds (or the folder is being replaced right now)
            if e is not None and self._failed.get((name, v)) == files:
                continue  # the same files failed before: tried again once they change
            if e is not None and e.state == READY:
                log.info("model %s:%s changed on disk: loading it again beside the one serving", name, v)
            self._load_version(name, v, pending_ok)
        with self._lock:
            current = dict(self._entries.get(name, {}))
        wanted_ready = any(current[v].state == READY for v in wanted if v in current)
        for v, e in current.items():
            if v in wanted:
                continue
            if v not in versions:  # its folder is gone
                self._retire(e, forget=True)
            elif e.state != READY or wanted_ready:  # a bad version never replaces a good one
                self._retire(e, forget=True)

    def _policy_failed(self, name: str, versions: list[str], reason: str) -> None:
        """An invalid policy file: what serves stays; versions not loaded say why."""
        log.error("model %s: %s; the versions serving stay", name, reason)
        self.observer.model_load_failure(name)
        with self._lock:
            mine = self._entries.setdefault(name, {})
            for v in versions:
                if v not in mine or mine[v].state == UNAVAILABLE:
                    mine[v] = LoadedModel(name, v, state=UNAVAILABLE, reason=reason[:MAX_REASON])

    def _load_version(
        self, name: str, version: str, pending_ok: bool, folder: Path | None = None
    ) -> LoadedModel | None:
        """Read, verify, open and warm up one version off the request path; it takes traffic only then.

        `pending_ok` (poll scans): a version that fails while its files are still changing is skipped until
        the next scan; one that fails twice on the same files is unavailable, with the reason."""
        fp = () if folder is not None else self.store.fingerprint(name, version)
        entry = LoadedModel(name, version, generation=next(self._generation), fingerprint=fp)
        with self._lock:
            shown = self._entries.setdefault(name, {})
            if version not in shown or shown[version].state == UNAVAILABLE:
                shown[version] = entry  # LOADING in /models meanwhile
        try:
            # A remote version's files are fetched into the model cache and verified first.
            card = read_card(folder) if folder is not None else load_card(self.store, name, version)
            entry.card = card
            entry.pipeline = Pipeline.for_card(card, self.limits, self.settings.preprocess_mode)
            # ONNX Runtime's threads take the nice value of the thread that makes the session
            session = made_lowered(self.settings.worker_niceness, lambda: ModelSession(card, self.settings))
            session.warm_up()
        except GpuRequired:
            self._forget_if_shown(entry)
            raise
        except Exception as e:  # a bad version fails alone
            entry.card, entry.pipeline = None, None
            reason = _reason(e)
            if pending_ok and self._seen.get((name, version)) != fp:
                self._seen[(name, version)] = fp
                self._forget_if_shown(entry)
                log.info(
                    "model %s:%s is not complete yet (%s): trying at the next scan", name, version, reason
                )
                return None
            self.observer.model_load_failure(name)  # counted before /models shows it
            entry.state, entry.reason = UNAVAILABLE, reason
            self._failed[(name, version)] = fp
            with self._lock:
                shown = self._entries.setdefault(name, {})
                if shown.get(version) is entry or shown.get(version) is None:
                    shown[version] = entry
                elif shown[version].state == UNAVAILABLE:
                    shown[version] = entry
                elif shown[version].state == READY:  # changed in place: the loaded one keeps serving
                    shown[version].reason = f"its files changed and do not load: {reason}"[:MAX_REASON]
            log.error("model %s:%s unavailable: %s", name, version, reason)
            return None
        entry.session, entry.state = session, READY
        self._seen.pop((name, version), None)
        self._failed.pop((name, version), None)
        with self._lock:
            shown = self._entries.setdefault(name, {})
            old = shown.get(version)
            shown[version] = entry
            self._by_key[entry.key] = entry
        if old is not None and old is not entry and old.state == READY:
            self._retire(old, forget=False)
        log.info("model %s:%s ready on %s (%s)", name, version, session.provider, session.precision)
        if session.on_gpu and self.settings.inference_workers > 1:
            log.warning(
                "%s:%s: GPU runs take turns, so inference_workers=%d only splits batches; use 1",
                name,
                version,
                self.settings.inference_workers,
            )
        return entry

    def _forget_if_shown(self, entry: LoadedModel) -> None:
        with self._lock:
            shown = self._entries.get(entry.name, {})
            if shown.get(entry.version) is entry:
                del shown[entry.version]
                if not shown:
                    del self._entries[entry.name]

    def _retire(self, entry: LoadedModel, forget: bool) -> None:
        """No new requests for `entry`; its session is released after its last admitted request.

        `forget`: its row leaves /models once drained (a removed or unloaded version); otherwise a newer load
        of the same version has already replaced it there."""
        with self._lock:
            if entry.state == UNAVAILABLE or entry.state == LOADING:
                shown = self._entries.get(entry.name, {})
                if shown.get(entry.version) is entry:
                    del shown[entry.version]
                    if not shown:
                        del self._entries[entry.name]
                return
            if entry.state == UNLOADING:
                return
            entry.state = UNLOADING
            done = entry.active <= 0
            if done:
                self._finish_locked(entry)
        log.info("model %s:%s unloading (%d requests to finish)", entry.name, entry.version, entry.active)
        if done:
            self._drained(entry)

    def _finish_locked(self, entry: LoadedModel) -> None:
        """Drained: out of the batcher's reach and of /models (unless a newer load of it is shown)."""
        self._by_key.pop(entry.key, None)
        shown = self._entries.get(entry.name, {})
        if shown.get(entry.version) is entry:
            del shown[entry.version]
            if not shown:
                del self._entries[entry.name]
        entry.session = None  # ONNX Runtime's memory goes with the last reference (a running batch's)

    def _drained(self, entry: LoadedModel) -> None:
        log.info("model %s:%s unloaded", entry.name, entry.version)
        return_memory()
        self._changed()

    def _changed(self) -> None:
        counts: dict[str, int] = {}
        for e in self.entries():
            counts[e.name] = counts.get(e.name, 0) + (e.state == READY)
        for name in self._gauged - set(counts):
            counts[name] = 0
        for name, n in counts.items():
            self.observer.model_versions(name, n)
        self._gauged = set(counts)
        if self.store.remote:
            ready: dict[str, dict[str, Path]] = {}
            for e in self.entries():
                if e.state == READY and e.card is not None and e.card.path is not None:
                    ready.setdefault(e.name, {})[e.version] = e.card.path
            self.store.remember(ready, self._last_listing)
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - a listener's fault must not undo a change
                log.exception("model set listener failed")
