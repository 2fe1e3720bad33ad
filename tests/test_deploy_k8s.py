"""The Kubernetes manifests, checked with the real tools: kubectl kustomize, kubernetes-validate (custom
resources against tests/schemas), checkov and yamllint, plus the properties a deployment needs (probes,
security, rollouts that lose no request, GPU scheduling, autoscaling on a metric the service exports).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ["cpu", "gpu"]
# Oldest Kubernetes the manifests target (the preStop `sleep` action is on by default from 1.30) and newest
# known to kubernetes-validate.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS / "podmonitor.json",
    ("ray.io/v1", "RayJob"): SCHEMAS / "rayjob.json",
}
# checkov checks skipped everywhere; each one is listed with its reason in docs/DEPLOY.md.
CHECKOV_SKIPS = ["CKV_K8S_43"]


def kubectl() -> str:
    path = shutil.which("kubectl") or "/usr/bin/kubectl"
    if not Path(path).exists():
        pytest.fail("kubectl is needed to render the kustomizations (it is at /usr/bin/kubectl on CI)")
    return path


def checkov() -> str:
    """checkov has its own virtualenv (`make checkov`): its pins conflict with pytest and scikit-image."""
    for candidate in (ROOT / "build" / "checkov" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("checkov not found: run `make checkov` (a virtualenv in build/checkov)")


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def batch() -> list[dict[str, Any]]:
    return render(K8S / "batch")


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate(doc: dict[str, Any]) -> None:
    """Built-in kinds against Kubernetes' schemas (strict); custom resources against ours. A kind with no
    schema is a failure, never a warning."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_SCHEMAS:
        schema = json.loads(CUSTOM_SCHEMAS[key].read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.Draft202012Validator(schema).validate(doc)
        for template in pod_templates_of(doc):
            validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            )
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def pod_templates_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayJob":
        cluster = doc["spec"].get("rayClusterSpec", {})
        groups = [cluster.get("headGroupSpec", {})] + list(cluster.get("workerGroupSpecs", []))
        return [g["template"] for g in groups if "template" in g]
    return []


# --- rendering and schemas -------------------------------------------------------------------------------


def test_each_overlay_renders_every_kind(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodMonitor",
            "Service",
            "ServiceAccount",
        ]
    )
    assert {d["metadata"].get("namespace") for d in docs} == {"cnn-serve"}


