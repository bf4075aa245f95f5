"""Zero padding folded into the Conv that reads it, in an ONNX graph (only
`onnx` and NumPy).

Keras's `ZeroPadding2D` before a `Conv2D` (ResNet50's stem, MobileNetV2's
strided blocks) is a Pad node before the Conv: tf2onnx merges the two, an
op-by-op exporter (PyTorch's) writes the Pad on the channels-last tensor,
before the Transpose to channels-first. A Conv pads with zeros itself, so a
constant-zero Pad of the spatial axes alone is the Conv's own `pads`: one
node and one copy of the input fewer.
"""

import numpy as np

from renorm_convert.onnx.graph import _attr, _Graph, _set_attr

__all__ = ["fold_padding"]


def _zero_pads(g, node, opset):
    """The pads of a Pad node that writes zeros (constant mode, value 0),
    as a list (begin of every axis, then end); None for any other Pad."""
    mode = _attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or node.domain not in ("", "ai.onnx"):
        return None
    if opset < 11:
        pads, value = _attr(node, "pads"), _attr(node, "value", 0.0)
    else:
        if len(node.input) > 3 and node.input[3]:  # axes
            return None
        pads = g.const(node.input[1]) if len(node.input) > 1 else None
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            constant = g.const(node.input[2])
            if constant is None or constant.size != 1:
                return None
            value = float(constant.reshape(-1)[0])
    if pads is None or value != 0.0:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    return pads if all(p >= 0 for p in pads) else None


def _reader_conv(g, node):
    """(Conv, perm of a Transpose between them or None) where the Pad's
    output reaches exactly one Conv's data input, directly or through one
    Transpose; else None."""
    value = node.output[0]
    reader, perm = g.sole_consumer(value), None
    if reader is not None and reader.op_type == "Transpose":
        perm = _attr(reader, "perm")
        if perm is None:
            return None
        perm = [int(i) for i in perm]
        value = reader.output[0]
        reader = g.sole_consumer(value)
    if reader is None or reader.op_type != "Conv" or reader.domain not in (
            "", "ai.onnx") or reader.input[0] != value:
        return None
    return reader, perm


def _fold_one(g, node, opset):
    pads = _zero_pads(g, node, opset)
    if pads is None:
        return False
    found = _reader_conv(g, node)
    if found is None:
        return False
    conv, perm = found
    rank = len(pads) // 2
    if perm is not None:
        if len(perm) != rank:
            return False
        pads = [pads[i] for i in perm] + [pads[rank + i] for i in perm]
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    # Only the spatial axes of the Conv's NCHW input may be padded.
    if auto_pad != "NOTSET" or any(pads[i] or pads[rank + i] for i in (0, 1)):
        return False
    spatial = rank - 2
    own = list(_attr(conv, "pads", [0] * (2 * spatial)))
    new = ([own[i] + pads[2 + i] for i in range(spatial)]
           + [own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)])
    _set_attr(conv, "pads", new)
    g.stale.add(conv.input[0])  # now unpadded: its recorded shape goes
    g.bypass(node, node.input[0])
    return True


def fold_padding(onnx_model):
    """Folds every constant-zero Pad of the spatial axes that a Conv reads
    (directly, or through a Transpose to channels-first) into that Conv's
    `pads`.

    Returns `(onnx_model, count)`: a new ModelProto (the one given is left
    as it is) and how many Pad nodes went.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = _Graph(model, shapes=False)
    opset = next((o.version for o in model.opset_import
                  if o.domain in ("", "ai.onnx")), 1)
    count = 0
    for node in list(g.nodes):
        if node.op_type == "Pad" and g.alive(node) and _fold_one(
                g, node, opset):
            count += 1
    g.finish()
    return model, count
