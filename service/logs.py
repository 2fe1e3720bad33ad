"""The service's own log lines (`service.*`, `cnn_serve.*`) at `Settings.log_level`, on stderr.

BentoML configures only its own loggers and leaves the root at WARNING, so without this the core's INFO lines
(which models are ready, on which provider) would vanish. The JSON access log (`cnn_serve.access`, see
`service/http/middleware.py`) has its own handler and is not governed by `log_level`.
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGERS = ("service", "cnn_serve")
FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s"


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
