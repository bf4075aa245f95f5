"""Keras 2 `.h5` files whose functional graphs call TensorFlow directly.

Keras 2 recorded `x + 3.0`, `tf.nn.relu6(x)` or `x[:, 1:]` in a functional
model as `TFOpLambda` / `SlicingOpLambda` layers that name a TensorFlow API
function; Keras 3 has no such layers and refuses those files. These layers
run the named function (looked up in the `tf` namespace only, so a file can
name no other code) and save like any Keras 3 layer.
"""

import json

import h5py
import keras
import tensorflow as tf

from renorm_convert import _keras_internals as internals

TF_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")


def _tf_function(name):
    """`tf.<name>` for a dotted name such as `math.multiply`."""
    target = tf
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(
                f"'tf.{name}' is not a TensorFlow function here (the file "
                "was saved with another TensorFlow version?)"
            )
    if not callable(target):
        raise ValueError(f"'tf.{name}' is not a function")
    return target


@keras.saving.register_keras_serializable(package="renorm_convert")
class TFOpLambda(keras.layers.Layer):
    """Calls `tf.<function>`; `tensor_kwargs` names keyword arguments that
    were tensors, which arrive after the first input."""

    def __init__(self, function, tensor_kwargs=(), **kwargs):
        super().__init__(**kwargs)
        self.function = function
        self.tensor_kwargs = list(tensor_kwargs)
        self._fn = _tf_function(function)

    def _arguments(self, inputs, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        if self.tensor_kwargs:
            inputs = list(inputs)
            given = inputs[len(inputs) - len(self.tensor_kwargs):]
            inputs = inputs[: len(inputs) - len(self.tensor_kwargs)]
            inputs = inputs[0] if len(inputs) == 1 else inputs
            kwargs.update(zip(self.tensor_kwargs, given))
        return inputs, kwargs

    def call(self, inputs, *args, **kwargs):
        inputs, kwargs = self._arguments(inputs, kwargs)
        return self._fn(inputs, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "function": self.function,
                "tensor_kwargs": self.tensor_kwargs}


@keras.saving.register_keras_serializable(package="renorm_convert")
class SlicingOpLambda(TFOpLambda):
    """`x[slice_spec]`, the spec as Keras 2 saved it (dicts for slices)."""

    def call(self, inputs, *args, slice_spec=None, **kwargs):
        inputs, kwargs = self._arguments(inputs, kwargs)
        spec = slice_spec if slice_spec is not None else args[0]
        return inputs[tuple(_slice(s) for s in _as_list(spec))]


def _as_list(spec):
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _slice(item):
    if isinstance(item, dict) and set(item) <= {"start", "stop", "step"}:
        return slice(item.get("start"), item.get("stop"), item.get("step"))
    if item == "Ellipsis" or item is Ellipsis:
        return Ellipsis
    return None if item == "None" else item


def _is_tensor_ref(value, layer_names):
    return (isinstance(value, list) and len(value) == 3
            and isinstance(value[0], str) and value[0] in layer_names
            and all(isinstance(v, int) for v in value[1:]))


def _rewrite(config):
    """Moves tensors passed as keyword arguments of TF-op layers (Keras 2's
    `[layer, node, index]` references, which Keras 3 does not resolve) to
    extra inputs of the call."""
    layers = config["config"]["layers"]
    names = {layer["name"] for layer in layers}
    for layer in layers:
        if layer["class_name"] not in TF_OP_CLASSES:
            continue
        tensor_kwargs = []
        nodes = layer.get("inbound_nodes", [])
        # Keras 2 wrote a TF-op call on one tensor as one flat entry,
        # `[layer, node, index, kwargs]`, where other layers have a list of
        # entries.
        nodes[:] = [[n] if n and isinstance(n[0], str) else n for n in nodes]
        for node in nodes:
            if not node or len(node[-1]) != 4:
                continue
            kwargs = dict(node[-1][3])
            refs = {k: v for k, v in kwargs.items()
                    if _is_tensor_ref(v, names)}
            if not refs:
                continue
            for key in refs:
                del kwargs[key]
            node[:] = [entry[:3] for entry in node]
            node += [list(ref) for ref in refs.values()]
            # Keras 3 takes the keyword arguments from the last input.
            node[-1] = node[-1] + [kwargs]
            tensor_kwargs = list(refs)
        layer["config"]["tensor_kwargs"] = tensor_kwargs
    return config


def uses_tf_ops(path):
    """Whether an `.h5` model file holds Keras 2 TF-op layers."""
    try:
        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
    except OSError:
        return False
    if config is None:
        return False
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    return any(f'"class_name": "{name}"' in config for name in TF_OP_CLASSES)


def load_h5_with_tf_ops(path, custom_objects=None):
    """A Keras-2 `.h5` functional model with TF-op layers, as Keras 3."""
    with h5py.File(path, "r") as f:
        config = f.attrs["model_config"]
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    config = _rewrite(json.loads(config))
    objects = {"TFOpLambda": TFOpLambda, "SlicingOpLambda": SlicingOpLambda,
               **(custom_objects or {})}
    with keras.saving.custom_object_scope(objects):
        model = internals.legacy_model_from_config(config,
                                                   custom_objects=objects)
    model.load_weights(path)
    return model
