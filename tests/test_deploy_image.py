"""The Dockerfile without a Docker engine: hadolint, checkov, its structure, and the runtime requirements
resolved against PyPI for the image's Python and platform (no PyTorch may come in)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deploy_k8s import run_checkov

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
RUNTIME = ROOT / "requirements" / "runtime.txt"
RAY = ROOT / "requirements" / "ray.txt"
RAYJOB_RAY_VERSION = re.search(r'rayVersion: "([^"]+)"', (ROOT / "k8s/batch/rayjob.yaml").read_text())[1]
# Ubuntu 24.04 (the CUDA image's base): python3 is 3.12, glibc 2.39, so manylinux_2_17 .. manylinux_2_39.
IMAGE_PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{y}_x86_64" for y in range(39, 16, -1)] + ["manylinux2014_x86_64"]
FORBIDDEN = {"torch", "torchvision", "torchaudio", "timm", "ray", "tensorflow", "jax"}


def stages() -> dict[str, list[str]]:
    """Dockerfile instructions by stage name (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(2) or m.group(1)
            result[current] = [line]
        elif current:
            result[current].append(line)
    return result


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:
            name, version = line.split("==", 1)
            out[normalise(name)] = version.strip()
    return out


def test_hadolint_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    out = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every inline ignore is explained in docs/DEPLOY.md.
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    for rule in re.findall(r"hadolint ignore=([\w,]+)", DOCKERFILE.read_text()):
        for code in rule.split(","):
            assert code in doc, f"hadolint ignore {code} is not explained in docs/DEPLOY.md"


@pytest.mark.slow
def test_checkov_dockerfile_finds_no_failed_check() -> None:
    report = run_checkov(["-f", str(DOCKERFILE), "--framework", "dockerfile"])
    assert report["summary"]["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 20


def test_stages_export_then_serve_without_pytorch() -> None:
    s = stages()
    assert list(s) == ["export", "serve", "batch-ray", "serve-models"], list(s)
    export, serve, serve_models = s["export"], s["serve"], s["serve-models"]
    assert any("torch==2.14.1" in i and "torchvision==0.29.1" in i for i in export)
    assert any("python -m export defaults --repository /models" in i for i in export)
    base = serve[0].split()[1]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    serve_text = "\n".join(serve)
    assert "torch" not in serve_text.lower()
    assert "requirements/runtime.txt" in serve_text
    assert re.search(r"^USER\s+\$\{APP_UID\}", serve_text, re.M) and "APP_UID=10001" in serve_text
    assert re.search(r"^EXPOSE\s+3000\s+50051$", serve_text, re.M)
    healthcheck = next(i for i in serve if i.startswith("HEALTHCHECK"))
    assert "/readyz" in healthcheck
    assert "HOME=/tmp" in serve_text and "BENTOML_HOME=/tmp/bentoml" in serve_text
    # Models: baked into the default (last) target, mounted at /models with `--target serve`.
    assert any(i.startswith("COPY --from=export") and "/models" in i for i in serve_models)
    assert "CNN_SERVE_REPOSITORY=/models" in serve_text
    # Ray only in the KubeRay image, which ends as the same unprivileged user.
    assert "ray" not in serve_text.lower().replace("array", "")
    ray = s["batch-ray"]
    assert ray[0] == "FROM serve AS batch-ray"
    assert any("requirements/ray.txt" in i and i.startswith("RUN pip install") for i in ray)
    assert [i for i in ray if i.startswith("USER")][-1] == "USER 10001:10001"


def test_dockerignore_sends_sources_only() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "**", "everything is excluded unless listed"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert not any(a.startswith(("models", ".venv", "tests", "bench", "build")) for a in allowed)
    # Every COPY from the build context is allowed by .dockerignore.
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert any(src.rstrip("/") == a.split("/")[0] or src == a for a in allowed), src


def test_runtime_requirements_are_pinned_and_match_pyproject() -> None:
    runtime = pins(RUNTIME)
    direct = pins(ROOT / "requirements" / "runtime.in")
    assert direct.items() <= runtime.items(), "runtime.txt is stale: regenerate it from runtime.in"
    for line in RUNTIME.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        assert not line or re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+!]+", line), line
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = extras["serve"] + extras["gpu"]
    for requirement in wanted:
        name = normalise(re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0])
        assert name in direct, f"{name} (pyproject serve/gpu extra) is missing from requirements/runtime.in"
    assert not FORBIDDEN & set(runtime)


def test_development_onnxruntime_is_the_image_release() -> None:
    """`make install` constrains the CPU build to requirements/cpu.txt: the tests run the image's release.
    The image's export stage validates the graphs it bakes in on that release too."""
    release = pins(RUNTIME)["onnxruntime-gpu"]
    assert pins(ROOT / "requirements" / "cpu.txt") == {"onnxruntime": release}
    assert "requirements/cpu.txt" in (ROOT / "Makefile").read_text()
    export = pins(ROOT / "requirements" / "export.txt")
    assert export["onnxruntime"] == release
    shared = set(export) & set(pins(RUNTIME))  # numpy, pillow, protobuf...: the same in both stages
    assert shared and all(export[name] == pins(RUNTIME)[name] for name in shared)


@pytest.mark.slow
def test_runtime_requirements_resolve_for_the_image_without_torch() -> None:
    """pip resolves requirements/runtime.txt against PyPI for CPython 3.12 on manylinux x86_64 wheels."""
    report = resolve_for_image(RUNTIME)
    resolved = {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    assert "torch" not in resolved and not FORBIDDEN & set(resolved)
    assert resolved["onnxruntime-gpu"].startswith("1.31")
    assert "onnxruntime" not in resolved, "the CPU and GPU wheels both install `onnxruntime`"
    # The lock is complete and exact: pip adds nothing and changes no version.
    assert resolved == pins(RUNTIME)
    for item in report["install"]:
        url = item["download_info"]["url"]
        assert url.endswith(".whl"), url
        wheel_tags = url.rsplit("/", 1)[1].removesuffix(".whl").split("-")[-3:]
        assert wheel_tags[0] in ("py3", "py2.py3", "cp312", "abi3") or wheel_tags[1] == "abi3", url


@pytest.mark.slow
def test_ray_image_requirements_complete_runtime_without_torch() -> None:
    """runtime.txt + ray.txt (the `batch-ray` image) resolve to exactly those pins: Ray, still no torch."""
    ray_pins = pins(RAY)
    assert ray_pins["ray"] == RAYJOB_RAY_VERSION, "requirements/ray.txt and rayjob.yaml's rayVersion differ"
    assert not set(ray_pins) & set(pins(RUNTIME)), "ray.txt repeats a runtime.txt pin"
    report = resolve_for_image(RUNTIME, RAY)
    resolved = {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    assert resolved == {**pins(RUNTIME), **ray_pins}
    assert "torch" not in resolved


def resolve_for_image(*requirements: Path) -> dict:
    """pip's --dry-run report for the image's Python and platform, binary wheels only."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        "--python-version",
        IMAGE_PYTHON,
        "--implementation",
        "cp",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        *[arg for r in requirements for arg in ("-r", str(r))],
        "--report",
        "-",
        "--quiet",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)
