"""The process `python -m service serve` becomes: BentoML's `serve` command, run in this process, that ends
the whole server, with a non-zero exit status, when a worker reports a start-up failure no restart can cure.

BentoML's arbiter (circus) restarts a worker that exits, forever: a worker whose gRPC port is taken would
reload every model, fail to bind and exit again, every few seconds, while the HTTP port the arbiter holds
stays bound and dead. So the worker sends `FATAL_SIGNAL` to the arbiter (`report_fatal`), whose pid it finds
in the environment (`ARBITER_ENV`); the arbiter then stops as on SIGTERM and exits 1.

`python -m service serve` checks the ports first (`check_ports`), so the usual case, a port already taken
when the server starts, is one line and exit 1 before BentoML starts at all; the signal covers a port taken
between that check and the worker's bind.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from service.config import Settings

FATAL_SIGNAL = signal.SIGUSR2  # circus handles HUP, QUIT, INT, TERM and WINCH; this one is free
# Not a setting (no CNN_SERVE_ prefix: `Settings` never reads it): the arbiter's pid, for its workers.
ARBITER_ENV = "_CNN_SERVE_ARBITER_PID"
FATAL_EXIT = 1

log = logging.getLogger("service.arbiter")


def ports(settings: Settings) -> list[tuple[str, str, int]]:
    """The ports the server binds: (what, the setting's flag, port), the ones switched off (0) left out."""
    listed = [("HTTP", "--http-port", settings.http_port), ("gRPC", "--grpc-port", settings.grpc_port)]
    if settings.grpc_port and settings.grpc_tls_cert:  # the health port is opened only with TLS on
        listed.append(("gRPC health", "--grpc-health-port", settings.grpc_health_port))
    return [(what, flag, port) for what, flag, port in listed if port]


def check_ports(settings: Settings) -> None:
    """OSError naming the first port that cannot be bound on `settings.host`, as the servers bind them
    (SO_REUSEADDR on, SO_REUSEPORT off: a port another process listens on is refused)."""
    for what, flag, port in ports(settings):
        try:
            infos = socket.getaddrinfo(settings.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise OSError(f"{what} address {settings.host!r} does not resolve ({flag}): {exc}") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise OSError(
                    f"{what} port {port} on {settings.host} cannot be bound ({flag}): {exc.strerror or exc}"
                ) from None


def report_fatal(message: str) -> bool:
    """From a worker: log `message` and stop the arbiter that started it, which then exits 1. False when no
    arbiter of ours started this process (e.g. `bentoml serve` run by hand): the caller must fail itself."""
    log.critical("the server stops: %s", message)
    try:
        pid = int(os.environ.get(ARBITER_ENV, ""))
        os.kill(pid, FATAL_SIGNAL)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def main(argv: Sequence[str]) -> int:
    """Run `bentoml <argv>` (BentoML's CLI, as `python -m bentoml` does) in this process."""
    fatal = False

    def on_fatal(signum: int, frame: FrameType | None) -> None:
        nonlocal fatal
        fatal = True
        stop = signal.getsignal(signal.SIGTERM)  # circus' handler by now: a graceful stop
        if callable(stop):
            stop(signal.SIGTERM, frame)
        else:
            raise SystemExit(FATAL_EXIT)

    signal.signal(FATAL_SIGNAL, on_fatal)
    os.environ[ARBITER_ENV] = str(os.getpid())  # the workers inherit it
    from bentoml_cli.cli import cli

    try:
        cli.main(args=list(argv), prog_name="bentoml")
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if fatal:
        return FATAL_EXIT
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
