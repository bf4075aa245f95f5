"""Model transforms that keep weights: `convert` / `revert` (normalization
layers swapped), and the surgery training needs: `replace_head`,
`freeze_all_but_normalization` / `unfreeze`, `copy_model`, `recast`. Each
returns a new model and leaves its input as it was.

Functional and Sequential models (nested ones too) are rebuilt with
`keras.models.clone_model(..., recursive=True)`, which keeps the graph, shared
layers and input / output names; the weights, which clone_model does not copy,
are moved here layer by layer. Subclassed models and custom layers that own
BatchNormalization sublayers are copied and their tracked sublayers swapped
in place, as PyTorch's `convert_sync_batchnorm` does.
"""

import inspect
import re

import keras

from renorm_convert import _keras_internals as internals
from renorm_convert.graph import clone_layer, is_graph_model
from renorm_convert.layers import (BatchRenormalization, build_with_values,
                                   values_by_name)


class ConversionError(ValueError):
    """A model or layer cannot be converted; the message names it and why."""


def _brief(error, limit=240):
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
        raise ValueError(
            f"Expected `{name}` to be a regular expression. Received: "
            f"{name}={pattern!r} ({e})"
        ) from None


def _selector(include, exclude):
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    def selected(layer):
        if inc is not None and not inc.search(layer.name):
            return False
        return not (exc is not None and exc.search(layer.name))

    return selected


def convert(model, *, include=None, exclude=None, **layer_options):
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
        **layer_options: Passed to every new layer (r_max, d_max,
            renorm_momentum, microbatch_size, ...).

    Returns:
        The new `keras.Model`; `model.renorm_converted` lists the names of the
        converted layers.

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

    return _transform(model, swap, "renorm_converted")


def revert(model):
    """A copy of `model` with every BatchRenormalization a plain
    `keras.layers.BatchNormalization` (gamma, beta and the current moving
    statistics), for people who do not have this package."""

    def swap(layer):
        if isinstance(layer, BatchRenormalization):
            return layer.to_batchnorm()
        return None

    return _transform(model, swap, "renorm_reverted")


def copy_model(model):
    """A copy of `model` with the same layers, weights and statistics
    (e.g. to re-create it inside a `tf.distribute` strategy scope)."""
    return _transform(model, lambda layer: None, "copied")


def recast(model, dtype_policy):
    """A copy of `model` whose layers compute under `dtype_policy`
    (e.g. "mixed_float16"); weights and statistics stay float32."""
    policy = keras.dtype_policies.get(dtype_policy)

    def swap(layer):
        if isinstance(layer, keras.layers.InputLayer) or is_graph_model(layer):
            return None
        return _clone_with_weights(layer, dtype=policy)

    return _transform(model, swap, "recast")


def _is_strided_pointwise(layer):
    return (isinstance(layer, keras.layers.Conv2D)
            and tuple(layer.kernel_size) == (1, 1)
            and max(layer.strides) > 1
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1)


def subsample_strided_pointwise(model):
    """Makes every 1x1 `Conv2D` with strides (s, t) > 1 of `model` (nested
    models too) compute `x[:, ::s, ::t]` followed by a stride-1 convolution
    with the same kernel: the same output (a 1x1 kernel reads exactly those
    pixels, under "valid" and "same" padding alike) and the same weights.

    Why: TensorFlow 2.21's oneDNN CPU kernel for the weight gradient of a
    strided 1x1 convolution corrupts the heap on AVX-512 machines once the
    input is about 56x56 or larger, and the process dies (ResNet and
    Xception projection shortcuts). The stride-1 kernel is not affected.

    Unlike the transforms above this changes `model` in place, for a copy
    its caller owns (`fine_tune` trains one): only the layers' convolution
    is replaced, so configs, weights and saved files are unchanged.
    `restore_strided_pointwise` undoes it. Returns how many layers changed.
    """
    changed = 0
    for layer in internals.flatten_layers(model):
        if not _is_strided_pointwise(layer) or \
                "convolution_op" in layer.__dict__:
            continue
        object.__setattr__(layer, "convolution_op",
                           _subsampled_convolution(layer))
        changed += 1
    return changed


