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

What stays is a Transpose per graph input and output (NHWC in, NHWC out;
a Reshape where it moves only axes of size 1, a 1-channel image) and one
before a Reshape / Flatten of a channels-last tensor (as tf2onnx writes it
too). Every rewrite is exact: no value changes, only the order
in which axes are stored between ops.
"""

import numpy as np
from onnx import helper

from renorm_convert.onnx.graph import _attr, _Graph, _set_attr

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
    """How one op of a region is rewritten to read untransposed values: its
    new inputs, its attribute changes, and the perm its output is stored
    in afterwards, relative to now (the region's perm: it stays in the
    region; None: as it is now; another: a Transpose of that perm must
    follow it)."""

    def __init__(self, node, inputs, attributes, out_perm, freed):
        self.node, self.inputs = node, inputs
        self.attributes, self.out_perm = attributes, out_perm
        self.freed = freed  # Transposes with the region's perm read here


def _data_inputs(g, node, region, perm):
    """The new inputs of an elementwise / Concat `node` whose data inputs
    are all values of the region, Transposes with `perm`, or constants
    (transposed here); None where one is not. (inputs, Transposes read)."""
    rank, inverse = len(perm), _inverse(perm)
    inputs, freed = [], []
    for name in node.input:
        producer = g.producer.get(name)
        if name in region:
            inputs.append(("region", name))
            continue
        if producer is not None and producer.op_type == "Transpose" and (
                _perm(producer) == perm):
            inputs.append(("value", producer.input[0]))
            freed.append(producer)
            continue
        value = g.const(name)
        if value is None or value.ndim > rank:
            return None
        if value.size == 1:  # broadcasts the same along any axes
            inputs.append(("value", name))
            continue
        full = value.reshape((1,) * (rank - value.ndim) + value.shape)
        inputs.append(("const", np.ascontiguousarray(
            np.transpose(full, inverse))))
    return inputs, freed


def _reduce_push(g, node, perm):
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
    inputs = [("region", node.input[0])]
    if not axes:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            return None
        # Every axis reduced: the result has only sizes of 1, in any order.
        inputs += [("value", n) for n in node.input[1:]]
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
        return ([("region", node.input[0])],
                {"pads": _permuted_pads(list(pads), perm)}, perm)
    if len(node.input) > 3 and node.input[3]:  # axes: not handled
        return None
    pads = g.const(node.input[1]) if len(node.input) > 1 else None
    if pads is None or pads.size != 2 * rank:
        return None
    new = np.asarray(_permuted_pads(pads.reshape(-1).tolist(), perm),
                     pads.dtype)
    inputs = [("region", node.input[0]), ("const", new)]
    inputs += [("value", n) for n in node.input[2:]]
    return inputs, {}, perm


def _permuted_pads(pads, perm):
    rank = len(perm)
    new = [0] * (2 * rank)
    for i, axis in enumerate(perm):
        new[axis], new[rank + axis] = pads[i], pads[rank + i]
    return new


def _push(g, node, region, perm, opset):
    """How `node`, reading values of the region (stored transposed by
    `perm`), would read them untransposed; None where it cannot."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    op, rank = node.op_type, len(perm)
    first_only = node.input[0] in region and not any(
        n in region for n in node.input[1:])
    freed, attributes, out_perm = [], {}, perm
    if op in _BROADCAST or op in ("Concat", "PRelu"):
        found = _data_inputs(g, node, region, perm)
        if found is None:
            return None
        inputs, freed = found
        if op == "Concat":
            axis = int(_attr(node, "axis"))
            attributes["axis"] = perm[axis + rank if axis < 0 else axis]
    elif not first_only:
        return None
    elif op in _UNARY:
        inputs = [("region", node.input[0])] + [("value", n)
                                                for n in node.input[1:]]
    elif op in _AXIS and opset >= 13 and len(node.input) == 1:
        axis = int(_attr(node, "axis", -1))
        inputs = [("region", node.input[0])]
        attributes["axis"] = perm[axis + rank if axis < 0 else axis]
    elif op in _REDUCE or op == "Pad":
        found = (_reduce_push(g, node, perm) if op in _REDUCE
                 else _pad_push(g, node, perm, opset))
        if found is None:
            return None
        inputs, attributes, out_perm = found
    else:
        return None
    return _Push(node, inputs, attributes, out_perm, freed)


