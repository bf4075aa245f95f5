"""onnx_folding: per-channel constant arithmetic folded into the linear node
next to it, in an ONNX graph (only `onnx` and NumPy).

Keras-level folding (`folding.fold`) cannot look inside a custom layer whose
Python code joins its sublayers (a fused-MBConv block calling its own Conv2D
and BatchNormalization): its normalization stays a per-channel scale and
offset, which tf2onnx lowers to a Mul and an Add after the Conv. Here those
are folded in the ONNX graph itself:

- backward: Conv / ConvTranspose / Gemm / MatMul (constant weights) followed
  by per-channel constant Mul / Add / Sub / Div, directly or through
  Transposes, Squeezes, Unsqueezes and Identities (tf2onnx's NHWC and Conv1D
  layouts), in any order: into the weights and bias. A MatMul has no bias
  input: its first Add is its bias (kept, or a Gemm when the input is 2-D).
- forward: per-channel constant Mul / Add / Sub / Div (directly or through
  the same layout nodes) before a Conv: the scale into the weights always
  (through a zero Pad too), the offset only where neither the Conv nor a
  Pad pads anything (a padded border would see the zeros unshifted);
  before a ConvTranspose the scale only.

"Per-channel" means broadcastable along the channel axis only: (1, C, 1, 1)
or (C, 1, 1) for an NCHW Conv output, (C,) for the last axis (a Gemm, or a
Conv output after a Transpose to NHWC), a scalar anywhere. Nothing is folded
unless it is exact: every intermediate value has a single consumer and is no
graph output, the weights (and bias) are constants (initializers that are
not graph inputs, or Constant nodes), the arithmetic constant is finite (and
non-zero for a Div), and it cannot change the shape of the value it acts on.
Weights are computed in float64 and stored in their own dtype (float16 stays
float16).
"""

import numpy as np
import onnx
from onnx import helper

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AFFINE = ("Mul", "Add", "Sub", "Div")
_LAYOUT = ("Transpose", "Squeeze", "Unsqueeze", "Identity")

__all__ = ["fold_affine", "count_affine_after_linear",
           "count_affine_before_linear"]


from renorm_convert.onnx.graph import (_FLOATS, _attr, _Graph,  # noqa: E402
                                       _set_attr, compose_step)


def _per_channel(value, rank, axis, channels):
    """The constant `value` as a float64 vector of `channels`, where it is
    finite and broadcasts along `axis` of a rank-`rank` value only (without
    changing its shape); else None. `rank` None: unknown, the channels are
    the last axis, and only a scalar or a vector qualifies."""
    if value is None or value.dtype.type not in _FLOATS:
        return None
    if rank is None:
        if value.ndim > 1:
            return None
        rank, axis = 1, 0
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[
            axis] not in (1, channels):
        return None
    vector = value.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(vector)):
        return None
    return np.broadcast_to(vector, (channels,)).copy()


def _affine_step(g, node, data, rank, axis, channels):
    """(kind, vector) of an affine node reading `data`: kind "mul", "add",
    "sub_from" (vector - data) or "div"; None if it is not per-channel
    constant arithmetic on `data`."""
    if node.op_type not in AFFINE or node.domain not in ("", "ai.onnx") or (
            len(node.input) != 2 or len(node.output) != 1):
        return None
    if list(node.input).count(data) != 1:
        return None
    index = list(node.input).index(data)
    vector = _per_channel(g.const(node.input[1 - index]), rank, axis,
                          channels)
    if vector is None:
        return None
    op = node.op_type
    if op == "Mul":
        return "mul", vector
    if op == "Add":
        return "add", vector
    if op == "Sub":
        return ("add", -vector) if index == 0 else ("sub_from", vector)
    if index == 0 and np.all(vector != 0):  # Div
        return "div", vector
    return None


