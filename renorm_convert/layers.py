"""The BatchRenormalization layer and its conversion from / to BatchNormalization.

The layer builds on Keras's own `BatchNormalization(renorm=True)` (Keras >=
3.14): the seven state arrays, the config, the batch moments and inference are
Keras's. A training call computes r, d and the statistic updates itself, with
Keras's arithmetic (the same numbers, bit for bit) in about half the
operations (see `call`). What this layer adds is what Keras's cannot do:

* the clipping bounds r_max and d_max live in variables the trainer tracks,
  so a schedule can change them at every step without retracing or
  recompiling, on every backend (under JAX a compiled step reads only the
  variables it is handed: bounds held anywhere else would be frozen into
  the compiled step);
* microbatches (the paper's Figure 2 set-up): the batch is split into groups of
  `microbatch_size` examples, each normalized with its own moments and its own
  r and d;
* lossless creation from a trained `BatchNormalization` and back.

Everything is `keras.ops` and Keras variables: the layer runs on TensorFlow,
JAX and PyTorch, and a `.keras` file saved on one loads on the others.
"""

import functools

import keras
import numpy as np
from keras import ops

from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.backend import channel_ops
from renorm_convert._internal.variables import (build_with_values,
                                                values_by_name)
from renorm_convert.errors import RenormConvertError

PACKAGE = "renorm_convert"

# Keras's renorm state, in the order Keras creates it (gamma and beta when
# scale / center). These, and only these, are what a saved file holds.
STATE = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev",
         "renorm_mean", "renorm_stddev")
BOUNDS = ("r_max", "d_max")


def _check_axis(axis, ndim, name):
    if not -ndim <= axis < ndim:
        raise RenormConvertError(
            f"Expected `axis` to index a dimension of the {ndim}-D input of "
            "layer '" + name + "'. Received: {arg}. Use -1 for channels-last "
            "or 1 for channels-first inputs.", "axis", axis)


def check_r_max(r_max):
    if isinstance(r_max, bool) or not float(r_max) >= 1.0:
        raise RenormConvertError(
            "Expected `r_max` >= 1 (r is clipped to [1/r_max, r_max]). "
            "Received: {arg}", "r_max", r_max)
    return float(r_max)


def check_d_max(d_max):
    if isinstance(d_max, bool) or not float(d_max) >= 0.0:
        raise RenormConvertError(
            "Expected `d_max` >= 0 (d is clipped to [-d_max, d_max]). "
            "Received: {arg}", "d_max", d_max)
    return float(d_max)


def check_momentum(value, name="momentum"):
    if isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise RenormConvertError(
            f"Expected `{name}` in [0, 1). Received: {{arg}}", name, value)
    return float(value)