def _grow(g, y, perm, opset):
    """The region below the Transpose output `y`: every op, in graph order,
    that reads region values and can read them untransposed, and whose
    output stays in the region's layout or leaves it. (values stored
    transposed by `perm`, [push of each op])."""
    order = {id(n): i for i, n in enumerate(g.nodes)}
    region, pushes, seen = {y}, [], set()
    pending = {id(r): r for r in g.consumers.get(y, ())}
    while pending:
        key = min(pending, key=order.__getitem__)
        node = pending.pop(key)
        if key in seen or node.op_type == "Transpose":
            continue  # a Transpose below the region cancels or merges
        seen.add(key)
        push = _push(g, node, region, perm, opset)
        if push is None:
            continue
        pushes.append(push)
        if push.out_perm == perm:
            region.add(node.output[0])
            pending.update((id(r), r) for r in g.consumers.get(
                node.output[0], ()))
    return region, pushes


def _outside_readers(g, value, inside):
    return list({id(r): r for r in g.consumers.get(value, ())
                 if id(r) not in inside}.values())


def _meets(reader, perm):
    """The perm a Transpose reading a region value would have reading it
    untransposed; None if `reader` is not such a Transpose."""
    second = _perm(reader) if reader.op_type == "Transpose" else None
    if second is None or len(second) != len(perm):
        return None
    return [perm[i] for i in second]


def _cost(g, region, pushes, perm):
    """How many nodes the move would add (negative: remove)."""
    inside = {id(p.node) for p in pushes}
    change = -1  # the Transpose moved
    for value in region:
        needs = value in g.outputs or value in g.sub_refs
        for reader in _outside_readers(g, value, inside):
            combined = _meets(reader, perm)
            if combined is None:
                needs = True
            elif _is_identity(combined):
                change -= 1
        change += needs
    change += sum(p.out_perm not in (None, perm) for p in pushes)
    freed = {id(t): t for p in pushes for t in p.freed}
    change -= sum(t.output[0] not in g.outputs and all(
        id(r) in inside for r in g.consumers.get(t.output[0], ()))
        for t in freed.values())
    return change


def _new_transpose(g, after, source, out, perm):
    node = helper.make_node("Transpose", [source], [out], perm=list(perm),
                            name=g.fresh_name(out, "transpose"))
    g.nodes.insert(g.index(after) + 1, node)
    return node


def _move(g, node, perm, region, pushes):
    """Rewrites the region to compute untransposed values: Transposes
    below it read those (merged, or gone where they cancel), and a
    Transpose of `perm` writes each region value still read as it was."""
    y, inside = node.output[0], {id(p.node) for p in pushes}
    plain = {y: node.input[0]}
    for push in pushes:
        if push.out_perm == perm:
            out = push.node.output[0]
            plain[out] = g.fresh_name(out, "nchw")
    cancelled = []
    for value in region:
        needs = value in g.outputs or value in g.sub_refs
        for reader in _outside_readers(g, value, inside):
            combined = _meets(reader, perm)
            if combined is None:
                needs = True
                continue
            reader.input[0] = plain[value]
            _set_attr(reader, "perm", combined)
            if _is_identity(combined):
                cancelled.append(reader)
        if needs and value != y:
            producer = g.producer[value]
            _new_transpose(g, producer, plain[value], value, perm)
    for push in pushes:
        _rewrite(g, push, plain, perm)
    g.reindex()
    for reader in cancelled:
        if g.alive(reader):
            g.bypass(reader, reader.input[0])
    for t in [node] + [t for p in pushes for t in p.freed]:
        if g.alive(t) and _unread(g, t.output[0]):
            g.remove(t)


