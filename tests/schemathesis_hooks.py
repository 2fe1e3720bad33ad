"""Schemathesis' hooks for `tests/test_fuzz.py` (loaded through SCHEMATHESIS_HOOKS): the server-error check.

No test here. Every 5xx is a failure but one: the 504 `deadline_exceeded` of a request that asked, with
`x-request-timeout-ms`, for less time than the server's own deadline (`request_timeout_s`). The fuzzer sends
deadlines down to 1e-20 ms, and a server that answers those in time does not exist; the answer is the one the
document declares. A 504 of a request that asked for no deadline of its own still fails.
"""

from __future__ import annotations

import json
import math
import os

import schemathesis

SERVER_DEADLINE_MS = float(os.environ.get("FUZZ_SERVER_DEADLINE_MS", "30000"))


def _asked_deadline_ms(case: schemathesis.Case) -> float | None:
    for name, value in (case.headers or {}).items():
        if name.lower() == "x-request-timeout-ms":
            try:
                asked = float(value)
            except (TypeError, ValueError):
                return None
            return asked if math.isfinite(asked) else None
    return None


@schemathesis.check
def no_server_fault(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """No 5xx, but the 504 a request's own short deadline asks for."""
    if response.status_code < 500:
        return None
    if response.status_code == 504:
        try:
            code = json.loads(response.content).get("code")
        except (ValueError, AttributeError):
            code = None
        asked = _asked_deadline_ms(case)
        if code == "deadline_exceeded" and asked is not None and asked < SERVER_DEADLINE_MS:
            return None
    raise AssertionError(f"server error {response.status_code}: {response.content[:500]!r}")
