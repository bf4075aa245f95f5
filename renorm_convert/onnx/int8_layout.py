"""int8_layout: Conv channel counts widened with zeros to what onnxruntime's
fast int8 convolution kernel takes, before static quantization (`onnx` and
NumPy; `widened_payload` checks the result in onnxruntime).

onnxruntime runs a quantized Conv (QLinearConv, u8 activations, symmetric
s8 weights) on MLAS's indirect "symmetric" convolution kernel only when the
Conv has at least 16 output channels, a multiple of 4 of them, and a
multiple of 4 of input channels (MlasConvSymPackWSize, x86 with AVX-512);
any other Conv falls back to im2col and a generic int8 GEMM, which on small
layers is slower than the float Conv it replaces. Measured on 2 AVX-512
VNNI cores, batch 32: 24 -> 8 channels 1x1 at 28x28 takes 0.24 ms in int8
(0.12 ms in float) but 0.10 ms widened to 16 outputs; a 1-channel 3x3 stem
0.66 ms (float 0.10 ms), 0.37 ms with its input padded to 4 channels.

Here every such Conv is widened, exactly (a float model gives the same
outputs before and after):

- outputs: a Conv with fewer than `MIN_OUTPUT_CHANNELS` output channels (or
  not a multiple of `CHANNEL_ALIGNMENT`) gets zero filters and zero biases
  up to that; only where every path from its output passes through ops that
  keep zero channels zero (Relu, MaxPool, AveragePool, Identity, channel
  Concat) and ends in Convs, whose weights get zero input columns for the
  extra channels. Anything else on the way (a residual Add, a graph output,
  a Reshape) leaves that Conv as it is.
- inputs: a Conv whose input channels are not a multiple of
  `CHANNEL_ALIGNMENT` (an image stem: 1 or 3 channels) gets a zero Pad of
  its input along channels, and zero input columns in its weights.

Only plain 2-D Convs (group 1, constant weights not shared with another
node) are touched. The widened model is for quantization only: the float
export keeps its shape.

After quantization, `share_concat_scales` gives the inputs of each
quantized Concat the scale and zero point of its output (whose calibrated
range covers all of theirs): onnxruntime's QLinearConcat then copies bytes
instead of requantizing every input through a lookup table (0.53 -> 0.34 ms
for the 64-channel 28x28 Concat of the Inception-style reference model).
"""

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_OUTPUT_CHANNELS = 16
CHANNEL_ALIGNMENT = 4
# Ops through which zero channels stay zero, channel for channel.
_CHANNELWISE = ("Relu", "MaxPool", "AveragePool", "Identity")

# The widened model must give the float model's outputs to float rounding
# (it only adds zeros); relative to the outputs' scale.
CHECK_TOLERANCE = 1e-4