def check_microbatch_size(value):
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float,
                                                          np.number))
            or int(value) != value or value < 1):
        raise RenormConvertError(
            "Expected `microbatch_size` to be None or an integer >= 1. "
            "Received: {arg}", "microbatch_size", value)
    return int(value)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchRenormalization(keras.layers.BatchNormalization):
    """Batch Renormalization with schedulable clipping and microbatches.

    In training mode each batch is normalized with its own moments, then
    corrected towards the moving statistics: `y = gamma * (x_hat * r + d) +
    beta`, with `r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))`
    and `d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))`, where
    `mu`, `sigma` are the `renorm_mean` / `renorm_stddev` moving averages. In
    inference mode it is plain batch normalization with `moving_mean` and
    `moving_variance`. With `r_max=1, d_max=0` it computes exactly what
    `BatchNormalization` computes.

    Args:
        axis: The channel axis (-1 for channels-last, 1 for channels-first).
        momentum: Momentum of the inference moving statistics.
        epsilon: Small float added to the variance.
        center: Whether to add the offset `beta`.
        scale: Whether to multiply by `gamma`.
        renorm_momentum: Momentum of `renorm_mean` / `renorm_stddev`, the
            statistics that r and d correct towards.
        r_max: r is clipped to `[1 / r_max, r_max]`; at least 1. Held in a
            variable: assign through `set_clipping` (or `RenormSchedule`).
        d_max: d is clipped to `[-d_max, d_max]`; at least 0.
        microbatch_size: If set, training batches are split into consecutive
            groups of this many examples, each normalized with its own moments
            and its own r and d; the moving statistics take the average of the
            groups' moments (weighted by group size). A batch whose size is not
            a multiple of it ends with one smaller group made of the remaining
            examples (so the last batch of an epoch needs no special care).
        synchronized: Aggregate the batch moments over all replicas of a
            `tf.distribute` strategy (TensorFlow). Under JAX with
            `keras.distribution`, moments are always those of the global
            batch, so the flag is kept (a file keeps it) but changes
            nothing; with microbatches the groups are local by definition.
        **kwargs: Everything else `keras.layers.BatchNormalization` accepts
            (initializers, regularizers, constraints, `name`, `dtype`, ...).

    Example:
    >>> layer = BatchRenormalization(r_max=1.0, d_max=0.0, microbatch_size=4)
    >>> y = layer(np.random.rand(8, 3).astype("float32"), training=True)
    >>> layer.set_clipping(r_max=3.0, d_max=5.0)

    Reference:
        Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence
        in Batch-Normalized Models", 2017, https://arxiv.org/abs/1702.03275
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        renorm_momentum=0.99,
        r_max=3.0,
        d_max=5.0,
        microbatch_size=None,
        synchronized=False,
        **kwargs,
    ):
        # Keras's own clipping arguments would be fixed floats; ours replace
        # them. They may come back through a BatchNormalization config.
        kwargs.pop("renorm", None)
        kwargs.pop("renorm_clipping", None)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise RenormConvertError(
                    "Expected `axis` to be a single integer. Received: {arg}",
                    "axis", axis)
            axis = axis[0]
        r_max = check_r_max(r_max)
        d_max = check_d_max(d_max)
        microbatch_size = check_microbatch_size(microbatch_size)
        renorm_momentum = check_momentum(renorm_momentum, "renorm_momentum")
        momentum = check_momentum(momentum)
        if isinstance(epsilon, bool) or not float(epsilon) > 0.0:
            raise RenormConvertError("Expected `epsilon` > 0. Received: {arg}",
                                     "epsilon", epsilon)
        # Keras allows synchronized=True on TensorFlow only; elsewhere the
        # request is kept for the config (see the docstring).
        keras_synchronized = bool(synchronized) and (
            keras.backend.backend() == "tensorflow")
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            renorm=True,
            renorm_clipping=None,
            renorm_momentum=renorm_momentum,
            synchronized=keras_synchronized,
            **kwargs,
        )
        self._synchronized_requested = bool(synchronized)
        self.microbatch_size = microbatch_size
        # Until `build` creates the variables.
        self._bounds = {"r_max": r_max, "d_max": d_max}
        self._r_max_var = self._d_max_var = None

    # --- clipping bounds ---------------------------------------------------

    @property
    def r_max(self):
        return self._bound("r_max")

    @property
    def d_max(self):
        return self._bound("d_max")

    def _bound(self, name):
        variable = getattr(self, f"_{name}_var")
        if variable is None:
            return self._bounds[name]
        return float(ops.convert_to_numpy(variable))

    def set_clipping(self, r_max=None, d_max=None):
        """Sets the clipping bounds; compiled steps read the new values."""
        for name, value, check in (("r_max", r_max, check_r_max),
                                   ("d_max", d_max, check_d_max)):
            if value is None:
                continue
            value = check(value)
            self._bounds[name] = value
            variable = getattr(self, f"_{name}_var")
            if variable is not None:
                variable.assign(np.float32(value))

    @property
    def clipping_variables(self):
        """(r_max, d_max) variables, None before the layer is built."""
        return self._r_max_var, self._d_max_var

    # --- Keras layer -------------------------------------------------------

    def build(self, input_shape):
        _check_axis(self.axis, len(input_shape), self.name)
        super().build(input_shape)
        # Non-trainable weights, created last: the trainer carries them into
        # every compiled step (an assignment needs no retrace), and they come
        # after Keras's seven state arrays, which alone are saved.
        self._r_max_var = self.add_weight(
            name="r_max", shape=(), dtype="float32", trainable=False,
            autocast=False,
            initializer=keras.initializers.Constant(self._bounds["r_max"]))
        self._d_max_var = self.add_weight(
            name="d_max", shape=(), dtype="float32", trainable=False,
            autocast=False,
            initializer=keras.initializers.Constant(self._bounds["d_max"]))

    def _state_variables(self):
        bounds = {id(v) for v in self.clipping_variables if v is not None}
        return [v for v in internals.own_variables(self)
                if id(v) not in bounds]

    def save_own_variables(self, store):
        # The seven state arrays, as Keras's renorm layer saves them; the
        # bounds are in the config. Files stay readable by every version.
        for i, v in enumerate(self._state_variables()):
            store[f"{i}"] = v

    def load_own_variables(self, store):
        state = self._state_variables()
        if len(store.keys()) not in (len(state), len(state) + 2):
            raise ValueError(
                f"Layer '{self.name}' expects {len(state)} variables, but "
                f"the file holds {len(store.keys())} for it.")
        for i, v in enumerate(state):
            v.assign(store[f"{i}"])

    # --- training ---------------------------------------------------------
    #
    # Training calls are computed here, not by Keras's `call`: on eager
    # PyTorch every `keras.ops` call and every operation autograd records
    # costs time, and Keras's renorm steps compute the batch's standard
    # deviation twice, read every variable through `ops.cast` (even the
    # inference statistics a training call does not use), clip r in two
    # operations where one does, and record gradients for r, d and the
    # statistic updates, which are then thrown away. Here r and d come from
    # moments detached once, in one pass whose sigma_B the updates share;
    # the arithmetic, and so every number, is Keras's.

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            # Inference: batch normalization with the moving statistics.
            return super().call(inputs, training=training, mask=mask)
        if self.microbatch_size is not None:
            if mask is not None:
                raise RenormConvertError(
                    f"Layer '{self.name}': masks are not supported together "
                    "with {arg}. Received a mask of shape "
                    f"{tuple(mask.shape)}.", "microbatch_size",
                    self.microbatch_size)
            return self._call_microbatched(inputs)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                f"Layer '{self.name}': the mask must have one dimension "
                f"less than the inputs. Received: mask.shape={mask.shape}, "
                f"inputs.shape={inputs.shape}")
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype,
                                                       "float32"))
        mean, variance = internals.batch_moments(self, x, mask)
        fixed_mean = ops.stop_gradient(mean)
        renorm = self._renorm_statistics(x.dtype)
        r, d, stddev = self._correction(
            fixed_mean, ops.stop_gradient(variance), renorm)
        scale, offset = self._compose(r, d, x.dtype)
        y = ops.batch_normalization(x, mean, variance, axis=self.axis,
                                    offset=offset, scale=scale,
                                    epsilon=self.epsilon)
        self._update_statistics(fixed_mean, stddev, renorm)
        return ops.cast(y, self.compute_dtype)

    def _renorm_statistics(self, dtype):
        """(renorm_mean, renorm_stddev) in `dtype`, read once for both the
        correction and the update."""
        return _read(self.renorm_mean, dtype), _read(self.renorm_stddev,
                                                     dtype)

    def _correction(self, mean, variance, renorm):
        """(r, d, sigma_B) of the batch (or each group) moments, r and d
        clipped by the bound variables; no gradient flows through them."""
        dtype = mean.dtype
        channel = channel_ops()
        renorm_mean, renorm_stddev = renorm
        stddev = channel.sqrt(variance + self.epsilon)
        # A floor on sigma (no division by zero early in training): the
        # square root of epsilon rounded to `dtype`, as a constant.
        renorm_stddev = channel.maximum(renorm_stddev,
                                        _sqrt_in(self.epsilon, dtype))
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        r_max = _read(self._r_max_var, dtype)
        d_max = _read(self._d_max_var, dtype)
        r = channel.clip(r, 1.0 / r_max, r_max)
        d = channel.clip(d, -d_max, d_max)
        return r, d, stddev

    def _compose(self, r, d, dtype):
        """(gamma * r, gamma * d + beta): `(x_hat * r + d) * gamma + beta`
        as one scale and one offset."""
        if self.scale:
            gamma = _read(self.gamma, dtype)
            scale, offset = r * gamma, d * gamma
        else:
            scale, offset = ops.cast(r, dtype), ops.cast(d, dtype)
        if self.center:
            # An add, not `+`: per microbatch group it is a BiasAdd on
            # TensorFlow, whose gradient sums in its own order.
            offset = channel_ops().add(offset, _read(self.beta, dtype))
        return scale, offset

    def _update_statistics(self, mean, stddev, renorm):
        """Moves renorm_mean / renorm_stddev (by renorm_momentum; `renorm`
        holds their values) and the inference statistics (by momentum)
        towards the batch's mean and standard deviation; moving_variance
        follows moving_stddev."""
        dtype = mean.dtype
        renorm_mean, renorm_stddev = renorm
        keep, keep_renorm = self.momentum, self.renorm_momentum
        moving_stddev = (_read(self.moving_stddev, dtype) * keep
                         + stddev * (1.0 - keep))
        internals.assign_statistics((
            (self.renorm_mean,
             renorm_mean * keep_renorm + mean * (1.0 - keep_renorm)),
            (self.renorm_stddev,
             renorm_stddev * keep_renorm + stddev * (1.0 - keep_renorm)),
            (self.moving_mean,
             _read(self.moving_mean, dtype) * keep + mean * (1.0 - keep)),
            (self.moving_stddev, moving_stddev),
            # Rounding could make the difference negative.
            (self.moving_variance,
             channel_ops().relu(moving_stddev * moving_stddev
                                - self.epsilon))))

    def _call_microbatched(self, inputs):
        m = self.microbatch_size
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype,
                                                       "float32"))
        batch = x.shape[0]
        renorm = self._renorm_statistics(x.dtype)
        if batch is not None and batch % m == 0:
            # Whole groups (every batch under JAX has a static size, and so
            # do `fine_tune`'s): a reshape, no masking.
            y, mean, variance = self._normalize_groups(x, renorm)
        else:
            # A smaller last group, or a batch size unknown while tracing
            # (TensorFlow's `fit` on arrays): exact for whole groups too.
            y, mean, variance = self._normalize_padded(x, renorm)
        self._update_statistics(mean, ops.sqrt(variance + self.epsilon),
                                renorm)
        return ops.cast(y, self.compute_dtype)

    def _grouped(self, x):
        """x as (groups, m, ...): sizes known while tracing stay static."""
        rest = tuple(ops.shape(x)[1:])
        return ops.reshape(x, (-1, self.microbatch_size) + rest)

    def _group_axes(self, ndim):
        """For x grouped as (groups, m, ...): the axes a group's moments
        reduce (its examples and all non-channel axes), and the shape that
        broadcasts (groups, channels) against it."""
        axis = self.axis % ndim
        reduced = [1] + [a + 1 for a in range(1, ndim) if a != axis]
        bshape = [1] * (ndim + 1)
        bshape[0] = -1
        bshape[axis + 1] = int(self.moving_mean.shape[0])
        return reduced, bshape

    def _normalize_groups(self, x, renorm):
        """The batch is a whole number of groups."""
        ndim = len(x.shape)
        axis = self.axis % ndim
        xg = self._grouped(x)
        red, bshape = self._group_axes(ndim)
        if axis == ndim - 1:
            # Channels last: keep dims so every per-group tensor broadcasts
            # against the batch with no reshape (fewer ops, in both passes).
            mean, variance = ops.moments(xg, axes=red, keepdims=True)
            y = self._normalize_with(xg, mean, variance, renorm)
            groups = [0] + red  # the other kept axes have size 1
        else:
            mean, variance = ops.moments(xg, axes=red)
            y = self._normalize_with(xg, mean, variance, renorm, bshape)
            groups = [0]
        y = ops.reshape(y, ops.shape(x))
        # The statistics' update needs no gradient.
        return (y, ops.mean(ops.stop_gradient(mean), axis=groups),
                ops.mean(ops.stop_gradient(variance), axis=groups))

    def _normalize_with(self, xg, mean, variance, renorm, bshape=None):
        """Applies r, d (against `renorm`, the renorm statistics' values),
        gamma and beta with each group's own moments. The moments broadcast
        against `xg` as they are (channels last, kept dims) or once reshaped
        to `bshape` (moments of shape (groups, channels))."""
        r, d, _ = self._correction(ops.stop_gradient(mean),
                                   ops.stop_gradient(variance), renorm)
        scale, offset = self._compose(r, d, xg.dtype)
        inv = ops.rsqrt(variance + self.epsilon) * scale
        offset = offset - mean * inv
        if bshape is not None:
            inv = ops.reshape(inv, bshape)
            offset = ops.reshape(offset, bshape)
        return xg * inv + offset

    def _normalize_padded(self, x, renorm):
        """The batch ends with a smaller group (or its size is unknown):
        pad to whole groups and mask the padding out of every moment."""
        m = self.microbatch_size
        ndim = len(x.shape)
        axis = self.axis % ndim
        shape = ops.shape(x)
        batch = shape[0]
        pad = (-batch) % m
        xp = ops.pad(x, [(0, pad)] + [(0, 0)] * (ndim - 1))
        xg = self._grouped(xp)
        red, bshape = self._group_axes(ndim)
        valid = ops.cast(ops.arange(batch + pad) < batch, x.dtype)
        w = ops.reshape(valid, (-1, m) + (1,) * (ndim - 1))
        per_example = 1.0
        for a in range(1, ndim):
            if a != axis:
                per_example = per_example * ops.cast(shape[a], x.dtype)
        sizes = ops.reshape(ops.sum(w, axis=1), (-1, 1))
        safe = ops.maximum(sizes * per_example, 1.0)
        mean = ops.sum(xg * w, axis=red) / safe
        centered = (xg - ops.reshape(mean, bshape)) * w
        variance = ops.sum(ops.square(centered), axis=red) / safe
        y = self._normalize_with(xg, mean, variance, renorm, bshape)
        y = ops.reshape(y, (-1,) + tuple(shape[1:]))[:batch]
        total = ops.sum(sizes)
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        return (y, ops.sum(mean * sizes, axis=0) / total,
                ops.sum(variance * sizes, axis=0) / total)

    def get_config(self):
        config = super().get_config()
        config.pop("renorm", None)
        config.pop("renorm_clipping", None)
        config.update(
            r_max=self.r_max,
            d_max=self.d_max,
            microbatch_size=self.microbatch_size,
            synchronized=self._synchronized_requested,
        )
        return config

    # --- conversion -----------------------------------------------------

    @classmethod
    def from_batchnorm(cls, layer, **options):
        """A BatchRenormalization initialised from a BatchNormalization.

        Keeps gamma, beta, moving_mean and moving_variance, and starts the
        renorm statistics where the paper's warm-up would leave them:
        `renorm_mean = moving_mean`, `moving_stddev = renorm_stddev =
        sqrt(moving_variance + epsilon)`. Inference outputs are unchanged.
        `options` (r_max, d_max, renorm_momentum, microbatch_size, ...)
        override the config.
        """
        if not isinstance(layer, keras.layers.BatchNormalization):
            raise RenormConvertError(
                "Expected a keras.layers.BatchNormalization. Received: "
                f"{type(layer).__name__} '{getattr(layer, 'name', layer)}'")
        config = layer.get_config()
        if not isinstance(layer, cls) and layer.renorm and \
                layer.renorm_clipping:
            # Keras's renorm layer: keep its clipping unless overridden.
            clip = layer.renorm_clipping
            config.setdefault("r_max", clip.get("rmax", 3.0))
            config.setdefault("d_max", clip.get("dmax", 5.0))
        config.pop("renorm", None)
        config.pop("renorm_clipping", None)
        config.update(options)
        new = cls.from_config(config)
        if layer.built:
            state = {k: v for k, v in values_by_name(layer.variables).items()
                     if k in STATE}
            if "moving_stddev" not in state:
                std = np.sqrt(state["moving_variance"].astype(np.float64)
                              + layer.epsilon).astype(np.float32)
                state["moving_stddev"] = std
                state["renorm_stddev"] = std
                state["renorm_mean"] = state["moving_mean"]
            build_with_values(new, _built_shape(layer), state)
        return new

    def to_batchnorm(self):
        """A plain `keras.layers.BatchNormalization` with this layer's
        gamma, beta, moving_mean and moving_variance (same inference)."""
        config = super().get_config()
        for key in ("renorm", "renorm_clipping", "renorm_momentum"):
            config.pop(key, None)
        new = keras.layers.BatchNormalization.from_config(config)
        if self.built:
            kept = ("gamma", "beta", "moving_mean", "moving_variance")
            build_with_values(new, _built_shape(self), {
                k: v for k, v in values_by_name(self.variables).items()
                if k in kept})
        return new


def _read(variable, dtype):
    """`variable`'s value in `dtype`, cast only where it differs: under
    eager PyTorch `ops.cast` costs as much as the arithmetic it feeds."""
    value = variable.value
    return value if value.dtype == dtype else ops.cast(value, dtype)


@functools.lru_cache(maxsize=64)
def _sqrt_in(value, dtype):
    """sqrt(value) computed in `dtype` (a backend dtype), as a Python float:
    the number `ops.sqrt(ops.cast(value, dtype))` gives, without two
    operations per call (and, cached, without NumPy per call)."""
    dtype = keras.backend.standardize_dtype(dtype)
    return float(np.sqrt(np.asarray(value, dtype=dtype)))


def _built_shape(layer):
    """An input shape that builds a copy of `layer` with the same weights."""
    ndim = layer.input_spec.ndim if layer.input_spec is not None else None
    channels = int(layer.moving_mean.shape[0])
    ndim = ndim or max(2, layer.axis + 1 if layer.axis >= 0 else -layer.axis)
    shape = [None] * ndim
    shape[layer.axis] = channels
    return tuple(shape)


def is_normalization(layer):
    """BatchNormalization, BatchRenormalization, and their subclasses."""
    return isinstance(layer, keras.layers.BatchNormalization)


def renorm_layers(model):
    """Every BatchRenormalization in `model`, nested models and custom
    layers' sublayers included."""
    return [layer for layer in internals.flatten_layers(model,
                                                         include_self=True)
            if isinstance(layer, BatchRenormalization)]
