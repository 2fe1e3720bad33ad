"""Where the model repository lives: a local folder, or a bucket reached through fsspec (`s3://`, `gs://`,
`az://`, `file://`).

`open_store` gives a `Store`; `service.repository` is its one user, so nothing else in the service knows where
models live. A local folder is read in place, as it always was. A remote repository is listed and read
through fsspec, and each file a card lists is copied into the local cache folder (`Settings.model_cache`)
under its sha256 from the card: downloaded to a temporary name, checked, then renamed, so a partial or altered
download never reaches the cache under its final name, and a cached file whose sha256 matches is never fetched
again. ONNX Runtime reads the verified local copy. fsspec and its backends (s3fs, gcsfs, adlfs) are imported
only when a URL asks for them: a local-only install works without them.

Credentials come from the backends' standard places (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*
environment variables and files); this module never reads, logs or shows them. URLs are shown without any
user information or query string (`redact`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.card import CARD_FILE, CardError, RepositoryError, is_version

log = logging.getLogger(__name__)

__all__ = ["LocalStore", "RemoteStore", "Store", "StoreUnreachable", "is_url", "open_store", "redact"]

SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "file": None}
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20  # bytes hashed per read: a 550 MB graph never sits in memory twice
MAX_MESSAGE = 300


class StoreUnreachable(RepositoryError):
    """The store could not be reached or refused us (network, credentials, permissions): not a property of
    the models, so what serves keeps serving and start-up says so plainly."""


def is_url(location: str | Path) -> bool:
    """True for `scheme://...` (a remote repository); a plain path (even `C:\\...`) is local."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", location) is not None


