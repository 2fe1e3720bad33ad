"""Every setting of the service in one typed place, read once at start-up.

Each field can be set by an environment variable `CNN_SERVE_<FIELD>` (upper case), and by the CLI flag
`--<field-with-dashes>` of `python -m service serve`. Transports and the core receive a `Settings` object;
nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "CNN_SERVE_"


@dataclass(frozen=True)
class Settings:
    # Model repository
    repository: str = "models"
    default_model: str = "efficientnet_lite0"
    models: tuple[str, ...] = ()  # names to load; empty: every model in the repository

    # ONNX Runtime
    providers: tuple[str, ...] = ()  # empty: CUDA (if available) then CPU
    require_gpu: bool = False  # fail start-up instead of silently falling back to CPU
    gpu_mem_limit_mb: int = 0  # 0: no limit
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    inter_op_threads: int = 1
    thread_spinning: bool = False  # ONNX Runtime threads spin between ops: lower latency, CPU burnt idle
    precision: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16
    preprocess_mode: str = "fast"  # fast | exact (torchvision-identical PIL pipeline)

    # Batching
    max_batch_size: int = 32  # images (views included) per ONNX Runtime call
    max_wait_ms: float = 2.0  # how long a batch waits for more requests
    queue_size: int = 256  # requests waiting; a full queue answers Overloaded at once
    decode_threads: int = 2  # decoding and preprocessing thread pool
    request_timeout_s: float = 30.0  # default per-request deadline

    # Limits on what clients send
    max_request_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_pixels: int = 40_000_000  # from the header, before decoding
    max_aspect_ratio: float = 20.0
    max_top_k: int = 1000

    # Transports
    host: str = "0.0.0.0"
    http_port: int = 3000
    grpc_port: int = 50051
    grpc_health_port: int = 0  # with TLS on: a plaintext port serving only gRPC health (0: off)
    auth_token: str = ""  # bearer token; empty: no authentication
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    drain_timeout_s: float = 20.0  # SIGTERM: time to finish in-flight requests
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `CNN_SERVE_*` variables, then explicit overrides (e.g. parsed CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision must be auto, fp32 or fp16, not {self.precision!r}")
        if self.preprocess_mode not in ("fast", "exact"):
            raise ValueError(f"preprocess_mode must be fast or exact, not {self.preprocess_mode!r}")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process (BentoML's worker)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; unset flags leave the environment's value."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper())


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by whichever flags were given."""
    overrides: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        overrides[f.name] = value if isinstance(value, bool) else _parse(f, str(value))
    return Settings.from_env(environ, **overrides)


def split_list(values: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = values.split(",")
    return tuple(v.strip() for v in values if v.strip())