def restore_strided_pointwise(model):
    """Undoes `subsample_strided_pointwise`; returns how many layers."""
    restored = 0
    for layer in internals.flatten_layers(model):
        if "convolution_op" in layer.__dict__:
            object.__delattr__(layer, "convolution_op")
            restored += 1
    return restored


def _subsampled_convolution(layer):
    sh, sw = layer.strides
    fmt = layer.data_format

    def convolution_op(inputs, kernel):
        if fmt == "channels_last":
            inputs = inputs[:, ::sh, ::sw, :]
        else:
            inputs = inputs[:, :, ::sh, ::sw]
        return keras.ops.conv(inputs, kernel, strides=1, padding="valid",
                              data_format=fmt)

    return convolution_op


def _transform(model, swap, record):
    if not isinstance(model, keras.Model):
        raise ConversionError(
            "Expected a keras.Model. Received: "
            f"{type(model).__name__}"
        )
    if not model.built:
        raise ConversionError(
            f"Model '{model.name}' is not built, so it has no weights to "
            "keep. Build it first, e.g. `model.build((None, ...))` or call it "
            "on a batch."
        )
    swapped = []
    if is_graph_model(model):
        new = _transform_graph_model(model, swap, swapped)
    else:
        new = _copy_subclassed(model)
        _mirror(new, model, swap, swapped, model.name)
    setattr(new, record, swapped)
    return new


def _transform_graph_model(model, swap, swapped):
    pairs = []

    def clone_function(layer):
        if not isinstance(layer, keras.layers.Layer):
            # A raw operation (`x + 3.0`, `keras.ops.pad`, slicing): no
            # weights, nothing to swap.
            return _clone_operation(layer)
        replacement = swap(layer)
        if replacement is not None:
            swapped.append(layer.name)
            return replacement
        if isinstance(layer, SwappedBlock) or (
                not is_graph_model(layer) and normalization_sublayers(layer)):
            # A custom block owning normalization: a fresh copy, its
            # sublayers mirrored (and swapped) once the rebuild built it.
            inner = layer.layer if isinstance(layer, SwappedBlock) else layer
            new = clone_layer(inner)
            pairs.append((inner, new))
            return SwappedBlock(new) if _will_hold_renorm(inner, swap) else new
        new = clone_prebuilt(layer)
        if new is None:
            new = clone_layer(layer)
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
        raise ConversionError(
            f"Could not rebuild model '{model.name}': {_brief(e)}"
        ) from e
    for old, new in pairs:
        if _sublayer_items(old):
            # A custom layer owning sublayers (maybe BatchNormalization).
            _mirror(new, old, swap, swapped, old.name)
        else:
            copy_weights(old, new)
    return new_model


def normalization_sublayers(layer, path=None):
    """(path, layer) of every BatchNormalization (ours included) that a
    custom layer holds in its attributes, at any depth; nested graph models
    are not searched (their normalization is in the graph)."""
    found = []
    path = layer.name if path is None else path
    if isinstance(layer, SwappedBlock):
        layer = layer.layer
    for _, _, sub in _sublayer_items(layer):
        sub_path = f"{path}/{sub.name}"
        if isinstance(sub, keras.layers.BatchNormalization):
            found.append((sub_path, sub))
        elif not is_graph_model(sub):
            found += normalization_sublayers(sub, sub_path)
    return found


def _will_hold_renorm(layer, swap):
    """Whether a custom layer holds BatchRenormalization once `swap` has
    replaced what it replaces."""
    for _, sub in normalization_sublayers(layer):
        replacement = swap(sub)
        if isinstance(sub if replacement is None else replacement,
                      BatchRenormalization):
            return True
    return False


def mirror_block(new, old, swap, path):
    """Makes the built custom layer `new` (a fresh copy of `old`) hold
    `old`'s weights, with the sublayers that `swap` replaces replaced;
    returns the paths of the replaced ones."""
    swapped = []
    _mirror(new, old.layer if isinstance(old, SwappedBlock) else old, swap,
            swapped, path)
    return swapped


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
        _put(parent, attr, index, old, new, f"{self.name}/{old.name}")

    def __getattr__(self, name):
        # Only reached when normal lookup fails; never during __init__.
        layer = self.__dict__.get("layer")
        if layer is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(layer, name)

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
                for path, sub in _sublayer_paths(self.layer)
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


