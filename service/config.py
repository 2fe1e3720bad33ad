"""Every setting of the service in one typed place, read once at start-up.

Each field can be set by an environment variable `CNN_SERVE_<FIELD>` (upper case), and by the CLI flag
`--<field-with-dashes>` of `python -m service serve`. Transports and the core receive a `Settings` object;
nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from service.logs import LEVELS

ENV_PREFIX = "CNN_SERVE_"


def _setting(default: Any, help: str, repeat: bool = False) -> Any:
    """A field with its help text: `python -m service serve --help` and docs/SERVING.md show it. `repeat`: the
    flag may be given several times (Triton's `--load-model`), each adding to the list."""
    return field(default=default, metadata={"help": help, "repeat": repeat})


@dataclass(frozen=True)
class Settings:
    # Model repository
    repository: str = _setting(
        "models",
        "the model repository (<name>/<version>/model.json): a folder, or s3://, gs://, az://, file:// URL",
    )
    model_cache: str = _setting(
        "/tmp/cnn-serve-models", "a remote repository's files are copied here, named by their sha256"
    )
    storage_endpoint_url: str = _setting(
        "", "endpoint of an S3-compatible store (MinIO, Ceph, ...); empty: AWS's, or AWS_ENDPOINT_URL"
    )
    storage_timeout_s: float = _setting(
        30.0, "seconds a remote repository may take to connect or answer one read before it counts as down"
    )
    default_model: str = _setting("efficientnet_lite0", "the model a request gets when it names none")
    models: tuple[str, ...] = _setting((), "comma-separated names to load; empty: all in the repository")
    strict_readiness: bool = _setting(
        True, "ready only once every model loaded (the protocol's rule, Triton's default); 0: once any did"
    )
    model_control: str = _setting(
        "none", "none (load at start, never change), poll (rescan the repository) or explicit (on request)"
    )
    poll_interval_s: float = _setting(10.0, "poll mode: seconds between two scans of the repository")
    load_model: tuple[str, ...] = _setting(
        (), "explicit mode: a model to load at start (repeatable); empty: none", repeat=True
    )
    model_check_interval_s: float = _setting(
        30.0, "seconds between two checks that each ready model's files still match what it serves; 0: off"
    )

    # ONNX Runtime
    providers: tuple[str, ...] = _setting(
        (), "comma-separated ONNX Runtime providers; empty: CUDA (if any), CPU"
    )
    require_gpu: bool = _setting(False, "fail start-up instead of falling back to CPU without CUDA")
    gpu_mem_limit_mb: int = _setting(0, "cap of ONNX Runtime's CUDA memory arena per model, MiB; 0: none")
    intra_op_threads: int = _setting(0, "ONNX Runtime threads per batch; 0: its default, one per core")
    inter_op_threads: int = _setting(1, "above 1: ONNX Runtime runs independent branches at once, in so many")
    thread_spinning: bool = _setting(False, "ONNX Runtime threads spin inside runs: lower latency, CPU burnt")
    solo_threads: int = _setting(
        0, "CPU: threads for a batch that runs alone, on a second session of the model that spins; 0: none"
    )
    precision: str = _setting("auto", "auto (fp16 on GPU, fp32 on CPU), fp32 or fp16: which graph to load")
    preprocess_mode: str = _setting(
        "exact",
        "exact: torchvision's PIL evaluation transform, the model's own answer; fast: JPEG DCT downscaling, "
        "3-5x quicker, another top-1 class on about 1 photo in 90 (docs/CORE.md)",
    )

    # Batching
    max_batch_size: int = _setting(32, "images (test-time views included) per ONNX Runtime call")
    inference_workers: int = _setting(
        1, "batches run at once; on CPU, 2 with intra_op_threads=1 serve more images/s (see solo_threads)"
    )
    max_wait_ms: float = _setting(2.0, "how long a batch waits for more images while others are decoding")
    queue_size: int = _setting(
        512, "views (images x test-time views) admitted and not yet answered; beyond it: overloaded at once"
    )
    decode_threads: int = _setting(2, "threads decoding and preprocessing images beside inference")
    decode_processes: bool = _setting(
        False,
        "each decode thread hands its images to a child process of its own, whose Python work never holds "
        "the event loop's interpreter lock and whose crash fails one image, not the worker (docs/CORE.md)",
    )
    worker_niceness: int = _setting(
        10,
        "Linux nice value of the threads that decode and run inference (and of ONNX Runtime's): the event "
        "loop that answers connections runs first; 0: the loop's own",
    )
    loop_realtime_priority: int = _setting(
        0,
        "Linux SCHED_FIFO priority (1-99) of the worker's event-loop thread, which then runs the moment it "
        "is ready, ahead of every ordinary thread on the host, and one below it of the threads that take the "
        "interpreter lock for short steps only; needs CAP_SYS_NICE or RLIMIT_RTPRIO (docs/SERVING.md); "
        "0: off",
    )
    loop_full_collections: bool = _setting(
        True,
        "Python's full garbage collections run on the event loop's thread, when Python's own rule says one "
        "is due, instead of on whichever thread allocates then (docs/SERVING.md); 0: Python's schedule",
    )
    decode_memory_mb: int = _setting(
        1024, "MiB the images being decoded may hold at once, by estimate; an image needing more is too large"
    )
    request_timeout_s: float = _setting(30.0, "a request's deadline when the client sends none")
    memory_trim_idle_s: float = _setting(
        1.0, "seconds idle after the last answer before freed memory is returned to the system; 0: never"
    )

    # Limits on what clients send
    max_request_bytes: int = _setting(32 * 1024 * 1024, "largest request body or gRPC message, bytes")
    receive_memory_mb: int = _setting(
        512,
        "MiB of request bodies and gRPC messages the worker holds at once, from before they are read to the "
        "request's end (a gRPC message counts as max_request_bytes until it has arrived); a request that "
        "does not fit waits, until its deadline: overloaded",
    )
    client_share: float = _setting(
        0.25,
        "share of receive_memory_mb, of grpc_max_calls and of queue_size held from HTTP headers, one client "
        "(an address; an IPv6 /64) may hold; 1 behind a proxy that all clients come through",
    )
    max_images_per_request: int = _setting(64, "images in one batch request")
    max_views_per_request: int = _setting(
        400, "images x test-time views (multiscale: 30 each) in one request; beyond it: 400"
    )
    max_image_pixels: int = _setting(
        40_000_000, "pixels an image header may declare (checked before decoding)"
    )
    max_aspect_ratio: float = _setting(20.0, "longer side over shorter side")
    max_jpeg_scans: int = _setting(256, "scans a multi-scan JPEG may have; each is a pass over the image")
    max_image_segments: int = _setting(
        65_536, "JPEG marker segments before the pixels, PNG chunks, GIF blocks before the first frame"
    )
    max_top_k: int = _setting(1000, "largest top_k a request may ask (also capped by the class count)")
    parse_processes: int = _setting(
        1, "processes parsing large JSON bodies (the parser holds the interpreter); 0: threads of the worker"
    )
    json_memory_factor: float = _setting(
        16.0, "a JSON body whose parse would take, by estimate, more than this many times its size is refused"
    )
    max_message_fields: int = _setting(
        10_000,
        "fields in one gRPC request message, nested and repeated ones each counted (a packed array once), "
        "counted before it is parsed",
    )

    # Transports
    host: str = _setting("0.0.0.0", "address the HTTP and gRPC servers listen on")
    http_port: int = _setting(3000, "HTTP port")
    grpc_port: int = _setting(50051, "gRPC port; 0: no gRPC server")
    grpc_health_port: int = _setting(0, "with TLS on: a plaintext port serving only gRPC health; 0: off")
    auth_token: str = _setting(
        "", "bearer token every call but probes, /metrics and the pages' files must send; empty: none"
    )
    admin_token: str = _setting(
        "", "bearer token of the repository's load and unload calls; empty: those calls are off"
    )
    web_ui: bool = _setting(
        True, "serve the web page at / and Swagger UI at /docs; 0: an API-only port (/openapi.json stays)"
    )
    grpc_tls_cert: str = _setting("", "PEM certificate file for gRPC TLS (with grpc_tls_key)")
    grpc_tls_key: str = _setting("", "PEM private key file for gRPC TLS (with grpc_tls_cert)")
    drain_timeout_s: float = _setting(20.0, "on SIGTERM: time to finish the requests already accepted")
    event_loop: str = _setting(
        "auto",
        "the event loop of HTTP and gRPC: uvloop, asyncio, or auto (uvloop where it is installed: Linux and "
        "macOS)",
    )
    max_connections: int = _setting(
        1000, "HTTP connections open at once; one more is answered 503 and closed at once"
    )
    idle_timeout_s: float = _setting(
        5.0, "HTTP: a connection with no request in progress is closed after this many seconds without a byte"
    )
    header_timeout_s: float = _setting(
        10.0, "HTTP: seconds from a request's first byte to the end of its headers; else 408, closed"
    )
    body_read_ahead_bytes: int = _setting(
        256 * 1024,
        "HTTP: bytes of a request body buffered per connection before the service reads them; reading "
        "pauses above it",
    )
    socket_receive_buffer_bytes: int = _setting(
        256 * 1024,
        "HTTP: kernel receive buffer asked for each connection (SO_RCVBUF), so that a body of a few images "
        "arrives in one read; 0 keeps the kernel's own, which grows with the transfer",
    )
    body_timeout_s: float = _setting(
        10.0, "HTTP: longest pause in a request body (all of it within request_timeout_s); else 408, closed"
    )
    grpc_max_connections: int = _setting(
        1000, "gRPC connections open at once (on each gRPC port); one more is closed at accept: UNAVAILABLE"
    )
    grpc_handshake_timeout_s: float = _setting(
        10.0,
        "gRPC: seconds from a connection's accept to the client's HTTP/2 settings (TLS included); else "
        "closed",
    )
    grpc_idle_timeout_s: float = _setting(
        60.0,
        "gRPC: a connection without a call for this many seconds is sent GOAWAY and closed; a client's "
        "channel connects again for its next call",
    )
    grpc_max_calls: int = _setting(
        1000,
        "gRPC calls in progress at once, all connections together (health included); one more is refused "
        "RESOURCE_EXHAUSTED at once",
    )
    grpc_bdp_probe: bool = _setting(
        False,
        "gRPC: let HTTP/2 flow control widen each stream's window to the measured bandwidth-delay product: "
        "faster large messages over long links, but a call waiting for receive_memory_mb may then hold up "
        "to 64 MiB of its message in grpc's core (docs/SERVING.md)",
    )
    grpc_max_streams: int = _setting(
        1000,
        "gRPC: calls open at once on one connection (HTTP/2 streams); a client's next ones wait for a slot "
        "(those it sends before the server's HTTP/2 settings have reached it are refused: UNAVAILABLE)",
    )
    log_level: str = _setting(
        "INFO", "level of the service's log lines (not the access log): DEBUG to CRITICAL"
    )

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
        threads = (self.intra_op_threads, self.inter_op_threads, self.solo_threads)
        if min(threads) < 0 or self.decode_threads < 1:
            raise ValueError("thread counts must not be negative, and decode_threads must be at least 1")
        if not 0 <= self.worker_niceness <= 19:
            raise ValueError("worker_niceness must be between 0 and 19")
        if not 0 <= self.loop_realtime_priority <= 99:
            raise ValueError("loop_realtime_priority must be between 0 (off) and 99")
        if not 1 <= self.inference_workers <= 64:
            raise ValueError("inference_workers must be between 1 and 64")
        if not 0 <= self.max_wait_ms <= 60_000:  # beyond a minute the batcher's timed wait overflows, too
            raise ValueError("max_wait_ms must be between 0 and 60000")
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision must be auto, fp32 or fp16, not {self.precision!r}")
        if self.preprocess_mode not in ("fast", "exact"):
            raise ValueError(f"preprocess_mode must be fast or exact, not {self.preprocess_mode!r}")
        if self.log_level.upper() not in LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, not {self.log_level!r}")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together")
        for name in ("grpc_tls_cert", "grpc_tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no file at {path!r}")
        for name in (
            "max_top_k",
            "max_images_per_request",
            "max_views_per_request",
            "max_image_pixels",
            "max_jpeg_scans",
            "max_image_segments",
            "max_message_fields",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.decode_memory_mb < 16:  # each decode's estimate has an 8 MiB allowance besides its pixels
            raise ValueError("decode_memory_mb must be at least 16")
        # grpcio takes message sizes as a C int: past 2 GiB - 1 the server would fail after start-up.
        if not 1 <= self.max_request_bytes <= 2**31 - 1:
            raise ValueError(f"max_request_bytes must be between 1 and {2**31 - 1}")
        if not 1 <= self.receive_memory_mb <= 2**20:
            raise ValueError(f"receive_memory_mb must be between 1 and {2**20}")
        if self.receive_memory_mb << 20 < self.max_request_bytes:
            raise ValueError(
                f"receive_memory_mb ({self.receive_memory_mb} MiB) must hold one request of "
                f"max_request_bytes ({self.max_request_bytes} bytes)"
            )
        if not (
            math.isfinite(self.client_share)
            and 0 < self.client_share <= 1
            and (self.receive_memory_mb << 20) * self.client_share >= self.max_request_bytes
        ):
            raise ValueError(
                "client_share must be at most 1 and leave a client room for one request of "
                f"max_request_bytes, not {self.client_share!r}"
            )
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be a positive number, not {self.request_timeout_s!r}")
        if not (math.isfinite(self.max_aspect_ratio) and self.max_aspect_ratio >= 1):
            raise ValueError(f"max_aspect_ratio must be at least 1, not {self.max_aspect_ratio!r}")
        if not (math.isfinite(self.memory_trim_idle_s) and 0 <= self.memory_trim_idle_s <= 3600):
            raise ValueError("memory_trim_idle_s must be between 0 and 3600")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise ValueError("drain_timeout_s must be a finite number, not negative")
        for name in (
            "idle_timeout_s",
            "header_timeout_s",
            "body_timeout_s",
            "grpc_handshake_timeout_s",
            "grpc_idle_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 86_400):
                raise ValueError(f"{name} must be between 0 (excluded) and 86400, not {value!r}")
        if not 0 <= self.parse_processes <= 64:
            raise ValueError("parse_processes must be between 0 and 64")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError(f"event_loop must be auto, uvloop or asyncio, not {self.event_loop!r}")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("event_loop=uvloop needs the uvloop package (pip install uvloop)")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        # gRPC's core stops the whole process at start-up on 2**31 - 1 (its own check, not an exception).
        if not 1 <= self.grpc_max_connections < 2**31 - 1:
            raise ValueError(f"grpc_max_connections must be between 1 and {2**31 - 2}")
        if self.grpc_max_calls < 1:
            raise ValueError("grpc_max_calls must be at least 1")
        if not 1 <= self.grpc_max_streams < 2**31 - 1:
            raise ValueError(f"grpc_max_streams must be between 1 and {2**31 - 2}")
        if self.body_read_ahead_bytes < 1:
            raise ValueError("body_read_ahead_bytes must be at least 1")
        if self.socket_receive_buffer_bytes < 0:
            raise ValueError("socket_receive_buffer_bytes must be 0 (the kernel's) or more")
        if not (math.isfinite(self.json_memory_factor) and self.json_memory_factor >= 1):
            raise ValueError(f"json_memory_factor must be at least 1, not {self.json_memory_factor!r}")
        for name in ("http_port", "grpc_port", "grpc_health_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be between 0 and 65535")
        ports = [p for p in (self.http_port, self.grpc_port, self.grpc_health_port) if p]
        if len(ports) != len(set(ports)):
            raise ValueError(f"http_port, grpc_port and grpc_health_port must differ, got {ports}")
        if self.gpu_mem_limit_mb < 0:
            raise ValueError("gpu_mem_limit_mb must not be negative")
        if self.model_control not in ("none", "poll", "explicit"):
            raise ValueError(f"model_control must be none, poll or explicit, not {self.model_control!r}")
        if not (math.isfinite(self.poll_interval_s) and 0.1 <= self.poll_interval_s <= 86_400):
            raise ValueError(f"poll_interval_s must be between 0.1 and 86400, not {self.poll_interval_s!r}")
        if not (math.isfinite(self.model_check_interval_s) and 0 <= self.model_check_interval_s <= 86_400):
            raise ValueError(
                f"model_check_interval_s must be between 0 and 86400, not {self.model_check_interval_s!r}"
            )
        if not (math.isfinite(self.storage_timeout_s) and 0.1 <= self.storage_timeout_s <= 3600):
            raise ValueError(f"storage_timeout_s must be from 0.1 to 3600, not {self.storage_timeout_s!r}")
        if self.storage_endpoint_url and not self.storage_endpoint_url.startswith(("http://", "https://")):
            raise ValueError("storage_endpoint_url must be an http:// or https:// URL")
        if self.load_model and self.model_control != "explicit":
            raise ValueError("load_model applies to model_control=explicit only")

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
        default, env = _default_text(f.default), ENV_PREFIX + f.name.upper()
        help = f"{f.metadata['help']} (default: {default}; env {env})"
        help = help.replace("%", "%%")  # argparse formats help strings
        if kind == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help
            )
        elif f.metadata.get("repeat"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="NAME", help=help)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by whichever flags were given."""
    overrides: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list):  # a repeatable flag: each occurrence may itself be comma-separated
            value = ",".join(value)
        overrides[f.name] = value if isinstance(value, bool) else _parse(f, str(value))
    return Settings.from_env(environ, **overrides)


def settings_table() -> str:
    """The Markdown table of every setting that docs/SERVING.md holds (a test keeps the two equal)."""
    rows = ["| flag | environment | default | what |", "|---|---|---|---|"]
    for f in fields(Settings):
        flag, env = "--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper()
        text = _default_text(f.default)
        shown = text if text == "empty" else f"`{text}`"
        rows.append(f"| `{flag}` | `{env}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def _default_text(default: Any) -> str:
    """A default as the environment spells it: lists comma-joined, booleans 1/0, nothing as "empty"."""
    if default in ("", ()):
        return "empty"
    if isinstance(default, bool):
        return "1" if default else "0"
    return str(default)


def split_list(values: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = values.split(",")
    return tuple(v.strip() for v in values if v.strip())
