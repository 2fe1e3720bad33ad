"""k8s/kserve: the ServingRuntime and InferenceService, rendered by kubectl kustomize, checked field by field
against KServe's own API models (the `kserve` package, in its own virtualenv: tests/kserve_check.py), the
ServiceAccount against Kubernetes' schemas, checkov, and the properties they must share with the Deployment.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.config import ENV_PREFIX, Settings
from tests.test_deploy_k8s import K8S, ROOT, kubectl, one, render, run_checkov, server_container, validate

KSERVE = K8S / "kserve"


def kserve_python() -> str:
    """The `kserve` package has its own virtualenv (`make kserve`): its pins conflict with the dev extra's."""
    path = ROOT / "build" / "kserve" / "bin" / "python"
    if not path.exists():
        pytest.fail("the kserve virtualenv is missing: run `make kserve` (build/kserve)")
    return str(path)


def kserve_problems(docs: list[dict[str, Any]]) -> list[list[str]]:
    out = subprocess.run(
        [kserve_python(), str(ROOT / "tests" / "kserve_check.py")],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(KSERVE)


@pytest.fixture(scope="module")
def deployment() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "cpu")


def runtime_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "ServingRuntime")["spec"]["containers"]
    return c


def test_renders_the_runtime_the_service_and_its_account(docs: list[dict[str, Any]]) -> None:
    assert sorted(d["kind"] for d in docs) == ["InferenceService", "ServiceAccount", "ServingRuntime"]
    assert {d["metadata"]["namespace"] for d in docs} == {"cnn-serve"}


def test_every_object_is_valid_against_the_kserve_api(docs: list[dict[str, Any]]) -> None:
    custom = [d for d in docs if d["apiVersion"].startswith("serving.kserve.io/")]
    assert len(custom) == 2
    assert kserve_problems(custom) == [[], []]
    for doc in docs:
        if doc not in custom:
            validate(doc)


def test_a_wrong_field_fails_the_kserve_check(docs: list[dict[str, Any]]) -> None:
    """The check above is not vacuous: a misspelt field, a wrong type and a missing required field fail."""
    runtime = json.loads(json.dumps(one(docs, "ServingRuntime")))
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")
    service = json.loads(json.dumps(one(docs, "InferenceService")))
    service["spec"]["predictor"]["model"]["storageURI"] = service["spec"]["predictor"]["model"].pop(
        "storageUri"
    )
    typed = json.loads(json.dumps(one(docs, "InferenceService")))
    typed["spec"]["predictor"]["minReplicas"] = "two"
    required = json.loads(json.dumps(one(docs, "ServingRuntime")))
    del required["spec"]["containers"][0]["ports"][0]["containerPort"]
    problems = kserve_problems([runtime, service, typed, required])
    assert "supportedModelFormat: unknown field" in problems[0][0]
    assert "storageURI: unknown field" in problems[1][0]
    assert "minReplicas: expected int" in problems[2][0]
    assert "containerPort" in problems[3][0] and "required" in problems[3][0]


def test_the_runtime_serves_onnx_over_both_v2_protocols(docs: list[dict[str, Any]]) -> None:
    spec = one(docs, "ServingRuntime")["spec"]
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    c = runtime_container(docs)
    env = {e["name"]: e["value"] for e in c["env"]}
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert set(k for k in env if k.startswith(ENV_PREFIX)) <= {
        ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__
    }
    assert settings.repository == "/mnt/models"  # where KServe's storage initializer puts storageUri
    (port,) = c["ports"]
    assert port["containerPort"] == settings.http_port == 8080 and settings.grpc_port > 0
    assert c["args"] == ["python", "-m", "service", "serve"]
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": settings.http_port}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120


def test_the_runtime_runs_as_the_deployment_does(
    docs: list[dict[str, Any]], deployment: list[dict[str, Any]]
) -> None:
    c, server = runtime_container(docs), server_container(deployment)
    assert c["securityContext"] == server["securityContext"]
    assert c["image"] == server["image"] and c["imagePullPolicy"] == server["imagePullPolicy"]
    env = {e["name"]: e["value"] for e in c["env"]}
    for e in server["env"]:
        assert env[e["name"]] == e["value"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in one(docs, "ServingRuntime")["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    pod = one(deployment, "Deployment")["spec"]["template"]["spec"]
    predictor = one(docs, "InferenceService")["spec"]["predictor"]
    assert predictor["securityContext"] == pod["securityContext"]
    assert predictor["automountServiceAccountToken"] is False


def test_the_inference_service_reads_a_bucket_with_the_runtime(docs: list[dict[str, Any]]) -> None:
    runtime = one(docs, "ServingRuntime")
    predictor = one(docs, "InferenceService")["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith("s3://")
    account = one(docs, "ServiceAccount")
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False and account["secrets"]
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "storage initializer" in doc and account["secrets"][0]["name"] in doc


@pytest.mark.slow
def test_checkov_finds_no_failed_check(tmp_path: Path) -> None:
    out = subprocess.run([kubectl(), "kustomize", str(KSERVE)], capture_output=True, text=True, check=True)
    (tmp_path / "kserve.yaml").write_text(out.stdout)
    report = run_checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    assert report["summary"]["failed"] == 0, [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]
    ]
