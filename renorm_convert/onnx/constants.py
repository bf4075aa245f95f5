"""Constant folding in an ONNX graph: every node whose inputs are all
constants becomes the constant it computes (only `onnx` and NumPy).

The folds after it (`folding.fold_affine`, `transposes`) see a weight or a
bias only as a constant; an exporter may write one as a computation on a
constant instead (jax2onnx: a Conv's weights as Transpose(constant), its
bias as Reshape(constant); tf2onnx and the dynamo exporter fold most of
theirs already). Each node is computed by `onnx.reference` (ONNX's own
reference implementation) in the model's opset, so every standard op is
known, in every environment (`onnx` is a dependency on every backend).

onnxscript's optimizer does the same and more, but it is installed only
with PyTorch (the dynamo exporter runs it on its own graph already), and
by default it folds nothing over 8192 elements, which leaves weights as
they are; this pass is the one step every exporter's graph goes through.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fold_constants"]

# Nodes whose output is not a function of their inputs.
_NONDETERMINISTIC = frozenset((
    "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Multinomial", "Bernoulli"))
# A folded constant may be at most this much larger than its inputs (an
# Expand or Tile of a small constant would otherwise grow the file).
_GROWTH, _SLACK_BYTES = 2, 1 << 20


def _constant_value(node):
    """The value of a Constant node, or None (a sparse or unusual one)."""
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(a),
                              np.float32 if a.name == "value_float"
                              else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.asarray(list(helper.get_attribute_value(a)),
                              np.float32 if a.name == "value_floats"
                              else np.int64)
    return None


def _foldable(node, constants, outputs):
    if node.domain not in ("", "ai.onnx") or (
            node.op_type in _NONDETERMINISTIC) or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute):
        return False
    if any(name in outputs for name in node.output):
        return False  # a graph output stays the output of a node
    return all(not name or name in constants for name in node.input)


def _evaluate(node, inputs, opset_import):
    """The outputs of `node` on constant `inputs`, computed by
    onnx.reference in the model's opsets; None where it cannot."""
    from onnx.reference import ReferenceEvaluator

    names = [n for n in node.input if n]
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(inputs[n].dtype),
            inputs[n].shape) for n in names],
        [helper.make_empty_tensor_value_info(n) for n in node.output])
    model = helper.make_model(graph, opset_imports=list(opset_import))
    try:
        values = ReferenceEvaluator(model).run(
            None, {n: inputs[n] for n in names})
    except Exception:  # an op or case the reference does not cover
        return None
    return [np.asarray(v) for v in values]


def fold_constants(onnx_model):
    """Replaces every node computed from constants alone (initializers and
    Constant nodes) by an initializer holding its result, in graph order,
    so that chains fold too. Constant nodes become initializers. Nodes
    that write a graph output, draw random numbers, hold subgraphs, or
    would grow into a much larger constant stay.

    Returns `(onnx_model, count)`: a new ModelProto (the one given is left
    as it is) and how many nodes were folded away.
    """
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    constants = {t.name: t for t in graph.initializer if t.name not in inputs}
    outputs = {o.name for o in graph.output}
    values, kept, new, read, touched = {}, [], {}, set(), set()

    def value(name):
        if name not in values:
            values[name] = numpy_helper.to_array(constants[name])
        return values[name]

    for node in graph.node:
        result = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and (
                node.output[0] not in outputs):
            found = _constant_value(node)
            result = None if found is None else [found]
        elif _foldable(node, constants, outputs):
            feed = {n: value(n) for n in node.input if n}
            size = sum(v.nbytes for v in feed.values())
            result = _evaluate(node, feed, model.opset_import)
            if result is not None and sum(r.nbytes for r in result) > (
                    _GROWTH * size + _SLACK_BYTES):
                result = None
        if result is None or len(result) != len(node.output):
            kept.append(node)
            read.update(node.input)
            continue
        touched.update(node.input)
        for name, array in zip(node.output, result):
            values[name] = array
            constants[name] = new[name] = numpy_helper.from_array(
                np.ascontiguousarray(array), name)
    folded = len(graph.node) - len(kept)
    if not folded:
        return model, 0
    read |= outputs
    for node in kept:  # what subgraphs read counts as read
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs)):
                read.update(n for inner in sub.node for n in inner.input)
    # Only the constants the folded nodes read and nothing reads now go.
    initializers = [t for t in graph.initializer if t.name not in touched
                    or t.name in read or t.name in inputs]
    initializers += [t for name, t in new.items() if name in read]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    alive = read | {n for node in kept for n in node.output}
    infos = [v for v in graph.value_info if v.name in alive]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return model, folded
