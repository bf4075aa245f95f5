"""Custom layers that own normalization sublayers (a block with `self.conv`,
`self.bn`): finding that normalization, and `SwappedBlock`, which keeps such
a block saveable once its sublayers were swapped.

Both `convert` (which swaps the sublayers) and `fold` (which turns them into
per-channel scale and offset) work on these blocks; this module sits below
both.
"""

import inspect

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.transform.graph import is_graph_model
from renorm_convert.layers import BatchRenormalization, is_normalization
from renorm_convert.transform.weights import put, sublayer_items, sublayer_paths


def unwrapped(layer):
    """The custom layer itself, for a SwappedBlock its block."""
    return layer.layer if isinstance(layer, SwappedBlock) else layer


def normalization_sublayers(layer, path=None):
    """(path, layer) of every BatchNormalization (ours included) that a
    custom layer holds in its attributes, at any depth; nested graph models
    are not searched (their normalization is in the graph)."""
    found = []
    path = layer.name if path is None else path
    layer = unwrapped(layer)
    for _, _, sub in sublayer_items(layer):
        sub_path = f"{path}/{sub.name}"
        if is_normalization(sub):
            found.append((sub_path, sub))
        elif not is_graph_model(sub):
            found += normalization_sublayers(sub, sub_path)
    return found


def is_block(layer):
    """A custom layer (not a graph model) owning normalization sublayers."""
    return isinstance(layer, SwappedBlock) or (
        not is_graph_model(layer) and bool(normalization_sublayers(layer)))


@keras.saving.register_keras_serializable(package="renorm_convert")
class SwappedBlock(keras.layers.Layer):
    """A custom layer whose BatchNormalization sublayers became
    BatchRenormalization.

    The block's own `get_config()` describes its original sublayers, so a
    saved model would recreate them as BatchNormalization and then fail to
    load their renorm statistics. This wrapper saves the block's config with
    the configs of its BatchRenormalization sublayers, and puts them back in
    place when the model is loaded. It calls the block, has its name, and
    passes attribute lookups on to it (`wrapper.bn` is the block's `bn`).
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
        for entry in renorm_sublayers or []:
            self._restore(entry["path"], entry["layer"])

    def _restore(self, path, config):
        parent = self.layer
        for attr, index in path[:-1]:
            parent = getattr(parent, attr)
            parent = parent if index is None else parent[index]
        attr, index = path[-1]
        container = getattr(parent, attr)
        old = container if index is None else container[index]
        if isinstance(old, BatchRenormalization):
            return
        new = keras.saving.deserialize_keras_object(config)
        put(parent, attr, index, old, new, f"{self.name}/{old.name}")

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
                {"path": path, "layer": _unbuilt_config(sub)}
                for path, sub in sublayer_paths(
                    self.layer, descend=lambda s: not is_graph_model(s))
                if isinstance(sub, BatchRenormalization)
            ],
        }


def _unbuilt_config(layer):
    """A layer's serialized config without its build config: the block and
    its restored sublayers must be built together, once the swaps are in
    place (`SwappedBlock.build_from_config`)."""
    config = keras.saving.serialize_keras_object(layer)
    config.pop("build_config", None)
    return config
