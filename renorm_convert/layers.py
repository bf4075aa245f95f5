"""The BatchRenormalization layer and its conversion from / to BatchNormalization.

The layer builds on Keras's own `BatchNormalization(renorm=True)` (Keras >=
3.14): the seven state arrays, the moments, the composition of r and d with
gamma and beta, and the moving-statistic updates are Keras's. What this layer
adds is what Keras's cannot do:

* the clipping bounds r_max and d_max live in variables, so a schedule can
  change them at every step without retracing a `tf.function` or recompiling
  an XLA graph;
* microbatches (the paper's Figure 2 set-up): the batch is split into groups of
  `microbatch_size` examples, each normalized with its own moments and its own
  r and d;
* lossless creation from a trained `BatchNormalization` and back.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from renorm_convert import _keras_internals as internals

PACKAGE = "renorm_convert"


def _check_axis(axis, ndim, name):
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"Expected `axis` to index a dimension of the {ndim}-D input of "
            f"layer '{name}'. Received: axis={axis}. Use -1 for channels-last "
            "or 1 for channels-first inputs."
        )


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
            `tf.distribute` strategy. With microbatches the groups are local
            to each replica by definition, so it has no effect there.
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
                raise ValueError(
                    "Expected `axis` to be a single integer. Received: "
                    f"axis={axis}"
                )
            axis = axis[0]
        r_max = self._check_r_max(r_max)
        d_max = self._check_d_max(d_max)
        if microbatch_size is not None:
            if (
                isinstance(microbatch_size, bool)
                or int(microbatch_size) != microbatch_size
                or microbatch_size < 1
            ):
                raise ValueError(
                    "Expected `microbatch_size` to be None or an integer >= 1. "
                    f"Received: microbatch_size={microbatch_size}"
                )
            microbatch_size = int(microbatch_size)
        if not 0.0 <= float(renorm_momentum) < 1.0:
            raise ValueError(
                "Expected `renorm_momentum` in [0, 1). Received: "
                f"renorm_momentum={renorm_momentum}"
            )
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"Expected `momentum` in [0, 1). Received: momentum={momentum}"
            )
        if float(epsilon) <= 0.0:
            raise ValueError(
                f"Expected `epsilon` > 0. Received: epsilon={epsilon}"
            )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            renorm=True,
            renorm_clipping=None,
            renorm_momentum=float(renorm_momentum),
            synchronized=synchronized,
            **kwargs,
        )
        self.microbatch_size = microbatch_size
        # Plain tf.Variables: read by reference inside traced and XLA-compiled
        # functions (an assignment needs no retrace), and not Keras weights,
        # so the layer's state arrays stay exactly Keras's seven.
        self._r_max_var = tf.Variable(r_max, trainable=False, dtype="float32",
                                      name="r_max")
        self._d_max_var = tf.Variable(d_max, trainable=False, dtype="float32",
                                      name="d_max")

    @staticmethod
    def _check_r_max(r_max):
        if not float(r_max) >= 1.0:
            raise ValueError(
                f"Expected `r_max` >= 1 (r is clipped to [1/r_max, r_max]). "
                f"Received: r_max={r_max}"
            )
        return float(r_max)

    @staticmethod
    def _check_d_max(d_max):
        if not float(d_max) >= 0.0:
            raise ValueError(
                f"Expected `d_max` >= 0 (d is clipped to [-d_max, d_max]). "
                f"Received: d_max={d_max}"
            )
        return float(d_max)

    @property
    def r_max(self):
        return float(self._r_max_var.numpy())

    @property
    def d_max(self):
        return float(self._d_max_var.numpy())

    def set_clipping(self, r_max=None, d_max=None):
        """Sets the clipping bounds; traced functions see the new values."""
        if r_max is not None:
            self._r_max_var.assign(self._check_r_max(r_max))
        if d_max is not None:
            self._d_max_var.assign(self._check_d_max(d_max))

    def build(self, input_shape):
        _check_axis(self.axis, len(input_shape), self.name)
        super().build(input_shape)

    def _renorm_correction_and_moments(self, mean, variance):
        # Overrides Keras's protected step (internals.BATCHNORM_HOOKS).
        # Keras computes r and d without clipping (its clipping dict is
        # empty); the bounds are applied here from the variables.
        r, d, mean, variance = internals.renorm_correction_and_moments(
            self, mean, variance
        )
        r_max = ops.cast(self._r_max_var, r.dtype)
        d_max = ops.cast(self._d_max_var, d.dtype)
        r = ops.minimum(ops.maximum(r, 1.0 / r_max), r_max)
        d = ops.clip(d, -d_max, d_max)
        return r, d, mean, variance

    def call(self, inputs, training=None, mask=None):
        if self.microbatch_size is None or not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(
                f"Layer '{self.name}': masks are not supported together with "
                "`microbatch_size`. Received a mask of shape "
                f"{tuple(mask.shape)}."
            )
        return self._call_microbatched(inputs)

    def _call_microbatched(self, inputs):
        m = self.microbatch_size
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        batch = x.shape[0]
        if batch is not None:
            normalize = (self._normalize_groups if batch % m == 0
                         else self._normalize_padded)
            y, mean, variance = normalize(x)
        elif internals.in_xla_compilation():
            # XLA knows the batch size when it compiles; the padded path is
            # exact for whole groups too (padding nothing), and a tf.cond
            # between the two would not compile (see in_xla_compilation).
            y, mean, variance = self._normalize_padded(x)
        else:
            # Inside `fit` the batch size is unknown when tracing: whole
            # groups take the cheap path, a ragged last batch the padded one.
            y, mean, variance = tf.cond(
                tf.equal(tf.shape(x)[0] % m, 0),
                lambda: self._normalize_groups(x),
                lambda: self._normalize_padded(x),
            )
        internals.update_renorm_statistics(
            self, ops.stop_gradient(mean), ops.stop_gradient(variance)
        )
        return ops.cast(y, self.compute_dtype)

    def _grouped_shape(self, x, groups):
        """(groups, m, ...) with every size known at trace time kept
        static, so that reshapes need no shape arithmetic at run time."""
        dynamic = tf.shape(x)
        rest = [d if d is not None else dynamic[i + 1]
                for i, d in enumerate(x.shape[1:])]
        return [groups, self.microbatch_size] + rest

    def _group_axes(self, x):
        """For x grouped as (groups, m, ...): the axes a group's moments
        reduce (its examples and all non-channel axes), and the shape that
        broadcasts (groups, channels) against it."""
        ndim = len(x.shape)
        axis = self.axis % ndim
        reduced = [1] + [a + 1 for a in range(1, ndim) if a != axis]
        bshape = [1] * (ndim + 1)
        bshape[0] = -1
        bshape[axis + 1] = x.shape[axis]
        return reduced, bshape

    def _normalize_groups(self, x):
        """The batch is a whole number of groups."""
        ndim = len(x.shape)
        axis = self.axis % ndim
        xg = tf.reshape(x, self._grouped_shape(x, -1))
        red, bshape = self._group_axes(x)
        if axis == ndim - 1:
            # Channels last: keep dims so every per-group tensor broadcasts
            # against the batch with no reshape (fewer ops, in both passes).
            mean, variance = ops.moments(xg, axes=red, keepdims=True)
            y = self._normalize_with(xg, mean, variance)
            flat_mean = ops.reshape(mean, [-1, x.shape[axis]])
            flat_var = ops.reshape(variance, [-1, x.shape[axis]])
        else:
            mean, variance = ops.moments(xg, axes=red)
            y = self._normalize_with(xg, mean, variance, bshape)
            flat_mean, flat_var = mean, variance
        y = tf.reshape(y, tf.shape(x))
        return y, ops.mean(flat_mean, axis=0), ops.mean(flat_var, axis=0)

    def _normalize_with(self, xg, mean, variance, bshape=None):
        """Applies r, d, gamma and beta with each group's own moments.
        The moments broadcast against `xg` as they are (channels last, kept
        dims) or once reshaped to `bshape` (moments of shape (groups,
        channels))."""
        r, d, mean, variance = self._renorm_correction_and_moments(
            mean, variance
        )
        gamma = ops.cast(self.gamma, xg.dtype) if self.scale else None
        beta = ops.cast(self.beta, xg.dtype) if self.center else None
        gamma, beta = internals.compose_transforms(self, r, d, gamma, beta,
                                                   xg.dtype)
        inv = ops.rsqrt(variance + self.epsilon) * gamma
        offset = beta - mean * inv
        if bshape is not None:
            inv = ops.reshape(inv, bshape)
            offset = ops.reshape(offset, bshape)
        return xg * inv + offset

    def _normalize_padded(self, x):
        """The batch ends with a smaller group: pad to whole groups and mask
        the padding out of every moment."""
        m = self.microbatch_size
        ndim = len(x.shape)
        axis = self.axis % ndim
        batch = tf.shape(x)[0]
        pad = (-batch) % m
        xp = tf.pad(x, [[0, pad]] + [[0, 0]] * (ndim - 1))
        groups = (batch + pad) // m
        valid = ops.cast(tf.range(batch + pad) < batch, x.dtype)
        xg = tf.reshape(xp, self._grouped_shape(xp, groups))
        red, bshape = self._group_axes(x)
        w = tf.reshape(valid, tf.concat([[groups, m], [1] * (ndim - 1)], 0))
        per_example = 1.0
        for a in range(1, ndim):
            if a != axis:
                per_example = per_example * ops.cast(tf.shape(x)[a], x.dtype)
        sizes = ops.reshape(ops.sum(w, axis=1), [-1, 1])
        safe = ops.maximum(sizes * per_example, 1.0)
        mean = ops.sum(xg * w, axis=red) / safe
        centered = (xg - ops.reshape(mean, bshape)) * w
        variance = ops.sum(ops.square(centered), axis=red) / safe
        y = self._normalize_with(xg, mean, variance, bshape)
        y = tf.reshape(y, tf.shape(xp))[:batch]
        total = ops.sum(sizes)
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
            raise ValueError(
                "Expected a keras.layers.BatchNormalization. Received: "
                f"{type(layer).__name__} '{getattr(layer, 'name', layer)}'"
            )
        config = layer.get_config()
        if isinstance(layer, cls):
            config.update(options)
            new = cls.from_config(config)
            if layer.built:
                build_with_values(new, _built_shape(layer),
                                  values_by_name(layer.variables))
            return new
        if layer.renorm and layer.renorm_clipping:
            # Keras's renorm layer: keep its clipping unless overridden.
            clip = layer.renorm_clipping
            config.setdefault("r_max", clip.get("rmax", 3.0))
            config.setdefault("d_max", clip.get("dmax", 5.0))
        config.pop("renorm", None)
        config.pop("renorm_clipping", None)
        config.update(options)
        new = cls.from_config(config)
        if layer.built:
            state = values_by_name(layer.variables)
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
        config.pop("renorm", None)
        config.pop("renorm_clipping", None)
        config.pop("renorm_momentum", None)
        new = keras.layers.BatchNormalization.from_config(config)
        if self.built:
            build_with_values(new, _built_shape(self),
                              values_by_name(self.variables))
        return new


def _built_shape(layer):
    """An input shape that builds a copy of `layer` with the same weights."""
    ndim = layer.input_spec.ndim if layer.input_spec is not None else None
    channels = int(layer.moving_mean.shape[0])
    ndim = ndim or max(2, layer.axis + 1 if layer.axis >= 0 else -layer.axis)
    shape = [None] * ndim
    shape[layer.axis] = channels
    return tuple(shape)


def values_by_name(variables):
    """{short name ("kernel", "moving_mean", ...): numpy value}; weights move
    between layers by these names, never by position."""
    return {v.path.split("/")[-1]: np.asarray(v.numpy()) for v in variables}


def build_with_values(layer, input_shape, values, build=None):
    """Builds `layer` with each weight named in `values` created directly
    with that value: weights move by name, and no initializer runs and no
    assignment follows (this is most of the cost of converting a model).
    `build` (no arguments) replaces `layer.build(input_shape)`. Returns the
    names of the weights created from `values`."""
    used = []
    add_weight = layer.add_weight

    def add_weight_with_value(*args, name=None, initializer=None, **kwargs):
        if name in values:
            value = values[name]
            used.append(name)

            def initializer(shape, dtype=None):
                return np.asarray(value, dtype=dtype or value.dtype)

        return add_weight(*args, name=name, initializer=initializer, **kwargs)

    # Bypass Layer.__setattr__ (attribute tracking) for this instance hook.
    object.__setattr__(layer, "add_weight", add_weight_with_value)
    try:
        if build is None:
            layer.build(input_shape)
        else:
            build()
    finally:
        object.__delattr__(layer, "add_weight")
    layer.built = True
    return used
