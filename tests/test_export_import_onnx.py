"""`python -m export import-onnx`: existing ONNX classifiers (old opsets too) in, everything else out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main
from export.nets import LeNet5
from export.weights import sha256_file


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def helper_classifier(
    path: Path, opset: int, classes: int = 1000, size: int = 224, softmax: bool = False
) -> Path:
    """Conv -> ReLU -> GlobalAveragePool -> Flatten -> Gemm (-> Softmax), written with onnx.helper."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.2, (classes, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["scores"], transB=1),
    ]
    out = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["prob"], axis=1))
        out = "prob"
    graph = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    if opset <= 8:  # IR 3: initializers are graph inputs too, as old exporters wrote them
        graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, i.dims) for i in inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset <= 8 else 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_import_old_opset_classifier(tmp_path: Path, capsys) -> None:
    src = helper_classifier(tmp_path / "old.onnx", opset=7, softmax=True)
    repo = tmp_path / "models"
    rc = main(["import-onnx", str(src), "--name", "oldnet", "--repository", str(repo)])
    assert rc == 0, capsys.readouterr().err
    folder = repo / "oldnet" / "1"
    card = json.loads((folder / "model.json").read_text())
    assert card["architecture"] == "imported" and card["opset"] == 7
    assert card["input"]["name"] == "data" and card["output"]["name"] == "prob"
    assert card["output"]["kind"] == "probabilities" and card["output"]["shape"] == [-1, 1000]
    assert card["files"]["model.onnx"]["sha256"] == sha256_file(src) == sha256_file(folder / "model.onnx")
    assert len(card["labels"]) == 1000 and card["labels"][0]["id"] == "n01440764"
    assert card["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"data": np.zeros((2, 3, 224, 224), np.float32)})[0]
    assert y.shape == (2, 1000)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_import_torch_export_at_opset_11_with_digits_and_label_file(tmp_path: Path, capsys) -> None:
    src = tmp_path / "lenet_op11.onnx"
    torch.onnx.export(
        LeNet5().eval(),
        (torch.zeros(1, 1, 32, 32),),
        str(src),
        dynamo=False,
        opset_version=11,
        input_names=["img"],
        output_names=["out"],
        dynamic_axes={"img": {0: "b"}, "out": {0: "b"}},
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(10)))
    pre = json.dumps({"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5], "resize": 32, "invert": True})
    repo = tmp_path / "models"
    args = ["import-onnx", str(src), "--name", "lenet_old", "--repository", str(repo)]
    rc = main([*args, "--preprocessing", pre, "--labels", str(labels), "--version", "4"])
    assert rc == 0, capsys.readouterr().err
    card = json.loads((repo / "lenet_old" / "4" / "model.json").read_text())
    assert card["opset"] == 11 and card["output"]["kind"] == "logits"
    assert card["labels"][3] == {"index": 3, "id": "3", "name": "digit 3"}
    assert card["preprocessing"]["channels"] == 1 and card["preprocessing"]["invert"] is True


def _non_classifier(path: Path) -> Path:
    """A segmenter-like graph: [N, 3, H, W] -> [N, 4, H, W]."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 224, 224])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _two_inputs(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 224, 224]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, 224, 224]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 3, 224, 224])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _hidden_non_classifier(path: Path) -> Path:
    """Declares [N, classes] but really outputs a 4-D map: only running it shows what it is."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "liar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_non_classifier, "is not an image classifier: output y is"),
        (_two_inputs, "it has 2 inputs"),
        (_hidden_non_classifier, "one image gave an output of shape [1, 4, 224, 224]"),
    ],
)
def test_non_classifiers_are_rejected(tmp_path: Path, capsys, make, message: str) -> None:
    src = make(tmp_path / "bad.onnx")
    repo = tmp_path / "models"
    rc = main(["import-onnx", str(src), "--name", "bad", "--repository", str(repo)])
    assert rc != 0
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line
    assert not repo.exists()


