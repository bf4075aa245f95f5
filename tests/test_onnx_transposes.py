"""transposes.optimize_transposes: NCHW <-> NHWC Transposes cancelled or
moved down through elementwise ops, Concat, Softmax, reductions and Pad.
Graphs built with onnx.helper; each is run in onnxruntime (optimizations
off) before and after, and the outputs must be equal (every backend)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from renorm_convert.onnx.transposes import count_transposes, optimize_transposes
from onnx_helpers import onnx_model, run_onnx

FLOAT = TensorProto.FLOAT
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _same_outputs(before, after, feed, rtol=0.0):
    """Equal outputs; `rtol` for reductions, whose sums run in another
    memory order once the axes are stored differently."""
    onnx.checker.check_model(after)
    assert [o.name for o in after.graph.output] == [
        o.name for o in before.graph.output]
    for a, b in zip(run_onnx(before, feed), run_onnx(after, feed)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=rtol, atol=0)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _conv(name, x, w, out):
    return helper.make_node("Conv", [x, w], [out], name=name,
                            kernel_shape=[1, 1])


def _t(x, out, perm):
    return helper.make_node("Transpose", [x], [out], perm=perm)


RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 3, 1, 1)).astype("float32")
W2 = RNG.normal(size=(4, 4, 1, 1)).astype("float32")
X = RNG.normal(size=(2, 5, 5, 3)).astype("float32")


def _conv_relu_conv(middle=("Relu",)):
    """NHWC input -> [to NCHW, Conv, to NHWC] -> elementwise ops -> [to NCHW,
    Conv, to NHWC]: what an op-by-op exporter writes for two Keras Conv2D
    layers."""
    nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w1", "b"),
             _t("b", "h0", NHWC)]
    for i, op in enumerate(middle):
        nodes.append(helper.make_node(op, [f"h{i}"], [f"h{i + 1}"]))
    last = f"h{len(middle)}"
    nodes += [_t(last, "d", NCHW), _conv("c2", "d", "w2", "e"),
              _t("e", "y", NHWC)]
    return onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", [2, 5, 5, 4])],
                  {"w1": W1, "w2": W2})


def test_pairs_around_elementwise_ops_cancel():
    model = _conv_relu_conv(("Relu", "Sigmoid"))
    out, removed = optimize_transposes(model)
    assert _ops(out) == ["Transpose", "Conv", "Relu", "Sigmoid", "Conv",
                         "Transpose"]
    assert removed == 2
    _same_outputs(model, out, {"x": X})
    # The model given is not changed; a second pass finds nothing.
    assert count_transposes(model) == 4
    assert optimize_transposes(out)[1] == 0


def test_transpose_then_its_inverse_cancels_and_merges():
    nodes = [_t("x", "a", NCHW), _t("a", "b", NHWC),
             helper.make_node("Relu", ["b"], ["c"]),
             _t("c", "d", [0, 3, 1, 2]), _t("d", "y", [0, 1, 3, 2])]
    model = onnx_model(nodes, [("x", [2, 5, 6, 3])], [("y", [2, 3, 6, 5])])
    out, removed = optimize_transposes(model)
    # The first pair cancels; the last two become one Transpose.
    assert _ops(out) == ["Relu", "Transpose"]
    assert list(out.graph.node[1].attribute[0].ints) == [0, 3, 2, 1]
    assert removed == 3
    _same_outputs(model, out, {"x": RNG.normal(size=(2, 5, 6, 3)).astype(
        "float32")})


def test_residual_add_concat_and_constants():
    """A residual Add of two transposed branches, a per-channel constant
    Add in NHWC (moved to NCHW: (C,) becomes (C, 1, 1)), a channel
    Concat, and a scalar Mul."""
    bias = RNG.normal(size=(4,)).astype("float32")
    nodes = [
        _t("x", "a", NCHW), _conv("c1", "a", "w1", "b"), _t("b", "p", NHWC),
        _conv("c2", "a", "w1", "q"), _t("q", "r", NHWC),
        helper.make_node("Add", ["p", "r"], ["s"]),
        helper.make_node("Add", ["s", "bias"], ["t"]),
        helper.make_node("Mul", ["t", "two"], ["u"]),
        helper.make_node("Concat", ["u", "p"], ["v"], axis=-1),
        _t("v", "w", NCHW),
        helper.make_node("Conv", ["w", "w3"], ["z"], kernel_shape=[1, 1]),
        _t("z", "y", NHWC)]
    w3 = RNG.normal(size=(2, 8, 1, 1)).astype("float32")
    model = onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", [2, 5, 5, 2])],
                   {"w1": W1, "bias": bias, "two": np.float32(2.0),
                    "w3": w3})
    out, _ = optimize_transposes(model)
    assert count_transposes(out) == 2  # the input's and the output's
    _same_outputs(model, out, {"x": X})
    concat = next(n for n in out.graph.node if n.op_type == "Concat")
    assert concat.attribute[0].i == 1


@pytest.mark.parametrize("keepdims", [0, 1])
def test_global_average_pooling_and_softmax(keepdims):
    nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w1", "b"),
             _t("b", "h", NHWC),
             helper.make_node("ReduceMean", ["h"], ["m"], axes=[1, 2],
                              keepdims=keepdims),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    shape = [2, 1, 1, 4] if keepdims else [2, 4]
    model = onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", shape)],
                   {"w1": W1})
    out, _ = optimize_transposes(model)
    # Without kept dimensions the pooled (N, C) needs no Transpose at all.
    assert count_transposes(out) == 1 + keepdims
    _same_outputs(model, out, {"x": X}, rtol=1e-6)


def test_reduce_with_axes_as_input_and_pad():
    nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w1", "b"),
             _t("b", "h", NHWC),
             helper.make_node("Pad", ["h", "pads"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["y"],
                              keepdims=0)]
    pads = np.array([0, 1, 2, 0, 0, 3, 1, 0], np.int64)
    model = onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", [2, 4])],
                   {"w1": W1, "pads": pads,
                    "axes": np.array([1, 2], np.int64)}, opset=18)
    out, _ = optimize_transposes(model)
    assert count_transposes(out) == 1
    _same_outputs(model, out, {"x": X}, rtol=1e-6)


def test_nothing_moves_where_a_node_would_be_added():
    """A Transpose read by a Relu and by a Reshape (which depends on the
    order of axes) stays where it is: moving it below the Relu would add
    one."""
    nodes = [_t("x", "a", NHWC), helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("Reshape", ["a", "shape"], ["z"])]
    model = onnx_model(nodes, [("x", [2, 3, 4, 5])], [("y", [2, 4, 5, 3]),
                                                  ("z", [2, 60])],
                   {"shape": np.array([2, 60], np.int64)})
    out, removed = optimize_transposes(model)
    assert removed == 0 and _ops(out) == _ops(model)
    _same_outputs(model, out, {"x": RNG.normal(size=(2, 3, 4, 5)).astype(
        "float32")})


def test_mixed_layouts_do_not_move():
    """An Add of a transposed value and a value in the other layout (not a
    constant) cannot read both untransposed: it stays."""
    nodes = [_t("x", "a", NHWC), helper.make_node("Add", ["a", "z"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 3, 4, 4]), ("z", [2, 4, 4, 3])],
                   [("y", [2, 4, 4, 3])])
    out, removed = optimize_transposes(model)
    assert removed == 0 and _ops(out) == ["Transpose", "Add"]


def test_graph_output_names_stay():
    """A Transpose whose cancelling partner writes a graph output: the
    producer writes the output under its name."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), _t("r", "a", NHWC),
             _t("a", "y", NCHW)]
    model = onnx_model(nodes, [("x", [2, 3, 4, 5])], [("y", [2, 3, 4, 5])])
    out, removed = optimize_transposes(model)
    assert _ops(out) == ["Relu"] and removed == 2
    assert out.graph.node[0].output[0] == "y"
    _same_outputs(model, out, {"x": RNG.normal(size=(2, 3, 4, 5)).astype(
        "float32")})


