"""Publishing to a bucket (`python -m export import-onnx --repository s3://...`) the atomic way, and batch
scoring with the model read from the same URL, against a real S3 server on loopback (moto's server mode)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from export.__main__ import main as export_main  # noqa: E402
from service.config import Settings  # noqa: E402
from service.core import InferenceCore  # noqa: E402
from service.score import main as score_main  # noqa: E402
from tests.conftest import classify_now, write_tiny_model  # noqa: E402
from tests.s3_server import S3, aws_env, s3_server  # noqa: E402
from tests.score_helpers import image_folder  # noqa: E402


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3, monkeypatch: pytest.MonkeyPatch) -> str:
    aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the standard variable: export has no flag for it
    name = f"publish-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    s3.requests.clear()
    return name


@pytest.fixture
def graph(tmp_path: Path) -> Path:
    """An ONNX classifier of 10 classes on 32x32 RGB (the tests' tiny network)."""
    return write_tiny_model(tmp_path / "src", "src", "1", seed=5) / "model.onnx"


PREPROCESSING = json.dumps(
    {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
)


def import_to(url: str, graph: Path, *extra: str) -> int:
    labels = graph.parent / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)))
    args = ["import-onnx", str(graph), "--name", "net", "--repository", url]
    return export_main([*args, "--preprocessing", PREPROCESSING, "--labels", str(labels), *extra])


def test_import_publishes_card_last_and_the_service_serves_it(
    s3: S3, bucket: str, graph: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"s3://{bucket}/models"
    assert import_to(url, graph) == 0, capsys.readouterr().err
    assert f"{url}/net/1" in capsys.readouterr().out
    writes = [p for m, p in s3.requests if m == "PUT"]
    final = [p for p in writes if p.startswith(f"/{bucket}/models/net/1/")]
    assert final[-1] == f"/{bucket}/models/net/1/model.json"  # the card last
    assert any("/.staging/" in p for p in writes)  # the graph went through a temporary prefix
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {"models/net/1/model.onnx", "models/net/1/model.json"}  # nothing left in .staging

    assert import_to(url, graph) == 0  # the next free version
    assert import_to(url, graph, "--version", "1") == 2
    assert "already exists" in capsys.readouterr().err

    core = InferenceCore(
        Settings(
            repository=url,
            model_cache=str(tmp_path / "cache"),
            storage_endpoint_url=s3.endpoint,
            default_model="net",
        )
    )
    core.load()
    try:
        assert core.ready and [m.version for m in core.models()] == ["2"]
        (photo,) = image_folder(tmp_path / "images", 1)
        (answer,) = classify_now(core, [photo.read_bytes()], top_k=3)
        assert answer.version == "2" and len(answer.top_k) == 3
    finally:
        core.close()


def test_batch_scoring_reads_the_model_from_the_bucket(
    s3: S3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    write_tiny_model(local, "tiny", "1", seed=1)
    s3.upload_folder(local, bucket, "models")
    images = tmp_path / "images"
    image_folder(images, 6)
    common = ["--model", "tiny", "--workers", "0", "--no-progress", "--model-cache", str(tmp_path / "cache")]
    remote = [str(images), "--out", str(tmp_path / "remote.jsonl"), "--repository", f"s3://{bucket}/models"]
    here = [str(images), "--out", str(tmp_path / "local.jsonl"), "--repository", str(local)]
    assert score_main([*remote, *common, "--storage-endpoint-url", s3.endpoint]) == 0
    assert score_main([*here, *common]) == 0

    def rows(name: str) -> list[dict]:
        out = []
        for part in sorted((tmp_path / name).glob("part-*")):
            out += [json.loads(line) for line in part.read_text().splitlines()]
        return sorted(out, key=lambda r: r["path"])

    got, want = rows("remote.jsonl"), rows("local.jsonl")
    assert len(got) == 6 and [(r["top_k_ids"], r["top_k_probabilities"]) for r in got] == [
        (r["top_k_ids"], r["top_k_probabilities"]) for r in want
    ]
    assert len(s3.gets("model.onnx")) == 1


def test_build_and_defaults_publish_to_a_bucket_the_same_way(
    s3: S3, bucket: str, model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`export build` and `export defaults` go through the same staged publish as import-onnx; defaults keeps
    a version the bucket already holds and builds (here: trains) only the missing one."""
    url = f"s3://{bucket}/models"
    assert export_main(["build", "lenet5", "--random-init", "--repository", url, "--name", "digits"]) == 0
    writes = [p for m, p in s3.requests if m == "PUT"]
    final = [p for p in writes if p.startswith(f"/{bucket}/models/digits/1/")]
    assert final and final[-1] == f"/{bucket}/models/digits/1/model.json"  # the card last
    assert any("/.staging/" in p for p in writes)

    s3.upload_folder(model_repo / "efficientnet_lite0", bucket, "models/efficientnet_lite0")
    capsys.readouterr()
    assert export_main(["defaults", "--repository", url]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0/1: up to date" in out
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert {"models/lenet5/1/model.json", "models/lenet5/1/model.onnx"} <= keys
    assert not [k for k in keys if "/.staging/" in k]

    core = InferenceCore(
        Settings(
            repository=url,
            model_cache=str(tmp_path / "cache"),
            storage_endpoint_url=s3.endpoint,
            default_model="lenet5",
        )
    )
    core.load()
    try:
        assert core.ready and {m.name for m in core.models()} == {"digits", "efficientnet_lite0", "lenet5"}
        (photo,) = image_folder(tmp_path / "images", 1)
        (answer,) = classify_now(core, [photo.read_bytes()], model="lenet5")
        assert answer.version == "1" and answer.top_k
    finally:
        core.close()
