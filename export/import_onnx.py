"""Bring your own ONNX: register an existing classifier (any opset ONNX Runtime runs) in the model repository.

Accepted: one NCHW float image input (batch dynamic or 1, C in 1 or 3) and one [N, classes] output; ONNX
Runtime must load it and run a real photo through it, and the output must have as many classes as the
labels. Anything else (detectors, segmenters, multi-input graphs, ...) is rejected with one line.
The file is copied as it is (no re-optimisation); no fp16 twin is made for an imported graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def parse_labels(spec: str, classes: int) -> list[dict]:
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
    if len(labels) != classes:
        raise ExportError(f"the model outputs {classes} classes but the label set has {len(labels)}")
    return labels


def inspect(path: Path) -> tuple[dict, dict, int]:
    """Check the graph is an image classifier; return (input, output, opset) facts."""
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
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if len(inputs) != 1 or len(g.output) != 1:
        raise ExportError(
            f"{path.name} is not an image classifier: it has {len(inputs)} inputs and {len(g.output)} "
            "outputs (need one NCHW image input and one [N, classes] output)"
        )

    def dims(vi) -> list:
        t = vi.type.tensor_type
        return [d.dim_value if d.dim_value > 0 else (d.dim_param or -1) for d in t.shape.dim], t.elem_type

    in_dims, in_type = dims(inputs[0])
    out_dims, _ = dims(g.output[0])
    if in_type != onnx.TensorProto.FLOAT or len(in_dims) != 4 or in_dims[1] not in (1, 3):
        raise ExportError(
            f"{path.name} is not an image classifier: input {inputs[0].name} is {in_dims} "
            f"({onnx.TensorProto.DataType.Name(in_type)}), need float32 [N, 1|3, H, W]"
        )
    if len(out_dims) != 2:
        raise ExportError(
            f"{path.name} is not an image classifier: output {g.output[0].name} is {out_dims}, "
            "need [N, classes]"
        )
    return {"name": inputs[0].name, "dims": in_dims}, {"name": g.output[0].name, "dims": out_dims}, int(opset)


def import_onnx(
    file: str | Path,
    repo: str | Path,
    *,
    name: str,
    version: str | None = None,
    preprocessing: str = "imagenet",
    labels: str = "imagenet",
    description: str | None = None,
) -> Path:
    path = Path(file)
    if not path.is_file():
        raise ExportError(f"ONNX file {str(path)!r} does not exist")
    repository.check_name(name)
    inp, out, opset = inspect(path)
    pre = parse_preprocessing(preprocessing)
    c, h, w = pre["input_size"]
    fixed = [d for d in inp["dims"][1:] if isinstance(d, int) and d > 0]
    if fixed and (len(fixed) != 3 or fixed != [c, h, w]):
        raise ExportError(
            f"the model's input is {inp['dims']} but the preprocessing gives [N, {c}, {h}, {w}]"
        )
    # ORT must load and run it on a real photo; the output must be [1, classes] of finite numbers.
    x = validate.preprocess(validate.photos()[0], pre)[None]
    try:
        sess = validate.ort_session(path)
        y = sess.run(None, {inp["name"]: x})[0]
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot run {path.name}: {str(e).splitlines()[0][:200]}") from None
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[0] != 1 or y.shape[1] < 2 or not np.isfinite(y).all():
        raise ExportError(
            f"{path.name} is not a classifier: one image gave an output of shape {list(y.shape)}"
        )
    classes = int(y.shape[1])
    label_list = parse_labels(labels, classes)
    batch_dynamic = not isinstance(inp["dims"][0], int) or inp["dims"][0] <= 0
    if (
        batch_dynamic
    ):  # declared dynamic: a graph that hard-codes batch 1 inside (Reshape [1, -1]) is caught here
        pair = np.stack([x[0], validate.preprocess(validate.photos()[1], pre)])
        try:
            y2 = np.asarray(sess.run(None, {inp["name"]: pair})[0])
        except Exception as e:
            raise ExportError(
                f"{path.name} declares a dynamic batch but fails on a batch of 2: "
                f"{str(e).splitlines()[0][:160]}"
            ) from None
        if y2.shape != (2, classes) or not np.allclose(y2[0], y[0], rtol=1e-3, atol=1e-4):
            raise ExportError(
                f"{path.name} declares a dynamic batch but a batch of 2 gives {list(y2.shape)}, not the same "
                f"rows as one image at a time ([2, {classes}]): fix the graph's batch handling or export it "
                "with a fixed batch of 1"
            )
    kind = "probabilities" if np.allclose(y.sum(1), 1.0, atol=1e-3) and (y >= 0).all() else "logits"
    repo = repository.location(repo)
    version = repository.check_version(version) if version else repository.next_version(repo, name)
    with repository.staged(repo, name, version) as stage:
        shutil.copyfile(path, stage / "model.onnx")
        card = {
            "name": name,
            "version": version,
            "architecture": "imported",
            "source": f"onnx:{path.name}",
            "trained": True,
            "description": description or f"imported ONNX classifier {path.name}",
            "input": {
                "name": inp["name"],
                "shape": [-1 if batch_dynamic else 1, c, h, w],
                "dtype": "float32",
                "layout": "NCHW",
            },
            "output": {"name": out["name"], "shape": [-1 if batch_dynamic else 1, classes], "kind": kind},
            "preprocessing": pre,
            "labels": label_list,
            "files": {"model.onnx": repository.file_entry(stage / "model.onnx", "fp32", optimization="none")},
            "opset": opset,
            "exporter": "imported",
            "tools": tool_versions(),
            "weights": {"file": path.name, "sha256": repository.sha256_file(path)},
            "validation": {"smoke": {"ran": True, "output_shape": list(y.shape), "finite": True}},
            "accuracy": None,
        }
        repository.write_card(stage, card)
    return stage if isinstance(repo, str) else repo / name / version  # a bucket's: the local copy