def test_swish_reads_the_transposed_value_twice():
    """x * sigmoid(x) (Keras's silu on PyTorch): the Transpose is read by
    the Sigmoid and by the Mul; both move below it together."""
    nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w1", "b"),
             _t("b", "h", NHWC),
             helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Mul", ["h", "s"], ["m"]),
             _t("m", "d", NCHW), _conv("c2", "d", "w2", "e"),
             _t("e", "y", NHWC)]
    model = onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", [2, 5, 5, 4])],
                   {"w1": W1, "w2": W2})
    out, removed = optimize_transposes(model)
    assert _ops(out) == ["Transpose", "Conv", "Sigmoid", "Mul", "Conv",
                         "Transpose"]
    assert removed == 2
    _same_outputs(model, out, {"x": X})


def test_squeeze_and_excitation_reshape_takes_the_transpose():
    """Global pooling to (N, C), a Reshape to (N, 1, 1, C) and a Transpose
    to NCHW that moves only axes of size 1: one Reshape to (N, C, 1, 1);
    the excitation multiplies the feature map in NCHW."""
    w_se = RNG.normal(size=(4, 4, 1, 1)).astype("float32")
    nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w1", "b"),
             _t("b", "h", NHWC),
             helper.make_node("ReduceMean", ["h"], ["m"], axes=[1, 2],
                              keepdims=0),
             helper.make_node("Reshape", ["m", "shape"], ["r"]),
             _t("r", "r_nchw", NCHW), _conv("se", "r_nchw", "w_se", "s"),
             _t("s", "s_nhwc", NHWC),
             helper.make_node("Sigmoid", ["s_nhwc"], ["g"]),
             helper.make_node("Mul", ["h", "g"], ["y"])]
    model = onnx_model(nodes, [("x", [2, 5, 5, 3])], [("y", [2, 5, 5, 4])],
                   {"w1": W1, "w_se": w_se,
                    "shape": np.array([-1, 1, 1, 4], np.int64)})
    out, _ = optimize_transposes(model)
    assert _ops(out) == ["Transpose", "Conv", "ReduceMean", "Reshape",
                         "Conv", "Sigmoid", "Mul", "Transpose"]
    reshape = out.graph.node[3]
    np.testing.assert_array_equal(_initializers_of(out)[reshape.input[1]],
                                  [-1, 4, 1, 1])
    _same_outputs(model, out, {"x": X}, rtol=1e-6)


def _initializers_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_transpose_of_a_one_channel_input_becomes_a_reshape():
    """(N, H, W, 1) to NCHW moves only an axis of size 1: a Reshape (the
    batch copied, shape 0); with 3 channels the Transpose stays."""
    for channels, op in ((1, "Reshape"), (3, "Transpose")):
        w = RNG.normal(size=(4, channels, 1, 1)).astype("float32")
        nodes = [_t("x", "a", NCHW), _conv("c1", "a", "w", "y")]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info(
                "x", FLOAT, ["n", 5, 6, channels])],
            [helper.make_tensor_value_info("y", FLOAT, ["n", 4, 5, 6])],
            [numpy_helper.from_array(w, "w")])
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        out, removed = optimize_transposes(model)
        assert removed == 0 and _ops(out) == [op, "Conv"]
        if op == "Reshape":
            shape = _initializers_of(out)[out.graph.node[0].input[1]]
            np.testing.assert_array_equal(shape, [0, 1, 5, 6])
        x = RNG.normal(size=(3, 5, 6, channels)).astype("float32")
        _same_outputs(model, out, {"x": x})
