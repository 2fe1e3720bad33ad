"""Model repositories in object storage, against a real S3 server on loopback (moto's server mode): a bucket
serves and classifies like a folder, files are cached by sha256 and verified, an altered file is refused, and
a store that is down, slow or refuses us fails plainly without taking the cached models with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.card import RepositoryError
from service.config import Settings
from service.core import InferenceCore
from service.storage import StoreUnreachable, redact
from tests.conftest import classify_now, encode, write_tiny_model
from tests.http_server import ROOT, free_port, running_server
from tests.s3_server import DUMMY_CREDENTIALS, S3, aws_env, s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket holding `tiny` (versions 1 and 2, both serving) and `tinyprob` under `models/`."""
    aws_env(monkeypatch)
    name = f"models-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    local = tmp_path / "local"
    write_tiny_model(local, "tiny", "1", seed=1)
    write_tiny_model(local, "tiny", "2", seed=2)
    (local / "tiny" / "version_policy.json").write_text('{"all": {}}')
    write_tiny_model(local, "tinyprob", "1", seed=4, kind="probabilities")
    s3.upload_folder(local, name, "models")
    s3.requests.clear()
    return name


@pytest.fixture(scope="module")
def photo(chelsea: Image.Image) -> bytes:
    return encode(chelsea, "JPEG", quality=90)


def remote_settings(s3: S3, bucket: str, cache: Path, **kw: object) -> Settings:
    return Settings(
        repository=f"s3://{bucket}/models",
        model_cache=str(cache),
        storage_endpoint_url=s3.endpoint,
        default_model="tiny",
        **kw,
    )


def started(settings: Settings) -> InferenceCore:
    core = InferenceCore(settings)
    core.load()
    return core


def test_a_bucket_serves_like_the_same_folder(s3: S3, bucket: str, tmp_path: Path, photo: bytes) -> None:
    remote = started(remote_settings(s3, bucket, tmp_path / "cache"))
    local = started(Settings(repository=str(tmp_path / "local"), default_model="tiny"))
    try:
        assert remote.ready
        assert {(m.name, m.version, m.state) for m in remote.models()} == {
            (m.name, m.version, m.state) for m in local.models()
        }
        for model, version in (("tiny", "1"), ("tiny", "2"), ("tinyprob", None)):
            (a,) = classify_now(remote, [photo], model=model, version=version, top_k=3)
            (b,) = classify_now(local, [photo], model=model, version=version, top_k=3)
            assert a.to_dict() == b.to_dict()
        # ONNX Runtime read the verified copies in the cache, named by their sha256 from the card.
        info = remote.model_info("tiny", "1")
        sha = info.card.files["model.onnx"].sha256
        assert (tmp_path / "cache" / sha).is_file()
        assert (info.card.path / "model.onnx").resolve() == (tmp_path / "cache" / sha)
        assert not list((tmp_path / "cache").glob(".partial-*"))
    finally:
        remote.close()
        local.close()


def test_a_second_start_fetches_no_model_file(s3: S3, bucket: str, tmp_path: Path, photo: bytes) -> None:
    settings = remote_settings(s3, bucket, tmp_path / "cache")
    first = started(settings)
    first.close()
    fetched = s3.gets(".onnx")
    assert len(fetched) == 3  # tiny 1, tiny 2, tinyprob 1: each once
    s3.requests.clear()
    second = started(settings)
    try:
        assert second.ready
        assert s3.gets(".onnx") == []  # the cache answered; only the listing and the cards were read
        assert s3.gets("model.json")
        (answer,) = classify_now(second, [photo], model="tiny", top_k=1)
        assert answer.version == "2"
    finally:
        second.close()


def test_a_cached_file_that_no_longer_matches_is_fetched_again(s3: S3, bucket: str, tmp_path: Path) -> None:
    settings = remote_settings(s3, bucket, tmp_path / "cache", models=("tinyprob",))
    started(settings).close()
    (blob,) = [p for p in (tmp_path / "cache").iterdir() if p.is_file() and len(p.name) == 64]
    blob.write_bytes(b"damaged on disk")
    s3.requests.clear()
    core = started(settings)
    try:
        assert core.ready
        assert len(s3.gets(".onnx")) == 1
        assert blob.read_bytes() != b"damaged on disk"
    finally:
        core.close()