__all__ = ["widen_for_int8", "widened_payload", "share_concat_scales",
           "CHANNEL_ALIGNMENT", "MIN_OUTPUT_CHANNELS"]


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _round_up(n, k):
    return -(-n // k) * k


def _target_outputs(n):
    return max(MIN_OUTPUT_CHANNELS, _round_up(n, CHANNEL_ALIGNMENT))


class _Widening:
    """The graph of a copy of a model, indexed for widening its Convs (the
    module docstring says how), and the widening itself, node by node."""

    def __init__(self, model):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        graph = self.model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.uses = collections.Counter(name for node in graph.node
                                        for name in node.input)
        self.consumers = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.channels = {name: shape[1] for name, shape in
                         _shapes(model).items()
                         if len(shape) == 4 and shape[1]}
        # tensor -> (width, indices of its original channels) where widened.
        self.layout = {}
        self.done = {"outputs": [], "inputs": []}
        self.pads = {}  # tensor -> its channel-padded copy
        self.new_nodes = []

    def plain_conv(self, node):
        """A 2-D Conv, group 1, its own constant weights (and bias)."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            return False
        if _attr(node, "group", 1) != 1 or len(node.input) < 2:
            return False
        for name in node.input[1:3]:
            if not name:
                continue
            if name not in self.inits or name in self.graph_inputs or (
                    self.uses[name] != 1):
                return False
        return len(self.inits[node.input[1]].dims) == 4

    def absorbable(self, tensor, seen=()):
        """Every path from `tensor` keeps extra zero channels zero and ends
        in plain Convs reading it as their data input."""
        if tensor in self.graph_outputs or not self.consumers[tensor] or (
                tensor in seen):
            return False
        seen = seen + (tensor,)
        for node in self.consumers[tensor]:
            if node.domain not in ("", "ai.onnx"):
                return False
            if self.plain_conv(node) and node.input[0] == tensor and \
                    tensor not in node.input[1:]:
                continue
            channelwise = node.op_type in _CHANNELWISE and len(
                node.output) == 1 and list(node.input[:1]) == [tensor]
            concat = node.op_type == "Concat" and _attr(
                node, "axis") in (1, -3) and all(
                self.channels.get(name) for name in node.input)
            if not (channelwise or concat) or not self.absorbable(
                    node.output[0], seen):
                return False
        return True

    def concat(self, node):
        keep, offset = [], 0
        for name in node.input:
            width, idx = self.layout.get(name, (self.channels[name], None))
            keep.append((np.arange(width) if idx is None else idx) + offset)
            offset += width
        self.layout[node.output[0]] = (offset, np.concatenate(keep))

    def conv(self, node):
        """Widens a plain Conv's input (a widened tensor it reads, or a
        channel count off the alignment) and its outputs (where every
        reader absorbs zero channels)."""
        weights = numpy_helper.to_array(self.inits[node.input[1]])
        changed = False
        if node.input[0] in self.layout:  # absorb a widened input
            width, idx = self.layout[node.input[0]]
            weights = _spread(weights, width, idx, axis=1)
            changed = True
        in_channels = weights.shape[1]
        if in_channels % CHANNEL_ALIGNMENT:
            width = _round_up(in_channels, CHANNEL_ALIGNMENT)
            source = node.input[0]
            if source not in self.pads:
                self.pads[source] = _pad_node(self.model, source, in_channels,
                                              width, self.new_nodes)
            node.input[0] = self.pads[source]
            weights = _spread(weights, width, np.arange(in_channels), axis=1)
            changed = True
            self.done["inputs"].append(node.name)
        out_channels = weights.shape[0]
        target = _target_outputs(out_channels)
        if target != out_channels and self.absorbable(node.output[0]):
            keep = np.arange(out_channels)
            weights = _spread(weights, target, keep, axis=0)
            if len(node.input) > 2 and node.input[2]:
                bias = numpy_helper.to_array(self.inits[node.input[2]])
                self.inits[node.input[2]].CopyFrom(numpy_helper.from_array(
                    _spread(bias, target, keep, axis=0), node.input[2]))
            self.layout[node.output[0]] = (target, keep)
            changed = True
            self.done["outputs"].append(node.name)
        if changed:
            self.inits[node.input[1]].CopyFrom(numpy_helper.from_array(
                weights, node.input[1]))

    def visit(self, node):
        if node.op_type in _CHANNELWISE and node.input and \
                node.input[0] in self.layout:
            self.layout[node.output[0]] = self.layout[node.input[0]]
        elif node.op_type == "Concat" and any(
                name in self.layout for name in node.input):
            self.concat(node)
        elif self.plain_conv(node):
            self.conv(node)
        elif any(name in self.layout for name in node.input):
            # `absorbable` rules this out; never leave a wrong graph.
            raise AssertionError(
                f"widened channels reached {node.op_type} '{node.name}'")
        self.new_nodes.append(node)


def widen_for_int8(model):
    """A copy of ONNX ModelProto `model` with its Convs widened as the module
    docstring says, and what was done: {"outputs": [Conv names widened],
    "inputs": [Conv names whose input was padded]}. `model` is not
    changed."""
    w = _Widening(model)
    graph = w.model.graph
    for node in graph.node:
        w.visit(node)
    if not w.done["outputs"] and not w.done["inputs"]:
        return w.model, w.done
    del graph.node[:]
    graph.node.extend(w.new_nodes)
    # Shapes changed: let shape inference (quant_pre_process) redo them.
    del graph.value_info[:]
    return w.model, w.done


def _spread(array, width, keep, axis):
    """`array` with its `axis` widened to `width`, its entries at `keep`
    and zeros elsewhere."""
    shape = list(array.shape)
    shape[axis] = width
    out = np.zeros(shape, array.dtype)
    index = [slice(None)] * array.ndim
    index[axis] = keep
    out[tuple(index)] = array
    return out


def _pad_node(model, source, channels, width, new_nodes):
    """Appends to `new_nodes` a Pad of NCHW `source` from `channels` to
    `width` channels with zeros; returns the padded tensor's name."""
    opset = next((o.version for o in model.opset_import
                  if o.domain in ("", "ai.onnx")), 11)
    pads = [0, 0, 0, 0, 0, width - channels, 0, 0]
    out = f"{source}/int8_channel_pad"
    name = f"{source}/int8_channel_pad"
    if opset >= 11:
        const = numpy_helper.from_array(np.asarray(pads, np.int64),
                                        f"{name}/pads")
        model.graph.initializer.append(const)
        node = helper.make_node("Pad", [source, const.name], [out],
                                name=name, mode="constant")
    else:
        node = helper.make_node("Pad", [source], [out], name=name,
                                mode="constant", pads=pads, value=0.0)
    new_nodes.append(node)
    return out


