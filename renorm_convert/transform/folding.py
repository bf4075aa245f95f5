"""fold: normalization folded into the layer that produces its input, or
forward into the layers that consume its output.

Two levels, as in PyTorch's `torch.nn.utils.fusion`: pure NumPy weight maths
(`fold_weights`, `scale_offset`), and the model plumbing (`fold_plan`,
`fold`) that finds each normalization layer's producer in the model graph and
rebuilds an inference-only model without the normalization layers.
"""

import dataclasses

import keras
import numpy as np

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.layers import is_normalization
from renorm_convert.transform.blocks import unwrapped
from renorm_convert.transform.copying import copy_layer, replace_sublayers
from renorm_convert.transform.graph import (consumers, is_graph_model,
                                            model_graph, rebuild)
from renorm_convert.transform.weights import (assign_by_name, build_like,
                                              clone_layer, sublayer_items,
                                              values_by_name)

# Producers whose output channels are a linear function of their weights:
# class -> (name of the kernel to scale, axis of its output channels).
# Depthwise kernels are (..., in, multiplier): handled by `_depthwise`.
FOLDABLE = {
    keras.layers.Dense: ("kernel", -1),
    keras.layers.Conv1D: ("kernel", -1),
    keras.layers.Conv2D: ("kernel", -1),
    keras.layers.Conv3D: ("kernel", -1),
    keras.layers.SeparableConv1D: ("pointwise_kernel", -1),
    keras.layers.SeparableConv2D: ("pointwise_kernel", -1),
    keras.layers.Conv1DTranspose: ("kernel", -2),
    keras.layers.Conv2DTranspose: ("kernel", -2),
    keras.layers.Conv3DTranspose: ("kernel", -2),
    keras.layers.DepthwiseConv1D: ("kernel", None),
    keras.layers.DepthwiseConv2D: ("kernel", None),
}


# --- weight maths (pure NumPy) ------------------------------------------------

