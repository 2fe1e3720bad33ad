"""Schemathesis fuzzes the HTTP API from its own description (/openapi.json) against a live server: the
documented examples, the boundary and negative cases of every parameter and body (coverage), then random
ones (fuzzing), a fixed number per operation with a fixed seed. Checked: no server error, every status and
content type declared, every JSON body and required header as the document says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.http_server import ROOT, Server

EXAMPLES_PER_OPERATION = 50
SEED = 20261204
CHECKS = (
    "no_server_fault",  # not_a_server_error, less the 504 a request's own short deadline asks for
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def schemathesis_cli() -> list[str]:
    st = Path(sys.executable).with_name("st")
    return [str(st)] if st.exists() else [shutil.which("st") or "st"]


@pytest.mark.slow
def test_the_api_survives_fuzzing_from_its_description(web_server: Server, tmp_path: Path) -> None:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    env["FUZZ_SERVER_DEADLINE_MS"] = "30000"  # the server's request_timeout_s (its default)
    cmd = [
        *schemathesis_cli(),
        "run",
        web_server.url + "/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--seed",
        str(SEED),
        "--workers",
        "1",  # hypothesis reads lambdas' sources with `ast`, which is not thread-safe on Python 3.11
        "--request-timeout",
        "30",
        "--generation-database",
        "none",  # no examples remembered from an earlier run: the same cases every time
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-12000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 0, report[-4000:]
    print(f"schemathesis: {time.monotonic() - start:.0f} s\n{report[-1500:]}")
