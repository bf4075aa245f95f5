"""The passes over the data. A working copy of the model holds every
normalization layer as a BatchRenormalization at r_max 1, d_max 0 (batch
norm exactly, per microbatch where training uses microbatches) whose
statistics never move; a `Probe` then switches each layer, call by call,
between its batch's statistics (as in training) and its moving statistics
(as in inference), and records the batch moments each layer sees."""

import contextlib

import numpy as np
from keras import ops

from renorm_convert._internal.backend import name as backend_name
from renorm_convert.evaluation import to_numpy
from renorm_convert.layers import BatchRenormalization, is_normalization
from renorm_convert.transform.blocks import layer_paths
from renorm_convert.transform.conversion import convert, copy_model


def normalization_paths(model):
    """(path, layer) of every normalization layer at any depth."""
    return [(path, layer) for path, layer in layer_paths(model)
            if is_normalization(layer)]


def working_copy(model, microbatch_size):
    """A copy of `model` whose normalization layers, in training mode,
    compute batch norm as training with this batching would: plain
    BatchNormalization converted, every layer held at r_max 1 / d_max 0,
    microbatches of `microbatch_size` (None: each layer's own setting,
    none for plain batch norm) and trainable (a frozen layer would
    normalize as in inference). A `Probe` holds its statistics still."""
    plain = any(not isinstance(layer, BatchRenormalization)
                for _, layer in normalization_paths(model))
    copy = convert(model, r_max=1.0, d_max=0.0) if plain else copy_model(model)
    for _, layer in normalization_paths(copy):
        layer.set_clipping(r_max=1.0, d_max=0.0)
        if microbatch_size is not None:
            layer.microbatch_size = microbatch_size
        layer.trainable = True
    return copy


def reference_statistics(layer):
    """The statistics r and d are measured against, as NumPy float64:
    (mean, stddev) where the layer's r and d would correct towards
    (renorm_mean, renorm_stddev floored as the layer floors it; for a
    converted batch norm these are its moving statistics), and the
    inference statistics (moving_mean, moving_variance)."""
    def value(variable):
        return to_numpy(variable.value).astype(np.float64)

    floor = float(np.sqrt(np.float32(layer.epsilon)))
    return {"mean": value(layer.renorm_mean),
            "stddev": np.maximum(value(layer.renorm_stddev), floor),
            "moving_mean": value(layer.moving_mean),
            "moving_variance": value(layer.moving_variance),
            "epsilon": float(layer.epsilon)}


def group_moments(layer, inputs):
    """(mean, variance) of each group the layer normalizes in training
    (the batch, or its microbatches; a last smaller group on its own), as
    NumPy arrays of shape (groups, channels)."""
    x = ops.cast(inputs, "float32")
    ndim = len(x.shape)
    axis = layer.axis % ndim
    size = int(x.shape[0])
    m = layer.microbatch_size or size
    reduced = [a for a in range(ndim) if a != axis]
    if size % m == 0:
        grouped = ops.reshape(x, (size // m, m) + tuple(x.shape[1:]))
        mean, variance = ops.moments(grouped, [1] + [a + 1 for a in reduced
                                                     if a != 0])
        return (to_numpy(mean).astype(np.float64),
                to_numpy(variance).astype(np.float64))
    means, variances = [], []
    for start in range(0, size, m):
        mean, variance = ops.moments(x[start:start + m], reduced)
        means.append(to_numpy(mean))
        variances.append(to_numpy(variance))
    return (np.stack(means).astype(np.float64),
            np.stack(variances).astype(np.float64))


class Probe:
    """Within `with probe:`, each normalization layer of `model` uses its
    batch's statistics when it is in `batch_mode` (a set of paths; "all")
    and its moving statistics otherwise, whatever mode the model is called
    in; layers in batch mode append their groups' moments to
    `moments[path]` while `recording`. Statistics are held still meanwhile
    (momentum 1: a training-mode call moves them by nothing)."""

    def __init__(self, model):
        self.model = model
        self.entries = normalization_paths(model)
        self.batch_mode = set()
        self.recording = False
        self.moments = {path: [] for path, _ in self.entries}

    def __enter__(self):
        self._momenta = [(layer.momentum, layer.renorm_momentum)
                         for _, layer in self.entries]
        for path, layer in self.entries:
            layer.momentum = layer.renorm_momentum = 1.0
            layer.call = self._switched(path, layer)
        return self

    def __exit__(self, *exc):
        for (_, layer), momenta in zip(self.entries, self._momenta):
            del layer.call  # the class's own again
            layer.momentum, layer.renorm_momentum = momenta

    def _switched(self, path, layer):
        original = layer.call

        def call(inputs, training=None, **kwargs):
            batch = self.batch_mode == "all" or path in self.batch_mode
            if batch and self.recording:
                self.moments[path].append(group_moments(layer, inputs))
            return original(inputs, training=batch, **kwargs)
        return call

    def outputs(self, batches, batch_mode=(), record=False):
        """The model's outputs (NumPy) for each batch of inputs, with the
        layers in `batch_mode` using batch statistics."""
        self.batch_mode = batch_mode if batch_mode == "all" else set(
            batch_mode)
        self.recording = record
        try:
            with _no_gradients():
                return [to_numpy(self.model(x, training=False))
                        for x in batches]
        finally:
            self.batch_mode, self.recording = set(), False


@contextlib.contextmanager
def _no_gradients():
    """Nothing is differentiated here; eager PyTorch would otherwise record
    every operation for autograd."""
    if backend_name() == "torch":
        import torch

        with torch.no_grad():
            yield
    else:
        yield
