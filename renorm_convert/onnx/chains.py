"""Chains of constant elementwise arithmetic merged into one Add and one Mul,
in an ONNX graph (only `onnx` and NumPy).

Keras's `Rescaling` and `Normalization` layers in front of a network
(EfficientNet's: x * 1/255, minus the mean, divided by the deviation) are
three passes over the input, one per op; tf2onnx merges them, an op-by-op
exporter (PyTorch's) does not. `y = ((x * a) - m) / s` is `(x + b) * c`
with `c = a / s` and `b = -m / a`: two nodes, and the Mul then folds
forward into the Conv that follows (`folding.fold_affine`, through a zero
Pad too), leaving one.

A chain is two or more Mul / Add / Sub / Div nodes in a row, each with one
constant operand (finite; a divisor without zeros) and one data operand,
each value read only by the next node; the constants' broadcast shape must
not change the data's shape. The merged constants are computed in float64
and stored in the data's dtype.
"""

import numpy as np

from renorm_convert.onnx.graph import _FLOATS, _Graph, compose_step

__all__ = ["merge_affine_chains"]


def _step(g, node):
    """(data input, kind, constant) of elementwise arithmetic with one
    constant operand; None for anything else."""
    if node.op_type not in ("Mul", "Add", "Sub", "Div") or (
            node.domain not in ("", "ai.onnx")) or len(node.input) != 2 or (
            len(node.output) != 1):
        return None
    consts = [g.const(n) for n in node.input]
    if (consts[0] is None) == (consts[1] is None):
        return None
    index = 0 if consts[0] is None else 1  # the data operand's
    value = consts[1 - index]
    if value.dtype.type not in _FLOATS or not np.all(np.isfinite(value)):
        return None
    value = value.astype(np.float64)
    op = node.op_type
    if op == "Div":
        if index != 0 or not np.all(value != 0):
            return None
        return node.input[0], "div", value
    if op == "Sub":
        return node.input[index], ("sub" if index == 0 else "sub_from"), value
    return node.input[index], op.lower(), value


def _chain(g, node):
    """The chain that starts at `node` (no chain node before it), as
    [(node, kind, constant)]."""
    chain, current = [], node
    while current is not None:
        step = _step(g, current)
        if step is None or (chain and step[0] != chain[-1][0].output[0]):
            break
        chain.append((current, step[1], step[2]))
        out = current.output[0]
        current = g.sole_consumer(out) if out not in g.outputs else None
    return chain


def _fits(shape, data_shape):
    """Whether a constant of `shape` broadcast onto the data keeps the
    data's shape."""
    if data_shape is None or len(shape) > len(data_shape):
        return False
    for dim, size in zip(reversed(shape), reversed(data_shape)):
        if dim != 1 and dim != size:
            return False
    return True


def _merge(g, chain, data):
    """Rewrites a chain as `(x + b) * c` (or `x * c + o` where a scale is
    zero); returns how many nodes went."""
    scale, offset = np.ones(()), np.zeros(())
    for _, kind, value in chain:
        scale, offset = compose_step(scale, offset, kind, value)
    shape = np.broadcast_shapes(scale.shape, offset.shape)
    if not _fits(shape, g.shapes.get(data)):
        return 0
    dtype = g.const(chain[0][0].input[1] if chain[0][0].input[0] == data
                    else chain[0][0].input[0]).dtype
    keep_scale, keep_offset = np.any(scale != 1), np.any(offset != 0)
    if keep_scale + keep_offset >= len(chain):
        return 0
    offset_first = keep_scale and keep_offset and np.all(scale != 0)
    ops = []
    if offset_first:
        ops = [("Add", offset / scale), ("Mul", scale)]
    else:
        ops = ([("Mul", scale)] if keep_scale else []) + (
            [("Add", offset)] if keep_offset else [])
    with np.errstate(over="ignore"):
        ops = [(op, value.astype(dtype)) for op, value in ops]
    if not all(np.all(np.isfinite(value)) for _, value in ops):
        return 0
    nodes = [n for n, _, _ in chain]
    out = nodes[-1].output[0]
    if not ops:  # the chain computes the identity
        if out in g.outputs:
            return 0
        g.replace_uses(out, data)
    for node, (op, value) in zip(nodes, ops):
        g.touched.update(n for n in node.input if n != data)
        node.op_type = op
        node.input[:] = [data, g.add_constant(node.name or op, value,
                                              "merged")]
        data = node.output[0]
    if ops:
        nodes[len(ops) - 1].output[0] = out
    for node in nodes[len(ops):]:
        g.remove(node)
    g.reindex()
    return len(chain) - len(ops)


def merge_affine_chains(onnx_model):
    """Merges every chain of constant Mul / Add / Sub / Div (see the module
    docstring) into at most one Add and one Mul.

    Returns `(onnx_model, count)`: a new ModelProto (the one given is left
    as it is) and how many nodes went.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = _Graph(model)
    count = 0
    for node in list(g.nodes):
        if not g.alive(node) or _step(g, node) is None:
            continue
        producer = g.producer.get(_step(g, node)[0])
        if producer is not None and _step(g, producer) is not None and (
                g.sole_consumer(producer.output[0]) is node):
            continue  # not the start of its chain
        chain = _chain(g, node)
        if len(chain) >= 2:
            count += _merge(g, chain, _step(g, node)[0])
    g.finish()
    return model, count
