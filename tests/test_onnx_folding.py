"""onnx_folding: per-channel constant Mul / Add folded into Conv / Gemm /
MatMul in the ONNX graph. Graphs built with onnx.helper and run in
onnxruntime before and after folding (every backend); one export of a Keras
model with a library-style block (every backend that exports)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from renorm_convert.onnx.folding import (count_affine_after_linear,
                                         count_affine_before_linear,
                                         fold_affine)
from onnx_helpers import onnx_model, run_onnx

OPSET = 13
FLOAT = TensorProto.FLOAT


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _naive_count(model):
    """An independent, literal pattern counter: Mul / Add / Sub / Div with
    an initializer operand whose other operand comes (through Transposes,
    Squeezes, Unsqueezes) straight from a Conv / ConvTranspose / Gemm, or a
    MatMul (where an Add is its bias, not counted)."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    reads = {}
    for n in model.graph.node:
        for i in n.input:
            reads[i] = reads.get(i, 0) + 1
    for o in model.graph.output:
        reads[o.name] = reads.get(o.name, 0) + 1

    def origin(name):  # the producer, through single-reader Transposes
        source = producer.get(name)
        if reads[name] != 1:
            return None
        if source is not None and source.op_type in ("Transpose", "Squeeze",
                                                     "Unsqueeze"):
            return origin(source.input[0])
        return source

    count = 0
    for node in model.graph.node:
        if node.op_type not in ("Mul", "Add", "Sub", "Div"):
            continue
        data = [i for i in node.input if i not in inits]
        if len(data) != 1:
            continue
        source = origin(data[0])
        if source is None or source.op_type not in (
                "Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if source.op_type == "MatMul" and node.op_type in ("Add", "Sub"):
            continue
        count += 1
    return count


def _check(model, feed, expect_before, expect_after=0, rtol=1e-5,
           forward=False):
    """Folds `model`; checks the counts, that the file is valid, and that
    onnxruntime's outputs match to `rtol` of their scale. Returns the
    folded model and the largest relative difference."""
    counter = count_affine_before_linear if forward else \
        count_affine_after_linear
    assert counter(model) == expect_before
    before = run_onnx(model, feed)
    folded, count = fold_affine(model)
    onnx.checker.check_model(folded, full_check=True)
    assert count == expect_before - expect_after
    assert counter(folded) == expect_after
    if not forward:
        assert _naive_count(folded) == expect_after
    after = run_onnx(folded, feed)
    assert [o.name for o in folded.graph.output] == [
        o.name for o in model.graph.output]
    worst = 0.0
    for a, b in zip(before, after):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(np.abs(a.astype(np.float64)).max()), 1e-12)
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max())
                    / scale)
    assert worst <= rtol, worst
    return folded, worst


RNG = np.random.default_rng(0)


def _r(*shape, low=None):
    if low is not None:
        return RNG.uniform(low, 2.0, shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


def _x(*shape):
    return {"x": _r(*shape)}


# --- backward: after the linear node -----------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shapes", [((1, 6, 1, 1), (6, 1, 1)),
                                    ((6, 1, 1), (1, 6, 1, 1)),
                                    ((), (1, 6, 1, 1))])
def test_conv_then_mul_add(bias, shapes):
    scale_shape, offset_shape = shapes
    inits = {"w": _r(6, 3, 3, 3), "s": _r(*scale_shape, low=0.3),
             "o": _r(*offset_shape)}
    conv_in = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = _r(6)
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["o", "m"], ["y"])]  # constant first
    model = onnx_model(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 6, 8, 8])],
                   inits)
    folded, _ = _check(model, _x(2, 3, 8, 8), 2)
    assert _ops(folded) == ["Conv"]
    # The constants the fold replaced are gone; the original is untouched.
    assert {t.name for t in folded.graph.initializer}.isdisjoint(inits)
    assert _ops(model) == ["Conv", "Mul", "Add"]


