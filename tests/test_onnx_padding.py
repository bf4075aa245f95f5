"""padding.fold_padding: a zero Pad of the spatial axes that a Conv reads
(directly, or through the Transpose to channels-first an op-by-op exporter
writes) becomes the Conv's own pads. Graphs built with onnx.helper, run in
onnxruntime before and after (every backend)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from renorm_convert.onnx.padding import fold_padding
from onnx_helpers import onnx_model, run_onnx

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3, 3, 3)).astype("float32")


def _nhwc_pad_conv(pads, value=None, conv_pads=(1, 0, 1, 0)):
    """NHWC input, a Pad (NHWC pads), the Transpose to NCHW, a 3x3 Conv
    with pads of its own: ResNet50's stem as the dynamo exporter writes
    it."""
    inputs = ["x", "pads"] + (["value"] if value is not None else [])
    nodes = [helper.make_node("Pad", inputs, ["p"]),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["y"], kernel_shape=[3, 3],
                              strides=[2, 2], pads=list(conv_pads))]
    inits = {"w": W, "pads": np.asarray(pads, np.int64)}
    if value is not None:
        inits["value"] = np.asarray(value, np.float32)
    x_shape = [2, 9, 8, 3]
    p = np.asarray(pads)
    h = 9 + p[1] + p[5] + conv_pads[0] + conv_pads[2]
    w = 8 + p[2] + p[6] + conv_pads[1] + conv_pads[3]
    out = [2 + int(p[0] + p[4]), 4, int(h - 3) // 2 + 1, int(w - 3) // 2 + 1]
    return onnx_model(nodes, [("x", x_shape)], [("y", out)], inits)


def test_zero_pad_through_a_transpose_becomes_the_conv_pads():
    model = _nhwc_pad_conv([0, 3, 2, 0, 0, 1, 3, 0], value=0.0)
    out, count = fold_padding(model)
    assert count == 1
    assert [n.op_type for n in out.graph.node] == ["Transpose", "Conv"]
    conv = out.graph.node[1]
    pads = next(a for a in conv.attribute if a.name == "pads").ints
    assert list(pads) == [1 + 3, 0 + 2, 1 + 1, 0 + 3]
    x = RNG.normal(size=(2, 9, 8, 3)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(model, x)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pads,value", [
    ([0, 1, 1, 0, 0, 1, 1, 0], 0.5),   # not zeros
    ([1, 1, 1, 0, 0, 1, 1, 0], 0.0),   # the batch too
])
def test_other_pads_stay(pads, value):
    model = _nhwc_pad_conv(pads, value=value)
    out, count = fold_padding(model)
    assert count == 0
    assert [n.op_type for n in out.graph.node] == ["Pad", "Transpose", "Conv"]


def test_a_pad_read_twice_stays():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["p"], ["z"])]
    model = onnx_model(nodes, [("x", [1, 3, 5, 5])],
                   [("y", [1, 4, 5, 5]), ("z", [1, 3, 7, 7])],
                   {"w": W, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1],
                                             np.int64)})
    assert fold_padding(model)[1] == 0


def test_opset_10_pads_attribute_directly_before_a_conv():
    nodes = [helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 2, 0, 0,
                                                         2, 1]),
             helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3])]
    model = onnx_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 6, 6])],
                   {"w": W}, opset=10)
    out, count = fold_padding(model)
    assert count == 1 and [n.op_type for n in out.graph.node] == ["Conv"]
    x = RNG.normal(size=(1, 3, 5, 5)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(model, x)[0],
                               rtol=1e-6, atol=1e-6)
