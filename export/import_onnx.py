"""Bring your own ONNX: register an existing classifier (opset 7 and up; older ones converted).

Accepted: a float image input, NCHW or NHWC (`[N, H, W, C]`, graphs converted from TensorFlow/Keras), with a
dynamic batch or a fixed batch of 1 (made dynamic when the graph runs a batch of two to the same rows, else
served one image at a time); scores `[N, C]` or `[N, C, 1, 1]` (a final 1x1 convolution or global pooling
without flatten), logits or probabilities (a final Softmax found in the graph), with one more column than
labels read as a background class at index 0 (TensorFlow-slim). A graph with several inputs or outputs is
imported once `--input` / `--output` name the image and the scores, cut down to them. ONNX Runtime must run
a real photo through it. Anything else (detectors, segmenters, ...) is rejected with one line; each choice
made is written in the card (`input.layout`, `input.shape`, `output.kind`, `output.label_offset`, `import`).
The graph is copied as it is unless a rewrite above was needed; no fp16 twin is made for an imported graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import repository, validate
from .build import tool_versions
from .errors import ExportError
from .labels import label_set
from .registry import IMAGENET_MEAN, IMAGENET_STD, LENET_PREPROCESSING

PRESETS: dict[str, dict] = {
    "imagenet": {
        "input_size": [3, 224, 224],
        "resize": 256,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "channels": 3,
        "invert": False,
    },
    "inception": {
        "input_size": [3, 299, 299],
        "resize": 342,
        "crop_pct": 0.8743,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "channels": 3,
        "invert": False,
    },
    "tf": {
        "input_size": [3, 224, 224],
        "resize": 256,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "channels": 3,
        "invert": False,
    },
    "digits": dict(LENET_PREPROCESSING),
}


def parse_preprocessing(spec: str) -> dict:
    """A preset name, a JSON object, or a JSON file; missing keys come from the `imagenet` preset."""
    if spec in PRESETS:
        return _checked(dict(PRESETS[spec]))
    text = spec
    if not spec.lstrip().startswith("{"):
        text = _read_text(
            Path(spec),
            "--preprocessing",
            f"not a preset ({', '.join(PRESETS)}), a JSON object or a JSON file",
        )
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"--preprocessing is not valid JSON: {e}") from None
    if not isinstance(given, dict):
        raise ExportError("--preprocessing must be a JSON object")
    pre = dict(PRESETS["imagenet"])
    pre.update(given)
    for derived in ("resize", "crop_pct"):  # each follows from the other when only one is given
        if derived not in given:
            pre.pop(derived)
    if "channels" not in given:
        pre.pop("channels")
    return _checked(pre)


def _read_text(path: Path, flag: str, what: str) -> str:
    """A flag's file as UTF-8 text; ExportError naming the flag when it is no file or unreadable."""
    if not path.is_file():
        raise ExportError(f"{flag} {str(path)!r}: {what}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{flag} {path.name}: cannot read it as UTF-8 ({e})") from None


def _checked(pre: dict) -> dict:
    try:
        return repository.preprocessing(pre)
    except ExportError as e:
        raise ExportError(f"--preprocessing: {str(e).removeprefix('preprocessing: ')}") from None