def test_every_rendered_object_is_valid(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    for doc in overlay[1]:
        validate(doc)


def test_batch_objects_and_rayjob_are_valid(batch: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in batch)
    assert kinds == ["Job", "NetworkPolicy", "PersistentVolumeClaim", "ServiceAccount"]
    for doc in batch:
        validate(doc)
    rayjob = K8S / "batch" / "rayjob.yaml"
    if not rayjob.exists():
        pytest.skip("k8s/batch/rayjob.yaml is missing")
    docs = [d for d in yaml.safe_load_all(rayjob.read_text()) if d]
    assert [d["kind"] for d in docs] == ["RayJob"]
    for doc in docs:
        validate(doc)
    assert "service.score" in docs[0]["spec"]["entrypoint"]
    assert "--engine ray" in docs[0]["spec"]["entrypoint"]


def test_a_missing_schema_or_a_wrong_field_fails() -> None:
    """The validation above is not vacuous: unknown kinds, typos and bad custom resources are caught."""
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}}, K8S_VERSIONS[0]
        )
    deployment = one(render(K8S / "overlays" / "cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        validate(deployment)
    monitor = one(render(K8S / "overlays" / "cpu"), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    monitor["spec"]["podMetricsEndpoints"][0] = {"port": "http", "interval": "fifteen"}
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


# --- what the pods do --------------------------------------------------------------------------------------


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def test_probes_cover_startup_readiness_liveness_and_grpc(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    c = server_container(overlay[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000, "grpc": 50051}
    # Startup: the gRPC health service, SERVING for "" only once every model is loaded and warmed up.
    assert c["startupProbe"]["grpc"]["port"] == ports["grpc"]
    assert c["startupProbe"]["grpc"].get("service", "") == ""
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget >= 120, "model loading and warm-up get at least two minutes"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}


def test_security_context(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    docs = overlay[1]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = server_container(docs)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000
    # Every write goes to the writable tmp volume.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in c["env"]}
    for name in ("HOME", "TMPDIR", "BENTOML_HOME"):
        assert env[name].startswith("/tmp"), name


def test_rollouts_lose_no_request(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    docs = overlay[1]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    pause = server_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    drain = float(config(docs)["CNN_SERVE_DRAIN_TIMEOUT_S"])
    assert drain == Settings.from_env(config(docs)).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    pdb = one(docs, "PodDisruptionBudget")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB must not block node drains"


def test_configmap_is_valid_settings(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Every CNN_SERVE_* key is a real setting and the whole map parses (a typo would be silently ignored)."""
    data = config(overlay[1])
    known = {"CNN_SERVE_" + name.upper() for name in Settings.__dataclass_fields__}
    assert set(data) <= known, set(data) - known
    settings = Settings.from_env(data)
    c = server_container(overlay[1])
    assert settings.http_port == 3000 and settings.grpc_port == 50051
    assert c["envFrom"][0]["configMapRef"]["name"] == one(overlay[1], "ConfigMap")["metadata"]["name"]


def test_service_and_network_policy_expose_both_ports(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    docs = overlay[1]
    service = one(docs, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 3000, "http"),
        ("grpc", 50051, "grpc"),
    }
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not policy["spec"].get("egress"), "the service opens no connection"
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {3000, 50051}
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_gpu_overlay_schedules_on_gpus_and_scales_on_in_flight_requests() -> None:
    docs = render(K8S / "overlays" / "gpu")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    settings = Settings.from_env(config(docs))
    assert settings.require_gpu and settings.providers[0] == "CUDAExecutionProvider"
    hpa = one(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in exported_metric_names(), f"{name} is not a metric of service/metrics.py"
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "prometheus-adapter" in doc and name in doc


def test_cpu_overlay_scales_on_cpu() -> None:
    docs = render(K8S / "overlays" / "cpu")
    (metric,) = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    c = server_container(docs)
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    assert Settings.from_env(config(docs)).providers == ("CPUExecutionProvider",)


def exported_metric_names() -> set[str]:
    """The Prometheus series names the service exports (from a real registry of service/metrics.py)."""
    from service.metrics import Metrics

    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_batch_job_runs_the_scoring_cli_safely(batch: list[dict[str, Any]]) -> None:
    job = one(batch, "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:3] == ["python", "-m", "service.score"]
    # The arguments parse with the real CLI's parser.
    from service.score import build_parser

    args = build_parser().parse_args(c["args"][3:])
    assert args.out.endswith(".parquet") and args.model == "efficientnet_lite0"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data", "/tmp"}


# --- linters -----------------------------------------------------------------------------------------------


def test_yamllint() -> None:
    files = [str(p) for p in sorted(K8S.rglob("*.yaml"))] + [str(ROOT / "bentofile.yaml")]
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-c", str(K8S / ".yamllint.yaml"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_checkov_finds_no_failed_check(tmp_path: Path) -> None:
    """checkov on each rendered overlay and the batch objects; skips are listed in docs/DEPLOY.md."""
    for name, path in [*((o, K8S / "overlays" / o) for o in OVERLAYS), ("batch", K8S / "batch")]:
        out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True)
        (tmp_path / f"{name}.yaml").write_text(out.stdout)
    report = run_checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    summary = report["summary"]
    assert summary["failed"] == 0, [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]
    ]
    assert summary["passed"] > 100
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped <= set(CHECKOV_SKIPS)


def run_checkov(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [checkov(), *args, "--skip-download", "--output", "json", "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]
    report = json.loads(out.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_skips_are_documented() -> None:
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    for check in CHECKOV_SKIPS:
        line = next((ln for ln in doc.splitlines() if check in ln), "")
        assert re.search(r"\w{4,}.*\w{4,}", line.replace(check, "")), f"{check} needs its reason in DEPLOY.md"