def test_sub_div_add_then_mul_chain():
    inits = {"w": _r(4, 2, 3, 3), "b": _r(4), "m": _r(1, 4, 1, 1),
             "v": _r(1, 4, 1, 1, low=0.3), "g": _r(4, 1, 1),
             "beta": _r(4, 1, 1), "k": np.float32(-1.5)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Sub", ["c", "m"], ["t1"]),
             helper.make_node("Div", ["t1", "v"], ["t2"]),
             helper.make_node("Add", ["t2", "beta"], ["t3"]),
             helper.make_node("Mul", ["t3", "g"], ["t4"]),
             helper.make_node("Sub", ["k", "t4"], ["y"])]  # k - t4
    model = onnx_model(nodes, [("x", [None, 2, 7, 7])], [("y", [None, 4, 5, 5])],
                   inits)
    folded, _ = _check(model, _x(3, 2, 7, 7), 5)
    assert _ops(folded) == ["Conv"]


@pytest.mark.parametrize("group, cin, cout", [(2, 4, 6), (4, 4, 4),
                                               (4, 4, 8)])
def test_grouped_and_depthwise_conv(group, cin, cout):
    inits = {"w": _r(cout, cin // group, 3, 3), "s": _r(1, cout, 1, 1,
                                                         low=0.3),
             "o": _r(1, cout, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=group,
                              strides=[2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, cin, 9, 9])],
                   [("y", [None, cout, 5, 5])], inits)
    _check(model, _x(2, cin, 9, 9), 2)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_transpose(group, bias):
    cin, cout = 4, 6
    inits = {"w": _r(cin, cout // group, 3, 3), "s": _r(1, cout, 1, 1,
                                                        low=0.3),
             "o": _r(cout, 1, 1)}
    conv_in = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = _r(cout)
    nodes = [helper.make_node("ConvTranspose", conv_in, ["c"], group=group,
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, cin, 5, 5])],
                   [("y", [None, cout, 9, 9])], inits)
    folded, _ = _check(model, _x(2, cin, 5, 5), 2)
    assert _ops(folded) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5)])