def scale_offset(mean, variance, epsilon, gamma=None, beta=None):
    """Inference batch norm as `y = x * scale + offset` per channel.

    `gamma` None means ones (scale=False), `beta` None means zeros
    (center=False). Computed in float64, returned as float32.
    """
    mean = np.asarray(mean, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    offset = -mean * scale
    if beta is not None:
        offset = offset + np.asarray(beta, np.float64)
    return scale.astype(np.float32), offset.astype(np.float32)


def fold_weights(kernel, bias, mean, variance, epsilon, gamma=None, beta=None,
                 channel_axis=-1):
    """Kernel and bias of a linear layer followed by inference batch norm.

    `kernel`'s output channels lie along `channel_axis`; `bias` None means
    zeros. Returns `(kernel * s, (bias - mean) * s + beta)` with
    `s = gamma / sqrt(variance + epsilon)`, as float32.
    """
    scale, offset = scale_offset(mean, variance, epsilon, gamma, beta)
    kernel = np.asarray(kernel, np.float64)
    shape = [1] * kernel.ndim
    shape[channel_axis] = -1
    new_kernel = kernel * scale.astype(np.float64).reshape(shape)
    bias = np.zeros(len(scale)) if bias is None else np.asarray(bias,
                                                               np.float64)
    new_bias = bias * scale.astype(np.float64) + offset.astype(np.float64)
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def fold_forward_weights(kernel, bias, scale, offset):
    """Kernel and bias of a Dense or `padding="valid"` Conv layer whose input
    is first mapped to `x * scale + offset` per input channel.

    `kernel` is (..., in, out); `bias` None means zeros. With valid padding
    every output sums whole kernels, so the offset adds a constant per
    output channel: `bias + sum(kernel * offset)`; zero padding would break
    this at the borders.
    """
    kernel = np.asarray(kernel, np.float64)
    shape = [1] * (kernel.ndim - 2) + [-1, 1]
    new_kernel = kernel * np.asarray(scale, np.float64).reshape(shape)
    shift = (kernel * np.asarray(offset, np.float64).reshape(shape)).sum(
        axis=tuple(range(kernel.ndim - 1)))
    bias = 0.0 if bias is None else np.asarray(bias, np.float64)
    return new_kernel.astype(np.float32), (bias + shift).astype(np.float32)


def _depthwise(kernel, bias, mean, variance, epsilon, gamma, beta):
    """Depthwise kernels are (..., in, multiplier); channel = i * m + j."""
    k = np.asarray(kernel)
    flat = k.reshape(k.shape[:-2] + (-1,))
    new, new_bias = fold_weights(flat, bias, mean, variance, epsilon, gamma,
                                 beta)
    return new.reshape(k.shape), new_bias


# --- model plumbing -------------------------------------------------------------

@keras.saving.register_keras_serializable(package="renorm_convert")
class ChannelAffine(keras.layers.Layer):
    """`y = x * scale + offset` per channel: a normalization layer that could
    not be folded, at inference."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def build(self, input_shape):
        channels = input_shape[self.axis]
        self.scale = self.add_weight(name="scale", shape=(channels,),
                                     initializer="ones", trainable=False)
        self.offset = self.add_weight(name="offset", shape=(channels,),
                                      initializer="zeros", trainable=False)
        self._shape = [1] * len(input_shape)
        self._shape[self.axis] = channels

    def call(self, inputs, training=None):
        scale = keras.ops.reshape(keras.ops.cast(self.scale, inputs.dtype),
                                  self._shape)
        offset = keras.ops.reshape(keras.ops.cast(self.offset, inputs.dtype),
                                   self._shape)
        return inputs * scale + offset

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def _norm_weights(layer):
    """(mean, variance, epsilon, gamma or None, beta or None) of a BN."""
    value = keras.ops.convert_to_numpy
    return (
        value(layer.moving_mean),
        value(layer.moving_variance),
        layer.epsilon,
        value(layer.gamma) if layer.scale else None,
        value(layer.beta) if layer.center else None,
    )


def _channel_axis(layer, ndim):
    if isinstance(layer, keras.layers.Dense):
        return ndim - 1
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return ndim - 1


def _unfoldable_reason(graph, node_id, calls_of):
    """Why the normalization call `node_id` cannot be folded, or None.

    A layer called several times (a shared layer, or one inside a submodel
    called several times) folds only when every call reads the same producer
    and that producer feeds nothing else in any of its calls.
    """
    data = graph.nodes[node_id]
    layer = data["layer"]
    producer_id = data["inputs"][0]
    for other in calls_of[data["layer_id"]]:
        other_producer = graph.nodes[graph.nodes[other]["inputs"][0]]
        if other_producer["layer_id"] != graph.nodes[producer_id]["layer_id"]:
            return "the normalization layer is shared by calls on " \
                   "different inputs"
    producer = graph.nodes[producer_id]
    player = producer["layer"]
    if producer["kind"] == "input":
        return "its input is a model input"
    if type(player) not in FOLDABLE:
        return f"its input comes from {producer['class_name']} " \
               f"'{producer['path']}', not a Conv or Dense layer"
    if player.activation is not keras.activations.linear:
        return f"'{producer['path']}' has a non-linear activation"
    for call in calls_of[producer["layer_id"]]:
        fed = consumers(graph, call)
        if len(fed) != 1 or graph.nodes.get(fed[0], {}).get(
                "layer_id") != data["layer_id"]:
            return f"the output of '{producer['path']}' has other consumers"
    ndim = len(next(iter(graph.in_edges(node_id, data=True)))[2]["shape"])
    if layer.axis % ndim != _channel_axis(player, ndim):
        return f"it normalizes axis {layer.axis}, not the channels of " \
               f"'{producer['path']}'"
    if getattr(player.dtype_policy, "quantization_mode", None) is not None:
        return f"'{producer['path']}' is quantized"
    return None


# Consumers a normalization folds forward into (input channels on the
# kernel's second-to-last axis, one input, no groups).
FORWARD_FOLDABLE = (keras.layers.Dense, keras.layers.Conv1D,
                    keras.layers.Conv2D, keras.layers.Conv3D)


def _forward_consumers(graph, node_id, calls_of):
    """The layers a normalization call folds forward into: every consumer
    is a Dense or a `padding="valid"` Conv reading its channels, called only
    here; else None."""
    data = graph.nodes[node_id]
    if len(calls_of[data["layer_id"]]) != 1:
        return None
    fed = consumers(graph, node_id)
    if not fed or "<output>" in fed:
        return None
    ndim = len(next(iter(graph.in_edges(node_id, data=True)))[2]["shape"])
    found = {}
    for consumer in fed:
        cdata = graph.nodes[consumer]
        layer = cdata["layer"]
        if type(layer) not in FORWARD_FOLDABLE or len(
                calls_of[cdata["layer_id"]]) != 1:
            return None
        if not isinstance(layer, keras.layers.Dense) and (
                layer.padding != "valid" or layer.groups != 1):
            return None
        if data["layer"].axis % ndim != _channel_axis(layer, ndim):
            return None
        if getattr(layer.dtype_policy, "quantization_mode", None) is not None:
            return None
        found[id(layer)] = cdata
    return list(found.values())


@dataclasses.dataclass
class FoldEntry:
    """Where one normalization layer goes when the model is folded.

    `into` is "producer" (folded into the Conv / Dense that feeds it),
    "consumers" (forward into the Conv / Dense layers it feeds, listed in
    `consumers`), or None (kept as a per-channel scale and offset, for
    `reason`)."""

    path: str
    layer: object
    producer: str
    producer_layer: object
    channels: int
    into: str = None
    consumers: list = dataclasses.field(default_factory=list)
    consumer_layers: list = dataclasses.field(default_factory=list)
    reason: str = None

    @property
    def foldable(self):
        return self.into is not None

    def as_dict(self):
        """The entry for people and JSON: paths and reasons, no objects."""
        return {"path": self.path, "class": type(self.layer).__name__,
                "producer": self.producer, "channels": self.channels,
                "foldable": self.foldable, "into": self.into,
                "consumers": list(self.consumers), "reason": self.reason}


@dataclasses.dataclass
class FoldPlan:
    """`fold_plan`'s answer: one `FoldEntry` per normalization layer, in
    graph order."""

    entries: list

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @property
    def folded(self):
        """Paths of the normalization layers folded into a Conv / Dense."""
        return [e.path for e in self.entries if e.foldable]

    @property
    def unfolded(self):
        """{path: reason} of the ones kept as scale and offset."""
        return {e.path: e.reason for e in self.entries if not e.foldable}


def _held_entries(layer, path):
    """Entries for the normalization a custom layer holds, at any depth.
    Those it holds itself are joined to their neighbours by its Python
    code, so each becomes a ChannelAffine inside the copy of the layer; the
    models it holds are planned as models (their normalization folds into
    their Conv / Dense where it can)."""
    entries = []
    owner = unwrapped(layer)
    for _, _, sub in sublayer_items(owner):
        sub_path = f"{path}/{sub.name}"
        if is_normalization(sub):
            entries.append(FoldEntry(
                path=sub_path, layer=sub, producer=path, producer_layer=layer,
                channels=int(sub.moving_mean.shape[0]),
                reason=f"it is inside custom layer '{path}' "
                       f"({type(owner).__name__}), whose Python code joins "
                       "its sublayers"))
        elif is_graph_model(sub):
            entries += [dataclasses.replace(
                entry, path=f"{sub_path}/{entry.path}",
                producer=f"{sub_path}/{entry.producer}",
                consumers=[f"{sub_path}/{c}" for c in entry.consumers])
                for entry in fold_plan(sub)]
        else:
            entries += _held_entries(sub, sub_path)
    return entries


def fold_plan(model, graph=None):
    """Which normalization layers can be folded, into what: a `FoldPlan`
    with one `FoldEntry` per normalization layer, in graph order (a layer
    called several times folds in all its calls or none)."""
    graph = model_graph(model) if graph is None else graph
    calls_of = {}
    for node_id, d in graph.nodes(data=True):
        calls_of.setdefault(d["layer_id"], []).append(node_id)
    entries = []
    seen = set()
    for node_id in graph.nodes:
        data = graph.nodes[node_id]
        if not is_normalization(data["layer"]):
            if data["layer_id"] not in seen and isinstance(
                    data["layer"], keras.layers.Layer):
                seen.add(data["layer_id"])
                entries += _held_entries(data["layer"], data["path"])
            continue
        if data["layer_id"] in seen:
            continue  # a layer called several times is planned once
        seen.add(data["layer_id"])
        producer_id = data["inputs"][0]
        reason = _unfoldable_reason(graph, node_id, calls_of)
        forward = None if reason is None else _forward_consumers(
            graph, node_id, calls_of)
        entries.append(FoldEntry(
            path=data["path"], layer=data["layer"],
            producer=graph.nodes[producer_id]["path"],
            producer_layer=graph.nodes[producer_id]["layer"],
            channels=int(data["layer"].moving_mean.shape[0]),
            into="consumers" if forward else (
                "producer" if reason is None else None),
            consumers=[c["path"] for c in forward or []],
            consumer_layers=[c["layer"] for c in forward or []],
            reason=None if forward else reason,
        ))
    return FoldPlan(entries)


def _folded_layer(player, name, norm=None, norm_before=None):
    """A copy of `player` named `name`, and its weights by name with `norm`
    (which reads its output) and `norm_before` (which feeds its input)
    folded in."""
    new = clone_layer(player, name=name, use_bias=True,
                      bias_initializer="zeros", bias_regularizer=None,
                      bias_constraint=None)
    weights = values_by_name(player.weights)
    kernel_name, axis = FOLDABLE[type(player)]
    if norm_before is not None:
        weights[kernel_name], weights["bias"] = fold_forward_weights(
            weights[kernel_name], weights.get("bias"),
            *scale_offset(*_norm_weights(norm_before)))
    if norm is None:
        return new, weights
    stats = _norm_weights(norm)
    if axis is None:
        kernel, bias = _depthwise(weights[kernel_name], weights.get("bias"),
                                  *stats)
    else:
        kernel, bias = fold_weights(weights[kernel_name], weights.get("bias"),
                                    *stats, channel_axis=axis)
    weights[kernel_name] = kernel
    weights["bias"] = bias
    return new, weights


def _built_affine(layer):
    """The inference equivalent of a normalization sublayer, built, with its
    values (None for other layers: kept as they are)."""
    if not is_normalization(layer):
        return None
    new, values = _affine(layer, layer.name)
    if not build_like(new, layer, values):
        new.build_from_config(layer.get_build_config())
        assign_by_name(new, values, layer)
    return new


def _affine(norm, name):
    new = ChannelAffine(axis=norm.axis, name=name)
    scale, offset = scale_offset(*_norm_weights(norm))
    return new, {"scale": scale, "offset": offset}


def fold(model, plan=None):
    """An inference-only copy of `model` with its normalization folded.

    Every BatchNormalization or BatchRenormalization whose input comes only
    from a linear Conv*/Dense layer (and feeds nothing else) is folded into
    that layer's kernel and bias (a bias is added if it had none). One that
    cannot fold backward (after Concatenate or Add, say) folds forward when
    every consumer of its output is a Dense or `padding="valid"` Conv
    reading its channels. Any other normalization becomes one
    `ChannelAffine` (per-channel scale and offset), as does normalization
    inside custom layers whose Python code joins their sublayers.
    Nested models are inlined. The input model is not modified.

    Args:
        model: A Keras model (Functional or Sequential).
        plan: `fold_plan(model)`, when the caller has it already.

    Returns:
        The folded `keras.Model`.
    """
    graph = model_graph(model)
    plan = fold_plan(model, graph) if plan is None else plan
    folded_norms = {id(e.layer) for e in plan if e.foldable}
    producers = {id(e.producer_layer): e.layer for e in plan
                 if e.into == "producer"}
    forward = {id(c): e.layer for e in plan if e.into == "consumers"
               for c in e.consumer_layers}
    clones = {}
    pending = []
    used_names = set()

    def clone(site):
        layer = site.layer
        if id(layer) in clones:
            return clones[id(layer)]
        if not isinstance(layer, keras.layers.Layer):
            clones[id(layer)] = layer  # a stateless keras.ops operation
            return layer
        # Inlined submodels may repeat names; a flat model needs unique ones.
        name = layer.name
        if name in used_names:
            name = site.path.replace("/", "_")
        used_names.add(name)
        values = None
        if id(layer) in producers or id(layer) in forward:
            new, values = _folded_layer(layer, name, producers.get(id(layer)),
                                        forward.get(id(layer)))
        elif is_normalization(layer):
            new, values = _affine(layer, name)
        elif sublayer_items(unwrapped(layer)):
            # A custom layer: a copy as it is in memory (its config need not
            # describe it), the normalization it holds as ChannelAffine, the
            # models it holds folded.
            inner = unwrapped(layer)
            new = replace_sublayers(internals.live_copy(inner), inner,
                                    _fold_held, site.path)
            new.name = name
        else:
            new = copy_layer(layer, name=name)
        if values is not None and not build_like(new, layer, values):
            pending.append((new, values, layer))
        clones[id(layer)] = new
        return new

    def visit(site, args, kwargs):
        if id(site.layer) in folded_norms:
            return args[0]
        if is_normalization(site.layer):
            kwargs.pop("training", None)
            kwargs.pop("mask", None)
        return clone(site)(*args, **kwargs)

    new_model = rebuild(model, visit)
    for new, values, old in pending:
        assign_by_name(new, values, old)
    return new_model


def _fold_held(layer, path):
    """`replace_sublayers`'s callback for a custom layer being folded."""
    if is_graph_model(layer):
        return fold(layer)
    return _built_affine(layer)
