"""Metrics: names, labels and the multiprocess mode that BentoML's /metrics reads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.core import ModelInfo
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_request_observer_and_model_info_are_exposed() -> None:
    m = Metrics()
    m.model_versions("lenet5", 1)  # a loaded model's name may be a label
    m.request("lenet5", "classify", "http", "200", 0.02, "1")
    m.request("lenet5", "classify", "http", "400", 0.001)
    with m.in_flight("grpc"):
        inside = _families(generate_latest(m.registry).decode())
    m.queue_depth(3)
    m.decode_memory(12_345_678)
    m.queue_wait(0.004)
    m.preprocess(0.01)
    m.inference(0.05, 8, "lenet5", "1")
    m.model_info([ModelInfo("lenet5", "1", "READY", runtime={"provider": "CPUExecutionProvider"})])
    fams = _families(generate_latest(m.registry).decode())

    reqs = {
        (s.labels["status"], s.labels["protocol"]): s.value
        for s in fams["cnn_serve_requests"].samples
        if s.name == "cnn_serve_requests_total"
    }
    assert reqs == {("200", "http"): 1.0, ("400", "http"): 1.0}
    versions = {
        s.labels["status"]: s.labels["version"]
        for s in fams["cnn_serve_requests"].samples
        if s.name == "cnn_serve_requests_total"
    }
    assert versions == {"200": "1", "400": "-"}  # the version that answered; none for a refusal
    in_flight = [s for s in inside["cnn_serve_in_flight_requests"].samples if s.labels["protocol"] == "grpc"]
    assert in_flight[0].value == 1.0
    after = [s for s in fams["cnn_serve_in_flight_requests"].samples if s.labels["protocol"] == "grpc"]
    assert after[0].value == 0.0
    assert fams["cnn_serve_queue_depth"].samples[0].value == 3.0
    assert fams["cnn_serve_decode_memory_bytes"].samples[0].value == 12_345_678.0
    batch = {
        s.labels.get("le"): s.value
        for s in fams["cnn_serve_batch_size"].samples
        if s.name.endswith("_bucket")
    }
    assert batch["4.0"] == 0.0 and batch["8.0"] == 1.0
    assert {s.labels["version"] for s in fams["cnn_serve_batch_size"].samples} == {"1"}
    info = fams["cnn_serve_model_info"].samples[0]
    assert info.labels["provider"] == "CPUExecutionProvider" and info.value == 1.0
    assert (info.labels["name"], info.labels["version"], info.labels["state"]) == ("lenet5", "1", "READY")
    for name in (
        "cnn_serve_request_duration_seconds",
        "cnn_serve_queue_wait_seconds",
        "cnn_serve_preprocess_seconds",
        "cnn_serve_inference_seconds",
    ):
        count = [s for s in fams[name].samples if s.name == name + "_count"]
        assert sum(s.value for s in count) >= 1.0


def test_multiprocess_mode_writes_files_read_by_the_collector(tmp_path: Path) -> None:
    """As in a BentoML worker: the directory is set after prometheus_client was imported."""
    script = textwrap.dedent(
        f"""
        import os, prometheus_client
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from service.core import ModelInfo
        from service.metrics import Metrics
        m = Metrics()
        m.request("efficientnet_lite0", "classify", "grpc", "OK", 0.1)
        m.queue_depth(2)
        m.model_info([ModelInfo("x", "1", "READY", runtime={{"provider": "CPUExecutionProvider"}})])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env, timeout=60)
    assert list(tmp_path.glob("*.db")), "no multiprocess files were written"
    reader = textwrap.dedent(
        """
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        r = CollectorRegistry(); MultiProcessCollector(r); print(generate_latest(r).decode())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", reader],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        timeout=60,
    ).stdout
    fams = _families(out)
    total = [s for s in fams["cnn_serve_requests"].samples if s.name == "cnn_serve_requests_total"]
    assert total[0].labels["protocol"] == "grpc" and total[0].value == 1.0
    assert "cnn_serve_model_info" in fams
