"""The one way the transforms copy a model: `copy_layer` copies any layer
with its weights (in new variables), `replace_sublayers` puts replacements
where a copy holds sublayers, and `transform` runs both over a whole model
(Functional, Sequential, nested or subclassed) with a `swap(layer)` that
says what replaces a layer, or None to copy it. `convert`, `revert`,
`copy_model`, `recast` and `fold` all copy through here, so every one of
them reaches every layer: those of nested models, those a custom layer
holds, and those of the models a custom layer holds.

How a layer is copied is decided from what it is, before copying:

* a leaf layer that recorded its build: from its config, each weight
  created directly from the original's value, by name
  (`weights.clone_prebuilt`); as it is in memory where that config does
  not recreate the same weights (other names, other shapes);
* a leaf layer without weights: from its config;
* a layer that holds sublayers (a custom block), a Lambda (a loaded one's
  function may name helpers its config cannot reach), or one with weights
  but no record of its build: as it is in memory (`live_copy`: every
  sublayer and variable copied, nothing recreated from a config, as
  torch's fusion code deep-copies a module), so nothing depends on its
  config describing it; what it holds is then replaced in place;
* a graph model, at any depth (inside a custom layer too): rebuilt by
  `keras.models.clone_model`, its layers copied as above;
* a subclassed model (the one given; a live copy would share its compile
  state): from its config, sublayers paired by the attribute that holds
  them, each layer's own weights moved by name.
"""

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.errors import RenormConvertError
from renorm_convert.layers import renorm_layers
from renorm_convert.transform.blocks import SwappedBlock, unwrapped
from renorm_convert.transform.graph import is_graph_model
from renorm_convert.transform.weights import (clone_layer, clone_prebuilt,
                                              copy_weights, put,
                                              sublayer_items)