def _sublayer_paths(layer, prefix=()):
    """([(attribute, index or None), ...], sublayer) for every sublayer of a
    custom layer, at any depth, graph models not searched."""
    found = []
    for attr, index, sub in _sublayer_items(layer):
        path = prefix + ((attr, index),)
        found.append((list(map(list, path)), sub))
        if not is_graph_model(sub):
            found += _sublayer_paths(sub, path)
    return found


def _clone_operation(op):
    """A fresh copy of a stateless `keras.Operation` where its config
    recreates it, else the operation itself (it holds no state, so the new
    graph may share it)."""
    try:
        return type(op).from_config(op.get_config())
    except Exception:  # ops without a usable config: share the stateless op
        return op


def clone_prebuilt(layer, **overrides):
    """A clone of a plain (no sublayers) built layer whose weights are
    created with the original's values, by name; None where that does not
    apply (the caller then copies weights after the rebuild)."""
    if not layer.weights or not layer.built or _sublayer_items(layer):
        return None
    build_config = layer.get_build_config()
    values = values_by_name(layer.weights)
    if not build_config or len(values) != len(layer.weights):
        return None
    new = clone_layer(layer, **overrides)
    used = build_with_values(new, None, values,
                             build=lambda: new.build_from_config(build_config))
    if sorted(used) != sorted(values) or len(new.weights) != len(values):
        return None
    return new


def copy_weights(old, new):
    """Moves the weights of layer `old` into `new`, a built copy of it made
    from its config: sublayers paired by the attribute that holds them, each
    layer's own variables by name (those created without a name, in
    creation order), never by position.

    Raises:
        ConversionError: naming the variable or sublayer that has no
            counterpart in the copy (its class's get_config() does not
            describe it).
    """
    if not old.weights:
        return
    if len(new.weights) != len(old.weights):
        raise ConversionError(
            f"Layer '{old.name}' ({type(old).__name__}) rebuilt from its "
            f"config has {len(new.weights)} weights instead of "
            f"{len(old.weights)}: its get_config() does not describe it. "
            "Fix get_config() of that class."
        )
    moved = set()
    _mirror(new, old, lambda layer: None, [], old.name, moved)
    missed = [v.path for v in old.weights if id(v) not in moved]
    if missed:
        raise ConversionError(
            f"Layer '{old.name}' ({type(old).__name__}) holds the variable "
            f"'{missed[0]}' in a sublayer that is not kept in an attribute, "
            "or in a list or dict of them, so its copy cannot be told which "
            "of its own sublayers gets it. Keep sublayers in attributes, "
            "lists or dicts."
        )


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
            f"be copied ({_brief(e)}). Give the class a "
            "get_config() (and from_config()) that recreates it, or build it "
            "as a Functional model."
        ) from e
    return new


def _sublayer_items(layer):
    """(attribute, index or None, sublayer) for the layers `layer` holds in
    its attributes and in lists / tuples / dicts of them."""
    items = []
    for attr, value in vars(layer).items():
        if internals.is_tracking_attribute(attr):
            continue
        if isinstance(value, keras.layers.Layer):
            items.append((attr, None, value))
        elif isinstance(value, (list, tuple)):
            items += [(attr, i, v) for i, v in enumerate(value)
                      if isinstance(v, keras.layers.Layer)]
        elif isinstance(value, dict):
            items += [(attr, k, v) for k, v in value.items()
                      if isinstance(v, keras.layers.Layer)]
    return items


# Keras names an `add_weight` without `name=` "variable", "variable_1", ...
# from a global counter, so the same weight has another name in every copy.
_UNNAMED = re.compile(r"^variable(_\d+)?$")


def _variables_by_name(layer, path):
    """({name: variable} of the variables `layer` created itself with a
    name, [the unnamed ones, in creation order])."""
    found, unnamed = {}, []
    for variable in internals.own_variables(layer):
        if _UNNAMED.match(variable.name):
            unnamed.append(variable)
            continue
        if variable.name in found:
            raise ConversionError(
                f"Layer '{path}' ({type(layer).__name__}) has two variables "
                f"named '{variable.name}', so they cannot be moved by name. "
                "Give each `add_weight` of that class its own `name=`."
            )
        found[variable.name] = variable
    return found, unnamed