def test_gemm(trans_b, c_shape):
    inits = {"w": _r(5, 4) if trans_b else _r(4, 5), "s": _r(5, low=0.3),
             "o": _r(1, 5)}
    gemm_in = ["x", "w"]
    if c_shape is not None:
        inits["c0"] = _r(*c_shape)
        gemm_in.append("c0")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b,
                              alpha=0.5, beta=2.0),
             helper.make_node("Mul", ["g", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    batch = 3 if c_shape == (3, 5) else None
    model = onnx_model(nodes, [("x", [batch, 4])], [("y", [batch, 5])], inits)
    folded, _ = _check(model, _x(3, 4), 2)
    assert _ops(folded) == ["Gemm"]


def test_matmul_2d_becomes_gemm():
    inits = {"w": _r(4, 5), "b": _r(5), "s": _r(5, low=0.3), "o": _r(5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["a"]),  # its bias
             helper.make_node("Mul", ["a", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 4])], [("y", [None, 5])], inits)
    folded, _ = _check(model, _x(3, 4), 2)
    assert _ops(folded) == ["Gemm"]


def test_matmul_3d_keeps_its_bias_add():
    inits = {"w": _r(4, 5), "s": _r(1, 1, 5, low=0.3), "o": _r(5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Mul", ["mm", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 7, 4])], [("y", [None, 7, 5])],
                   inits)
    folded, _ = _check(model, _x(2, 7, 4), 1)
    assert _ops(folded) == ["MatMul", "Add"]
    # A MatMul and its bias alone: nothing to fold, nothing changes.
    again, count = fold_affine(folded)
    assert count == 0 and _ops(again) == ["MatMul", "Add"]


def test_matmul_mul_only():
    inits = {"w": _r(4, 5), "s": _r(5, low=0.3)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Mul", ["s", "mm"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 4])], [("y", [None, 5])], inits)
    folded, _ = _check(model, _x(3, 4), 1)
    assert _ops(folded) == ["MatMul"]


def test_through_transpose_to_nhwc():
    """tf2onnx's layout: an NCHW Conv, a Transpose back to NHWC, then the
    scale and offset on the last axis; the output keeps its name."""
    inits = {"w": _r(6, 3, 3, 3), "b": _r(6), "s": _r(6, low=0.3),
             "o": _r(1, 1, 1, 6), "s2": _r(1, 6, 1, 1, low=0.3)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w", "b"], ["c"],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s2"], ["c2"]),
             helper.make_node("Transpose", ["c2"], ["ct"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["ct", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 8, 8, 3])], [("y", [None, 8, 8, 6])],
                   inits)
    folded, _ = _check(model, _x(2, 8, 8, 3), 3)
    assert _ops(folded) == ["Transpose", "Conv", "Transpose"]
    assert folded.graph.node[-1].output[0] == "y"


def _squeeze(op, data, out, axes, opset, inits):
    if opset >= 13:
        inits[out + "_axes"] = np.asarray(axes, np.int64)
        return helper.make_node(op, [data, out + "_axes"], [out])
    return helper.make_node(op, [data], [out], axes=axes)


@pytest.mark.parametrize("opset", [11, 13])
def test_through_squeeze_conv1d_layout(opset):
    """TensorFlow's Conv1D as tf2onnx writes it: Unsqueeze, a 2-D Conv
    between Transposes, Squeeze, then the bias Add and the normalization."""
    inits = {"w": _r(6, 4, 1, 3), "b": _r(6), "s": _r(6, low=0.3),
             "o": _r(1, 1, 6)}
    nodes = [_squeeze("Unsqueeze", "x", "u", [1], opset, inits),
             helper.make_node("Transpose", ["u"], ["ut"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["ut", "w"], ["c"], pads=[0, 1, 0, 1]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]),
             _squeeze("Squeeze", "ct", "sq", [-3], opset, inits),
             helper.make_node("Identity", ["sq"], ["i"]),
             helper.make_node("Add", ["i", "b"], ["bias"]),
             helper.make_node("Mul", ["bias", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 10, 4])], [("y", [None, 10, 6])],
                   inits, opset=opset)
    folded, _ = _check(model, _x(2, 10, 4), 3)
    assert "Add" not in _ops(folded) and "Mul" not in _ops(folded)


def test_forward_through_unsqueeze():
    inits = {"w": _r(5, 4, 1, 1), "s": _r(4, low=0.3), "o": _r(4)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Sub", ["m", "o"], ["a"]),
             _squeeze("Unsqueeze", "a", "u", [1], OPSET, inits),
             helper.make_node("Transpose", ["u"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 7, 4])], [("y", None)], inits)
    folded, _ = _check(model, _x(2, 7, 4), 2, forward=True)
    assert _ops(folded) == ["Unsqueeze", "Transpose", "Conv"]


def test_folding_twice_changes_nothing():
    inits = {"w": _r(6, 3, 3, 3), "s": _r(1, 6, 1, 1, low=0.3),
             "o": _r(6, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 3, 8, 8])], [("y", None)], inits)
    once, count = fold_affine(model)
    twice, again = fold_affine(once)
    assert count == 2 and again == 0
    assert twice.SerializeToString() == once.SerializeToString()


def test_constant_nodes_and_float16():
    """Weights and the scale as Constant nodes, float16 throughout: the
    dtype stays float16."""
    f16 = TensorProto.FLOAT16
    w, s, o = _r(4, 3, 1, 1), _r(1, 4, 1, 1, low=0.3), _r(4, 1, 1)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper
                              .from_array(w.astype(np.float16))),
             helper.make_node("Constant", [], ["s"], value=numpy_helper
                              .from_array(s.astype(np.float16))),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 3, 4, 4], f16)],
                   [("y", [None, 4, 4, 4], f16)],
                   {"o": o.astype(np.float16)})
    folded, _ = _check(model, {"x": _r(2, 3, 4, 4).astype(np.float16)}, 2,
                       rtol=2e-3)
    assert _ops(folded) == ["Conv"]  # the Constant nodes went with them
    assert {t.data_type for t in folded.graph.initializer} == {f16}