def parse_labels(spec: str, classes: int | None = None) -> list[dict]:
    """`imagenet`, `digits`, or a file (one name per line, a JSON list, Keras' index object); with `classes`,
    the count must match."""
    if spec in ("imagenet", "digits"):
        labels = label_set(spec)
    else:
        p = Path(spec)
        text = _read_text(p, "--labels", "not 'imagenet', 'digits' or a file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [line.strip() for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):  # Keras' imagenet_class_index.json: {"0": ["n01440764", "tench"], ...}
            try:
                ordered = [data[str(i)] for i in range(len(data))]
            except KeyError:
                raise ExportError(f"--labels {p.name}: an object's keys must be 0 .. N-1") from None
            data = [{"id": e[0], "name": e[1]} if isinstance(e, list) and len(e) == 2 else e for e in ordered]
        if not isinstance(data, list):
            raise ExportError(f"--labels {p.name}: a JSON list of names, an object by index, or one per line")
        if all(isinstance(e, dict) and "index" in e for e in data) and data:
            try:
                by_index = {int(e["index"]): e for e in data}
            except (TypeError, ValueError):
                by_index = {}
            if sorted(by_index) != list(range(len(data))):
                raise ExportError(f"--labels {p.name}: the 'index' fields must be 0 .. N-1, each once")
            data = [by_index[i] for i in range(len(data))]
        labels = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                labels.append({"index": i, "id": str(i), "name": item})
            elif isinstance(item, dict) and "name" in item:
                labels.append({"index": i, "id": str(item.get("id", i)), "name": str(item["name"])})
            else:
                raise ExportError(f"--labels {p.name}: entry {i} is neither a name nor an object with 'name'")
    if classes is not None and len(labels) != classes:
        raise ExportError(f"the model outputs {classes} classes but the label set has {len(labels)}")
    return labels


MIN_OPSET = 7  # ONNX Runtime guarantees opset 7 and up; older graphs are converted to it
LAYOUTS = ("auto", "NCHW", "NHWC")
OUTPUT_KINDS = ("auto", "logits", "probabilities")
# Operators that only move values: a Softmax behind them still makes the output probabilities.
_PASS_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Transpose"})
ROW_RTOL, ROW_ATOL = 1e-3, 1e-4  # one image alone and in a batch of two: the same row within these


@dataclass
class Graph:
    """The graph being imported, with the facts found about it and a note per choice for the card."""

    path: Path
    model: Any  # onnx.ModelProto
    image: str
    scores: str
    opset: int
    rewritten: bool = False
    notes: dict[str, str] = field(default_factory=dict)


def _load(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(
            f"{path.name} is not a readable ONNX file ({str(e).splitlines()[0][:120]})"
        ) from None
    g = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        raise ExportError(
            f"{path.name} keeps its weights in external data files, which the repository does not carry: "
            "save it as one file (onnx.save(model, path, save_as_external_data=False)) and import that"
        )
    foreign = sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(
            f"{path.name} uses operators of {', '.join(foreign)}: a graph ONNX Runtime optimised for one "
            "provider (e.g. com.microsoft.nchwc, CPU only) cannot be served everywhere; import the graph "
            "as exported, before ONNX Runtime's optimisations"
        )
    return model


def _dims(vi: Any) -> list[int | str]:
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or -1) for d in vi.type.tensor_type.shape.dim]


def _describe(vi: Any) -> str:
    import onnx

    elem = vi.type.tensor_type.elem_type
    kind = onnx.TensorProto.DataType.Name(elem) if elem else "?"
    return f"{vi.name} {kind} {_dims(vi)}"


def _is_float(vi: Any) -> bool:
    import onnx

    return vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _image_like(vi: Any) -> bool:
    d = _dims(vi)
    return _is_float(vi) and len(d) == 4 and (d[1] in (1, 3) or d[3] in (1, 3))


def _scores_like(vi: Any) -> bool:
    d = _dims(vi)
    if not vi.type.tensor_type.HasField("shape"):  # some converters leave outputs unshaped: running tells
        return _is_float(vi)
    return _is_float(vi) and (
        len(d) == 2 or (len(d) == 4 and all(not isinstance(x, int) or x in (-1, 1) for x in d[2:]))
    )


def _choose(items: list, given: str | None, what: str, role: str, flag: str, looks: Any, path: Path) -> Any:
    """The input (or output) that is the image (or the scores): the one there is, or the one named."""
    if given is not None:
        for item in items:
            if item.name == given:
                return item
        listed = "; ".join(_describe(i) for i in items)
        raise ExportError(f"{flag} {given!r}: {path.name} has no such {what} (its {what}s: {listed})")
    if len(items) == 1:
        return items[0]
    listed = "; ".join(_describe(i) for i in items)
    if not items:
        raise ExportError(f"{path.name} is not an image classifier: it has no {what}")
    likely = [i for i in items if looks(i)]
    hint = f"{likely[0].name!r} looks like the {role};" if len(likely) == 1 else f"which is the {role}?"
    raise ExportError(
        f"{path.name} is not a single-{what} classifier: it has {len(items)} {what}s ({listed}); {hint} "
        f"name it with {flag} NAME"
    )