def _shapes(model):
    """Tensor name -> its shape as far as shape inference knows it (None
    for an unknown dimension)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes = {}
    for value in (list(inferred.graph.value_info) + list(inferred.graph.input)
                  + list(inferred.graph.output)):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else None
            for d in tensor.shape.dim)
    return shapes


def widened_payload(float_payload, sample):
    """Serialized `float_payload` widened (`widen_for_int8`), checked in
    onnxruntime on `sample` (one array per graph input); `float_payload`
    itself where there is nothing to widen, or where the check fails or
    cannot run (a model this module misreads is quantized as it is)."""
    try:
        widened, done = widen_for_int8(onnx.load_from_string(float_payload))
    except Exception:
        return float_payload
    if not done["outputs"] and not done["inputs"]:
        return float_payload
    payload = widened.SerializeToString()
    try:
        expected, got = _run(float_payload, sample), _run(payload, sample)
    except Exception:
        return float_payload
    for e, g in zip(expected, got):
        scale = max(float(np.abs(e).max()), 1e-12)
        if e.shape != g.shape or not (
                float(np.abs(e - g).max()) <= CHECK_TOLERANCE * scale):
            return float_payload
    return payload


def _run(payload, inputs):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(payload, options,
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def share_concat_scales(model):
    """Gives the inputs of every quantized Concat of QDQ ModelProto `model`
    (in place) its output's quantization parameters; returns how many
    Concats. A Concat qualifies when each input is DequantizeLinear(
    QuantizeLinear(t)) read by that Concat alone, and its output feeds one
    QuantizeLinear (per-tensor parameters)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    shared = 0
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        after = consumers[node.output[0]]
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or \
                len(after[0].input) < 3:
            continue
        scale, zero_point = after[0].input[1], after[0].input[2]
        pairs = []
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and \
                dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or \
                    len(q.input) < 3 or _attr(q, "axis") is not None:
                break
            readers = consumers[q.output[0]]
            if any(r.op_type != "DequantizeLinear" or
                   any(c is not node for c in consumers[r.output[0]])
                   for r in readers):
                break
            pairs.append([q] + readers)
        else:
            for nodes in pairs:
                for qdq in nodes:
                    qdq.input[1], qdq.input[2] = scale, zero_point
            shared += 1
    if shared:
        used = {name for n in graph.node for name in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return shared