def test_shared_weight_stays_for_the_other_conv():
    inits = {"w": _r(4, 3, 3, 3), "s": _r(1, 4, 1, 1, low=0.3)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]),
             helper.make_node("Conv", ["x", "w"], ["c2"]),
             helper.make_node("Mul", ["c1", "s"], ["y1"]),
             helper.make_node("Relu", ["c2"], ["y2"])]
    model = onnx_model(nodes, [("x", [None, 3, 6, 6])],
                   [("y1", [None, 4, 4, 4]), ("y2", [None, 4, 4, 4])], inits)
    folded, _ = _check(model, _x(2, 3, 6, 6), 1)
    assert "w" in {t.name for t in folded.graph.initializer}


# --- forward: before a Conv --------------------------------------------------

@pytest.mark.parametrize("pads", [dict(pads=[0, 0, 0, 0]),
                                  dict(auto_pad="VALID"), dict(),
                                  dict(auto_pad="SAME_UPPER", kernel=1)])
@pytest.mark.parametrize("group", [1, 2])
def test_forward_into_unpadded_conv(pads, group):
    pads = dict(pads)
    k = pads.pop("kernel", 3)
    inits = {"w": _r(6, 4 // group, k, k), "b": _r(6),
             "s": _r(1, 4, 1, 1, low=0.3), "o": _r(4, 1, 1)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["a"]),
             helper.make_node("Conv", ["a", "w", "b"], ["y"], group=group,
                              **pads)]
    model = onnx_model(nodes, [("x", [None, 4, 7, 7])], [("y", None)], inits)
    folded, _ = _check(model, _x(2, 4, 7, 7), 2, forward=True)
    assert _ops(folded) == ["Relu", "Conv"]


def test_forward_through_transpose():
    inits = {"w": _r(5, 3, 2, 2), "s": _r(3, low=0.3), "o": _r(1, 1, 1, 3)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["y"], strides=[2, 2])]
    model = onnx_model(nodes, [("x", [None, 6, 6, 3])], [("y", None)], inits)
    folded, _ = _check(model, _x(2, 6, 6, 3), 2, forward=True)
    assert _ops(folded) == ["Transpose", "Conv"]


def test_forward_into_padded_conv_folds_the_scale_only():
    inits = {"w": _r(5, 3, 3, 3), "s": _r(1, 3, 1, 1, low=0.3),
             "o": _r(1, 3, 1, 1)}
    # Add then Mul: the Mul (next to the Conv) folds, the Add must stay.
    nodes = [helper.make_node("Add", ["x", "o"], ["a"]),
             helper.make_node("Mul", ["a", "s"], ["m"]),
             helper.make_node("Conv", ["m", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = onnx_model(nodes, [("x", [None, 3, 6, 6])], [("y", None)], inits)
    folded, _ = _check(model, _x(2, 3, 6, 6), 1, forward=True)
    assert _ops(folded) == ["Add", "Conv"]
    # Mul then Add: the Add is next to the padded Conv: nothing folds.
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = onnx_model(nodes, [("x", [None, 3, 6, 6])], [("y", None)], inits)
    _, count = fold_affine(model)
    assert count == 0
    for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        nodes[-1] = helper.make_node("Conv", ["a", "w"], ["y"],
                                     auto_pad=auto_pad)
        model = onnx_model(nodes, [("x", [None, 3, 6, 6])], [("y", None)], inits)
        assert fold_affine(model)[1] == 0


def test_forward_into_conv_transpose_folds_the_scale_only():
    inits = {"w": _r(4, 3, 3, 3), "s": _r(1, 4, 1, 1, low=0.3),
             "o": _r(1, 4, 1, 1)}
    nodes = [helper.make_node("Add", ["x", "o"], ["a"]),
             helper.make_node("Mul", ["a", "s"], ["m"]),
             helper.make_node("ConvTranspose", ["m", "w"], ["y"],
                              strides=[2, 2])]
    model = onnx_model(nodes, [("x", [None, 4, 5, 5])], [("y", None)], inits)
    folded, _ = _check(model, _x(2, 4, 5, 5), 1, forward=True)
    assert _ops(folded) == ["Add", "ConvTranspose"]


def test_forward_needs_the_channel_count():
    """x with one channel times a (1, 3, 1, 1) constant broadcasts to three:
    removing the Mul would change what the Conv sees."""
    inits = {"w": _r(2, 3, 1, 1), "s": _r(1, 3, 1, 1, low=0.3)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]),
             helper.make_node("Conv", ["m", "w"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 1, 4, 4])], [("y", None)], inits)
    assert count_affine_before_linear(model) == 0
    assert fold_affine(model)[1] == 0


