"""`python -m service serve [--flags]`: the HTTP + gRPC service; `python -m service score ...`: batch scoring.

`serve` reads the settings once (environment, then flags), validates them and checks that its ports are free
here, so that a bad flag or a busy port fails in one line before BentoML starts, and replaces this process
with BentoML's `serve` (`service.arbiter`; same pid: SIGTERM from a supervisor reaches BentoML's arbiter
directly) with the settings in the environment of the worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service.arbiter import check_ports
from service.card import RepositoryError
from service.config import Settings, add_arguments, from_args

SERVICE_TARGET = "service.http.service:ClassifierService"
USAGE = """usage: python -m service {serve,score} [options]

  serve   the HTTP (BentoML) and gRPC service; every setting is a flag or a CNN_SERVE_* variable
  score   offline batch scoring of a folder, glob or manifest into Parquet, CSV or JSON Lines

python -m service serve --help, python -m service score --help: their options."""
ROOT = Path(__file__).resolve().parents[1]


def serve_settings(argv: Sequence[str]) -> Settings:
    """The settings of these flags (and the environment); ValueError names a bad one."""
    parser = argparse.ArgumentParser(prog="python -m service serve", description="Serve HTTP and gRPC.")
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def serve_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of BentoML's `serve` for these settings, run by `service.arbiter`."""
    env = {**os.environ, **settings.to_env()}
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    cmd = [
        sys.executable,
        "-m",
        "service.arbiter",
        "serve",
        SERVICE_TARGET,
        "--host",
        settings.host,
        "--port",
        str(settings.http_port),
        "--working-dir",
        str(ROOT),
        # uvicorn finishes in-flight requests for this long after SIGTERM; gRPC drains in on_shutdown.
        "--timeout-graceful-shutdown",
        str(max(1, int(round(settings.drain_timeout_s)))),
    ]
    return cmd, env


def check_repository(settings: Settings) -> None:
    """A remote repository is listed once before the server starts: RepositoryError (with no secret in it)
    when it cannot be reached, does not exist or the credentials are refused. Poll mode starts anyway (the
    model cache serves what served last time, the poller keeps trying); a local folder is left to the
    model set, as before."""
    from service import repository

    if not repository.is_url(settings.repository):
        return
    store = repository.store_for(settings)
    try:
        repository.scan(store)
    except repository.StoreUnreachable as exc:
        if settings.model_control != "poll":
            raise
        print(f"warning: {exc}; starting from the model cache", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        try:
            settings = serve_settings(rest)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            check_ports(settings)
        except OSError as exc:  # the same status as when a worker finds its port taken (service.arbiter)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            check_repository(settings)
        except RepositoryError as exc:  # a bucket out of reach: one line and exit 1, before BentoML starts
            print(f"error: {exc}", file=sys.stderr)
            return 1
        cmd, env = serve_command(settings)
        os.execve(sys.executable, cmd, env)
    if command == "score":
        from service.score import main as score_main

        return int(score_main(rest) or 0)
    print(f"unknown command {command!r}; use serve or score", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