def brief(error, limit=240):
    """An exception as one short line, for messages that embed it."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def copies_live(layer):
    """Whether `copy_layer` copies `layer` as it is in memory (rather than
    from its config): it holds sublayers, is a Lambda, or has weights
    without a record of how it was built."""
    return (isinstance(layer, keras.layers.Lambda)
            or bool(sublayer_items(layer))
            or bool(layer.weights and not layer.get_build_config()))


def copy_layer(layer, *, name=None):
    """A built copy of `layer` (not a graph model) with its weights in new
    variables, named `name` when given. A stateless `keras.Operation`
    (`x + 3.0`, slicing) is copied from its config where that works, else
    shared (it holds nothing)."""
    if not isinstance(layer, keras.layers.Layer):
        return _copy_operation(layer)
    if not copies_live(layer):
        new = _from_config(layer, {} if name is None else {"name": name})
        if new is not None:
            return new
    new = internals.live_copy(layer)
    if name is not None:
        new.name = name
    return new


def _from_config(layer, overrides):
    """`layer` from its config: built with its weights by name, or unbuilt
    when it has none; None where the config does not recreate it."""
    if layer.weights:
        return clone_prebuilt(layer, **overrides)
    try:
        return clone_layer(layer, **overrides)
    except Exception:  # noqa: BLE001  a config that cannot recreate it
        return None    # (any error of the layer's own code): copied live


def _copy_operation(op):
    try:
        return type(op).from_config(op.get_config())
    except Exception:  # noqa: BLE001  an op without a usable config:
        return op      # stateless, so the new graph may share it


def replace_sublayers(new, old, replace, path):
    """In `new`, a copy of the custom layer `old` (the same sublayers in the
    same attributes), puts `replace(old_sub, sub_path)` in place of each
    sublayer where that gives a layer, and goes into the others, at any
    depth; a graph model is never gone into (`replace` must rebuild it,
    since a live copy of one cannot be cloned). Returns `new`."""
    copies = {(attr, index): sub for attr, index, sub in sublayer_items(new)}
    for attr, index, old_sub in sublayer_items(old):
        sub_path = f"{path}/{old_sub.name}"
        new_sub = copies[(attr, index)]
        replacement = replace(old_sub, sub_path)
        if replacement is not None:
            put(new, attr, index, new_sub, replacement, sub_path)
        elif not is_graph_model(old_sub):
            replace_sublayers(new_sub, old_sub, replace, sub_path)
    return new


class _Transform:
    """One transform of one model: `swap(layer)` gives what replaces a
    layer (or None: copy it), at any depth."""

    def __init__(self, swap):
        self.swap = swap

    def layer(self, layer, path):
        """What replaces `layer` in the new model."""
        replacement = self.swap(layer)
        if replacement is not None:
            return replacement
        if is_graph_model(layer):
            return self.graph(layer)
        if isinstance(layer, keras.layers.Layer) and sublayer_items(
                unwrapped(layer)):
            return self.block(layer, path)
        return copy_layer(layer)

    def sublayer(self, layer, path):
        """`replace_sublayers`'s callback: a swapped or rebuilt sublayer,
        or None (its live copy stays, and is gone into)."""
        replacement = self.swap(layer)
        if replacement is None and is_graph_model(layer):
            replacement = self.graph(layer)
        return replacement

    def block(self, layer, path):
        """A live copy of the custom layer, what it holds replaced; wrapped
        to save its BatchRenormalization sublayers where it holds any."""
        inner = unwrapped(layer)
        new = replace_sublayers(internals.live_copy(inner), inner,
                                self.sublayer, path)
        return SwappedBlock(new) if renorm_layers(new) else new

    def graph(self, model):
        """A Functional or Sequential model rebuilt by clone_model."""
        input_tensors = None
        if not isinstance(model, keras.Sequential):
            # clone_model names new inputs after the input tensors; keep
            # the input layers' names, which users and exporters see.
            input_tensors = keras.tree.map_structure(
                lambda t: keras.Input(
                    batch_shape=t.shape, dtype=t.dtype,
                    name=internals.producing_operation(t).name),
                model.input)
        try:
            return keras.models.clone_model(
                model, clone_function=lambda layer: self.layer(
                    layer, layer.name), recursive=True,
                input_tensors=input_tensors)
        except RenormConvertError:
            raise
        except Exception as e:  # noqa: BLE001  clone_model's many types
            raise RenormConvertError(
                f"Could not rebuild model '{model.name}': {brief(e)}") from e

    def subclassed(self, model):
        """A subclassed model from its config, each sublayer paired with
        its original by attribute: swapped, rebuilt (graph models), a live
        copy (custom blocks, and layers the config recreates otherwise),
        or given the original's weights by name."""
        new = _copy_subclassed(model)

        def replace(old_sub, new_sub, path):
            replacement = self.sublayer(old_sub, path)
            if replacement is None and (
                    type(new_sub) is not type(old_sub)
                    or sublayer_items(unwrapped(old_sub))):
                replacement = self.layer(old_sub, path)
            return replacement

        copy_weights(model, new, replace)
        return new


def transform(model, swap):
    """A copy of `model` in which every layer, at any depth, is replaced by
    `swap(layer)` where that gives a layer, and copied otherwise. The input
    is not modified.

    Raises:
        RenormConvertError: `model` is not a built keras.Model, or cannot
            be copied (the message says why and what to do).
    """
    if not isinstance(model, keras.Model):
        raise RenormConvertError(
            f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise RenormConvertError(
            f"Model '{model.name}' is not built, so it has no weights to "
            "keep. Build it first, e.g. `model.build((None, ...))` or call it "
            "on a batch.")
    run = _Transform(swap)
    if is_graph_model(model):
        return run.graph(model)
    return run.subclassed(model)


def _copy_subclassed(model):
    """A fresh, built instance of a subclassed model (weights not copied)."""
    try:
        config = keras.saving.serialize_keras_object(model)
        with keras.saving.custom_object_scope(
                {type(model).__name__: type(model)}):
            new = keras.saving.deserialize_keras_object(config)
        if not new.built:
            new.build_from_config(model.get_build_config())
    except Exception as e:  # noqa: BLE001  the class's own code, any error
        raise RenormConvertError(
            f"Subclassed model '{model.name}' ({type(model).__name__}) cannot "
            f"be copied ({brief(e)}). Give the class a get_config() (and "
            "from_config()) that recreates it, or build it as a Functional "
            "model.") from e
    return new