def test_not_onnx_and_label_count_mismatch(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert main(["import-onnx", str(junk), "--name", "j", "--repository", str(tmp_path / "m")]) != 0
    assert "not a readable ONNX file" in one_error_line(capsys.readouterr().err)
    ten = helper_classifier(tmp_path / "ten.onnx", opset=13, classes=10)
    assert main(["import-onnx", str(ten), "--name", "t", "--repository", str(tmp_path / "m")]) != 0
    assert "outputs 10 classes but the label set has 1000" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def _batch_one_inside(path: Path) -> Path:
    """Declares a dynamic batch but reshapes to [1, -1] inside, as some converters write."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.2, (1000, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w"], ["c"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "b1",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _external_data(path: Path) -> Path:
    src = helper_classifier(path.with_name("inline.onnx"), opset=13)
    model = onnx.load(str(src))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    return path


def _cpu_optimised(path: Path) -> Path:
    """What ONNX Runtime writes at its ALL level on a CPU: NCHWc kernels of com.microsoft.nchwc."""
    src = helper_classifier(path.with_name("plain.onnx"), opset=13)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_external_data, "external data files"),
        (_cpu_optimised, "uses operators of com.microsoft"),
    ],
)
def test_graphs_the_service_could_not_serve_everywhere_are_refused(tmp_path, capsys, make, message) -> None:
    src = make(tmp_path / "odd.onnx")
    repo = tmp_path / "models"
    assert main(["import-onnx", str(src), "--name", "odd", "--repository", str(repo)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not repo.exists()


def test_a_dynamic_batch_that_runs_one_image_only_is_served_with_batch_one(tmp_path, capsys) -> None:
    src = _batch_one_inside(tmp_path / "b1.onnx")
    repo = tmp_path / "models"
    assert main(["import-onnx", str(src), "--name", "b1", "--repository", str(repo)]) == 0, (
        capsys.readouterr()
    )
    card = json.loads((repo / "b1" / "1" / "model.json").read_text())
    assert card["input"]["shape"] == [1, 3, 224, 224] and card["output"]["shape"] == [1, 1000]
    assert "declares a dynamic batch but a batch of two gives" in card["import"]["batch"]
    assert card["import"]["rewritten"] is False
    assert card["files"]["model.onnx"]["sha256"] == sha256_file(src)


@pytest.mark.parametrize(
    ("preprocessing", "message"),
    [
        ('{"input_size": [3, 224, 224], "resize": 0}', "resize must be a positive size"),
        ('{"input_size": [3, 224, 224], "crop_pct": 0}', "crop_pct must be in (0, 1]"),
        ('{"input_size": [3, 224, 224], "channels": 1}', "channels must be 1 or 3"),
        ('{"input_size": [3, 224, 224], "std": [0.2, 0, 0.2]}', "std must not be 0"),
        ('{"input_size": [3, 224, 224], "invert": "false"}', "invert must be true or false"),
    ],
)
def test_bad_preprocessing_is_one_error_line(tmp_path, capsys, preprocessing: str, message: str) -> None:
    src = helper_classifier(tmp_path / "m.onnx", opset=13)
    args = ["import-onnx", str(src), "--name", "m", "--repository", str(tmp_path / "r")]
    assert main([*args, "--preprocessing", preprocessing]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_label_files_keras_index_and_explicit_indices(tmp_path, capsys) -> None:
    src = helper_classifier(tmp_path / "m.onnx", opset=13, classes=3)
    keras = tmp_path / "keras.json"
    keras.write_text(json.dumps({"0": ["n1", "cat"], "1": ["n2", "dog"], "2": ["n3", "bird"]}))
    indexed = tmp_path / "indexed.json"
    indexed.write_text(
        json.dumps([{"index": 2, "name": "bird"}, {"index": 0, "name": "cat"}, {"index": 1, "name": "dog"}])
    )
    for i, labels in enumerate((keras, indexed)):
        repo = tmp_path / f"r{i}"
        assert (
            main(["import-onnx", str(src), "--name", "m", "--repository", str(repo), "--labels", str(labels)])
            == 0
        )
        card = json.loads((repo / "m" / "1" / "model.json").read_text())
        assert [entry["name"] for entry in card["labels"]] == ["cat", "dog", "bird"]
    assert card["labels"][0]["index"] == 0
    seven = tmp_path / "seven.json"
    seven.write_text("7")
    assert (
        main(
            [
                "import-onnx",
                str(src),
                "--name",
                "m",
                "--repository",
                str(tmp_path / "r9"),
                "--labels",
                str(seven),
            ]
        )
        == 2
    )
    assert "a JSON list of names" in one_error_line(capsys.readouterr().err)


def _heads(path: Path, scores_need_threshold: bool = False) -> Path:
    """An image and a threshold in; class scores and a mask out (what a graph with extras looks like)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.2, (1000, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
        helper.make_node("Add", ["logits", "threshold"], ["shifted"]),
        helper.make_node("Greater", ["logits", "threshold"], ["above"]),
        helper.make_node("Cast", ["above"], ["mask"], to=TensorProto.FLOAT),
    ]
    scores = "shifted" if scores_need_threshold else "logits"
    graph = helper.make_graph(
        nodes,
        "heads",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224]),
            helper.make_tensor_value_info("threshold", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info(scores, TensorProto.FLOAT, ["N", 1000]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1000]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_several_inputs_or_outputs_name_the_image_and_the_flags_choose(tmp_path, capsys) -> None:
    src = _heads(tmp_path / "heads.onnx")
    repo = tmp_path / "models"
    base = ["import-onnx", str(src), "--name", "heads", "--repository", str(repo)]
    assert main(base) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "it has 2 inputs (x FLOAT ['N', 3, 224, 224]; threshold FLOAT [1])" in line
    assert "'x' looks like the image; name it with --input NAME" in line
    assert main([*base, "--input", "image"]) == 2
    assert "--input 'image': heads.onnx has no such input" in one_error_line(capsys.readouterr().err)
    assert main([*base, "--input", "x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "it has 2 outputs" in line and "name it with --output NAME" in line
    assert not repo.exists()
    assert main([*base, "--input", "x", "--output", "logits"]) == 0, capsys.readouterr().err
    card = json.loads((repo / "heads" / "1" / "model.json").read_text())
    assert card["input"]["name"] == "x" and card["output"]["name"] == "logits"
    assert card["import"]["rewritten"] is True and "cut down to input 'x'" in card["import"]["graph"]
    served = onnx.load(str(repo / "heads" / "1" / "model.onnx")).graph
    assert [i.name for i in served.input] == ["x"] and [o.name for o in served.output] == ["logits"]
    needy = _heads(tmp_path / "needy.onnx", scores_need_threshold=True)
    args = ["import-onnx", str(needy), "--name", "n", "--repository", str(repo), "--input", "x"]
    assert main([*args, "--output", "shifted"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "output 'shifted' needs input(s) threshold besides the image 'x'" in line


def test_output_kind_is_found_in_the_graph_and_can_be_overridden(tmp_path, capsys) -> None:
    logits = helper_classifier(tmp_path / "logits.onnx", opset=13)
    probs = helper_classifier(tmp_path / "probs.onnx", opset=13, softmax=True)
    repo = tmp_path / "models"
    assert main(["import-onnx", str(probs), "--name", "p", "--repository", str(repo)]) == 0
    card = json.loads((repo / "p" / "1" / "model.json").read_text())
    assert card["output"]["kind"] == "probabilities"
    assert card["import"]["output_kind"] == "probabilities: the graph ends in Softmax 'prob'"
    args = ["import-onnx", str(probs), "--name", "p", "--repository", str(repo), "--output-kind", "logits"]
    assert main(args) == 0
    assert json.loads((repo / "p" / "2" / "model.json").read_text())["output"]["kind"] == "logits"
    args = ["import-onnx", str(logits), "--name", "l", "--repository", str(repo)]
    assert main([*args, "--output-kind", "probabilities"]) == 2
    assert "outputs for a photo do not sum to 1" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exited:  # argparse's own usage error
        main([*args, "--output-kind", "odds"])
    assert exited.value.code == 2 and "invalid choice: 'odds'" in capsys.readouterr().err


def test_background_column_and_label_offset(tmp_path, capsys) -> None:
    repo = tmp_path / "models"
    src = helper_classifier(tmp_path / "bg.onnx", opset=13, classes=1001)
    assert main(["import-onnx", str(src), "--name", "bg", "--repository", str(repo)]) == 0
    card = json.loads((repo / "bg" / "1" / "model.json").read_text())
    assert card["output"]["label_offset"] == 1 and len(card["labels"]) == 1000
    assert "column 0 is a background class" in card["import"]["label_offset"]
    two = helper_classifier(tmp_path / "two.onnx", opset=13, classes=1002)
    args = ["import-onnx", str(two), "--name", "two", "--repository", str(repo)]
    assert main(args) == 2
    assert "the model outputs 1002 classes but the label set has 1000" in one_error_line(
        capsys.readouterr().err
    )
    assert main([*args, "--label-offset", "1"]) == 2
    assert "outputs 1001 classes after 1 leading column(s)" in one_error_line(capsys.readouterr().err)
    assert main([*args, "--label-offset", "2"]) == 0
    assert json.loads((repo / "two" / "1" / "model.json").read_text())["output"]["label_offset"] == 2


def _nhwc(path: Path, dims: list) -> Path:
    """helper_classifier's network behind a Transpose: the NHWC input a TensorFlow/Keras conversion has."""
    model = onnx.load(str(helper_classifier(path.with_name("nchw.onnx"), opset=13)))
    g = model.graph
    g.node.insert(0, helper.make_node("Transpose", ["image"], ["data"], perm=[0, 3, 1, 2]))
    g.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, dims))
    onnx.save(model, str(path))
    return path


def test_nhwc_layout_from_the_shape_or_the_flag(tmp_path, capsys) -> None:
    repo = tmp_path / "models"
    src = _nhwc(tmp_path / "nhwc.onnx", ["N", 224, 224, 3])
    args = ["import-onnx", str(src), "--name", "k", "--repository", str(repo)]
    assert main([*args, "--preprocessing", "inception"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the model's input is ['N', 224, 224, 3] but the preprocessing gives [N, 299, 299, 3]" in line
    assert main(args) == 0
    card = json.loads((repo / "k" / "1" / "model.json").read_text())
    assert card["input"]["layout"] == "NHWC" and card["input"]["shape"] == [-1, 224, 224, 3]
    unknown = _nhwc(tmp_path / "unknown.onnx", ["N", "H", "W", "C"])
    args = ["import-onnx", str(unknown), "--name", "u", "--repository", str(repo)]
    assert main(args) == 2
    assert "name the layout with --layout" in one_error_line(capsys.readouterr().err)
    assert main([*args, "--layout", "NHWC"]) == 0
    card = json.loads((repo / "u" / "1" / "model.json").read_text())
    assert card["input"]["layout"] == "NHWC" and card["import"]["layout"] == "NHWC, as --layout says"


def test_a_graph_below_opset_7_is_converted_and_checked(tmp_path, capsys) -> None:
    """Opset 6's Gemm has no ONNX Runtime kernel: converted to 7, it gives what the same network built at
    opset 7 gives."""
    old = helper_classifier(tmp_path / "op6.onnx", opset=6, softmax=True)
    repo = tmp_path / "models"
    assert main(["import-onnx", str(old), "--name", "op6", "--repository", str(repo)]) == 0, (
        capsys.readouterr()
    )
    card = json.loads((repo / "op6" / "1" / "model.json").read_text())
    assert card["opset"] == 7 and card["import"]["opset"] == "converted from 6 to 7, checked on a photo"
    assert card["input"]["shape"] == [-1, 3, 224, 224] and card["weights"]["sha256"] == sha256_file(old)
    same = helper_classifier(tmp_path / "op7.onnx", opset=7, softmax=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
        for p in (repo / "op6" / "1" / "model.onnx", same)
    ]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_an_output_without_a_declared_shape_is_judged_by_running_it(tmp_path, capsys) -> None:
    model = onnx.load(str(helper_classifier(tmp_path / "shaped.onnx", opset=13)))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "unshaped.onnx"))
    repo = tmp_path / "models"
    assert (
        main(["import-onnx", str(tmp_path / "unshaped.onnx"), "--name", "u", "--repository", str(repo)]) == 0
    )
    card = json.loads((repo / "u" / "1" / "model.json").read_text())
    assert card["output"] == {"name": "scores", "shape": [-1, 1000], "kind": "logits"}
