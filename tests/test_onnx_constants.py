"""constants.fold_constants and passes.clean: what an exporter computes from
constants becomes a constant (checked against NumPy), and the whole
clean-up leaves an exporter's Conv as one node with its bias. Graphs built
with onnx.helper, run in onnxruntime before and after (every backend)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from renorm_convert.onnx.constants import fold_constants
from renorm_convert.onnx.folding import count_affine_after_linear
from renorm_convert.onnx.passes import clean
from onnx_helpers import onnx_model, run_onnx

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _jax2onnx_style_conv():
    """A Keras Conv2D as jax2onnx writes it: NHWC input transposed to NCHW,
    the HWIO kernel transposed to OIHW by a node, the output transposed
    back, and the bias a Reshape of a (C,) constant added in NHWC."""
    kernel = RNG.normal(size=(3, 3, 2, 5)).astype("float32")  # HWIO
    bias = RNG.normal(size=(5,)).astype("float32")
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["kernel"], ["w"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x_nchw", "w"], ["c"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["c"], ["c_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.
                         from_array(np.array([1, 1, 1, 5], np.int64))),
        helper.make_node("Reshape", ["bias", "shape"], ["b"]),
        helper.make_node("Add", ["c_nhwc", "b"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 6, 6, 2])], [("y", [2, 6, 6, 5])],
                   {"kernel": kernel, "bias": bias})
    return model, kernel, bias


def test_weights_written_as_computations_become_constants():
    model, kernel, bias = _jax2onnx_style_conv()
    out, count = fold_constants(model)
    assert count == 3  # the kernel's Transpose, the Constant, the Reshape
    assert [n.op_type for n in out.graph.node] == [
        "Transpose", "Conv", "Transpose", "Add"]
    values = _initializers(out)
    conv = out.graph.node[1]
    np.testing.assert_array_equal(values[conv.input[1]],
                                  np.transpose(kernel, (3, 2, 0, 1)))
    add = out.graph.node[3]
    np.testing.assert_array_equal(values[add.input[1]],
                                  bias.reshape(1, 1, 1, 5))
    assert "kernel" not in values and "bias" not in values  # orphans go
    x = RNG.normal(size=(2, 6, 6, 2)).astype("float32")
    np.testing.assert_array_equal(run_onnx(model, {"x": x})[0],
                                  run_onnx(out, {"x": x})[0])
    assert count_affine_after_linear(model) == 0  # the bias was not seen
    assert count_affine_after_linear(out) == 1  # now it is


def test_clean_leaves_one_conv_with_its_bias():
    model, kernel, bias = _jax2onnx_style_conv()
    out, record = clean(model)
    assert [n.op_type for n in out.graph.node] == [
        "Transpose", "Conv", "Transpose"]
    assert (record.constants, record.affine, record.nodes_before,
            record.nodes_after) == (3, 1, 7, 3)
    conv = out.graph.node[1]
    np.testing.assert_allclose(_initializers(out)[conv.input[2]], bias)
    x = RNG.normal(size=(2, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, {"x": x})[0],
                               run_onnx(model, {"x": x})[0], rtol=1e-6,
                               atol=1e-6)


def test_chains_fold_and_what_must_stay_stays():
    """A Cast of a Constant feeding a Mul folds as a chain; a random draw,
    a node computing from an input, a node writing a graph output and an
    Expand that would make a far larger constant stay."""
    nodes = [
        helper.make_node("Constant", [], ["half"], value=numpy_helper.
                         from_array(np.array([0.5], np.float64))),
        helper.make_node("Cast", ["half"], ["half32"], to=FLOAT),
        helper.make_node("Mul", ["half32", "three"], ["scale"]),
        helper.make_node("RandomNormal", [], ["noise"], shape=[4]),
        helper.make_node("Expand", ["three", "big"], ["wide"]),
        helper.make_node("ReduceSum", ["wide"], ["total"], keepdims=0),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Add", ["xs", "noise"], ["noisy"]),
        helper.make_node("Mul", ["noisy", "total"], ["y"]),
        helper.make_node("Neg", ["three"], ["z"])]
    model = onnx_model(nodes, [("x", [4])], [("y", [4]), ("z", [1])],
                   {"three": np.array([3.0], np.float32),
                    "big": np.array([1024, 1024], np.int64)})
    out, count = fold_constants(model)
    assert count == 3
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["RandomNormal", "Expand", "ReduceSum", "Mul", "Add",
                   "Mul", "Neg"]
    scale = out.graph.node[3].input[1]
    np.testing.assert_array_equal(_initializers(out)[scale],
                                  np.array([1.5], np.float32))
    assert fold_constants(out)[1] == 0
