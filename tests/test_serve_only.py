"""The service runs without PyTorch and Ray: every `service` module imports, and a real server answers.

An import hook on `sitecustomize` (PYTHONPATH) makes `torch`, `torchvision`, `timm` and `ray` imports fail in
every process of the server (BentoML's arbiter and its worker), as in the Docker image's serve-only venv.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import httpx
from skimage import data as photos

import service
from tests.http_server import ROOT, jpeg, running_server

BLOCKED = ("torch", "torchvision", "timm", "ray")
HOOK = f"""
import sys
from importlib.abc import MetaPathFinder

class _Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked: serve-only environment", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


def _blocking_env(tmp: Path) -> dict[str, str]:
    hook_dir = tmp / "serve_only_hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    return {"PYTHONPATH": f"{hook_dir}:{ROOT}"}


def test_hook_really_blocks_torch(tmp_path: Path) -> None:
    env = _blocking_env(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "serve-only" in r.stderr


def test_every_service_module_imports_without_torch_or_ray(tmp_path: Path) -> None:
    names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
    assert "service.http.service" in names
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({n!r})\n" for n in names if not n.endswith("__main__")
    )
    code += f"assert not any(m.split('.')[0] in {BLOCKED!r} for m in sys.modules), 'leaked'\n"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**_blocking_env(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_server_classifies_without_torch_or_ray(tmp_path: Path) -> None:
    with running_server(
        tmp_path, "--models", "lenet5,efficientnet_lite0", env_extra=_blocking_env(tmp_path)
    ) as server:
        r = httpx.post(server.url + "/classify", content=jpeg(photos.chelsea()), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["probability"] > 0
        assert "blocked: serve-only" not in server.log()
