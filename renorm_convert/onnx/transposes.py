"""Transposes cancelled, or pushed down through the ops that do not care
about the order of axes, in an ONNX graph (only `onnx` and NumPy).

Keras computes channels-last (NHWC); ONNX's Conv, MaxPool and the other
spatial ops take channels-first (NCHW). An exporter that converts op by op
(PyTorch's dynamo exporter, jax2onnx) writes a Transpose to NCHW before
every such op and one back to NHWC after it; tf2onnx removes those itself.
This pass gets the others to the same graph, whatever wrote it:

- two Transposes in a row become one, and none where they cancel;
- a Transpose is moved below an elementwise op (Relu, Add, ...), a Concat,
  a Softmax, a reduction (ReduceMean: global average pooling) or a
  constant Pad, adjusting that op's axes, pads and constants, when every
  input of the op is transposed the same way (or constant), so that it
  meets the Transpose back below and cancels;
- a move is made only where it adds no node: a Transpose read by several
  ops moves only where the Transposes it meets there are removed with it.

What stays is a Transpose per graph input and output (NHWC in, NHWC out)
and one before a Reshape / Flatten of a channels-last tensor (as tf2onnx
writes it too). Every rewrite is exact: no value changes, only the order
in which axes are stored between ops.
"""

import numpy as np
from onnx import helper

from renorm_convert.onnx.graph import _Graph, _attr, _set_attr

__all__ = ["optimize_transposes", "count_transposes"]

# Ops whose output element i depends only on input element i (and on
# scalar or per-call constants: Clip's bounds): they commute with any
# Transpose.
_UNARY = frozenset((
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Elu", "Selu", "Celu", "ThresholdedRelu", "Softplus",
    "Softsign", "Mish", "Gelu", "Exp", "Log", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "Not", "IsNaN", "IsInf", "Identity", "Cast", "Clip"))
# Elementwise ops with broadcasting, every input data.
_BROADCAST = frozenset((
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And",
    "Or", "Xor", "Where"))
