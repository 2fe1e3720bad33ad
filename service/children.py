"""Child processes that work for the worker over a pipe: decoding images, parsing large JSON bodies.

Started with `spawn`: the worker holds threads (ONNX Runtime, gRPC) that a fork would copy in a broken state.
A child ends when it reads `None` from its pipe, or is killed once it has had `STOP_S` to do so.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

STOP_S = 5.0  # how long a child may take to end once asked


def start_child(
    target: Callable[..., None], args: tuple[Any, ...], name: str
) -> tuple[Connection, BaseProcess]:
    """`target(conn, *args)` in a new child; the worker's end of the pipe, and the child."""
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe(duplex=True)
    process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
    process.start()
    child.close()
    return conn, process


def end_child(conn: Connection, process: BaseProcess) -> None:
    """Ask the child to end, kill it if it has not within `STOP_S`, and close the pipe."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(None)
    process.join(STOP_S)
    if process.is_alive():
        process.kill()
        process.join(1.0)
    conn.close()