# --- what must not fold ------------------------------------------------------

def _conv_mul(mul_const="s", s_shape=(1, 4, 1, 1), extra_nodes=(),
              extra_outputs=(), constant_inputs=(), mul_op="Mul"):
    inits = {"w": _r(4, 3, 3, 3), "s": _r(*s_shape, low=0.3)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node(mul_op, ["c", mul_const], ["y"]),
             *extra_nodes]
    return onnx_model(nodes, [("x", [None, 3, 6, 6])],
                  [("y", None), *extra_outputs], inits, constant_inputs)


@pytest.mark.parametrize("case", [
    "non_constant", "initializer_is_input", "two_consumers",
    "intermediate_is_output", "not_per_channel", "vector_on_width",
    "divide_by_zero", "conv_weight_not_constant"])
def test_not_folded(case):
    if case == "non_constant":
        model = _conv_mul(mul_const="z", constant_inputs=[("z", [1, 4, 1, 1])])
        feed = {"z": _r(1, 4, 1, 1)}
    elif case == "initializer_is_input":  # a default the caller may override
        model = _conv_mul(constant_inputs=[("s", [1, 4, 1, 1])])
        feed = {}
    elif case == "two_consumers":
        model = _conv_mul(extra_nodes=[helper.make_node("Relu", ["c"],
                                                        ["r"])],
                          extra_outputs=[("r", None)])
        feed = {}
    elif case == "intermediate_is_output":
        model = _conv_mul(extra_outputs=[("c", None)])
        feed = {}
    elif case == "not_per_channel":
        model = _conv_mul(s_shape=(1, 1, 4, 4))
        feed = {}
    elif case == "vector_on_width":  # (4,) on NCHW is along W, not C
        model = _conv_mul(s_shape=(4,))
        feed = {}
    elif case == "divide_by_zero":
        model = _conv_mul(mul_op="Div")
        for t in model.graph.initializer:
            if t.name == "s":
                value = numpy_helper.to_array(t).copy()
                value.flat[0] = 0.0
                t.CopyFrom(numpy_helper.from_array(value, "s"))
        feed = None
    else:
        nodes = [helper.make_node("Conv", ["x", "wx"], ["c"]),
                 helper.make_node("Mul", ["c", "s"], ["y"])]
        model = onnx_model(nodes, [("x", [None, 3, 6, 6]), ("wx", [4, 3, 3, 3])],
                       [("y", None)], {"s": _r(1, 4, 1, 1)})
        feed = {"wx": _r(4, 3, 3, 3)}
    assert count_affine_after_linear(model) == 0
    folded, count = fold_affine(model)
    assert count == 0 and _ops(folded) == _ops(model)
    if feed is not None:
        feed = {"x": _r(2, 3, 6, 6), **feed}
        if case == "initializer_is_input":
            feed["s"] = _r(1, 4, 1, 1)
        for a, b in zip(run_onnx(model, feed), run_onnx(folded, feed)):
            np.testing.assert_array_equal(a, b)


