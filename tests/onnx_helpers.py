"""ONNX graphs built with `onnx.helper` and run in onnxruntime: what the
tests of the ONNX passes (and of int8) share."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def onnx_model(nodes, inputs, outputs, initializers=None,
               constant_inputs=(), opset=13):
    """A checked model of `nodes`. `inputs`, `outputs`, `constant_inputs`
    (graph inputs that initializers also give): (name, shape) with FLOAT
    values, or (name, shape, dtype); a shape None is rank 4 of unknown
    sizes. `initializers`: name -> array (or a list of TensorProtos)."""
    def info(spec):
        name, shape, *dtype = spec
        if shape is None:
            shape = ["n", "c", "h", "w"]
        return helper.make_tensor_value_info(name, dtype[0] if dtype
                                             else FLOAT, shape)

    initializers = initializers or {}
    tensors = (list(initializers) if isinstance(initializers, list) else
               [numpy_helper.from_array(np.asarray(v), k)
                for k, v in initializers.items()])
    graph = helper.make_graph(
        nodes, "g", [info(i) for i in list(inputs) + list(constant_inputs)],
        [info(o) for o in outputs], tensors)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_onnx(model, feed, optimize=False):
    """The outputs of an ONNX model (a ModelProto, or a file's path) in
    onnxruntime on the CPU. `feed`: a dict, a list of arrays in the order
    of its inputs, or one array for its one input. Unoptimized unless asked,
    so that onnxruntime's own fusions do not hide a wrong graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model.SerializeToString() if isinstance(
        model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options,
                                   providers=["CPUExecutionProvider"])
    if not isinstance(feed, dict):
        arrays = feed if isinstance(feed, (list, tuple)) else [feed]
        feed = {i.name: x for i, x in zip(session.get_inputs(), arrays)}
    return session.run(None, feed)