def _cut(graph: Graph, others: list[str]) -> None:
    """Keep only what computes the scores from the image; refused when the scores need another input."""
    import onnx.utils

    g = graph.model.graph
    producer = {out: node for node in g.node for out in node.output}
    inits = {i.name for i in g.initializer}
    needed, seen, stack = set(), set(), [graph.scores]
    while stack:
        name = stack.pop()
        if name in seen or name == graph.image or name in inits:
            continue
        seen.add(name)
        if name in others:
            needed.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
            for attr in node.attribute:  # If / Loop bodies may read the outer graph's names
                for sub in [attr.g, *attr.graphs]:
                    stack.extend(i for n in sub.node for i in n.input if i)
    if needed:
        raise ExportError(
            f"{graph.path.name}: output {graph.scores!r} needs input(s) {', '.join(sorted(needed))} besides "
            f"the image {graph.image!r}; only scores computed from the image alone can be served"
        )
    try:
        graph.model = onnx.utils.Extractor(graph.model).extract_model([graph.image], [graph.scores])
    except Exception as e:
        raise ExportError(
            f"{graph.path.name}: cannot cut the graph down to {graph.image!r} -> {graph.scores!r} "
            f"({str(e).splitlines()[0][:160]})"
        ) from None
    graph.rewritten = True
    graph.notes["graph"] = f"cut down to input {graph.image!r} and output {graph.scores!r}"


def _layout(dims: list, given: str, path: Path, image: Any) -> str:
    if given != "auto":
        return given
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first:
        return "NCHW"
    if last:
        return "NHWC"
    raise ExportError(
        f"{path.name} is not an image classifier: input {_describe(image)} has neither 1 or 3 channels "
        "second (NCHW) nor last (NHWC); name the layout with --layout if the channels are dynamic"
    )


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # the batch probes may fail on purpose: no log lines for those
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(sess: Any, graph: Graph, layout: str, x: np.ndarray) -> np.ndarray:
    """The raw output for a prepared NCHW batch, fed in the graph's layout."""
    feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x
    return np.asarray(sess.run([graph.scores], {graph.image: feed})[0])


def _rows(y: np.ndarray) -> np.ndarray:
    return y.reshape(y.shape[0], -1)


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=ROW_RTOL, atol=ROW_ATOL))


