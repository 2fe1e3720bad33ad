"""The service's own log lines (`service.*`, `cnn_serve.*`) at `Settings.log_level`, on stderr; the JSON
access log of both transports; and the request id rule they share.

BentoML configures only its own loggers and leaves the root at WARNING, so without this the core's INFO lines
(which models are ready, on which provider) would vanish. The JSON access log (`cnn_serve.access`) has its own
handler and is not governed by `log_level`: one JSON object per line, so that nothing a client sends (a model
name with a newline, a request id with spaces) can forge or split a line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGERS = ("service", "cnn_serve")
FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"
# A client's request id is kept only if it is a plain token: it is echoed in answers and written in logs.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's request id if it is a plain token (HTTP header or gRPC metadata), else a new one."""
    return given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def access_logger() -> logging.Logger:
    """A logger that writes bare JSON lines to stderr, whatever BentoML did to the root logger."""
    logger = logging.getLogger("cnn_serve.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def access(logger: logging.Logger, **fields: Any) -> None:
    """One access line: `{"ts", "type": "access", ...fields}` as JSON (values escaped by the encoder)."""
    logger.info(json.dumps({"ts": round(time.time(), 3), "type": "access", **fields}, default=str))


def configure(level: str) -> None:
    """Idempotent: BentoML may import the service module twice; a second call only sets the level."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.propagate = False
        if not any(getattr(h, "_cnn_serve", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
            handler._cnn_serve = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