def _transpose_axis(node, rank, axis, backward=False):
    """The channel axis after a Transpose (before it, `backward`)."""
    perm = _attr(node, "perm")
    if perm is None:
        if rank is None:
            return None
        perm = list(range(rank))[::-1]
    perm = list(perm)
    if rank is not None and len(perm) != rank:
        return None
    return perm[axis] if backward else perm.index(axis)


def _squeezed_axes(g, node, rank):
    """The axes a Squeeze / Unsqueeze removes / inserts, non-negative (for a
    Squeeze: of its input, of rank `rank`; for an Unsqueeze: of its output);
    None where unknown."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.const(node.input[1])
        if value is None or value.dtype.kind not in "iu":
            return None
        axes = value.reshape(-1).tolist()
    if axes is None:
        if node.op_type != "Squeeze":
            return None
        shape = g.shapes.get(node.input[0])  # all its size-1 dimensions
        if shape is None or len(shape) != rank or None in shape:
            return None
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes]
    if len(set(axes)) != len(axes) or not all(0 <= a < rank for a in axes):
        return None
    return set(axes)


def _layout_step(g, node, rank, axis, backward=False):
    """(rank, channel axis) on the other side of a node that only moves or
    reshapes axes of size 1 (Transpose, Squeeze, Unsqueeze, Identity): after
    it, or before it with `backward`; None for any other node, or where the
    channel axis cannot be followed through it."""
    op = node.op_type
    if rank is None or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    if op == "Identity":
        return rank, axis
    if op == "Transpose":
        new_axis = _transpose_axis(node, rank, axis, backward)
        return None if new_axis is None else (rank, new_axis)
    if op not in ("Squeeze", "Unsqueeze"):
        return None
    # Axes of the side with more dimensions: a Squeeze's input, an
    # Unsqueeze's output.
    widening = (op == "Unsqueeze") != backward
    if widening:
        wide_rank = rank + _count_axes(g, node)
        if op == "Squeeze" and wide_rank == rank:  # squeezes every size 1
            wide_rank = len(g.shapes.get(node.input[0]) or ())
        k = _squeezed_axes(g, node, wide_rank)
        if k is None:
            return None
        kept = sorted(set(range(rank + len(k))) - k)
        return rank + len(k), kept[axis]
    k = _squeezed_axes(g, node, rank)
    if k is None or axis in k:
        return None
    return rank - len(k), axis - sum(a < axis for a in k)


def _count_axes(g, node):
    """How many axes a Squeeze / Unsqueeze names (0 where it names none)."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.const(node.input[1])
        axes = [] if value is None else value.reshape(-1).tolist()
    return len(axes or ())


# --- the linear nodes --------------------------------------------------------

def _set_bias(node, name):
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def _float_const(g, name):
    value = g.const(name)
    if value is None or value.dtype.type not in _FLOATS:
        return None
    return value