_REDUCE = frozenset((
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceSumSquare"))
_AXIS = frozenset(("Softmax", "LogSoftmax", "Hardmax"))


def _perm(node):
    perm = _attr(node, "perm")
    return None if perm is None else [int(i) for i in perm]


def _inverse(perm):
    return [int(i) for i in np.argsort(perm)]


def _is_identity(perm):
    return list(perm) == list(range(len(perm)))


def _opset(model):
    return next((o.version for o in model.opset_import
                 if o.domain in ("", "ai.onnx")), 1)


class _Push:
    """How one op is rewritten to read the untransposed values: its new
    inputs, its attribute changes, and the perm of the Transpose that
    follows it (None: none is needed)."""

    def __init__(self, node, inputs, attributes, out_perm, freed):
        self.node, self.inputs = node, inputs
        self.attributes, self.out_perm = attributes, out_perm
        self.freed = freed  # Transposes (other than the one pushed) read here


def _data_inputs(g, node, y, perm):
    """The new inputs of an elementwise / Concat `node` whose data inputs
    are all Transposes with `perm` (or constants, transposed here), or
    None. (new inputs list, the other Transposes read)."""
    rank, inverse = len(perm), _inverse(perm)
    inputs, freed = [], []
    for name in node.input:
        producer = g.producer.get(name)
        if name == y or (producer is not None and producer.op_type ==
                         "Transpose" and _perm(producer) == perm):
            source = producer.input[0] if name != y else None
            inputs.append(("value", source))
            if name != y:
                freed.append(producer)
            continue
        value = g.const(name)
        if value is None or value.ndim > rank:
            return None
        if value.size == 1:  # broadcasts the same along any axes
            inputs.append(("keep", name))
            continue
        full = value.reshape((1,) * (rank - value.ndim) + value.shape)
        inputs.append(("const", np.ascontiguousarray(
            np.transpose(full, inverse))))
    return inputs, freed


def _reduce_push(g, node, perm, opset):
    rank = len(perm)
    keepdims = int(_attr(node, "keepdims", 1))
    axes_input = len(node.input) > 1 and node.input[1]
    if axes_input:
        value = g.const(node.input[1])
        if value is None:
            return None
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = _attr(node, "axes")
        axes = None if axes is None else [int(a) for a in axes]
    inputs = [("value", None)]
    if not axes:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            return None
        # Every axis reduced: the result has only sizes of 1, in any order.
        inputs += [("keep", n) for n in node.input[1:]]
        return inputs, {}, None
    axes = [a + rank if a < 0 else a for a in axes]
    new_axes = sorted(perm[a] for a in axes)
    attributes = {}
    if axes_input:
        inputs.append(("const", np.asarray(new_axes, np.int64)))
    else:
        attributes["axes"] = new_axes
    if keepdims:
        return inputs, attributes, perm
    kept = [a for a in range(rank) if a not in axes]
    kept_source = sorted(perm[a] for a in kept)
    out_perm = [kept_source.index(perm[a]) for a in kept]
    return inputs, attributes, (None if _is_identity(out_perm)
                                else out_perm)


def _pad_push(g, node, perm, opset):
    rank = len(perm)
    if opset < 11:
        pads = _attr(node, "pads")
        if pads is None:
            return None
        new = _permuted_pads(list(pads), perm)
        return [("value", None)], {"pads": new}, perm
    if len(node.input) > 3 and node.input[3]:  # axes: not handled
        return None
    pads = g.const(node.input[1]) if len(node.input) > 1 else None
    if pads is None or pads.size != 2 * rank:
        return None
    new = np.asarray(_permuted_pads(pads.reshape(-1).tolist(), perm),
                     pads.dtype)
    inputs = [("value", None), ("const", new)]
    inputs += [("keep", n) for n in node.input[2:]]
    return inputs, {}, perm


def _permuted_pads(pads, perm):
    rank = len(perm)
    new = [0] * (2 * rank)
    for i, axis in enumerate(perm):
        new[axis], new[rank + axis] = pads[i], pads[rank + i]
    return new


def _push(g, node, y, perm, opset):
    """How `node`, reading the Transpose output `y` (of `perm`), would read
    the value before the Transpose instead; None where it cannot."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    op, rank = node.op_type, len(perm)
    freed = []
    if op in _UNARY:
        if list(node.input).index(y) != 0 or y in node.input[1:]:
            return None
        if op == "PRelu":  # its slope broadcasts like a second operand
            found = _data_inputs(g, node, y, perm)
            if found is None:
                return None
            inputs, freed = found
        else:
            inputs = [("value", None)] + [("keep", n)
                                          for n in node.input[1:]]
        attributes, out_perm = {}, perm
    elif op in _BROADCAST or op == "Concat":
        found = _data_inputs(g, node, y, perm)
        if found is None:
            return None
        inputs, freed = found
        attributes, out_perm = {}, perm
        if op == "Concat":
            axis = int(_attr(node, "axis"))
            attributes["axis"] = perm[axis + rank if axis < 0 else axis]
    elif op in _AXIS and opset >= 13:
        if list(node.input) != [y]:
            return None
        axis = int(_attr(node, "axis", -1))
        inputs = [("value", None)]
        attributes, out_perm = {"axis": perm[axis + rank if axis < 0
                                             else axis]}, perm
    elif op in _REDUCE or op == "Pad":
        if node.input[0] != y or y in node.input[1:]:
            return None
        found = (_reduce_push if op in _REDUCE else _pad_push)(
            g, node, perm, opset)
        if found is None:
            return None
        inputs, attributes, out_perm = found
    else:
        return None
    return _Push(node, inputs, attributes, out_perm, freed)


def _apply(g, push, source):
    """Rewrites `push.node` to read untransposed values, with a Transpose
    of `push.out_perm` after it writing its old output."""
    node = push.node
    for i, (kind, value) in enumerate(push.inputs):
        if kind == "value":
            node.input[i] = source if value is None else value
        elif kind == "const":
            base = node.input[i] or node.name or node.op_type
            g.touched.add(node.input[i])
            node.input[i] = g.add_constant(base, value, "nchw")
        else:
            node.input[i] = value
    for name, value in push.attributes.items():
        _set_attr(node, name, value)
    if push.out_perm is not None:
        out = node.output[0]
        fresh = g.fresh_name(out, "nchw")
        node.output[0] = fresh
        transpose = helper.make_node("Transpose", [fresh], [out],
                                     name=g.fresh_name(
                                         node.name or out, "transpose"),
                                     perm=list(push.out_perm))
        g.nodes.insert(g.index(node) + 1, transpose)


def _unread(g, name):
    return not g.consumers.get(name) and name not in g.outputs and (
        name not in g.sub_refs)


def _cancel_following(g, node, perm):
    """Folds each Transpose reading `node`'s output into one reading its
    input (none where they cancel). Returns whether anything changed."""
    source, changed = node.input[0], False
    for reader in list(g.consumers.get(node.output[0], ())):
        if reader.op_type != "Transpose" or not g.alive(reader):
            continue
        second = _perm(reader)
        if second is None or len(second) != len(perm):
            continue
        combined = [perm[i] for i in second]
        reader.input[0] = source
        _set_attr(reader, "perm", combined)
        g.reindex()
        changed = True
        if _is_identity(combined):
            g.bypass(reader, source)
    return changed


def _try_push(g, node, perm, opset):
    """Moves the Transpose `node` below every op reading it, where each can
    read the untransposed value and no node is added in all."""
    y = node.output[0]
    if y in g.outputs or y in g.sub_refs:
        return False
    readers = list({id(r): r for r in g.consumers.get(y, ())}.values())
    if not readers:
        return False
    pushes = [_push(g, reader, y, perm, opset) for reader in readers]
    if any(p is None for p in pushes):
        return False
    added = sum(p.out_perm is not None for p in pushes)
    reading = {id(r) for r in readers}
    freed = {id(t): t for p in pushes for t in p.freed}
    removed = 1 + sum(all(id(r) in reading for r in g.consumers.get(
        t.output[0], ())) and t.output[0] not in g.outputs
        for t in freed.values())
    if added > removed:
        return False
    for push in pushes:
        _apply(g, push, node.input[0])
    g.reindex()
    for t in [node] + list(freed.values()):
        if g.alive(t) and _unread(g, t.output[0]):
            g.remove(t)
    return True


def _step(g, node, opset):
    perm = _perm(node)
    if perm is None or len(node.input) != 1:
        return False
    if _is_identity(perm):
        return g.bypass(node, node.input[0])
    changed = _cancel_following(g, node, perm)
    if _unread(g, node.output[0]):
        g.remove(node)
        return True
    return _try_push(g, node, perm, opset) or changed


def count_transposes(onnx_model):
    return sum(n.op_type == "Transpose" for n in onnx_model.graph.node)


def optimize_transposes(onnx_model):
    """Cancels Transposes, and moves them below elementwise ops, Concat,
    Softmax, reductions and Pad until they meet and cancel (see the module
    docstring).

    Returns `(onnx_model, count)`: a new ModelProto (the one given is left
    as it is) and how many nodes fewer it has.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    before = len(model.graph.node)
    g = _Graph(model, shapes=False)
    opset = _opset(model)
    changed, rounds = True, 0
    # Every move takes a Transpose further down a finite graph: this ends;
    # the bound only guards against a bug.
    while changed and rounds < 10 * (len(g.nodes) + 1):
        changed, rounds = False, rounds + 1
        for node in list(g.nodes):
            if node.op_type == "Transpose" and node.domain in (
                    "", "ai.onnx") and g.alive(node):
                changed |= bool(_step(g, node, opset))
    g.finish()
    return model, before - len(model.graph.node)
