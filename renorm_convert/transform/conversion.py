"""Model transforms that keep weights: `convert` / `revert` (normalization
layers swapped), `copy_model` and `recast`. Each returns a new model and
leaves its input as it was.

Functional and Sequential models (nested ones too) are rebuilt with
`keras.models.clone_model(..., recursive=True)`, which keeps the graph, shared
layers and input / output names; the weights, which clone_model does not copy,
are moved by name (`weights`). A layer whose config does not recreate it
is copied as it is in memory instead (`keras_hooks.live_copy`).
Subclassed models and custom layers that own
BatchNormalization sublayers are copied and their tracked sublayers swapped
in place, as PyTorch's `convert_sync_batchnorm` does.
"""

import dataclasses
import re

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.transform.blocks import (SwappedBlock, is_block,
                                   normalization_sublayers, unwrapped)
from renorm_convert.errors import RenormConvertError
from renorm_convert.transform.graph import is_graph_model, iter_layers
from renorm_convert.layers import BatchRenormalization
from renorm_convert.transform.weights import (WeightsError, clone_layer,
                                    clone_prebuilt, clone_with_weights,
                                    copy_weights, mirror, put, sublayer_items)


class ConversionError(RenormConvertError):
    """A model or layer cannot be converted; the message names it and why."""


@dataclasses.dataclass
class ConversionReport:
    """What a transform changed: the paths of the layers it swapped
    (`inner/bn_3`, `block/bn` for a custom layer's sublayer)."""

    swapped: list

    def __len__(self):
        return len(self.swapped)