def _linear(g, node):
    """What a backward fold needs of a linear node with constant weights:
    dict(rank, axis, channels, weight, bias); None if it has none."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    op = node.op_type
    if op not in LINEAR or len(node.input) < 2:
        return None
    weight = _float_const(g, node.input[1])
    if weight is None:
        return None
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = _float_const(g, bias_name) if bias_name else None
    if bias_name and bias is None:
        return None
    if op in ("Conv", "ConvTranspose"):
        if weight.ndim < 3:
            return None
        group = int(_attr(node, "group", 1))
        channels = weight.shape[0] if op == "Conv" else weight.shape[1] * group
        if bias is not None and bias.shape != (channels,):
            return None
        return dict(rank=weight.ndim, axis=1, channels=channels,
                    weight=weight, bias=bias)
    if weight.ndim != 2 or g.const(node.input[0]) is not None:
        return None
    if op == "Gemm":
        transposed = bool(_attr(node, "transB", 0))
        channels = weight.shape[0] if transposed else weight.shape[1]
        return dict(rank=2, axis=1, channels=channels, weight=weight,
                    bias=bias)
    if len(node.input) != 2:
        return None
    shape = g.shapes.get(node.input[0])
    rank = None if shape is None else max(len(shape), 1)
    return dict(rank=rank, axis=None if rank is None else rank - 1,
                channels=weight.shape[1], weight=weight, bias=None)


def _chain_after(g, node, info):
    """The affine nodes (with their data inputs and steps) that can fold into
    `node`, walking forward through Transposes, Squeezes and Unsqueezes."""
    rank, axis, channels = info["rank"], info["axis"], info["channels"]
    current, chain = node.output[0], []
    while True:
        consumer = g.sole_consumer(current)
        if consumer is None:
            break
        if consumer.op_type in _LAYOUT:
            if list(consumer.input).index(current) != 0:
                break
            step = _layout_step(g, consumer, rank, axis)
            if step is None:
                break
            (rank, axis), current = step, consumer.output[0]
            continue
        step = _affine_step(g, consumer, current, rank, axis, channels)
        if step is None:
            break
        chain.append((consumer, current, step))
        current = consumer.output[0]
    return chain


def _matmul_bias_ops(chain):
    """How many of a MatMul's chain are its bias (its first Add, where
    there is an additive step): 0 or 1."""
    return int(any(kind in ("add", "sub_from") for _, _, (kind, _) in chain))


def _fold_after(g, node):
    """Folds the affine chain after `node`; returns how many affine nodes
    went into its weights (0: nothing changed)."""
    info = _linear(g, node)
    if info is None:
        return 0
    chain = _chain_after(g, node, info)
    if not chain:
        return 0
    op, channels = node.op_type, info["channels"]
    weight = info["weight"]
    scale, offset = np.ones(channels), np.zeros(channels)
    for _, _, (kind, vector) in chain:
        scale, offset = compose_step(scale, offset, kind, vector)
    dtype = weight.dtype
    w = weight.astype(np.float64)
    bias = info["bias"]
    b = np.zeros(channels) if bias is None else bias.astype(np.float64)
    count = len(chain)
    if op == "Conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op == "ConvTranspose":
        group = int(_attr(node, "group", 1))
        per_group = scale.reshape(group, -1)  # (group, Cout / group)
        rows = per_group[np.arange(w.shape[0]) // (w.shape[0] // group)]
        w = w * rows.reshape(rows.shape + (1,) * (w.ndim - 2))
    elif op == "Gemm":
        transposed = bool(_attr(node, "transB", 0))
        w = w * (scale[:, None] if transposed else scale[None, :])
    else:  # MatMul
        w = w * scale[None, :]
        count -= _matmul_bias_ops(chain)
        if count == 0:
            return 0
    # The new bias (None: none needed).
    if op in ("Conv", "ConvTranspose"):
        new_bias = b * scale + offset
        if bias is None and not np.any(new_bias != 0):
            new_bias = None
    elif op == "Gemm":
        beta = float(_attr(node, "beta", 1.0))
        # y = alpha A'B' scale + (beta C scale + offset)
        new_bias = None if bias is None and not np.any(offset != 0) else (
            offset if bias is None else beta * b * scale + offset)
    else:  # MatMul
        new_bias = offset if (np.any(offset != 0) or _matmul_bias_ops(
            chain)) else None
    with np.errstate(over="ignore", invalid="ignore"):
        w = w.astype(dtype)
        new_bias = None if new_bias is None else new_bias.astype(dtype)
    if not np.all(np.isfinite(w)) or (new_bias is not None and not np.all(
            np.isfinite(new_bias))):
        return 0  # out of the dtype's range: not exact
    g.touched.update(n for n in node.input[1:] if n)
    weight_name = node.input[1]
    node.input[1] = g.add_constant(weight_name, w)
    if op in ("Conv", "ConvTranspose", "Gemm") and new_bias is not None:
        _set_bias(node, g.add_constant(weight_name + "_bias", new_bias))
        if op == "Gemm":
            _set_attr(node, "beta", 1.0)
    elif new_bias is not None:  # MatMul
        bias_name = g.add_constant(weight_name + "_bias", new_bias)
        if info["rank"] == 2:  # a Gemm: MatMul and its bias in one node
            node.op_type = "Gemm"
            node.input.append(bias_name)
        else:
            out = node.output[0]
            fresh = g.fresh_name(out + "_matmul")
            node.output[0] = fresh
            add = helper.make_node("Add", [fresh, bias_name], [out],
                                   name=(node.name or out) + "_bias")
            g.nodes.insert(g.index(node) + 1, add)
            g.shapes[fresh] = g.shapes.get(out)
    g.reindex()
    for affine, data, _ in reversed(chain):  # the last first: `data` stays
        g.remove_affine(affine, data)
    return count


# --- forward into a Conv -----------------------------------------------------

def _pads_nothing(node, weight):
    """Whether a Conv adds no padding (its output sees only real input)."""
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return True
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in weight.shape[2:])
    return not any(_attr(node, "pads", []))


def _chain_before(g, node, weight, channels, additive_ok):
    """The affine nodes before `node` that fold forward into it, nearest
    first, each with its data input and step."""
    rank, axis = weight.ndim, 1
    current, reader, chain = node.input[0], node, []
    while True:
        producer = g.producer.get(current)
        if producer is None or g.sole_consumer(current) is not reader:
            break
        reader = producer
        if producer.op_type in _LAYOUT:
            step = _layout_step(g, producer, rank, axis, backward=True)
            if step is None:
                break
            (rank, axis), current = step, producer.input[0]
            continue
        if producer.op_type == "Pad":
            # Zeros scaled stay zeros: a scale folds through a zero Pad of
            # the other axes, an offset does not (the border would shift).
            if not _pads_zeros_beside(g, producer, rank, axis):
                break
            additive_ok, current = False, producer.input[0]
            continue
        if producer.op_type not in AFFINE or len(producer.input) != 2:
            break
        data = [n for n in producer.input if g.const(n) is None]
        if len(data) != 1:
            break
        step = _affine_step(g, producer, data[0], rank, axis, channels)
        if step is None or (not additive_ok and step[0] in ("add",
                                                            "sub_from")):
            break
        # The constant must not change the shape of the value it acts on.
        shape = g.shapes.get(data[0])
        constant = g.const(producer.input[1 - list(producer.input).index(
            data[0])])
        wide = constant.ndim > 0 and constant.size > 1
        if shape is None or len(shape) != rank or (
                wide and shape[axis] != channels):
            break
        chain.append((producer, data[0], step))
        current = data[0]
    return chain


def _pads_zeros_beside(g, node, rank, axis):
    """Whether a Pad writes zeros and only along axes other than `axis`."""
    from renorm_convert.onnx.padding import _zero_pads

    opset = next((o.version for o in g.model.opset_import
                  if o.domain in ("", "ai.onnx")), 1)
    pads = _zero_pads(g, node, opset)
    return pads is not None and len(pads) == 2 * rank and not (
        pads[axis] or pads[rank + axis])


def _forward_chain(g, node, weight, group):
    """(input channels, the affine chain before `node` that folds into it
    exactly): a ConvTranspose takes only scales, a Conv offsets too where it
    pads nothing."""
    if node.op_type == "Conv":
        channels = weight.shape[1] * group
        additive_ok = _pads_nothing(node, weight)
    else:
        channels, additive_ok = weight.shape[0], False
    return channels, _chain_before(g, node, weight, channels, additive_ok)


def _fold_before(g, node):
    """Folds the affine chain before a Conv / ConvTranspose into it; returns
    how many affine nodes went in."""
    if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in (
            "", "ai.onnx") or g.const(node.input[0]) is not None:
        return 0
    info = _linear(g, node)
    if info is None:
        return 0
    weight, group = info["weight"], int(_attr(node, "group", 1))
    channels, chain = _forward_chain(g, node, weight, group)
    if not chain:
        return 0
    scale, offset = np.ones(channels), np.zeros(channels)
    for _, _, (kind, vector) in reversed(chain):  # in the order they run
        scale, offset = compose_step(scale, offset, kind, vector)
    dtype, w = weight.dtype, weight.astype(np.float64)
    cout = info["channels"]
    b = np.zeros(cout) if info["bias"] is None else info["bias"].astype(
        np.float64)
    if node.op_type == "Conv":
        per_group = w.shape[1]
        # The input channel each weight reads: (Cout, Cin / group).
        index = (np.arange(w.shape[0])[:, None] // (w.shape[0] // group)
                 * per_group + np.arange(per_group)[None, :])
        spatial = (1,) * (w.ndim - 2)
        new_b = b + (w * offset[index].reshape(index.shape + spatial)).sum(
            axis=tuple(range(1, w.ndim)))
        new_w = w * scale[index].reshape(index.shape + spatial)
    else:
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        new_b = b
    with np.errstate(over="ignore", invalid="ignore"):
        new_w, new_b = new_w.astype(dtype), new_b.astype(dtype)
    if not (np.all(np.isfinite(new_w)) and np.all(np.isfinite(new_b))):
        return 0  # out of the dtype's range: not exact
    g.touched.update(n for n in node.input[1:] if n)
    weight_name = node.input[1]
    node.input[1] = g.add_constant(weight_name, new_w)
    if info["bias"] is not None or np.any(new_b != 0):
        _set_bias(node, g.add_constant(weight_name + "_bias", new_b))
    g.reindex()
    for affine, data, _ in chain:  # nearest the Conv first: `data` stays
        g.remove_affine(affine, data)
    return len(chain)


# --- the API -----------------------------------------------------------------

def fold_affine(onnx_model, forward=True):
    """Folds per-channel constant Mul / Add (Sub, Div) into the Conv /
    ConvTranspose / Gemm / MatMul next to them wherever that is exact.

    Returns `(onnx_model, count)`: a new ModelProto (the one given is left
    as it is) and the number of arithmetic nodes folded away. The first Add
    after a MatMul is its bias, not counted (a Gemm takes it where the input
    is 2-D). With `forward`, also folds arithmetic before a Conv (its offset
    only where the Conv pads nothing) or a ConvTranspose (scale only).
    """
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = _Graph(model)
    total = 0
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if node.op_type in LINEAR and g.alive(node):
                n = _fold_after(g, node)
                total += n
                changed |= n > 0
        if forward:
            for node in list(g.nodes):
                if node.op_type in ("Conv", "ConvTranspose") and g.alive(
                        node):
                    n = _fold_before(g, node)
                    total += n
                    changed |= n > 0
    g.finish()
    return model, total


def count_affine_after_linear(onnx_model):
    """How many per-channel constant Mul / Add / Sub / Div nodes follow a
    Conv / ConvTranspose / Gemm / MatMul with constant weights, directly or
    through Transposes, Squeezes, Unsqueezes and each other, where folding
    them in would be exact (the one check it leaves to `fold_affine`: that
    the new weights stay within their dtype's range): what `fold_affine`
    leaves at zero. A MatMul's first Add is its
    bias and not counted."""
    g = _Graph(onnx_model)
    count = 0
    for node in g.nodes:
        info = _linear(g, node)
        if info is None:
            continue
        chain = _chain_after(g, node, info)
        count += len(chain)
        if node.op_type == "MatMul":
            count -= _matmul_bias_ops(chain)
    return count


def count_affine_before_linear(onnx_model):
    """How many per-channel constant Mul / Add / Sub / Div nodes before a
    Conv / ConvTranspose would fold forward into it exactly."""
    g = _Graph(onnx_model)
    count = 0
    for node in g.nodes:
        if node.op_type not in ("Conv", "ConvTranspose") or g.const(
                node.input[0]) is not None:
            continue
        info = _linear(g, node)
        if info is None:
            continue
        group = int(_attr(node, "group", 1))
        count += len(_forward_chain(g, node, info["weight"], group)[1])
    return count
