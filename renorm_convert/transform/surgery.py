"""The surgery fine-tuning uses, as transforms a caller chains: a new head
(`replace_head`), which layers train (`freeze_all_but_normalization` /
`unfreeze`), and the normalization layers' settings (`configure`). Each
returns a new model and leaves its input as it was (`inplace=True` changes
the model itself, for a caller that owns it).
"""

import contextlib

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.errors import RenormConvertError, check_integer
from renorm_convert.layers import (BatchRenormalization, check_d_max,
                                   check_microbatch_size, check_momentum,
                                   check_r_max, is_normalization)
from renorm_convert.transform.conversion import copy_model

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

# `configure(..., microbatch_size=KEEP)` leaves microbatches as they are;
# None turns them off.
KEEP = object()


def _classifier_chain(model, num_classes):
    """(classifier, its input, [layers after it]) for the layer producing
    the model's class dimension: a Dense, or a Conv followed only by
    _HEAD_TAIL layers."""
    def refuse(found):
        raise RenormConvertError(
            f"cannot give model '{model.name}' a head of {num_classes} "
            f"classes: it has no classifier layer to replace ({found}). A "
            "Dense or Conv layer producing the classes, followed only by "
            "pooling, flatten, reshape, activation or dropout, can be "
            "replaced; give other models a head yourself.",
            "num_classes", num_classes)

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
            raise RenormConvertError(
                f"cannot carry {num_classes} classes "
                f"through Reshape '{layer.name}' to {tuple(shape)}; give the "
                "model a head yourself.", "num_classes", num_classes)
        config["target_shape"] = tuple(shape[:-1]) + (
            shape[-1] if shape[-1] == -1 else num_classes,)
    return config


def replace_head(model, num_classes, *, inplace=False):
    """A copy of `model` whose classifier (the Dense, or a Conv followed
    only by pooling / flatten / reshape / activation / dropout, as in
    SqueezeNet or keras.applications.MobileNet) is a new, freshly
    initialized layer with `num_classes` outputs and the same activation,
    the layers after it kept, for fine-tuning on another label set.
    `inplace=True` shares every other layer with `model` (no copy)."""
    num_classes = check_integer(num_classes, "num_classes")
    if not inplace:
        model = copy_model(model)
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


def freeze_all_but_normalization(model, *, inplace=False):
    """A copy of `model` in which only the normalization layers' parameters
    are trainable (Frankle et al., "Training BatchNorm and only
    BatchNorm"); `unfreeze` undoes it."""
    model = model if inplace else copy_model(model)
    if set_trainable(model, is_normalization) == 0:
        raise RenormConvertError(
            f"model '{model.name}' has no normalization layer to train.")
    return model


def unfreeze(model, *, inplace=False):
    """A copy of `model` with every layer trainable."""
    model = model if inplace else copy_model(model)
    set_trainable(model, lambda layer: True)
    return model


def set_trainable(model, which):
    """Sets, in place, each leaf layer of `model` trainable where
    `which(layer)` is true and frozen elsewhere (containers follow their
    leaves); returns how many leaves are trainable."""
    count = 0
    for layer in internals.flatten_layers(model):
        if internals.flatten_layers(layer, recursive=False):
            continue  # containers follow their leaves
        layer.trainable = bool(which(layer))
        count += int(layer.trainable)
    return count


def configure(model, *, microbatch_size=KEEP, momentum=None,
              renorm_momentum=None, r_max=None, d_max=None, inplace=False):
    """A copy of `model` whose normalization layers train with these
    settings (None: keep each layer's own).

    Args:
        microbatch_size: Groups of this many examples, each normalized with
            its own moments (BatchRenormalization layers); None turns
            microbatches off.
        momentum: `momentum` of every normalization layer (and, unless
            `renorm_momentum` is given, its `renorm_momentum`). Keras's 0.99
            lags behind fast optimizers on short runs (a few thousand steps
            or fewer) and can make renorm unstable there; 0.9 suits them.
        renorm_momentum: `renorm_momentum` of every BatchRenormalization.
        r_max, d_max: The clipping bounds of every BatchRenormalization (a
            `RenormSchedule` sets them during training).
        inplace: Change `model` itself.

    Returns:
        The configured model.
    """
    if microbatch_size is not KEEP:
        microbatch_size = check_microbatch_size(microbatch_size)
    momentum = None if momentum is None else check_momentum(momentum)
    renorm_momentum = momentum if renorm_momentum is None else \
        check_momentum(renorm_momentum, "renorm_momentum")
    r_max = None if r_max is None else check_r_max(r_max)
    d_max = None if d_max is None else check_d_max(d_max)
    model = model if inplace else copy_model(model)
    for layer in internals.flatten_layers(model):
        if not is_normalization(layer):
            continue
        if momentum is not None:
            layer.momentum = momentum
        if isinstance(layer, BatchRenormalization):
            if renorm_momentum is not None:
                layer.renorm_momentum = renorm_momentum
            if microbatch_size is not KEEP:
                layer.microbatch_size = microbatch_size
            layer.set_clipping(r_max=r_max, d_max=d_max)
    return model


def normalization_settings(model):
    """{setting: sorted list of the values found} over the model's
    BatchRenormalization layers (microbatch_size, momentum,
    renorm_momentum, r_max, d_max): what training will use."""
    found = {}
    for layer in internals.flatten_layers(model):
        if isinstance(layer, BatchRenormalization):
            for key in ("microbatch_size", "momentum", "renorm_momentum",
                        "r_max", "d_max"):
                found.setdefault(key, set()).add(getattr(layer, key))
    return {k: sorted(v, key=lambda x: (x is None, x))
            for k, v in found.items()}


def _is_strided_pointwise(layer):
    return (isinstance(layer, keras.layers.Conv2D)
            and tuple(layer.kernel_size) == (1, 1)
            and max(layer.strides) > 1
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1)


@contextlib.contextmanager
def strided_pointwise_subsampled(model):
    """Within the block, every 1x1 `Conv2D` with strides (s, t) > 1 of
    `model` (nested models too) computes `x[:, ::s, ::t]` followed by a
    stride-1 convolution with the same kernel: the same output (a 1x1
    kernel reads exactly those pixels, under "valid" and "same" padding
    alike) and the same weights. Undone on leaving, whatever happens.

    Why: TensorFlow 2.21's oneDNN CPU kernel for the weight gradient of a
    strided 1x1 convolution corrupts the heap on AVX-512 machines once the
    input is about 56x56 or larger, and the process dies (ResNet and
    Xception projection shortcuts). The stride-1 kernel is not affected.
    Only the layers' convolution is replaced, so configs, weights and saved
    files are unchanged. Yields how many layers changed.
    """
    changed = []
    try:
        for layer in internals.flatten_layers(model):
            if not _is_strided_pointwise(layer) or \
                    "convolution_op" in layer.__dict__:
                continue
            object.__setattr__(layer, "convolution_op",
                               _subsampled_convolution(layer))
            changed.append(layer)
        yield len(changed)
    finally:
        for layer in changed:
            object.__delattr__(layer, "convolution_op")


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