def _assign_own_variables(new, old, path, moved):
    """Assigns each variable `old` created itself to the one of `new` with
    the same name; refuses, naming it, one that has no counterpart.
    Variables created without a name (Keras names them anew in every copy)
    are paired in creation order, when both have as many of the same
    shapes."""
    new_vars, new_unnamed = _variables_by_name(new, path)
    old_vars, old_unnamed = _variables_by_name(old, path)
    for names, other, where in ((old_vars, new_vars, "its copy"),
                                (new_vars, old_vars, "the original")):
        for name in names:
            if name not in other:
                raise ConversionError(
                    f"Layer '{path}' ({type(old).__name__}): the variable "
                    f"'{name}' has no counterpart in {where} (which has "
                    f"{sorted(other) or 'none'}); weights move by name. Fix "
                    "get_config() of that class."
                )
    if [tuple(v.shape) for v in old_unnamed] != [
            tuple(v.shape) for v in new_unnamed]:
        raise ConversionError(
            f"Layer '{path}' ({type(old).__name__}) has unnamed variables of "
            f"shapes {[tuple(v.shape) for v in old_unnamed]}, its copy "
            f"{[tuple(v.shape) for v in new_unnamed]}: they cannot be paired. "
            "Give every `add_weight` of that class a `name=`, and fix its "
            "get_config()."
        )
    pairs = [(v, new_vars[name]) for name, v in old_vars.items()]
    for variable, target in pairs + list(zip(old_unnamed, new_unnamed)):
        target.assign(variable)
        if moved is not None:
            moved.add(id(variable))


def _mirror(new, old, swap, swapped, path, moved=None):
    """Makes `new` (a fresh copy of `old`'s class) hold `old`'s weights, with
    the sublayers that `swap` replaces replaced, recursively; the ids of
    the variables moved are added to `moved` (when given)."""
    new_items = {(a, i): v for a, i, v in _sublayer_items(new)}
    for attr, index, old_sub in _sublayer_items(old):
        sub_path = f"{path}/{old_sub.name}"
        new_sub = new_items.get((attr, index))
        if new_sub is None:
            raise ConversionError(
                f"Layer '{path}' ({type(old).__name__}) recreated from its "
                f"config has no sublayer at `{attr}`"
                f"{'' if index is None else f'[{index!r}]'}, where the "
                f"original has '{old_sub.name}'. Give the class a get_config()"
                " that recreates its sublayers."
            )
        replacement = swap(old_sub)
        if replacement is not None:
            swapped.append(sub_path)
        elif is_graph_model(old_sub):
            replacement = _transform_graph_model(old_sub, swap, swapped)
        elif type(new_sub) is not type(old_sub):
            replacement = _clone_with_weights(old_sub)
        else:
            _mirror(new_sub, old_sub, swap, swapped, sub_path, moved)
            continue
        if moved is not None:
            # The replacement was made from `old_sub` with its weights.
            moved.update(id(v) for v in old_sub.weights)
        _put(new, attr, index, new_sub, replacement, sub_path)
    _assign_own_variables(new, old, path, moved)


def _clone_with_weights(layer, **overrides):
    """A built clone of `layer` (config with `overrides`) holding its
    weights."""
    new = clone_prebuilt(layer, **overrides)
    if new is not None:
        return new
    new = clone_layer(layer, **overrides)
    build_config = layer.get_build_config()
    if build_config:
        new.build_from_config(build_config)
    if layer.weights:
        copy_weights(layer, new)
    return new


def _put(layer, attr, index, old, new, path):
    """Replaces sublayer `old` of a (possibly built) layer by `new`."""
    container = getattr(layer, attr)
    if index is not None and isinstance(container, tuple):
        raise ConversionError(
            f"Layer '{path.rsplit('/', 1)[0]}' keeps '{old.name}' in the tuple "
            f"attribute `{attr}`, which cannot be changed in place; use a "
            "list."
        )
    internals.replace_sublayer(layer, attr, index, old, new)


