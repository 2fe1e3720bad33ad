"""`python -m export list | build | import-onnx | defaults | architectures`.

Every user error ends as one line on stderr (`error: ...`) and exit status 2; the repository is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ExportError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


REPOSITORY_HELP = (
    "a folder, or s3://bucket/prefix, gs://..., az://..., file://... (published the atomic way: files to a "
    "temporary prefix, the card last; credentials and AWS_ENDPOINT_URL from the environment)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("list", help="the registry: name, source, input size")

    b = sub.add_parser("build", help="export one architecture into the model repository")
    b.add_argument("arch")
    w = b.add_mutually_exclusive_group()
    w.add_argument("--weights", help="state dict: .pth/.pt (loaded weights_only) or .safetensors")
    w.add_argument("--random-init", action="store_true", help="no weights: untrained, benchmarks only")
    b.add_argument("--repository", default="models", help=REPOSITORY_HELP)
    b.add_argument("--name", help="repository name (default: the architecture's)")
    b.add_argument("--version", help="positive integer (default: next free)")
    b.add_argument(
        "--samples", type=_positive, default=256, help="validation inputs (>= 256 for the fp16 rule)"
    )

    i = sub.add_parser("import-onnx", help="register an existing ONNX classifier")
    i.add_argument("file")
    i.add_argument("--name", required=True)
    i.add_argument("--version")
    i.add_argument("--repository", default="models", help=REPOSITORY_HELP)
    i.add_argument(
        "--preprocessing",
        default="imagenet",
        help="JSON object or file, or a preset: imagenet, inception, tf (mean/std 0.5), digits",
    )
    i.add_argument(
        "--labels", default="imagenet", help="imagenet, digits, or a file (one name per line, or JSON)"
    )
    i.add_argument("--description")
    i.add_argument("--input", help="the image input, for a graph with several inputs")
    i.add_argument("--output", help="the class scores, for a graph with several outputs")
    i.add_argument(
        "--layout",
        choices=("auto", "NCHW", "NHWC"),
        default="auto",
        help="the input's (auto: from its shape)",
    )
    i.add_argument(
        "--output-kind",
        choices=("auto", "logits", "probabilities"),
        default="auto",
        help="auto: probabilities when the graph ends in Softmax (or its outputs sum to 1)",
    )
    i.add_argument(
        "--label-offset",
        type=int,
        help="leading output columns that are no label (auto: 1 when there is one more output than labels, "
        "a background class at index 0)",
    )

    d = sub.add_parser("defaults", help="build the two trained defaults (efficientnet_lite0, lenet5)")
    d.add_argument("--repository", default="models", help=REPOSITORY_HELP)

    a = sub.add_parser("architectures", help="export + validate + measure every entry, write a table")
    a.add_argument("--out", default="docs/ARCHITECTURES.md")
    a.add_argument("--only", nargs="*", help="a subset of names")
    a.add_argument("--samples", type=_positive, default=64)
    a.add_argument("--timeout", type=int, default=1500, help="seconds per architecture")
    a.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one entry, print JSON
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "list":
            from . import registry

            for arch in registry.REGISTRY.values():
                c, h, w = arch.input_shape()
                print(f"{arch.name:22s} {arch.source:34s} {c}x{h}x{w}  {arch.labels}")
        elif args.cmd in ("build", "import-onnx"):
            _print_built(_write_one(args), args.repository)
        elif args.cmd == "defaults":
            from .defaults import build_defaults, publish_defaults
            from .repository import is_url

            remote = is_url(args.repository)
            for folder in (publish_defaults if remote else build_defaults)(args.repository):
                _print_built(folder, args.repository)
        elif args.cmd == "architectures":
            from . import architectures

            if args.one:
                print(json.dumps(architectures.measure_one(args.one, args.samples)))
            else:
                architectures.run(args.out, only=args.only, samples=args.samples, timeout=args.timeout)
    except ExportError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _write_one(args: argparse.Namespace) -> Path:
    """`build` or `import-onnx`: one new version in the repository; its folder."""
    where = {"name": args.name, "version": args.version}
    if args.cmd == "build":
        from .build import build

        options = {"weights": args.weights, "random_init": args.random_init, "samples": args.samples}
        return build(args.arch, args.repository, **where, **options)
    from .import_onnx import import_onnx

    options = {
        "preprocessing": args.preprocessing,
        "labels": args.labels,
        "description": args.description,
        "input_name": args.input,
        "output_name": args.output,
        "layout": args.layout,
        "output_kind": args.output_kind,
        "label_offset": args.label_offset,
    }
    return import_onnx(args.file, args.repository, **where, **options)


def _print_built(folder: Path, repository: str) -> None:
    from .repository import is_url, read_card, redact

    card = read_card(folder)
    if is_url(repository):  # the bucket's version, not the local copy it was uploaded from
        folder = f"{redact(repository.rstrip('/'))}/{card.name}/{card.version}"  # type: ignore[assignment]
    v = card.extra.get("validation") or {}
    f32, f16 = v.get("fp32", {}), v.get("fp16", {})
    parts = [f"{folder}", f"trained={card.trained}"]
    if f32:
        parts.append(f"fp32 rel_err={f32.get('rel_err', 0):.1e}")
    if f16:
        parts.append(f"fp16 top1={f16.get('top1_agreement', 0):.2%} top5={f16.get('top5_overlap', 0):.2%}")
    if card.extra.get("accuracy") is not None:
        parts.append(f"accuracy={card.extra['accuracy']:.2%}")
    print("  ".join(parts))


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