def _rewrite(g, push, plain, perm):
    node = push.node
    for i, (kind, value) in enumerate(push.inputs):
        if kind == "region":
            node.input[i] = plain[value]
        elif kind == "const":
            base = node.input[i] or node.name or node.op_type
            g.touched.add(node.input[i])
            node.input[i] = g.add_constant(base, value, "nchw")
        else:
            node.input[i] = value
    for name, value in push.attributes.items():
        _set_attr(node, name, value)
    out = node.output[0]
    if push.out_perm == perm:
        node.output[0] = plain[out]
    elif push.out_perm is not None:
        node.output[0] = g.fresh_name(out, "nchw")
        _new_transpose(g, node, node.output[0], out, push.out_perm)


def _unread(g, name):
    return not g.consumers.get(name) and name not in g.outputs and (
        name not in g.sub_refs)


def _cancel_following(g, node, perm):
    """Folds each Transpose reading `node`'s output into one reading its
    input (none where they cancel). Returns whether anything changed."""
    source, changed = node.input[0], False
    for reader in list(g.consumers.get(node.output[0], ())):
        combined = _meets(reader, perm)
        if combined is None or not g.alive(reader):
            continue
        reader.input[0] = source
        _set_attr(reader, "perm", combined)
        g.reindex()
        changed = True
        if _is_identity(combined):
            g.bypass(reader, source)
    return changed


def _into_reshape(g, node, perm):
    """A Transpose after a Reshape (its only reader) that moves only axes
    of size 1 keeps the order of the values: the Reshape writes the
    transposed shape itself (a squeeze-and-excitation block's (N, 1, 1, C)
    to NCHW). Returns whether it did."""
    data = node.input[0]
    reshape = g.producer.get(data)
    if reshape is None or reshape.op_type != "Reshape" or len(
            reshape.input) < 2 or g.sole_consumer(data) is not node:
        return False
    shape = g.const(reshape.input[1])
    if shape is None or shape.ndim != 1 or len(shape) != len(perm) or (
            0 in shape.tolist()):
        return False
    moved = [axis for axis in perm if shape[axis] != 1]
    if moved != sorted(moved):
        return False
    new_shape = np.asarray([shape[axis] for axis in perm], shape.dtype)
    g.touched.add(reshape.input[1])
    reshape.input[1] = g.add_constant(reshape.input[1], new_shape, "nchw")
    g.stale.add(data)
    return g.bypass(node, data)


def _try_push(g, node, perm, opset):
    y = node.output[0]
    if y in g.outputs or y in g.sub_refs:
        return False
    region, pushes = _grow(g, y, perm, opset)
    if not pushes or _cost(g, region, pushes, perm) > 0:
        return False
    _move(g, node, perm, region, pushes)
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
    if _into_reshape(g, node, perm):
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
    _reshapes_of_inputs(g)
    g.finish()
    return model, before - len(model.graph.node)


def _input_shapes(graph):
    """Graph input -> its dims (None where symbolic)."""
    shapes = {}
    for value in graph.input:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value")
                                  else None for d in t.shape.dim]
    return shapes


def _reshapes_of_inputs(g):
    """A Transpose of a graph input that moves only axes of size 1 (a
    1-channel NHWC image to NCHW) keeps the order of the values: it becomes
    a Reshape, which onnxruntime does without copying (as tf2onnx writes
    it). A symbolic size (the batch) must stay where it is: the Reshape
    copies it (shape 0)."""
    shapes = _input_shapes(g.model.graph)
    for node in list(g.nodes):
        shape = shapes.get(node.input[0]) if node.op_type == "Transpose" \
            else None
        perm = _perm(node) if shape is not None else None
        if perm is None or len(perm) != len(shape):
            continue
        if any(shape[axis] is None and axis != i
               for i, axis in enumerate(perm)):
            continue
        moved = [axis for axis in perm if shape[axis] != 1]
        if moved != sorted(moved):
            continue
        target = np.asarray([0 if shape[axis] is None else shape[axis]
                             for axis in perm], np.int64)
        node.op_type = "Reshape"
        del node.attribute[:]
        node.input.append(g.add_constant(node.input[0], target, "shape"))
    g.reindex()