# Layers that may follow the classifier: they pool, reshape, activate or
# drop, and never mix channels, so they carry the class dimension through.
_HEAD_TAIL = (
    keras.layers.Activation, keras.layers.Softmax, keras.layers.ReLU,
    keras.layers.Dropout, keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.Flatten, keras.layers.Reshape, keras.layers.Identity,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
)
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _classifier_chain(model, num_classes):
    """(classifier, [layers after it]) for the layer producing the model's
    class dimension: a Dense, or a Conv followed only by _HEAD_TAIL layers."""
    def refuse(found):
        raise ConversionError(
            f"cannot give model '{model.name}' a head of {num_classes} "
            f"classes: it has no classifier layer to replace ({found}). A "
            "Dense or Conv layer producing the classes, followed only by "
            "pooling, flatten, reshape, activation or dropout, can be "
            "replaced; give other models a head yourself.")

    if len(model.outputs) != 1:
        refuse(f"it has {len(model.outputs)} outputs")
    tail = []
    tensor = model.outputs[0]
    while True:
        layer, node = internals.producing_node(tensor)
        if isinstance(layer, keras.layers.Dense) or (
                isinstance(layer, _CONVS) and layer.groups == 1):
            return layer, node.input_tensors[0], tail[::-1]
        if not isinstance(layer, _HEAD_TAIL) or len(node.input_tensors) != 1:
            refuse(f"the output comes from {type(layer).__name__} "
                   f"'{layer.name}'"
                   + (f" after {', '.join(repr(t.name) for t in tail)}"
                      if tail else ""))
        tail.append(layer)
        tensor = node.input_tensors[0]


def _tail_config(layer, classes, num_classes):
    config = layer.get_config()
    if isinstance(layer, keras.layers.Reshape):
        shape = list(config["target_shape"])
        if shape[-1] not in (classes, -1):
            raise ConversionError(
                f"cannot carry {num_classes} classes "
                f"through Reshape '{layer.name}' to {tuple(shape)}; give the "
                "model a head yourself.")
        config["target_shape"] = tuple(shape[:-1]) + (
            shape[-1] if shape[-1] == -1 else num_classes,)
    return config


def replace_head(model, num_classes):
    """A copy of `model` whose classifier (the Dense, or a Conv followed
    only by pooling / flatten / reshape / activation / dropout, as in
    SqueezeNet or keras.applications.MobileNet) is a new, freshly
    initialized layer with `num_classes` outputs and the same activation,
    the layers after it kept, for fine-tuning on another label set."""
    return with_new_head(copy_model(model), num_classes)


def with_new_head(model, num_classes):
    """`replace_head` without the copy: the new model shares every layer but
    the head (and the layers after it) with `model`; for callers that own
    `model`."""
    old, features, tail = _classifier_chain(model, num_classes)
    config = old.get_config()
    config["units" if isinstance(old, keras.layers.Dense)
           else "filters"] = num_classes
    config["name"] = f"{old.name}_head{num_classes}"
    x = type(old).from_config(config)(features)
    classes = old.units if isinstance(old, keras.layers.Dense) else old.filters
    for layer in tail:
        x = type(layer).from_config(_tail_config(layer, classes,
                                                 num_classes))(x)
    return keras.Model(model.inputs, x, name=model.name)


def freeze_all_but_normalization(model):
    """A copy of `model` in which only the normalization layers' parameters
    are trainable (Frankle et al., "Training BatchNorm and only
    BatchNorm"); `unfreeze` undoes it."""
    copy = copy_model(model)
    set_trainable(copy, is_normalization)
    return copy


def unfreeze(model):
    """A copy of `model` with every layer trainable."""
    copy = copy_model(model)
    set_trainable(copy, lambda layer: True)
    return copy


def set_trainable(model, which):
    """Sets, in place, each leaf layer of `model` trainable where
    `which(layer)` is true and frozen elsewhere (containers follow their
    leaves); returns how many leaves are trainable. For callers that own
    `model`; `freeze_all_but_normalization` and `unfreeze` copy first."""
    count = 0
    for layer in internals.flatten_layers(model):
        if internals.flatten_layers(layer, recursive=False):
            continue  # containers follow their leaves
        layer.trainable = bool(which(layer))
        count += int(layer.trainable)
    return count


def is_normalization(layer):
    """BatchNormalization, BatchRenormalization, and their subclasses."""
    return isinstance(layer, keras.layers.BatchNormalization)