def _set_batch(model: Any, value: str | int, graph: Graph) -> Any:
    """A copy whose image input's and scores' batch dimension is `value` (a name: dynamic); the inner shapes
    a converter wrote for the old batch are dropped for ONNX Runtime to infer again."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    del g.value_info[:]
    for vi in [*g.input, *g.output]:
        if vi.name not in (graph.image, graph.scores):
            continue
        dim = vi.type.tensor_type.shape.dim[0]
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    return copy


def _convert_opset(graph: Graph, layout: str, x: np.ndarray) -> None:
    """A graph below opset 7 goes up to it (ONNX Runtime lacks some of the oldest kernels) where the converter
    manages, the result passes the checker and, where ONNX Runtime runs the original too, gives its scores;
    otherwise it stays as it is and the note says why."""
    import onnx
    from onnx import version_converter

    image = next(i for i in graph.model.graph.input if i.name == graph.image)
    batch = image.type.tensor_type.shape.dim[0]
    try:  # the converter needs every dimension known: it converts the graph for one image
        one = onnx.shape_inference.infer_shapes(_set_batch(graph.model, 1, graph))
        converted = version_converter.convert_version(one, MIN_OPSET)
        if not batch.dim_value:
            converted = _set_batch(converted, batch.dim_param or "N", graph)
        onnx.checker.check_model(converted)
        after = _rows(_run(_session(converted), graph, layout, x))
    except Exception as e:
        graph.notes["opset"] = (
            f"kept at {graph.opset}: conversion to {MIN_OPSET} failed ({str(e).splitlines()[0][:100]})"
        )
        return
    try:
        before = _rows(_run(_session(graph.model), graph, layout, x))
    except Exception:
        before = None  # ONNX Runtime has no kernel for one of its operators: the converted graph is the one
    if before is not None and not _same_rows(before, after):
        graph.notes["opset"] = f"kept at {graph.opset}: converted to {MIN_OPSET} it gave other scores"
        return
    graph.notes["opset"] = f"converted from {graph.opset} to {MIN_OPSET}, checked on a photo"
    graph.model, graph.opset, graph.rewritten = converted, MIN_OPSET, True


def _ends_in_softmax(graph: Graph) -> str | None:
    """The Softmax the scores come from through value-moving operators only, or None."""
    producer = {out: node for node in graph.model.graph.node for out in node.output}
    node = producer.get(graph.scores)
    while node is not None:
        if node.op_type == "Softmax":
            return node.name or node.output[0]
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        node = producer.get(node.input[0])
    return None


def _output_kind(graph: Graph, given: str, rows: np.ndarray) -> str:
    sums_to_one = bool((rows >= -1e-6).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3))
    if given != "auto":
        if given == "probabilities" and not sums_to_one:
            raise ExportError(
                f"--output-kind probabilities, but {graph.path.name}'s outputs for a photo do not sum to 1"
            )
        graph.notes["output_kind"] = f"{given}, as --output-kind says"
        return given
    softmax = _ends_in_softmax(graph)
    if softmax is not None:
        if not sums_to_one:
            raise ExportError(
                f"{graph.path.name} ends in Softmax {softmax!r} but its outputs for a photo do not sum to 1 "
                "over the classes: say what they are with --output-kind logits|probabilities"
            )
        graph.notes["output_kind"] = f"probabilities: the graph ends in Softmax {softmax!r}"
        return "probabilities"
    if sums_to_one:
        graph.notes["output_kind"] = "probabilities: the outputs for each photo are >= 0 and sum to 1"
        return "probabilities"
    graph.notes["output_kind"] = "logits: no final Softmax (a softmax is applied when serving)"
    return "logits"


def _label_offset(given: int | None, classes: int, labels: list[dict], graph: Graph) -> int:
    n = len(labels)
    if given is None:
        if classes == n + 1:
            graph.notes["label_offset"] = (
                f"1: {classes} outputs for {n} labels, column 0 is a background class (TensorFlow-slim)"
            )
            return 1
        given = 0
    elif given:
        graph.notes["label_offset"] = f"{given}, as --label-offset says"
    if classes - given != n:
        extra = f" after {given} leading column(s)" if given else ""
        raise ExportError(f"the model outputs {classes - given} classes{extra} but the label set has {n}")
    return given


def import_onnx(
    file: str | Path,
    repo: str | Path,
    *,
    name: str,
    version: str | None = None,
    preprocessing: str = "imagenet",
    labels: str = "imagenet",
    description: str | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str = "auto",
    output_kind: str = "auto",
    label_offset: int | None = None,
) -> Path:
    """Check, adapt where needed (see the module's docstring) and write one new version; its folder."""
    path = Path(file)
    if not path.is_file():
        raise ExportError(f"ONNX file {str(path)!r} does not exist")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if output_kind not in OUTPUT_KINDS:
        raise ExportError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, not {output_kind!r}")
    if label_offset is not None and label_offset < 0:
        raise ExportError(f"--label-offset must be 0 or more, not {label_offset}")
    repository.check_name(name)
    model = _load(path)
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    outputs = list(g.output)
    image = _choose(inputs, input_name, "input", "image", "--input", _image_like, path)
    scores = _choose(outputs, output_name, "output", "scores", "--output", _scores_like, path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    graph = Graph(path, model, image.name, scores.name, int(opset))
    if len(inputs) > 1 or len(outputs) > 1:
        _cut(graph, [i.name for i in inputs if i.name != image.name])

    in_dims = _dims(image)
    if not _is_float(image) or len(in_dims) != 4:
        raise ExportError(
            f"{path.name} is not an image classifier: input {image.name} is {in_dims} "
            f"({_describe(image).split()[1]}), need float32 [N, 1|3, H, W] or [N, H, W, 1|3]"
        )
    out_dims = _dims(scores)
    if not _scores_like(scores):
        raise ExportError(
            f"{path.name} is not an image classifier: output {scores.name} is {out_dims}, "
            "need [N, classes] or [N, classes, 1, 1]"
        )
    lay = _layout(in_dims, layout, path, image)
    graph.notes["layout"] = (
        f"{lay}, as --layout says" if layout != "auto" else f"{lay}: from the input's shape"
    )
    pre = parse_preprocessing(preprocessing)
    c, h, w = pre["input_size"]
    want = [c, h, w] if lay == "NCHW" else [h, w, c]
    if any(isinstance(d, int) and d > 0 and d != e for d, e in zip(in_dims[1:], want, strict=True)):
        raise ExportError(
            f"the model's input is {in_dims} but the preprocessing gives [N, {', '.join(map(str, want))}]"
        )

    declared = in_dims[0]
    if isinstance(declared, int) and declared > 1:  # one image must run: try the graph with a dynamic batch
        graph.model, graph.rewritten = _set_batch(graph.model, "N", graph), True
        graph.notes["batch"] = f"declared {declared}, made dynamic"

    # ORT must load and run it on a real photo; one image must give [1, classes] (or [1, classes, 1, 1]).
    photos = validate.photos()
    x = validate.preprocess(photos[0], pre)[None]
    pair = np.stack([x[0], validate.preprocess(photos[1], pre)])
    if graph.opset < MIN_OPSET:
        _convert_opset(graph, lay, x)
    try:
        sess = _session(graph.model)
        y = _run(sess, graph, lay, x)
    except Exception as e:
        why = f" (opset {graph.notes['opset']})" if "opset" in graph.notes else ""
        raise ExportError(
            f"ONNX Runtime cannot run {path.name}{why}: {str(e).splitlines()[0][:200]}"
        ) from None
    if (
        y.ndim not in (2, 4)
        or y.shape[0] != 1
        or y.shape[1] < 2
        or any(d != 1 for d in y.shape[2:])
        or not np.isfinite(y).all()
    ):
        raise ExportError(
            f"{path.name} is not a classifier: one image gave an output of shape {list(y.shape)}"
        )
    rows = np.concatenate([_rows(y), _rows(_run(sess, graph, lay, pair[1:]))])  # each photo alone
    classes = int(rows.shape[1])
    batch = -1
    if declared == 1:
        batch = _fixed_batch(graph, lay, pair, rows)
    else:
        why = "other rows than one image at a time"
        try:
            if _same_rows(_rows(_run(sess, graph, lay, pair)), rows):
                why = ""
        except Exception as e:
            why = f"fails ({str(e).splitlines()[0][:120]})"
        if why:
            graph.notes["batch"] = f"1: the graph declares a dynamic batch but a batch of two gives {why}"
            batch = 1
        else:
            graph.notes.setdefault("batch", "dynamic, as the graph declares")
    kind = _output_kind(graph, output_kind, rows)
    label_list = parse_labels(labels)
    offset = _label_offset(label_offset, classes, label_list, graph)

    repo = repository.location(repo)
    version = repository.check_version(version) if version else repository.next_version(repo, name)
    out_tail = [classes, 1, 1] if y.ndim == 4 else [classes]
    with repository.staged(repo, name, version) as stage:
        target = stage / "model.onnx"
        if graph.rewritten:
            target.write_bytes(graph.model.SerializeToString())
        else:
            target.write_bytes(path.read_bytes())
        card = {
            "name": name,
            "version": version,
            "architecture": "imported",
            "source": f"onnx:{path.name}",
            "trained": True,
            "description": description or f"imported ONNX classifier {path.name}",
            "input": {
                "name": graph.image,
                "shape": [batch, *want],
                "dtype": "float32",
                "layout": lay,
            },
            "output": {
                "name": graph.scores,
                "shape": [batch, *out_tail],
                "kind": kind,
                "label_offset": offset,
            },
            "preprocessing": pre,
            "labels": label_list,
            "files": {"model.onnx": repository.file_entry(target, "fp32", optimization="none")},
            "opset": graph.opset,
            "exporter": "imported",
            "import": {"rewritten": graph.rewritten, **graph.notes},
            "tools": tool_versions(),
            "weights": {"file": path.name, "sha256": repository.sha256_file(path)},
            "validation": {"smoke": {"ran": True, "output_shape": list(y.shape), "finite": True}},
            "accuracy": None,
        }
        repository.write_card(stage, card)
    return stage if isinstance(repo, str) else repo / name / version  # a bucket's: the local copy


def _fixed_batch(graph: Graph, layout: str, pair: np.ndarray, rows: np.ndarray) -> int:
    """A graph declaring a batch of 1 (older exports): made dynamic when, declared so, a batch of two gives
    the rows each image gives alone; else served one image at a time."""
    try:
        dynamic = _set_batch(graph.model, "N", graph)
        both = _rows(_run(_session(dynamic), graph, layout, pair))
        ok = _same_rows(both, rows)
    except Exception:
        ok = False
    if ok:
        graph.model, graph.rewritten = dynamic, True
        graph.notes["batch"] = "made dynamic: the graph declared 1 and runs two images to the same rows"
        return -1
    graph.notes["batch"] = "1: fixed in the graph, which cannot run more at once; served one image at a time"
    return 1