def brief(error, limit=240):
    """An exception as one short line, for messages that embed it."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def _is_plain_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(
        layer, BatchRenormalization
    )


def _compile(pattern, name):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ConversionError(
            f"Expected `{name}` to be a regular expression ({e}). "
            "Received: {arg}", name, pattern) from None


def _selector(include, exclude):
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    def selected(layer):
        if inc is not None and not inc.search(layer.name):
            return False
        return not (exc is not None and exc.search(layer.name))

    return selected


def convert(model, *, include=None, exclude=None, report=False,
            **layer_options):
    """A copy of `model` with every BatchNormalization a BatchRenormalization.

    Each new layer starts from the old one's gamma, beta and moving
    statistics (see `BatchRenormalization.from_batchnorm`), so inference
    outputs are unchanged; every other layer keeps its weights, trainable flag
    and name. Layers that are already BatchRenormalization are kept as they
    are. The input model is not modified.

    Args:
        model: A Keras model: Sequential, Functional (nested models, shared
            layers, several inputs and outputs), or subclassed.
        include: Regular expression; only layers whose name matches it are
            converted.
        exclude: Regular expression; layers whose name matches it are not.
        report: Also return a `ConversionReport` (what was converted).
        **layer_options: Passed to every new layer (r_max, d_max,
            renorm_momentum, microbatch_size, ...).

    Returns:
        The new `keras.Model`, or `(model, ConversionReport)` with
        `report=True`.

    Example:
    >>> renormed = convert(keras.applications.ResNet50(), r_max=1, d_max=0)
    """
    # Fail early, with the argument's name, on options the layer refuses.
    BatchRenormalization(**layer_options)
    selected = _selector(include, exclude)

    def swap(layer):
        if _is_plain_bn(layer) and selected(layer):
            return BatchRenormalization.from_batchnorm(layer, **layer_options)
        return None

    return _transform(model, swap, report)


def revert(model, *, report=False):
    """A copy of `model` with every BatchRenormalization a plain
    `keras.layers.BatchNormalization` (gamma, beta and the current moving
    statistics), for people who do not have this package."""

    def swap(layer):
        if isinstance(layer, BatchRenormalization):
            return layer.to_batchnorm()
        return None

    return _transform(model, swap, report)


def copy_model(model):
    """A copy of `model` with the same layers, weights and statistics
    (e.g. to re-create it inside a distribution scope)."""
    return _transform(model, lambda layer: None, False)


def recast(model, dtype_policy):
    """A copy of `model` whose layers compute under `dtype_policy`
    (e.g. "mixed_float16"); weights and statistics stay float32."""
    try:
        policy = keras.dtype_policies.get(dtype_policy)
    except ValueError:
        raise ConversionError(
            "{arg}: expected a Keras dtype policy such as 'mixed_float16' "
            "or 'mixed_bfloat16'.", "dtype_policy", dtype_policy) from None

    def swap(layer):
        if isinstance(layer, keras.layers.InputLayer) or is_graph_model(layer):
            return None
        return clone_with_weights(layer, dtype=policy)

    new = _transform(model, swap, False)
    # The models themselves take the policy too: `compile` reads the
    # model's to add loss scaling (a LossScaleOptimizer) under
    # mixed_float16.
    for graph in [new] + [layer for layer in iter_layers(new)
                          if is_graph_model(layer)]:
        graph.dtype_policy = policy
    return new


def _transform(model, swap, report):
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise ConversionError(
            f"Model '{model.name}' is not built, so it has no weights to "
            "keep. Build it first, e.g. `model.build((None, ...))` or call it "
            "on a batch.")
    swapped = []
    if is_graph_model(model):
        new = _transform_graph_model(model, swap, swapped)
    else:
        new = _copy_subclassed(model)
        mirror(new, model, _replacer(swap, swapped), model.name)
    if report:
        return new, ConversionReport(swapped)
    return new


def _replacer(swap, swapped):
    """`mirror`'s callback: a swapped sublayer, a transformed nested graph
    model, or None (mirror it)."""

    def replace(old_sub, path):
        replacement = swap(old_sub)
        if replacement is not None:
            swapped.append(path)
            return replacement
        if is_graph_model(old_sub):
            return _transform_graph_model(old_sub, swap, swapped)
        return None

    return replace


def _transform_graph_model(model, swap, swapped):
    """`model` rebuilt by `keras.models.clone_model`, each layer replaced by
    a copy with its weights (or by what `swap` makes of it).

    A layer is copied from its config where that recreates it; one whose
    config does not (sublayers made in `build()` from arguments the config
    leaves out, a loaded Lambda whose function cannot be found again) is
    copied as it is in memory (`live_copy`) and the rebuild starts over."""
    live = set()
    while True:
        attempt = []
        try:
            new_model = _rebuild_graph_model(model, swap, attempt, live)
        except _NeedsLiveCopy as retry:
            ids = {id(layer) for layer in retry.layers}
            if ids <= live:
                raise retry.error
            live |= ids
            continue
        swapped += attempt
        return new_model


class _NeedsLiveCopy(Exception):
    """The rebuild failed where these layers, copied from their configs,
    may be why: it starts over with them copied live."""

    def __init__(self, layers, error):
        super().__init__(str(error))
        self.layers, self.error = layers, error


def _live_block(inner, swap, swapped, path):
    """A live copy of the custom layer `inner`, its normalization sublayers
    swapped in place (the copy's own, so the original is untouched)."""
    new = internals.live_copy(inner)

    def swap_in(layer, layer_path):
        for attr, index, sub in sublayer_items(layer):
            sub_path = f"{layer_path}/{sub.name}"
            replacement = swap(sub)
            if replacement is not None:
                swapped.append(sub_path)
                put(layer, attr, index, sub, replacement, sub_path)
            elif not is_graph_model(sub):
                swap_in(sub, sub_path)

    swap_in(new, path)
    return new


def _rebuild_graph_model(model, swap, swapped, live):
    pairs = []

    def copy_of(layer):
        """A config copy of `layer`, or a live copy where the config cannot
        recreate it."""
        if id(layer) in live or isinstance(layer, keras.layers.Lambda):
            # A loaded Lambda's function may not survive its config (code
            # that names its module's helpers): the loaded one is kept.
            return internals.live_copy(layer), False
        try:
            new = clone_layer(layer)
        except Exception:  # the config does not recreate it: any error
            return internals.live_copy(layer), False
        if not _recreates(new, layer):
            return internals.live_copy(layer), False
        return new, True

    def clone_function(layer):
        if not isinstance(layer, keras.layers.Layer):
            # A raw operation (`x + 3.0`, `keras.ops.pad`, slicing): no
            # weights, nothing to swap.
            return _clone_operation(layer)
        replacement = swap(layer)
        if replacement is not None:
            swapped.append(layer.name)
            return replacement
        if is_block(layer):
            # A custom block owning normalization: a fresh copy, its
            # sublayers mirrored (and swapped) once the rebuild built it.
            inner = unwrapped(layer)
            new, from_config = copy_of(inner)
            if from_config:
                pairs.append((inner, new))
            else:
                new = _live_block(new, swap, swapped, inner.name)
            return SwappedBlock(new) if _will_hold_renorm(inner, swap) else new
        if id(layer) not in live:
            new = clone_prebuilt(layer)
            if new is not None:
                return new
        new, from_config = copy_of(layer)
        if from_config:
            pairs.append((layer, new))
        return new

    input_tensors = None
    if not isinstance(model, keras.Sequential):
        # clone_model names new inputs after the input tensors; keep the
        # input layers' names, which are what users and exporters see.
        input_tensors = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype,
                                  name=internals.producing_operation(t).name),
            model.input,
        )
    try:
        new_model = keras.models.clone_model(
            model, clone_function=clone_function, recursive=True,
            input_tensors=input_tensors,
        )
    except Exception as e:  # clone_model raises many types for one cause
        error = ConversionError(
            f"Could not rebuild model '{model.name}': {brief(e)}")
        error.__cause__ = e
        # A copy from a config that does not describe its layer (which
        # built nothing before the call) breaks the rebuild this way too.
        raise _NeedsLiveCopy([old for old, _ in pairs if old.weights],
                             error) from e
    for old, new in pairs:
        try:
            if sublayer_items(old):
                # A custom layer owning sublayers (maybe BatchNormalization).
                mirror(new, old, _replacer(swap, swapped), old.name)
            else:
                copy_weights(old, new)
        except WeightsError as e:
            raise _NeedsLiveCopy([old], e) from e
    return new_model