def test_not_folded_out_of_float16_range():
    """float16 weights times a large scale overflow, where the product of
    the Conv output and the scale does not: left as it is."""
    f16 = TensorProto.FLOAT16
    inits = {"w": np.full((2, 3, 1, 1), 300.0, np.float16),
             "s": np.full((1, 2, 1, 1), 300.0, np.float16)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["y"])]
    model = onnx_model(nodes, [("x", [None, 3, 2, 2], f16)],
                   [("y", [None, 2, 2, 2], f16)], inits)
    folded, count = fold_affine(model)
    assert count == 0 and _ops(folded) == ["Conv", "Mul"]


def test_chain_stops_at_a_second_consumer():
    """Conv -> Mul -> Add where the Mul's output is also read elsewhere:
    only the Mul folds."""
    inits = {"w": _r(4, 3, 3, 3), "s": _r(1, 4, 1, 1, low=0.3),
             "o": _r(1, 4, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "o"], ["y"]),
             helper.make_node("Relu", ["m"], ["r"])]
    model = onnx_model(nodes, [("x", [None, 3, 6, 6])],
                   [("y", None), ("r", None)], inits)
    folded, _ = _check(model, _x(2, 3, 6, 6), 1)
    assert _ops(folded) == ["Conv", "Add", "Relu"]


# --- a Keras model with a library-style block (TensorFlow, PyTorch) ----------

def _fused_mbconv_model():
    import keras

    class FusedMBConv(keras.layers.Layer):
        """EfficientNetV2's fused-MBConv as a library writes it: the block's
        own call() joins its Conv2D and BatchNormalization sublayers."""

        def __init__(self, channels, expand=4, **kwargs):
            super().__init__(**kwargs)
            self.expand_conv = keras.layers.Conv2D(
                channels * expand, 3, padding="same")
            self.expand_bn = keras.layers.BatchNormalization()
            # With biases: tf2onnx then leaves the normalization as a Mul
            # and an Add after each Conv (it folds them only into a Conv
            # without bias).
            self.project_conv = keras.layers.Conv2D(channels, 1)
            self.project_bn = keras.layers.BatchNormalization()

        def call(self, inputs, training=None):
            x = self.expand_conv(inputs)
            x = keras.activations.silu(self.expand_bn(x, training=training))
            x = self.project_bn(self.project_conv(x), training=training)
            return x + inputs

    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("swish")(x)
    x = FusedMBConv(8, name="fused_mbconv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for v in model.weights:
        name = v.path.split("/")[-1]
        if name in ("moving_variance", "gamma"):
            v.assign(rng.uniform(0.3, 2.0, v.shape).astype("float32"))
        elif name in ("moving_mean", "beta", "bias"):
            v.assign(rng.uniform(-1.0, 1.0, v.shape).astype("float32"))
    return model


def test_export_folds_normalization_inside_a_library_block(tmp_path):
    import keras

    import renorm_convert as rc
    from onnx_helpers import run_onnx

    if keras.backend.backend() == "jax":
        pytest.skip("JAX exports a saved .keras file on another backend")
    model = _fused_mbconv_model()
    path = tmp_path / "fused.onnx"
    report = rc.export_onnx(model, path)
    assert report.folded == 1  # the stem's; the block's two are not
    assert report.folded_onnx >= 4  # a Mul and an Add for each of those
    onnx_model = onnx.load(str(path))
    assert count_affine_after_linear(onnx_model) == 0
    assert _naive_count(onnx_model) == 0
    assert report.relative_diff <= 1e-4
    assert report.verification.logits_relative_diff <= 1e-4
    x = np.random.default_rng(1).normal(size=(3, 12, 12, 3)).astype(
        "float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    got = run_onnx(str(path), [x])[0]
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max() + 1e-6
    described = report.describe()
    assert f"{report.folded_onnx} per-channel Mul/Add folded" in described
    assert "not folded: fused_mbconv/" in described
