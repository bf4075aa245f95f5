"""Normalization statistics recomputed with a model's final weights ("precise
BN"), on every backend."""

import logging

import keras
import numpy as np
from keras import ops

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.transform.conversion import copy_model
from renorm_convert.data import Split, model_image_shape
from renorm_convert.errors import RenormConvertError, check_integer
from renorm_convert.evaluation import to_numpy
from renorm_convert.layers import is_normalization

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
    seen = 0

    def measuring(layer):
        original = layer.call

        def call(inputs, training=None, **kwargs):
            x = ops.cast(inputs, "float32")
            axis = layer.axis % len(x.shape)
            mean, variance = ops.moments(
                x, [i for i in range(len(x.shape)) if i != axis])
            total = sums[id(layer)]
            total[0] = total[0] + to_numpy(mean).astype(np.float64)
            total[1] = total[1] + to_numpy(variance).astype(np.float64)
            # The layer's own training-mode forward, held at batch norm
            # (renorm bounds 1 / 0: r = 1, d = 0) and with its statistics
            # held still (momentum 1); they are replaced at the end.
            return original(inputs, training=True, **kwargs)
        return call

    momenta, bounds, trainable = {}, {}, {}
    for layer in norms:
        momenta[id(layer)] = (layer.momentum,
                              getattr(layer, "renorm_momentum", None))
        layer.momentum = 1.0
        if momenta[id(layer)][1] is not None:
            layer.renorm_momentum = 1.0
        if hasattr(layer, "set_clipping"):
            bounds[id(layer)] = (layer.r_max, layer.d_max,
                                 layer.microbatch_size)
            layer.set_clipping(r_max=1.0, d_max=0.0)
            layer.microbatch_size = None  # whole batches: population moments
        trainable[id(layer)] = layer.trainable
        layer.trainable = True  # a frozen one would normalize as in inference
        layer.call = measuring(layer)
    try:
        for x in _input_batches(copy, data, batch_size):
            if batches is not None and seen >= batches:
                break
            copy(x, training=False)
            seen += 1
    finally:
        for layer in norms:
            del layer.call  # the class's own again
            layer.momentum, renorm_momentum = momenta[id(layer)]
            if renorm_momentum is not None:
                layer.renorm_momentum = renorm_momentum
            layer.trainable = trainable[id(layer)]
            if id(layer) in bounds:
                r_max, d_max, layer.microbatch_size = bounds[id(layer)]
                layer.set_clipping(r_max=r_max, d_max=d_max)
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