def redact(url: str) -> str:
    """`url` without user information, query or fragment: the form every log line and message shows."""
    if not is_url(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]+://\S+", lambda m: redact(m.group(0)), text)
    return f"{type(exc).__name__}: {text}"[:MAX_MESSAGE]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """A model repository's files: folders listed, small files read, version folders made local."""

    url: str
    remote: bool = False

    def describe(self) -> str:
        return redact(self.url)

    def versions(self, name: str) -> list[str]:
        """`name`'s complete versions, ascending."""
        raise NotImplementedError

    def scan(self) -> dict[str, list[str]]:
        """Model name -> complete versions, ascending; RepositoryError when the repository does not exist."""
        raise NotImplementedError

    def read_text(self, rel: str) -> str | None:
        """A small file's text (a version policy); None when it does not exist."""
        raise NotImplementedError

    def fingerprint(self, name: str, version: str) -> tuple:
        """What changes while a version folder is being written (names, sizes, times or etags)."""
        raise NotImplementedError

    def folder(self, name: str, version: str) -> Path:
        """A local folder with the version's card and files, those of a remote store verified by sha256."""
        raise NotImplementedError

    def remember(self, ready: dict[str, dict[str, Path]], listing: dict[str, list[str]]) -> None:
        """Note the local folders of the versions serving and the repository's listing (a remote store's
        cache serves them next start when the store cannot be reached, and the listing says what is
        missing); nothing to do for a local folder."""

    def recall(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        """The versions `remember` noted whose cached folders are still there, and the listing noted."""
        return {}, {}


@dataclass
class LocalStore(Store):
    """A folder on this machine, read in place."""

    url: str

    @property
    def root(self) -> Path:
        return Path(self.url)

    def versions(self, name: str) -> list[str]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted((p.name for p in model_dir.iterdir() if p.is_dir() and is_version(p.name)), key=int)

    def scan(self) -> dict[str, list[str]]:
        root = self.root
        if not root.is_dir():
            raise RepositoryError(f"model repository {str(root)!r} does not exist")
        out: dict[str, list[str]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = self.versions(model_dir.name)
            if versions:
                out[model_dir.name] = versions
        return out

    def read_text(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except FileNotFoundError:
            return None

    def fingerprint(self, name: str, version: str) -> tuple:
        try:
            files = []
            for p in (self.root / name / version).iterdir():
                st = p.stat()
                files.append((p.name, st.st_size, st.st_mtime_ns))
            return tuple(sorted(files))
        except OSError:
            return ()

    def folder(self, name: str, version: str) -> Path:
        return self.root / name / version


class RemoteStore(Store):
    """A repository in object storage (or any fsspec URL), copied file by file into the local cache.

    A version is complete once its card is there: publishers write the card last (`publish`), so the graph
    files of a version being uploaded are never read before they are all in place.

    The cache folder holds `<sha256>` (each file a card lists, verified) and `views/<key>/<name>/<version>/`
    (the card as read and a link per file to its `<sha256>`): the folder ONNX Runtime's loader reads.
    """

    remote = True

    def __init__(self, url: str, cache_dir: str | Path, endpoint_url: str = "", timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.cache = Path(cache_dir).absolute()  # the links of a cached version point here
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if "@" in parts.netloc or parts.query:
            raise RepositoryError(
                f"model repository {redact(url)!r}: credentials and options do not belong in the URL; "
                "use the store's standard environment variables or files"
            )
        if scheme not in SCHEMES:
            raise RepositoryError(
                f"model repository {redact(url)!r}: unsupported scheme {scheme!r}; "
                f"use a local path, s3://, gs://, az:// or file://"
            )
        try:
            import fsspec
        except ImportError:
            raise RepositoryError(
                f"model repository {redact(url)!r} needs fsspec: pip install 'cnn-serve[serve]'"
            ) from None
        options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
        if scheme == "s3":
            client: dict[str, Any] = {}
            if endpoint_url:
                client["endpoint_url"] = endpoint_url
            options["client_kwargs"] = client
            options["config_kwargs"] = {
                "connect_timeout": timeout_s,
                "read_timeout": timeout_s,
                "retries": {"max_attempts": 2, "mode": "standard"},
            }
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:
            raise RepositoryError(
                f"model repository {redact(url)!r} needs {SCHEMES[scheme]}: {_message(e)}"
            ) from None
        except Exception as e:  # noqa: BLE001 - a backend's own errors, shown without secrets
            raise StoreUnreachable(f"model repository {redact(url)!r}: {_message(e)}") from None
        if hasattr(self.fs, "retries"):
            self.fs.retries = 2  # s3fs retries a timeout 5 times by default: a slow store would stall us
        self.path = self.path.rstrip("/")

    # -- reading the store ----
    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one fsspec call; its failures become RepositoryError subclasses with a message that names the
        URL without secrets. FileNotFoundError passes through (the caller knows what absence means)."""
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - network, credentials, permissions: the store's problem
            raise StoreUnreachable(
                f"model repository {self.describe()!r} cannot be read ({what}): {_message(e)}"
            ) from None

    def _cards(self) -> list[str]:
        """Relative paths `<name>/<version>/model.json` of every complete version."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()
        try:
            found = self._call("listing", self.fs.find, self.path)
        except FileNotFoundError:
            found = []
        prefix = self.path + "/"
        out = []
        for p in found:
            rel = p[len(prefix) :] if p.startswith(prefix) else ""
            parts = rel.split("/")
            if len(parts) == 3 and parts[2] == CARD_FILE and not parts[0].startswith("."):
                out.append(rel)
        if not out and not found:
            try:
                exists = self._call("listing", self.fs.exists, self.path)
            except FileNotFoundError:
                exists = False
            if not exists:
                raise RepositoryError(f"model repository {self.describe()!r} does not exist")
        return out

    def scan(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rel in self._cards():
            name, version, _ = rel.split("/")
            if is_version(version):
                out.setdefault(name, []).append(version)
        return {name: sorted(vs, key=int) for name, vs in sorted(out.items())}

    def versions(self, name: str) -> list[str]:
        return self.scan().get(name, [])

    def _read(self, rel: str) -> bytes | None:
        try:
            return self._call(f"reading {rel}", self.fs.cat_file, f"{self.path}/{rel}")
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        data = self._read(rel)
        return None if data is None else data.decode("utf-8", errors="replace")

    def fingerprint(self, name: str, version: str) -> tuple:
        try:
            rows = self._call("listing", self.fs.ls, f"{self.path}/{name}/{version}", True)
        except (FileNotFoundError, RepositoryError):
            return ()
        out = []
        for r in rows:
            tag = next((r[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if r.get(k)), "")
            out.append((r["name"].rsplit("/", 1)[-1], r.get("size"), str(tag)))
        return tuple(sorted(out))

    # -- the cache ----
    def folder(self, name: str, version: str) -> Path:
        card = self._read(f"{name}/{version}/{CARD_FILE}")
        if card is None:
            raise CardError(f"{CARD_FILE} is missing from {self.describe()}/{name}/{version}")
        files = _listed_files(card)
        self.cache.mkdir(parents=True, exist_ok=True)
        for fname, (sha, size) in files.items():
            self.fetch(f"{name}/{version}/{fname}", sha, size)
        key = hashlib.sha256(b"%s\0%s\0%s" % (name.encode(), version.encode(), card)).hexdigest()[:32]
        view = self.cache / "views" / key
        if not view.is_dir():
            stage = self.cache / "views" / f".tmp-{uuid.uuid4().hex}"
            inner = stage / name / version
            inner.mkdir(parents=True)
            (inner / CARD_FILE).write_bytes(card)
            for fname, (sha, _) in files.items():
                (inner / fname).symlink_to(self.cache / sha)
            try:
                os.rename(stage, view)
            except OSError:  # another loader made the same view meanwhile: theirs is the same
                shutil.rmtree(stage, ignore_errors=True)
        return view / name / version

    def cached(self, sha: str, size: int | None = None) -> bool:
        """The cache holds a file with this sha256 (checked: a damaged copy is removed and fetched again)."""
        path = self.cache / sha
        if not path.is_file():
            return False
        if (size is None or path.stat().st_size == size) and sha256_of(path) == sha:
            return True
        log.warning("cached %s does not match its sha256: fetching it again", path)
        path.unlink(missing_ok=True)
        return False

    def fetch(self, rel: str, sha: str, size: int | None) -> Path:
        """`rel` in the cache as `<sha256>`: downloaded to a temporary name, checked, then renamed."""
        final = self.cache / sha
        if self.cached(sha, size):
            return final
        log.info("fetching %s/%s into the model cache", self.describe(), rel)
        tmp = self.cache / f".partial-{sha[:16]}-{uuid.uuid4().hex[:8]}"
        h = hashlib.sha256()
        n = 0
        try:
            try:
                src = self._call(f"opening {rel}", self.fs.open, f"{self.path}/{rel}", "rb")
            except FileNotFoundError:
                raise CardError(f"{rel} is listed in its card but missing from {self.describe()}") from None
            with src, open(tmp, "wb") as out:
                while True:
                    chunk = self._call(f"reading {rel}", src.read, CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
            actual = h.hexdigest()
            if actual != sha:
                raise CardError(
                    f"{rel.rsplit('/', 1)[-1]} sha256 mismatch: card {sha[:12]}..., "
                    f"downloaded {actual[:12]}... ({n} bytes); not cached"
                )
            if size is not None and n != size:
                raise CardError(f"{rel}: card says {size} bytes, downloaded {n}; not cached")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    @property
    def _index(self) -> Path:
        return self.cache / f"serving-{hashlib.sha256(self.url.encode()).hexdigest()[:16]}.json"

    def remember(self, ready: dict[str, dict[str, Path]], listing: dict[str, list[str]]) -> None:
        doc = {
            "serving": {name: {v: str(p) for v, p in vs.items()} for name, vs in ready.items()},
            "listing": listing,
        }
        try:
            if self._index.is_file() and json.loads(self._index.read_text()) == doc:
                return
            tmp = self._index.with_name(f".{self._index.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            os.replace(tmp, self._index)
        except (OSError, ValueError) as e:
            log.warning("could not note the cached versions in %s: %s", self._index, e)

    def recall(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        try:
            doc = json.loads(self._index.read_text())
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        serving, listing = doc.get("serving"), doc.get("listing")
        out: dict[str, dict[str, Path]] = {}
        views = (self.cache / "views").resolve()
        for name, vs in serving.items() if isinstance(serving, dict) else ():
            for v, p in vs.items() if isinstance(vs, dict) else ():
                path = Path(str(p))
                if is_version(v) and path.resolve().is_relative_to(views) and (path / CARD_FILE).is_file():
                    out.setdefault(name, {})[v] = path
        known: dict[str, list[str]] = {}
        for name, vs in listing.items() if isinstance(listing, dict) else ():
            if isinstance(vs, list) and all(isinstance(v, str) and is_version(v) for v in vs) and vs:
                known[name] = sorted(vs, key=int)
        return out, known

    # -- writing (export) ----
    def publish(self, local: Path, name: str, version: str) -> None:
        """Upload a finished local version folder as `<name>/<version>/`: its files to a temporary prefix,
        copied into place, and the card last, so a reader never sees a card whose files are not all there.
        RepositoryError when the version exists already."""
        try:
            existing = self.versions(name)
        except StoreUnreachable:
            raise
        except RepositoryError:  # an empty prefix: the first version of the repository
            existing = []
        if version in existing:
            raise RepositoryError(f"{self.describe()}/{name}/{version} already exists")
        final = f"{self.path}/{name}/{version}"
        staging = f"{self.path}/.staging/{name}-{version}-{uuid.uuid4().hex[:8]}"
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name != CARD_FILE)
        try:
            for p in files:
                self._call(f"uploading {p.name}", self.fs.put_file, str(p), f"{staging}/{p.name}")
            for p in files:
                self._call(f"copying {p.name}", self.fs.copy, f"{staging}/{p.name}", f"{final}/{p.name}")
            self._call("uploading the card", self.fs.put_file, str(local / CARD_FILE), f"{final}/{CARD_FILE}")
        finally:
            try:
                self.fs.rm(staging, recursive=True)
            except Exception as e:  # noqa: BLE001 - leftovers under .staging/ are never read
                log.warning("could not remove %s: %s", redact(staging), _message(e))


def _listed_files(card: bytes) -> dict[str, tuple[str, int | None]]:
    """The card's files: name -> (sha256, size). Only plain names and real sha256 digests: the cache path
    comes from them."""
    try:
        data = json.loads(card)
    except ValueError as e:
        raise CardError(f"{CARD_FILE} is not JSON: {e}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise CardError(f"{CARD_FILE} lists no files")
    out: dict[str, tuple[str, int | None]] = {}
    for fname, entry in files.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith(".") or not fname:
            raise CardError(f"{CARD_FILE}: file name {str(fname)[:64]!r} is not a plain name")
        sha = str(entry.get("sha256", "")).lower() if isinstance(entry, dict) else ""
        if not SHA256_RE.fullmatch(sha):
            raise CardError(f"{CARD_FILE}: {fname} has no valid sha256")
        size = entry.get("bytes")
        ok = isinstance(size, int) and not isinstance(size, bool) and size > 0
        out[fname] = (sha, size if ok else None)
    return out


def open_store(
    location: str | Path, cache_dir: str | Path = "", endpoint_url: str = "", timeout_s: float = 30.0
) -> Store:
    """The store of a repository location: a plain path is a `LocalStore`; a URL a `RemoteStore` caching
    into `cache_dir`."""
    if is_url(str(location)):
        if not cache_dir:
            raise RepositoryError("a remote model repository needs a model cache folder (--model-cache)")
        return RemoteStore(str(location), cache_dir, endpoint_url, timeout_s)
    return LocalStore(str(location))
