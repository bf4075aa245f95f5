"""Custom layers that hold sublayers (a block with `self.conv`, `self.bn`;
a pyramid-pooling layer holding a Sequential per branch): every layer of a
model at any depth with the path users know it by (`layer_paths`), and
`SwappedBlock`, which keeps such a block saveable once its normalization
sublayers were swapped.

`copying` (convert, revert, fold) and `folding` work on these blocks; this
module sits below both.
"""

import inspect

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.layers import BatchRenormalization, renorm_layers
from renorm_convert.transform.graph import is_graph_model, model_graph
from renorm_convert.transform.weights import (put, sublayer_items,
                                              sublayer_paths)


def unwrapped(layer):
    """The custom layer itself, for a SwappedBlock its block."""
    return layer.layer if isinstance(layer, SwappedBlock) else layer


def layer_paths(model):
    """(path, layer) for every layer of `model` at any depth, each once, in
    graph order: the layers of its graph (`inner/bn_3` inside a nested
    model), what custom layers hold (`block/bn`), and the layers of the
    models those hold (`pyramid/branch_1/bn`). Not `model` itself, nor
    input layers."""
    found, seen = [], set()
    _walk(model, "", found, seen)
    return found


def _walk(layer, prefix, found, seen):
    if is_graph_model(layer):
        graph = model_graph(layer)
        for node_id, data in graph.nodes(data=True):
            sub = data["layer"]
            if data["kind"] == "input" or id(sub) in seen or not isinstance(
                    sub, keras.layers.Layer):
                continue
            seen.add(id(sub))
            path = prefix + data["path"]
            found.append((path, sub))
            _walk_held(sub, path, found, seen)
    else:
        _walk_held(layer, prefix.rstrip("/") or layer.name, found, seen)


def _walk_held(layer, path, found, seen):
    """The sublayers a custom layer holds, at any depth."""
    for _, _, sub in sublayer_items(unwrapped(layer)):
        if id(sub) in seen:
            continue
        sub_path = f"{path}/{sub.name}"
        if is_graph_model(sub):
            _walk(sub, sub_path + "/", found, seen)
            continue
        seen.add(id(sub))
        found.append((sub_path, sub))
        _walk_held(sub, sub_path, found, seen)


def _renorm_entries(layer):
    """(attribute path, sublayer) of what a SwappedBlock must save apart
    from its block's config: each BatchRenormalization sublayer, and each
    graph model holding one (whole, as its config has them)."""
    return [(path, sub) for path, sub in sublayer_paths(
                layer, descend=lambda s: not is_graph_model(s))
            if isinstance(sub, BatchRenormalization)
            or (is_graph_model(sub) and renorm_layers(sub))]


@keras.saving.register_keras_serializable(package="renorm_convert")
class SwappedBlock(keras.layers.Layer):
    """A custom layer whose BatchNormalization sublayers became
    BatchRenormalization.

    The block's own `get_config()` describes its original sublayers, so a
    saved model would recreate them as BatchNormalization and then fail to
    load their renorm statistics. This wrapper saves the block's config with
    the configs of its BatchRenormalization sublayers (and of the models it
    holds that contain one), and puts them back in place when the model is
    loaded: at once for sublayers the block makes in `__init__`, after the
    block's own build for those it makes in `build()`. It calls the block,
    has its name, and passes attribute lookups on to it (`wrapper.bn` is the
    block's `bn`).
    """

    def __init__(self, layer, renorm_sublayers=None, **kwargs):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        self.layer = layer
        # Keyword arguments bind as the block's own call binds them.
        internals.adopt_call_signature(self, layer)
        self._pending = list(renorm_sublayers or [])
        self._restore(built=False)

    def _restore(self, built):
        """Puts back each saved sublayer whose place exists by now; the
        others wait for the block's build. `built`: the block is built,
        so the restored layers are built too (from their build configs)."""
        waiting = []
        for entry in self._pending:
            parent = self.layer
            try:
                for attr, index in entry["path"][:-1]:
                    parent = getattr(parent, attr)
                    parent = parent if index is None else parent[index]
                attr, index = entry["path"][-1]
                container = getattr(parent, attr)
                old = container if index is None else container[index]
            except (AttributeError, IndexError, KeyError):
                waiting.append(entry)  # made in the block's build()
                continue
            if isinstance(old, BatchRenormalization):
                continue
            config = dict(entry["layer"])
            if not built:
                config.pop("build_config", None)
            new = keras.saving.deserialize_keras_object(config)
            put(parent, attr, index, old, new, f"{self.name}/{old.name}")
        self._pending = waiting

    def __getattr__(self, name):
        # Only reached when normal lookup fails. On PyTorch a sublayer is a
        # torch Module, kept in `_modules` rather than in `__dict__`.
        if name.startswith("_"):
            raise AttributeError(name)
        layer = self.__dict__.get("layer")
        if layer is None:
            layer = self.__dict__.get("_modules", {}).get("layer")
        if layer is None:
            raise AttributeError(name)
        return layer if name == "layer" else getattr(layer, name)

    def build(self, *args, **kwargs):
        self.built = True  # the block builds itself on its first call

    def get_build_config(self):
        return self.layer.get_build_config()

    def build_from_config(self, config):
        if config and not self.layer.built:
            self.layer.build_from_config(config)
        self._restore(built=True)
        self.built = True

    def call(self, *args, training=None, **kwargs):
        if "training" in inspect.signature(self.layer.call).parameters:
            kwargs["training"] = training
        return self.layer(*args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": _unbuilt_config(self.layer),
            "renorm_sublayers": [
                {"path": path, "layer": keras.saving.serialize_keras_object(
                    sub)} for path, sub in _renorm_entries(self.layer)],
        }


def _unbuilt_config(layer):
    """A layer's serialized config without its build config: the block is
    built by the wrapper once the swaps it can make at once are in place
    (`SwappedBlock.build_from_config`)."""
    config = keras.saving.serialize_keras_object(layer)
    config.pop("build_config", None)
    return config
