"""Normalization statistics recomputed with a model's final weights ("precise
BN"), on every backend."""

import contextlib
import logging

import keras
import numpy as np
from keras import ops

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.data import Split, model_image_shape
from renorm_convert.errors import RenormConvertError, check_integer
from renorm_convert.evaluation import to_numpy
from renorm_convert.layers import is_normalization
from renorm_convert.transform.conversion import copy_model

_log = logging.getLogger("renorm_convert")




def recalibrate(model, data, *, batches=None, batch_size=32):
    """A copy of `model` whose normalization statistics are the exact
    averages of the batch moments over `data` ("precise BN"), computed with
    the model's final weights, instead of the exponential averages that lag
    behind a short fine-tune.

    Every normalization layer (at any depth) is measured in the same
    forward passes: each records the mean and variance of its input batch
    and normalizes it with them (its own training-mode forward; batch
    renorm held at r = 1, d = 0, i.e. batch norm), so each layer's
    statistics are the population moments of its input when every layer
    before it normalizes with population moments too, which is what
    inference then does. Statistics are held still meanwhile, no weight is
    updated, dropout is off.

    Batch renorm trains the following layers on inputs normalized by its
    moving averages; where those lag (momentum 0.99 on a short run), the
    network has adapted to them, and recalibration can cost accuracy
    (benchmarks/recalibrate.py measures it). It serves batch-norm-trained
    models and runs whose weights moved after the statistics settled.
    Afterwards `moving_mean` is the mean of the batch means and
    `moving_variance` the mean of the batch variances; a
    BatchRenormalization layer gets `renorm_mean = moving_mean` and
    `moving_stddev = renorm_stddev = sqrt(moving_variance + epsilon)`, so
    all its statistics agree.

    Args:
        model: A Keras model with BatchNormalization / BatchRenormalization
            layers. It is not modified.
        data: Input batches: an array (or list of arrays) of model inputs,
            a `data.Split` (its training images, adapted to the model as
            training adapts them), or an iterable of inputs or (inputs,
            labels) batches (a `keras.utils.PyDataset`, a `tf.data.Dataset`).
        batches: Use this many batches (default: all).
        batch_size: Batch size for arrays and Splits.

    Returns:
        The recalibrated copy (it carries no optimizer state). How many
        batches gave the statistics is logged (logger "renorm_convert").
    """
    batches = check_integer(batches, "batches", none="for all")
    copy = copy_model(model)
    norms = [layer for layer in internals.flatten_layers(copy)
             if is_normalization(layer)]
    if not norms:
        raise RenormConvertError(f"model '{model.name}' has no normalization "
                                 "layer to recalibrate.")
    sums = {id(layer): [0.0, 0.0] for layer in norms}

    def record(layer, mean, variance):
        total = sums[id(layer)]
        total[0] = total[0] + mean
        total[1] = total[1] + variance

    seen = 0
    with batch_moments(norms, record):
        for x in _input_batches(copy, data, batch_size):
            if batches is not None and seen >= batches:
                break
            copy(x, training=False)
            seen += 1
    if not seen:
        raise RenormConvertError("recalibrate: the data holds no batch.")
    for layer in norms:
        mean, variance = (t / seen for t in sums[id(layer)])
        values = {"moving_mean": mean, "moving_variance": variance}
        if hasattr(layer, "renorm_mean"):
            std = np.sqrt(variance + layer.epsilon)
            values.update(renorm_mean=mean, renorm_stddev=std,
                          moving_stddev=std)
        for name, value in values.items():
            variable = getattr(layer, name)
            variable.assign(value.astype(variable.dtype))
    _log.info(f"recalibrated the normalization statistics on {seen} "
              f"batch{'es' if seen > 1 else ''}")
    return copy


@contextlib.contextmanager
def batch_moments(norms, record):
    """Within the block, each normalization layer of `norms` normalizes with
    its batch's own moments, in any call (`training` or not), as batch norm
    trains (batch renorm held at r = 1, d = 0, whole batches, frozen layers
    too), and hands `record(layer, mean, variance)` the batch's moments
    (NumPy, float64) at every call; its statistics are held still (momentum
    1). Everything is put back on leaving, whatever happens."""
    saved = {}

    def measuring(layer):
        original = layer.call

        def call(inputs, training=None, **kwargs):
            x = ops.cast(inputs, "float32")
            axis = layer.axis % len(x.shape)
            mean, variance = ops.moments(
                x, [i for i in range(len(x.shape)) if i != axis])
            record(layer, to_numpy(mean).astype(np.float64),
                   to_numpy(variance).astype(np.float64))
            return original(inputs, training=True, **kwargs)
        return call

    for layer in norms:
        saved[id(layer)] = _hold_as_batch_norm(layer)
        layer.call = measuring(layer)
    try:
        yield
    finally:
        for layer in norms:
            del layer.call  # the class's own again
            _restore(layer, saved[id(layer)])


def _hold_as_batch_norm(layer):
    """Sets `layer` to normalize as batch norm trains with its statistics
    held still; returns what it had."""
    had = {"momentum": layer.momentum, "trainable": layer.trainable}
    layer.momentum = 1.0
    layer.trainable = True  # a frozen one would normalize as in inference
    if getattr(layer, "renorm_momentum", None) is not None:
        had["renorm_momentum"] = layer.renorm_momentum
        layer.renorm_momentum = 1.0
    if hasattr(layer, "set_clipping"):
        had.update(r_max=layer.r_max, d_max=layer.d_max,
                   microbatch_size=layer.microbatch_size)
        layer.set_clipping(r_max=1.0, d_max=0.0)
        layer.microbatch_size = None  # whole batches: population moments
    return had


def _restore(layer, had):
    if "r_max" in had:
        layer.set_clipping(r_max=had.pop("r_max"), d_max=had.pop("d_max"))
    for name, value in had.items():
        setattr(layer, name, value)


def _input_batches(model, data, batch_size):
    """Model-input batches from an array, list of arrays, Split or an
    iterable of batches."""
    if isinstance(data, Split):
        from renorm_convert.data.batches import TrainingBatches

        batches = TrainingBatches(data, model_image_shape(model), batch_size)
        for i in range(batches.num_batches):
            yield batches[i][0]
        return
    if isinstance(data, np.ndarray) or (
            isinstance(data, (list, tuple)) and data and all(
                isinstance(a, np.ndarray) for a in data)):
        arrays = data if isinstance(data, (list, tuple)) else [data]
        for start in range(0, len(arrays[0]), batch_size):
            part = [a[start:start + batch_size] for a in arrays]
            yield part[0] if len(part) == 1 else part
        return
    if isinstance(data, keras.utils.PyDataset):
        dataset = data  # the generator must not read `data`, rebound here
        data = (dataset[i] for i in range(dataset.num_batches))
    for item in data:
        yield item[0] if isinstance(item, tuple) else item
