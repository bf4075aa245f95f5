"""chains.merge_affine_chains, and the forward fold of a scale through a
zero Pad: an input's rescaling and normalization (x * a - m) / s as an
exporter writes it op by op end as one Add before the Conv. Graphs built
with onnx.helper, run in onnxruntime before and after (every backend)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from renorm_convert.onnx.chains import merge_affine_chains
from renorm_convert.onnx.passes import clean
from onnx_helpers import run_onnx

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _normalized_stem(pad=True):
    """x * (1/255) - mean, / std (per channel, NHWC), a zero Pad, the
    Transpose to NCHW, a strided 3x3 Conv: EfficientNet's input as the
    dynamo exporter writes it."""
    mean = RNG.uniform(0.3, 0.6, 3).astype("float32")
    std = RNG.uniform(0.2, 0.3, 3).astype("float32")
    nodes = [helper.make_node("Mul", ["x", "rescale"], ["a"]),
             helper.make_node("Sub", ["a", "mean"], ["b"]),
             helper.make_node("Div", ["b", "std"], ["c"])]
    data = "c"
    if pad:
        nodes.append(helper.make_node("Pad", ["c", "pads"], ["p"]))
        data = "p"
    nodes += [helper.make_node("Transpose", [data], ["t"], perm=[0, 3, 1, 2]),
              helper.make_node("Conv", ["t", "w", "bias"], ["y"],
                               kernel_shape=[3, 3], strides=[2, 2])]
    inits = {"rescale": np.float32(1 / 255), "mean": mean, "std": std,
             "w": RNG.normal(size=(8, 3, 3, 3)).astype("float32"),
             "bias": RNG.normal(size=8).astype("float32"),
             "pads": np.array([0, 0, 0, 0, 0, 1, 1, 0], np.int64)}
    size = 17 if pad else 16
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT,
                                                   ["n", 16, 16, 3])],
        [helper.make_tensor_value_info("y", FLOAT,
                                       ["n", 8, (size - 3) // 2 + 1,
                                        (size - 3) // 2 + 1])],
        [numpy_helper.from_array(np.asarray(v), k)
         for k, v in inits.items()])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, inits


def test_three_ops_become_an_add_and_a_mul():
    model, inits = _normalized_stem()
    out, count = merge_affine_chains(model)
    assert count == 1
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Add", "Mul", "Pad", "Transpose", "Conv"]
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    add, mul = out.graph.node[0], out.graph.node[1]
    scale = (1 / 255) / inits["std"].astype(np.float64)
    offset = -inits["mean"].astype(np.float64) * 255
    np.testing.assert_allclose(values[mul.input[1]], scale, rtol=1e-6)
    np.testing.assert_allclose(values[add.input[1]], offset, rtol=1e-6)
    x = RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(model, x)[0],
                               rtol=1e-5, atol=1e-4)


def test_clean_leaves_one_add_before_the_padded_conv():
    """The scale folds into the Conv through the zero Pad; the offset
    cannot (the padded border would shift), so one Add stays; the Pad goes
    into the Conv's pads."""
    model, _ = _normalized_stem()
    out, record = clean(model)
    assert [n.op_type for n in out.graph.node] == ["Add", "Transpose",
                                                   "Conv"]
    assert (record.merged, record.affine, record.pads) == (1, 1, 1)
    x = RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(model, x)[0],
                               rtol=1e-5, atol=1e-4)


def test_without_padding_all_of_it_folds_into_the_conv():
    model, _ = _normalized_stem(pad=False)
    out, _ = clean(model)
    assert [n.op_type for n in out.graph.node] == ["Transpose", "Conv"]
    x = RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(model, x)[0],
                               rtol=1e-5, atol=1e-4)


def test_a_constant_that_would_broadcast_the_data_stays():
    """A (5, 1, 3) constant broadcasts (N, 3) data to (5, N, 3): three
    nodes that two could compute, but merged constants must keep the
    data's shape, so nothing merges."""
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["s"]),
             helper.make_node("Mul", ["s", "a"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", FLOAT, [5, "n", 3])],
        [numpy_helper.from_array(np.full((1, 3), 2.0, np.float32), "a"),
         numpy_helper.from_array(np.ones((5, 1, 3), np.float32), "b")])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 13)])
    assert merge_affine_chains(model)[1] == 0
    # With a (3,) offset the same chain merges.
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(
        np.ones(3, np.float32), "b"))
    assert merge_affine_chains(model)[1] == 1
