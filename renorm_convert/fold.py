"""fold: normalization folded into the layer that produces its input, or
forward into the layers that consume its output.

Two levels, as in PyTorch's `torch.nn.utils.fusion`: pure NumPy weight maths
(`fold_weights`, `scale_offset`), and the model plumbing (`fold_plan`,
`fold`) that finds each normalization layer's producer in the model graph and
rebuilds an inference-only model without the normalization layers.
"""

import keras
import numpy as np

from renorm_convert.convert import (SwappedBlock, clone_prebuilt,
                                    copy_weights, mirror_block,
                                    normalization_sublayers)
from renorm_convert.graph import clone_layer, consumers, model_graph, rebuild
from renorm_convert.layers import build_with_values, values_by_name

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
    return (
        layer.moving_mean.numpy(),
        layer.moving_variance.numpy(),
        layer.epsilon,
        layer.gamma.numpy() if layer.scale else None,
        layer.beta.numpy() if layer.center else None,
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


def _unwrapped(layer):
    return layer.layer if isinstance(layer, SwappedBlock) else layer


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


def _block_plan(node_id, data):
    """Plan entries for the normalization a custom layer holds: its Python
    code joins its sublayers, so none of them can be folded; each becomes a
    ChannelAffine inside a copy of the block."""
    prefix = data["path"].rsplit("/", 1)[0] + "/" if "/" in data["path"] else ""
    return [{
        "node": node_id,
        "path": prefix + path,
        "layer": norm,
        "producer": data["path"],
        "producer_layer": data["layer"],
        "channels": int(norm.moving_mean.shape[0]),
        "foldable": False,
        "into": None,
        "consumers": [],
        "consumer_layers": [],
        "reason": f"it is inside custom layer '{data['path']}' "
                  f"({type(_unwrapped(data['layer'])).__name__}), whose "
                  "Python code "
                  "joins its sublayers",
    } for path, norm in normalization_sublayers(data["layer"])]


def fold_plan(model, graph=None):
    """Which normalization calls can be folded, into what.

    Returns a list of dicts, one per normalization layer in graph order
    (its first call; a layer called several times folds in all calls or
    none), with
    `path`, `producer` (the path of the layer producing its input), `layer`,
    `producer_layer`, `foldable` and `reason` (None when foldable).
    """
    graph = model_graph(model) if graph is None else graph
    calls_of = {}
    for node_id, d in graph.nodes(data=True):
        calls_of.setdefault(d["layer_id"], []).append(node_id)
    plan = []
    seen = set()
    for node_id in graph.nodes:
        data = graph.nodes[node_id]
        if not isinstance(data["layer"], keras.layers.BatchNormalization):
            if data["layer_id"] not in seen and isinstance(
                    data["layer"], keras.layers.Layer):
                seen.add(data["layer_id"])
                plan += _block_plan(node_id, data)
            continue
        if data["layer_id"] in seen:
            continue  # a layer called several times is planned once
        seen.add(data["layer_id"])
        producer_id = data["inputs"][0]
        reason = _unfoldable_reason(graph, node_id, calls_of)
        forward = None if reason is None else _forward_consumers(
            graph, node_id, calls_of)
        plan.append({
            "node": node_id,
            "path": data["path"],
            "layer": data["layer"],
            "producer": graph.nodes[producer_id]["path"],
            "producer_layer": graph.nodes[producer_id]["layer"],
            "channels": int(data["layer"].moving_mean.shape[0]),
            "foldable": reason is None or forward is not None,
            "reason": None if forward else reason,
            # "producer", or "consumers" (folded forward into those).
            "into": "consumers" if forward else (
                "producer" if reason is None else None),
            "consumers": [c["path"] for c in forward or []],
            "consumer_layers": [c["layer"] for c in forward or []],
        })
    return plan


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
    if not isinstance(layer, keras.layers.BatchNormalization):
        return None
    new, values = _affine(layer, layer.name)
    if not _build_with_values(new, layer, values):
        new.build_from_config(layer.get_build_config())
        _assign_by_name(new, values, layer)
    return new


def _build_with_values(new, old, values):
    """Builds `new` as `old` was built, each weight created with the value
    of its name in `values`; False (nothing done) when `old` recorded no
    build (the rebuild builds `new`, and `_assign_by_name` follows)."""
    build_config = old.get_build_config()
    if not build_config:
        return False
    used = build_with_values(new, None, values,
                             build=lambda: new.build_from_config(build_config))
    _check_names(new, values, used, old)
    return True


def _assign_by_name(new, values, old):
    """Assigns each weight of the built `new` the value of its name."""
    names = [v.path.split("/")[-1] for v in new.weights]
    _check_names(new, values, [n for n in names if n in values], old)
    for variable, name in zip(new.weights, names):
        variable.assign(values[name])


def _check_names(new, values, used, old):
    names = [v.path.split("/")[-1] for v in new.weights]
    missing = [n for n in names if n not in used]
    unused = [n for n in values if n not in used]
    if missing or unused:
        what = (f"a weight '{missing[0]}' with no value" if missing
                else f"no weight '{unused[0]}'")
        raise ValueError(
            f"The folded copy of layer '{old.name}' ({type(old).__name__}) "
            f"has {what} (weights move by name; it has {sorted(names)}, the "
            f"values are {sorted(values)}). Fix get_config() of that class."
        )


def _affine(norm, name):
    new = ChannelAffine(axis=norm.axis, name=name)
    scale, offset = scale_offset(*_norm_weights(norm))
    return new, {"scale": scale, "offset": offset}


def fold(model):
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

    Returns:
        The folded `keras.Model`, with `folded` (paths of the folded layers)
        and `unfolded` (path -> reason) attributes.
    """
    graph = model_graph(model)
    plan = fold_plan(model, graph)
    folded_norms = {id(p["layer"]): p for p in plan if p["foldable"]}
    producers = {id(p["producer_layer"]): p["layer"] for p in plan
                 if p["into"] == "producer"}
    forward = {id(c): p["layer"] for p in plan if p["into"] == "consumers"
               for c in p["consumer_layers"]}
    clones = {}
    pending = []
    blocks = []
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
        elif isinstance(layer, keras.layers.BatchNormalization):
            new, values = _affine(layer, name)
        elif isinstance(layer, SwappedBlock) or normalization_sublayers(layer):
            inner = layer.layer if isinstance(layer, SwappedBlock) else layer
            new = clone_layer(inner, name=name)
            blocks.append((new, layer, site.path))
        else:
            new = clone_prebuilt(layer, name=name)
            if new is None:
                # Built by the rebuild's call; its weights follow by name.
                new = clone_layer(layer, name=name)
                if layer.weights:
                    pending.append((new, None, layer))
        if values is not None and not _build_with_values(new, layer, values):
            pending.append((new, values, layer))
        clones[id(layer)] = new
        return new

    def visit(site, args, kwargs):
        if id(site.layer) in folded_norms:
            return args[0]
        if isinstance(site.layer, keras.layers.BatchNormalization):
            kwargs.pop("training", None)
            kwargs.pop("mask", None)
        return clone(site)(*args, **kwargs)

    new_model = rebuild(model, visit)
    for new, values, old in pending:
        if values is None:
            copy_weights(old, new)
        else:
            _assign_by_name(new, values, old)
    for new, old, path in blocks:
        mirror_block(new, old, _built_affine, path)
    new_model.folded = [p["path"] for p in plan if p["foldable"]]
    new_model.unfolded = {p["path"]: p["reason"] for p in plan
                          if not p["foldable"]}
    return new_model
