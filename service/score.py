"""Offline batch scoring: `python -m service.score INPUT --model NAME --out PATH`.

INPUT is a folder (walked recursively), a glob, or a manifest (text or CSV of paths), on the local disk or any
fsspec filesystem. PATH's extension picks Parquet, CSV or JSON Lines; PATH is a folder of part files (see
docs/BATCH.md). Rerunning the same command resumes: only files whose (path, size, mtime) has no row yet are
scored. Exit status: 0 every image scored, 1 some images failed (each has a row with its error), 2 bad
arguments/input/model, 3 the output cannot be written, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from service import logs
from service.config import Settings, add_arguments, from_args
from service.errors import InvalidArgument, ServiceError
from service.postprocessing import check_top_k
from service.repository import RepositoryError
from service.scoring.local import WorkerLost
from service.scoring.results import OutputError, ResultStore, output_format
from service.scoring.runner import READ_THREADS
from service.scoring.sources import InputError, SourceFile, list_inputs
from service.sessions import GpuRequired

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MAX_READ_THREADS = 256  # threads per process: more only queues requests a store would throttle anyway


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.score", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("input", metavar="INPUT", help="folder, glob or manifest; local or fsspec URL")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", default=None, help="model version (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder: NAME.parquet, NAME.csv or NAME.jsonl")
    parser.add_argument("--top-k", type=int, default=None, help="classes per image (default 5, or all)")
    parser.add_argument("--tta", default="none", help="test-time augmentation views (as the service's `tta`)")
    parser.add_argument("--batch-size", type=int, default=32, help="images (views) per ONNX Runtime run")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (0: decode in-process)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="rows per part file (unit of resume)")
    parser.add_argument(
        "--read-threads",
        type=int,
        default=READ_THREADS,
        help="files each process reads at once (remote stores: more)",
    )
    parser.add_argument("--manifest", action="store_true", default=None, help="INPUT is a manifest")
    parser.add_argument("--all-files", action="store_true", help="take every file of folders")
    parser.add_argument("--retry-failed", action="store_true", help="rescore files with an error row")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--engine", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to connect to (default: start one)")
    parser.add_argument("--ray-actors", type=int, default=2, help="inference actors in the Ray pool")
    group = parser.add_argument_group("service settings (also CNN_SERVE_* variables)")
    add_arguments(group)  # type: ignore[arg-type]
    return parser


def plan(
    files: list[SourceFile], store: ResultStore, retry_failed: bool
) -> tuple[list[SourceFile], int, int]:
    """What is left to score, after dropping rows made stale by a changed file (or failed, when retried).

    Also returns how many files are done, and how many of those have an error row (they count in the exit
    status of a resumed run too)."""
    done = store.done()
    todo: list[SourceFile] = []
    stale: list[str] = []
    failed_before = 0
    for source in files:
        row = done.get(source.name)
        if row is None:
            todo.append(source)
        elif (row["size"], row["mtime"]) != (source.size, source.mtime) or (retry_failed and row["error"]):
            stale.append(source.name)
            todo.append(source)
        elif row["error"]:
            failed_before += 1
    if stale:
        store.drop(stale, done)
    return todo, len(files) - len(todo), failed_before


def check_args(args: argparse.Namespace, settings: Settings) -> None:
    try:  # the service's rule, bounded by max_top_k alone until the model's class count is known
        check_top_k(args.top_k, settings.max_top_k, what="--top-k")
    except InvalidArgument as exc:
        raise InputError(exc.message) from None
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.chunk_size < 1:
        raise InputError("--chunk-size must be at least 1")
    if args.workers < 0:
        raise InputError("--workers must not be negative")
    if not 1 <= args.read_threads <= MAX_READ_THREADS:
        raise InputError(f"--read-threads must be between 1 and {MAX_READ_THREADS}")
    if output_format(args.out) != "parquet" and args.engine == "ray":
        raise InputError("--engine ray writes Parquet: give --out a .parquet folder")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = from_args(args)
        check_args(args, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level)
    try:
        store = ResultStore(args.out)
        files = list_inputs(args.input, manifest=args.manifest, all_files=args.all_files, exclude=store.root)
    except (InputError, OSError, ValueError, ImportError) as exc:  # ImportError: s3:// without s3fs
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        store.prepare()
        todo, skipped, failed_before = plan(files, store, args.retry_failed)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    try:
        if args.engine == "ray":
            from service.scoring.ray_engine import score_ray  # Ray only here, never in the serving path

            summary = score_ray(
                todo,
                store,
                settings,
                model=args.model,
                version=args.version,
                top_k=args.top_k,
                tta=args.tta,
                batch_size=args.batch_size,
                actors=args.ray_actors,
                address=args.ray_address,
                chunk_size=args.chunk_size,
                read_threads=args.read_threads,
            )
        else:
            summary = _score_local(todo, store, settings, args)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except WorkerLost as exc:  # not every file has its row: 1, and a rerun resumes
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED_IMAGES
    except (ServiceError, InputError, RepositoryError, GpuRequired) as exc:  # the model cannot be loaded
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return EXIT_USAGE
    summary.skipped, summary.failed_before = skipped, failed_before
    print(summary.line(), flush=True)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_IMAGES if summary.failed or failed_before else EXIT_OK


def _score_local(
    todo: list[SourceFile], store: ResultStore, settings: Settings, args: argparse.Namespace
) -> Any:
    from tqdm import tqdm

    from service.scoring.local import score_local
    from service.scoring.runner import ModelRunner, PrepareSpec

    runner = ModelRunner(settings, args.model, args.version, args.batch_size)
    top_k = check_top_k(args.top_k, runner.card.num_classes, settings.max_top_k, what="--top-k")
    spec = PrepareSpec.for_runner(runner, settings, args.tta, args.read_threads)
    with tqdm(
        total=len(todo),
        unit="img",
        disable=args.no_progress or not sys.stderr.isatty(),
        mininterval=0.5,
        file=sys.stderr,
        desc=f"{runner.name}:{runner.version} ({runner.session.provider})",
    ) as bar:
        return score_local(
            todo,
            store,
            runner,
            spec,
            top_k=top_k,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=bar.update,
        )


if __name__ == "__main__":
    sys.exit(main())