def test_a_file_altered_in_the_bucket_is_refused(s3: S3, bucket: str, tmp_path: Path) -> None:
    other = write_tiny_model(tmp_path / "other", "tiny", "1", seed=99) / "model.onnx"
    s3.client().upload_file(str(other), bucket, "models/tiny/1/model.onnx")  # the card still names the old
    core = started(remote_settings(s3, bucket, tmp_path / "cache", strict_readiness=False))
    try:
        info = core.model_info("tiny", "1")
        assert info.state == "UNAVAILABLE"
        assert "sha256 mismatch" in info.reason and "not cached" in info.reason
        assert core.model_info("tiny", "2").state == "READY"  # the others serve
        cache = tmp_path / "cache"
        names = {p.name for p in cache.iterdir()}
        assert not any(n.startswith(".partial") for n in names)
        import hashlib

        assert hashlib.sha256(other.read_bytes()).hexdigest() not in names
    finally:
        core.close()


def test_a_version_without_its_card_is_not_there_yet(s3: S3, bucket: str, tmp_path: Path) -> None:
    """Publishers upload the card last: a version whose graph is there but not its card is not listed."""
    s3.client().put_object(Bucket=bucket, Key="models/tiny/3/model.onnx", Body=b"half a version")
    core = started(remote_settings(s3, bucket, tmp_path / "cache"))
    try:
        assert {m.version for m in core.models() if m.name == "tiny"} == {"1", "2"}
        assert core.ready
    finally:
        core.close()


