"""Settings: one typed place, read from CNN_SERVE_* variables then flags, validated before anything starts."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from service.config import ENV_PREFIX, Settings, add_arguments, from_args, settings_table
from tests.http_server import ROOT


def parse(argv: list[str], environ: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), environ)


def test_environment_then_flags() -> None:
    env = {
        "CNN_SERVE_MODELS": "lenet5, efficientnet_lite0",
        "CNN_SERVE_REQUIRE_GPU": "yes",
        "CNN_SERVE_MAX_WAIT_MS": "0.5",
        "CNN_SERVE_QUEUE_SIZE": "8",
        "CNN_SERVE_LOG_LEVEL": "debug",
    }
    s = parse(["--queue-size", "16", "--no-require-gpu"], env)
    assert s.models == ("lenet5", "efficientnet_lite0")
    assert s.max_wait_ms == 0.5 and s.log_level == "debug"
    assert s.queue_size == 16 and s.require_gpu is False  # flags win over the environment
    assert parse([], {}) == Settings()


def test_to_env_round_trips() -> None:
    s = Settings(
        models=("a", "b"), providers=("CPUExecutionProvider",), thread_spinning=True, max_wait_ms=3.5
    )
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CNN_SERVE_QUEUE_SIZE": "many"}, "CNN_SERVE_QUEUE_SIZE='many' is not a valid int"),
        ({"CNN_SERVE_REQUIRE_GPU": "perhaps"}, "is not a valid bool"),
        ({"CNN_SERVE_QUEUE_SIZE": "0"}, "queue_size must be at least 1"),
        ({"CNN_SERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size must be at least 1"),
        ({"CNN_SERVE_MAX_WAIT_MS": "-1"}, "max_wait_ms must be between 0 and 60000"),
        ({"CNN_SERVE_MAX_WAIT_MS": "1e13"}, "max_wait_ms must be between 0 and 60000"),
        ({"CNN_SERVE_PRECISION": "int4"}, "precision must be auto, fp32 or fp16"),
        ({"CNN_SERVE_PREPROCESS_MODE": "rough"}, "preprocess_mode must be fast or exact"),
        ({"CNN_SERVE_LOG_LEVEL": "LOUD"}, "log_level must be one of DEBUG"),
        ({"CNN_SERVE_DECODE_THREADS": "0"}, "decode_threads must be at least 1"),
        ({"CNN_SERVE_DECODE_MEMORY_MB": "8"}, "decode_memory_mb must be at least 16"),
        ({"CNN_SERVE_INTRA_OP_THREADS": "-2"}, "thread counts must not be negative"),
        ({"CNN_SERVE_GRPC_TLS_CERT": "cert.pem"}, "grpc_tls_cert and grpc_tls_key go together"),
        (
            {"CNN_SERVE_GRPC_TLS_CERT": "/nonexistent/c.pem", "CNN_SERVE_GRPC_TLS_KEY": "/nonexistent/k.pem"},
            "grpc_tls_cert: no file at '/nonexistent/c.pem'",
        ),
        # grpcio's message-size options are C ints: this once passed and crashed every worker after start-up
        ({"CNN_SERVE_MAX_REQUEST_BYTES": "3000000000"}, "max_request_bytes must be between 1 and 2147483647"),
        ({"CNN_SERVE_MAX_REQUEST_BYTES": "0"}, "max_request_bytes must be between 1"),
        ({"CNN_SERVE_MAX_TOP_K": "0"}, "max_top_k must be at least 1"),
        ({"CNN_SERVE_MAX_IMAGES_PER_REQUEST": "0"}, "max_images_per_request must be at least 1"),
        ({"CNN_SERVE_MAX_IMAGE_PIXELS": "-5"}, "max_image_pixels must be at least 1"),
        ({"CNN_SERVE_REQUEST_TIMEOUT_S": "-1"}, "request_timeout_s must be a positive number"),
        ({"CNN_SERVE_REQUEST_TIMEOUT_S": "nan"}, "request_timeout_s must be a positive number"),
        ({"CNN_SERVE_MAX_ASPECT_RATIO": "0.5"}, "max_aspect_ratio must be at least 1"),
        ({"CNN_SERVE_DRAIN_TIMEOUT_S": "-5"}, "drain_timeout_s must be a finite number, not negative"),
        ({"CNN_SERVE_DRAIN_TIMEOUT_S": "inf"}, "drain_timeout_s must be a finite number, not negative"),
        ({"CNN_SERVE_HTTP_PORT": "70000"}, "http_port must be between 0 and 65535"),
        ({"CNN_SERVE_HTTP_PORT": "5000", "CNN_SERVE_GRPC_PORT": "5000"}, "must differ, got [5000, 5000]"),
        ({"CNN_SERVE_GPU_MEM_LIMIT_MB": "-1"}, "gpu_mem_limit_mb must not be negative"),
    ],
)
def test_bad_settings_are_refused_with_their_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env(environ)


def test_a_bad_flag_fails_before_the_server_starts() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--log-level", "LOUD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "log_level must be one of" in r.stderr, r.stderr


def test_help_names_every_setting_with_its_variable_and_default() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for f in fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"env {ENV_PREFIX}{f.name.upper()})" in text, f.name
    assert "(default: 512; env CNN_SERVE_QUEUE_SIZE)" in text


def test_docs_list_every_setting() -> None:
    doc = (ROOT / "docs" / "SERVING.md").read_text()
    assert settings_table() in doc, (
        "docs/SERVING.md's settings table is out of date; replace it with the output of\n"
        "python -c 'from service.config import settings_table; print(settings_table())'"
    )


def test_log_level_governs_the_service_loggers_only() -> None:
    code = (
        "import logging; from service import logs; logs.configure('WARNING'); "
        "logging.getLogger('service.core').info('hidden info'); "
        "logging.getLogger('service.core').warning('shown warning'); "
        "logs.configure('DEBUG'); logging.getLogger('cnn_serve.http').debug('shown debug')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "hidden info" not in r.stderr
    assert "[WARNING] [service.core] shown warning" in r.stderr
    assert r.stderr.count("shown warning") == 1  # configured twice, one handler
    assert "[DEBUG] [cnn_serve.http] shown debug" in r.stderr