def _recreates(new, old):
    """Whether `new`, a copy of `old` from its config, built as `old` was,
    has weights of the same shapes; True where `old` recorded no build (the
    weights are compared once the rebuild has built the copy), and where
    the copy's sublayers build only when it is called."""
    build_config = old.get_build_config()
    if not old.weights or not build_config:
        return True
    try:
        new.build_from_config(build_config)
    except Exception:  # a config that does not build as the original did
        return False
    if not new.weights:
        return True  # its sublayers build on the first call
    shapes = sorted(tuple(v.shape) for v in new.weights)
    return shapes == sorted(tuple(v.shape) for v in old.weights)


def _will_hold_renorm(layer, swap):
    """Whether a custom layer holds BatchRenormalization once `swap` has
    replaced what it replaces."""
    for _, sub in normalization_sublayers(layer):
        replacement = swap(sub)
        if isinstance(sub if replacement is None else replacement,
                      BatchRenormalization):
            return True
    return False


def _clone_operation(op):
    """A fresh copy of a stateless `keras.Operation` where its config
    recreates it, else the operation itself (it holds no state, so the new
    graph may share it)."""
    try:
        return type(op).from_config(op.get_config())
    except Exception:  # ops without a usable config: share the stateless op
        return op


def _copy_subclassed(model):
    """A fresh, built instance of a subclassed model (weights not copied)."""
    try:
        config = keras.saving.serialize_keras_object(model)
        with keras.saving.custom_object_scope(
            {type(model).__name__: type(model)}
        ):
            new = keras.saving.deserialize_keras_object(config)
        if not new.built:
            new.build_from_config(model.get_build_config())
    except Exception as e:
        raise ConversionError(
            f"Subclassed model '{model.name}' ({type(model).__name__}) cannot "
            f"be copied ({brief(e)}). Give the class a "
            "get_config() (and from_config()) that recreates it, or build it "
            "as a Functional model.") from e
    return new