def test_the_endpoint_down_at_start_up(bucket: str, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        repository=f"s3://{bucket}/models",
        model_cache=str(tmp_path / "cache"),
        storage_endpoint_url=down,
        storage_timeout_s=2,
    )
    core = InferenceCore(settings)
    with pytest.raises(StoreUnreachable, match=f"s3://{bucket}/models.*cannot be read"):
        core.load()
    core.close()
    # The command line: one line naming the repository, exit status 1, before any server starts.
    r = serve_cli(settings, tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("error: model repository") and "cannot be read" in r.stderr
    assert DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in r.stderr + r.stdout


def test_credentials_absent(s3: S3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch, credentials=False)
    settings = remote_settings(s3, bucket, tmp_path / "cache")
    core = InferenceCore(settings)
    with pytest.raises(StoreUnreachable, match="credentials"):
        core.load()
    core.close()
    r = serve_cli(settings, tmp_path)
    assert r.returncode == 1 and "credentials" in r.stderr.lower(), r.stderr


def test_a_missing_bucket_is_a_clear_error(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    core = InferenceCore(remote_settings(s3, "no-such-bucket-here", tmp_path / "cache"))
    with pytest.raises(RepositoryError, match="s3://no-such-bucket-here/models' does not exist"):
        core.load()
    core.close()


def test_a_slow_store_does_not_hold_back_the_cached_models(
    s3: S3, bucket: str, tmp_path: Path, photo: bytes
) -> None:
    settings = remote_settings(
        s3, bucket, tmp_path / "cache", model_control="poll", poll_interval_s=0.5, storage_timeout_s=1
    )
    first = started(settings)
    first.close()
    s3.delay_s = 20.0  # every answer of the store now takes 20 s
    try:
        t0 = time.monotonic()
        core = started(settings)
        took = time.monotonic() - t0
        try:
            assert core.ready and took < 12, took  # well before the store's first answer
            assert {(m.name, m.version) for m in core.models() if m.state == "READY"} == {
                ("tiny", "1"),
                ("tiny", "2"),
                ("tinyprob", "1"),
            }
            (answer,) = classify_now(core, [photo], model="tiny", version="1", top_k=1)
            assert answer.version == "1"
            # The store answers again: the poller picks up what was published meanwhile.
            new = tmp_path / "new"
            write_tiny_model(new, "tinyprob", "2", seed=8, kind="probabilities")
            s3.delay_s = 0.0
            s3.upload_folder(new, bucket, "models")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and core.model_info("tinyprob").version != "2":
                time.sleep(0.2)
            assert core.model_info("tinyprob").version == "2" and core.ready
        finally:
            core.close()
    finally:
        s3.delay_s = 0.0


def test_poll_mode_loads_a_version_published_to_the_bucket(
    s3: S3, bucket: str, tmp_path: Path, photo: bytes
) -> None:
    core = started(remote_settings(s3, bucket, tmp_path / "cache", model_control="poll", poll_interval_s=0.3))
    try:
        assert {m.version for m in core.models() if m.name == "tinyprob"} == {"1"}
        new = tmp_path / "new"
        write_tiny_model(new, "tinyprob", "2", seed=7, kind="probabilities")
        s3.upload_folder(new, bucket, "models")  # files first, the card last
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            versions = {m.version: m.state for m in core.models() if m.name == "tinyprob"}
            if versions == {"2": "READY"}:
                break
            time.sleep(0.2)
        assert versions == {"2": "READY"}
        (answer,) = classify_now(core, [photo], model="tinyprob", top_k=1)
        assert answer.version == "2"
    finally:
        core.close()


def serve_cli(settings: Settings, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m service serve` with these settings' repository flags, the ports free."""
    args = [
        "--repository",
        settings.repository,
        "--model-cache",
        settings.model_cache,
        "--storage-endpoint-url",
        settings.storage_endpoint_url,
        "--storage-timeout-s",
        str(settings.storage_timeout_s),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
    ]
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_server_serves_a_bucket_and_shows_no_secret(
    s3: S3, bucket: str, tmp_path: Path, photo: bytes
) -> None:
    env = {**DUMMY_CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent"}
    with running_server(
        tmp_path,
        "--repository",
        f"s3://{bucket}/models",
        "--model-cache",
        str(tmp_path / "cache"),
        "--storage-endpoint-url",
        s3.endpoint,
        "--default-model",
        "tiny",
        env_extra=env,
    ) as server:
        r = httpx.post(f"{server.url}/classify", files={"file": ("cat.jpg", photo, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny" and r.json()["version"] == "2"
        shown = [httpx.get(f"{server.url}{p}", timeout=30).text for p in ("/models", "/metrics")]
        shown.append(server.log())
        for text in shown:
            assert DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text
            assert DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text
        models = json.loads(shown[0])
        assert {(m["name"], m["version"]) for m in models["models"]} >= {("tiny", "1"), ("tiny", "2")}


def test_a_file_url_repository_goes_through_the_cache(tiny_repo: Path, tmp_path: Path, photo: bytes) -> None:
    remote = started(
        Settings(repository=tiny_repo.as_uri(), model_cache=str(tmp_path / "cache"), default_model="tiny")
    )
    local = started(Settings(repository=str(tiny_repo), default_model="tiny"))
    try:
        assert [(m.name, m.version) for m in remote.models()] == [(m.name, m.version) for m in local.models()]
        (a,) = classify_now(remote, [photo], model="tinygray", top_k=3)
        (b,) = classify_now(local, [photo], model="tinygray", top_k=3)
        assert a.to_dict() == b.to_dict()
        assert remote.model_info("tinygray").card.path.is_relative_to(tmp_path / "cache")
    finally:
        remote.close()
        local.close()


def test_urls_are_shown_without_secrets(tmp_path: Path) -> None:
    url = "s3://AKIDEXAMPLE:s3cr3t-value@bucket/models?X-Amz-Security-Token=t0ken-value"
    assert redact(url) == "s3://bucket/models"
    settings = Settings(repository=url, model_cache=str(tmp_path / "cache"), storage_timeout_s=1)
    r = serve_cli(settings.replace(storage_endpoint_url=f"http://127.0.0.1:{free_port()}"), tmp_path)
    assert r.returncode == 1 and "credentials and options do not belong in the URL" in r.stderr
    for secret in ("AKIDEXAMPLE", "s3cr3t-value", "t0ken-value"):
        assert secret not in r.stderr + r.stdout


def test_poll_mode_with_the_store_down_serves_the_cache_and_says_what_is_missing(
    s3: S3, bucket: str, tmp_path: Path, photo: bytes
) -> None:
    cache = tmp_path / "cache"
    settings = remote_settings(
        s3, bucket, cache, model_control="poll", poll_interval_s=0.5, storage_timeout_s=1
    )
    started(settings).close()
    tinyprob = next(p for p in (cache / "views").iterdir() if (p / "tinyprob").is_dir())
    shutil.rmtree(tinyprob)  # the cache no longer holds tinyprob
    down = settings.replace(storage_endpoint_url=f"http://127.0.0.1:{free_port()}")
    core = started(down)
    try:
        states = {(m.name, m.version): (m.state, m.reason) for m in core.models()}
        assert states[("tiny", "1")][0] == states[("tiny", "2")][0] == "READY"
        state, reason = states[("tinyprob", "1")]
        assert state == "UNAVAILABLE" and "not in the model cache" in reason and "cannot be read" in reason
        assert not core.ready  # strict readiness: tinyprob should serve and does not
        (answer,) = classify_now(core, [photo], model="tiny", top_k=1)
        assert answer.version == "2"
        assert {r["name"] for r in core.repository_index()} == {"tiny", "tinyprob"}
    finally:
        core.close()
