"""int8 and float16 ONNX of the trained reference models, on real images, and
the widening of narrow Convs for int8 (`renorm_convert.onnx.int8_layout`).

Latency is benchmarks/quantize.py's job (paired, interleaved rounds); the
tests here check what the speed rests on: the structure of the int8 graph
(every Conv quantized, none narrower than onnxruntime's fast int8 kernel
takes) and that it keeps the float model's predictions."""

import os

import keras
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import renorm_convert as rc
from renorm_convert import data
from renorm_convert.onnx.export import FLOAT16_TOLERANCE
from renorm_convert.onnx.int8_layout import (CHANNEL_ALIGNMENT,
                                        MIN_OUTPUT_CHANNELS,
                                        share_concat_scales, widen_for_int8)
from onnx_helpers import onnx_model, run_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(name, val=500):
    if not os.path.isdir(data.FASHION_MNIST_DIR) and not os.environ.get("CI"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    model = rc.convert(keras.models.load_model(
        os.path.join(ROOT, "renorm_convert", "reference", f"{name}.keras")))
    split = data.load_fashion_mnist().subset(train=256, val=val, seed=0)
    shape = data.model_image_shape(model)
    return (model, np.asarray(data.adapt(split.x_train, shape)),
            np.asarray(data.adapt(split.x_val, shape)), split.y_val)


@pytest.fixture(scope="module")
def trained():
    return _reference("resnet_fmnist")


@pytest.fixture(scope="module")
def inception_int8(tmp_path_factory):
    """The Inception-style model (narrow branches, a 1-channel stem) and its
    int8 export, verified on 1000 test images."""
    model, calibration, x, y = _reference("inception_fmnist", val=1000)
    path = tmp_path_factory.mktemp("int8") / "inception.onnx"
    report = rc.export_onnx(model, path, quantize="int8",
                            calibration=calibration, verify=x, labels=y)
    return model, path, report


def _producer(graph, name):
    return next((n for n in graph.node if name in n.output), None)


def _quantized_convs(path):
    """(Conv node, float weights, DQ of its input) of a QDQ file."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        x_dq = _producer(graph, node.input[0])
        w_dq = _producer(graph, node.input[1])
        assert x_dq is not None and x_dq.op_type == "DequantizeLinear", \
            f"{node.name}: float input"
        assert w_dq is not None and w_dq.op_type == "DequantizeLinear", \
            f"{node.name}: float weights"
        weights = numpy_helper.to_array(inits[w_dq.input[0]])
        assert weights.dtype == np.int8
        out.append((node, weights, x_dq))
    return graph, out


def test_int8_keeps_accuracy_and_is_smaller(trained, tmp_path):
    model, calibration, x, y = trained
    report = rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                            calibration=calibration, verify=x, labels=y)
    assert report.precision == "int8"
    saved = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in saved.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "BatchNormalization" not in ops
    assert [i.name for i in saved.graph.input] == report.input_names
    assert [o.name for o in saved.graph.output] == report.output_names
    assert report.file_size < 0.5 * report.int8.float_file_size
    # The float file is verified against Keras as always.
    assert report.verification.logits_relative_diff <= 1e-5
    # int8 against float, on validation images calibration never saw.
    assert report.int8.top1_agreement >= 0.95
    assert report.int8.float_accuracy >= 0.85
    assert report.int8.int8_accuracy >= report.int8.float_accuracy - 0.01
    assert "latency" not in str(report.as_dict())


def test_int8_inception_every_conv_quantized_and_wide(inception_int8):
    model, path, report = inception_int8
    graph, convs = _quantized_convs(path)
    assert len(convs) == 19  # every Conv of the model, none left in float
    for node, weights, _ in convs:
        out_channels, in_channels = weights.shape[:2]
        assert out_channels >= MIN_OUTPUT_CHANNELS, node.name
        assert out_channels % CHANNEL_ALIGNMENT == 0, node.name
        assert in_channels % CHANNEL_ALIGNMENT == 0, node.name
    # The 1-channel stem reads the image padded to 4 channels.
    stems = [(n, x_dq) for n, w, x_dq in convs if w.shape[1] == 4]
    assert len(stems) == 1
    pad = _producer(graph, stems[0][1].input[0])
    pad = _producer(graph, pad.input[0]) if pad.op_type == "QuantizeLinear" \
        else pad
    assert pad.op_type == "Pad"
    # Every Concat's inputs carry its output's scale: QLinearConcat copies.
    concats = [n for n in graph.node if n.op_type == "Concat"]
    assert len(concats) == 3
    for concat in concats:
        out_q = next(n for n in graph.node if concat.output[0] in n.input)
        assert out_q.op_type == "QuantizeLinear"
        assert {tuple(_producer(graph, i).input[1:3]) for i in concat.input} \
            == {tuple(out_q.input[1:3])}
    # Zero filters: a widened Conv computes exactly what it did.
    assert report.int8.top1_agreement >= 0.97
    assert report.int8.float_accuracy >= 0.78
    assert report.int8.int8_accuracy >= report.int8.float_accuracy - 0.01


def test_int8_resnet_structure(trained, tmp_path):
    """Nothing narrow but the stem: only it changes (its input padded to 4
    channels); the residual Adds stay int8 too."""
    model, calibration, _, _ = trained
    rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                   calibration=calibration, verify=False)
    graph, convs = _quantized_convs(tmp_path / "q.onnx")
    assert len(convs) == 9
    shapes = sorted(w.shape[:2] for _, w, _ in convs)
    assert (16, 4) in shapes and all(c % 4 == 0 for _, c in shapes)
    assert sum(n.op_type == "Pad" for n in graph.node) == 1
    for add in (n for n in graph.node if n.op_type == "Add"):
        assert all(_producer(graph, i).op_type == "DequantizeLinear"
                   for i in add.input)


def test_int8_needs_calibration(trained, tmp_path):
    model = trained[0]
    with pytest.raises(rc.ExportError,
                       match="quantize='int8' needs calibration"):
        rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8")
    with pytest.raises(rc.ExportError, match="calibration=.*inputs of shape"):
        rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                       calibration=np.zeros((4, 5, 5, 1), "float32"))
    assert not (tmp_path / "q.onnx").exists()


def test_float16_within_its_tolerance(trained, tmp_path):
    model, _, x, y = trained
    report = rc.export_onnx(model, tmp_path / "h.onnx", precision="float16",
                            verify=x[:64])
    saved = onnx.load(str(tmp_path / "h.onnx"))
    types = {i.data_type for i in saved.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    # Inputs and outputs stay float32.
    assert saved.graph.input[0].type.tensor_type.elem_type == \
        onnx.TensorProto.FLOAT
    v = report.verification
    assert v.tolerance == FLOAT16_TOLERANCE
    assert v.logits_relative_diff <= v.tolerance
    assert v.top1_agreement >= 0.95


def test_quantize_onnx_is_export_int8_for_any_file(trained, tmp_path):
    model, calibration, x, _ = trained
    rc.export_onnx(model, tmp_path / "f.onnx", verify=False)
    rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                   calibration=calibration, verify=False)
    rc.quantize_onnx(tmp_path / "f.onnx", tmp_path / "again.onnx",
                     calibration)

    def run(name):
        return run_onnx(tmp_path / name, x[:64], optimize=True)[0]

    # Same settings, same calibration, same float model: the same int8 file.
    np.testing.assert_array_equal(run("again.onnx"), run("q.onnx"))
    assert not np.array_equal(run("again.onnx"), run("f.onnx"))
    with pytest.raises(rc.ExportError, match="1 input"):
        rc.quantize_onnx(tmp_path / "f.onnx", tmp_path / "x.onnx",
                         [calibration, calibration])
    assert not (tmp_path / "x.onnx").exists()


# --- int8_layout on small graphs ---------------------------------------------

def _conv(rng, name, x, cin, cout, k=1):
    w = numpy_helper.from_array(
        rng.normal(size=(cout, cin, k, k)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(
        rng.normal(size=(cout,)).astype(np.float32), f"{name}_b")
    node = helper.make_node("Conv", [x, w.name, b.name], [name], name=name,
                            kernel_shape=[k, k], pads=[k // 2] * 4)
    return node, [w, b]


def _model(nodes, inits, cin, outputs):
    return onnx_model(nodes, [("x", [None, cin, 8, 8])],
                      [(o, [None] * 4) for o in outputs], inits)


def _branchy(rng):
    """x(1) -> stem(12) -> relu -> {a: 1x1 (8) -> relu; b: maxpool}
    -> concat -> c: 3x3 (16) -> relu -> r: 1x1 (8) -> add(with d(8)) ->
    out. `a` is absorbable (through Relu, Concat into c); r and d feed an
    Add, so they stay."""
    nodes, inits = [], []
    for args in (("stem", "x", 1, 12, 3), ("a", "stem_relu", 12, 8),
                 ("c", "cat", 20, 16, 3), ("r", "c_relu", 16, 8),
                 ("d", "c_relu", 16, 8)):
        node, weights = _conv(rng, *args)
        nodes.append(node)
        inits += weights
        if args[0] in ("stem", "a", "c"):
            nodes.append(helper.make_node("Relu", [args[0]],
                                          [f"{args[0]}_relu"]))
        if args[0] == "a":
            nodes.append(helper.make_node(
                "MaxPool", ["stem_relu"], ["pool"], kernel_shape=[3, 3],
                pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Concat", ["a_relu", "pool"],
                                          ["cat"], axis=1))
    nodes.append(helper.make_node("Add", ["r", "d"], ["out"]))
    order = ["stem", "stem_relu", "a", "a_relu", "pool", "cat", "c",
             "c_relu", "r", "d", "out"]
    nodes.sort(key=lambda n: order.index(n.output[0]))
    return _model(nodes, inits, 1, ["out"])


def test_widen_is_exact_and_follows_its_rule():
    rng = np.random.default_rng(0)
    model = _branchy(rng)
    onnx.checker.check_model(model)
    widened, done = widen_for_int8(model)
    onnx.checker.check_model(widened)
    assert done == {"outputs": ["stem", "a"], "inputs": ["stem"]}
    inits = {i.name: numpy_helper.to_array(i)
             for i in widened.graph.initializer}
    assert inits["stem_w"].shape == (16, 4, 3, 3)
    assert inits["a_w"].shape == (16, 16, 1, 1)   # absorbed the stem's 16
    assert inits["c_w"].shape == (16, 32, 3, 3)   # 16 from a, 16 from pool
    assert inits["r_w"].shape == (8, 16, 1, 1)    # into an Add: kept
    assert inits["d_w"].shape == (8, 16, 1, 1)
    x = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    got, expected = run_onnx(widened, x, optimize=True)[0], run_onnx(
        model, x, optimize=True)[0]
    assert got.shape == expected.shape
    # Only zeros added: float rounding of a different summation order.
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # The model given is not changed.
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == \
        (12, 1, 3, 3)


def test_widen_leaves_wide_graph_outputs_and_shared_weights():
    rng = np.random.default_rng(1)
    # Already aligned: nothing to do.
    node, inits = _conv(rng, "y", "x", 4, 16)
    widened, done = widen_for_int8(_model([node], inits, 4, ["y"]))
    assert done == {"outputs": [], "inputs": []}
    # A narrow Conv producing a graph output keeps its width.
    node, inits = _conv(rng, "y", "x", 4, 8)
    _, done = widen_for_int8(_model([node], inits, 4, ["y"]))
    assert done["outputs"] == []
    # Weights shared by two Convs are left alone.
    a, inits = _conv(rng, "a", "x", 4, 4)
    b = helper.make_node("Conv", ["a", "a_w", "a_b"], ["b"], name="b",
                         kernel_shape=[1, 1])
    m = _model([a, helper.make_node("Relu", ["a"], ["ar"]), b],
               inits, 4, ["b"])
    m.graph.node[2].input[0] = "ar"
    _, done = widen_for_int8(m)
    assert done == {"outputs": [], "inputs": []}


def test_quantize_int8_falls_back_when_widening_changes_outputs(
        monkeypatch):
    """A widening that does not reproduce the float outputs is dropped."""
    from renorm_convert.onnx import int8_layout

    rng = np.random.default_rng(2)
    model = _branchy(rng)
    x = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    payload = model.SerializeToString()
    assert int8_layout.widened_payload(payload, [x]) != payload

    def wrong(m):
        widened, done = widen_for_int8(m)
        for init in widened.graph.initializer:
            if init.name == "c_b":
                init.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(init) + 1, "c_b"))
        return widened, done

    monkeypatch.setattr(int8_layout, "widen_for_int8", wrong)
    assert int8_layout.widened_payload(payload, [x]) == payload


def test_share_concat_scales_on_a_quantized_graph(tmp_path):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                          QuantType, quantize_static)

    rng = np.random.default_rng(3)
    model = _branchy(rng)
    onnx.save(model, tmp_path / "f.onnx")
    x = rng.normal(size=(16, 1, 8, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"),
                    Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    before = run_onnx(quantized, x, optimize=True)[0]
    assert share_concat_scales(quantized) == 1
    onnx.checker.check_model(quantized)
    graph = quantized.graph
    concat = next(n for n in graph.node if n.op_type == "Concat")
    out_q = next(n for n in graph.node if concat.output[0] in n.input)
    for name in concat.input:
        dq = _producer(graph, name)
        q = _producer(graph, dq.input[0])
        assert dq.input[1:3] == out_q.input[1:3] == q.input[1:3]
    # Coarser steps for the narrower input, same predictions to within them.
    after = run_onnx(quantized, x, optimize=True)[0]
    assert np.abs(after - before).max() <= 0.1 * np.abs(before).max()
    # A second pass changes nothing.
    again = quantized.SerializeToString()
    share_concat_scales(quantized)
    assert quantized.SerializeToString() == again
