"""Model builders and checks shared by the test modules."""

import keras
import numpy as np


def randomize_statistics(model, seed=0):
    """Random gamma, beta and moving statistics in every normalization layer,
    so that parity checks compare something (fresh layers are identities)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for v in layer.variables:
            name = v.path.split("/")[-1]
            if name in ("moving_variance", "gamma"):
                value = rng.uniform(0.3, 2.0, v.shape)
            elif name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.5, 1.5, v.shape)
            else:
                value = rng.uniform(-1.0, 1.0, v.shape)
            v.assign(value.astype("float32"))
    # Non-zero biases too: folding must keep them.
    for v in model.weights:
        if v.path.endswith("/bias"):
            v.assign(rng.uniform(-0.5, 0.5, v.shape).astype("float32"))


def sample_inputs(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(batch,) + tuple(t.shape[1:])).astype("float32")
          for t in model.inputs]
    return xs[0] if len(xs) == 1 else xs


def as_list(y):
    return [np.asarray(t) for t in y] if isinstance(y, (list, tuple)) else [
        np.asarray(y)]


def max_rel_diff(a, b):
    """Max abs difference relative to the output scale, over all outputs."""
    worst = 0.0
    for x, y in zip(as_list(a), as_list(b)):
        scale = max(float(np.abs(x).max()), 1e-6)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


def weights_snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def nested_model(channels_first=False):
    """Nested Functional and Sequential submodels, a shared layer called
    twice, two inputs and two outputs, BN with center / scale off."""
    axis = 1 if channels_first else -1
    shape = (3, 8, 8) if channels_first else (8, 8, 3)
    fmt = "channels_first" if channels_first else "channels_last"

    inner_in = keras.Input(shape, name="inner_in")
    h = keras.layers.Conv2D(4, 3, padding="same", data_format=fmt,
                            name="inner_conv")(inner_in)
    h = keras.layers.BatchNormalization(axis=axis, name="inner_bn")(h)
    h = keras.layers.ReLU(name="inner_relu")(h)
    inner = keras.Model(inner_in, h, name="inner")

    seq = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(16, name="seq_dense"),
        keras.layers.BatchNormalization(center=False, name="seq_bn"),
        keras.layers.Dense(16, use_bias=False, name="seq_dense2"),
        keras.layers.BatchNormalization(scale=False, name="seq_bn2"),
    ], name="seq")

    shared_bn = keras.layers.BatchNormalization(axis=axis, name="shared_bn")
    a = keras.Input(shape, name="image_a")
    b = keras.Input(shape, name="image_b")
    ya = shared_bn(inner(a))
    yb = shared_bn(inner(b))
    joined = keras.layers.Concatenate(axis=axis, name="join")([ya, yb])
    joined = keras.layers.BatchNormalization(axis=axis, name="join_bn")(joined)
    pooled = keras.layers.GlobalAveragePooling2D(data_format=fmt,
                                                 name="pool")(joined)
    v = keras.layers.Dense(16, name="head_dense")(pooled)
    v = seq(v)
    frozen = keras.layers.Dense(5, name="frozen_dense")
    frozen.trainable = False
    out1 = keras.layers.Activation("softmax", name="probs")(frozen(v))
    out2 = keras.layers.Dense(1, name="score")(pooled)
    return keras.Model([a, b], [out1, out2], name="outer")


class FlippedWeights(keras.layers.Layer):
    """`x * a + b` with `a` and `b` of one shape, created in the order
    `FlippedWeights.order` says when built: `flipped_model` reverses it once
    its model is built, so copies create them in the other order, and
    weights moved by position would trade places."""

    order = ("a", "b")

    def build(self, input_shape):
        for name in FlippedWeights.order:
            setattr(self, name, self.add_weight(
                name=name, shape=(input_shape[-1],),
                initializer="random_normal"))

    def call(self, x):
        return x * self.a + self.b


class FlippedBlock(keras.layers.Layer):
    """A custom layer with a Dense sublayer and, of its own, FlippedWeights'
    pair of weights in `FlippedWeights.order`; no normalization."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="dense")

    def build(self, input_shape):
        self.dense.build(input_shape)
        for name in FlippedWeights.order:
            setattr(self, name, self.add_weight(
                name=name, shape=(4,), initializer="random_normal"))

    def call(self, x):
        return self.dense(x) * self.a + self.b


def weight_order(layer):
    """The names of a layer's own weights `a` and `b`, in creation order."""
    return [v.name for v in layer.weights if v.name in ("a", "b")]


def flipped_model():
    """Input -> FlippedWeights -> FlippedBlock -> BatchNormalization ->
    Dense, built with weights a, b (in that order), statistics randomized;
    layers built from now on create b first."""
    FlippedWeights.order = ("a", "b")
    inputs = keras.Input((4,))
    x = FlippedWeights(name="flipped")(inputs)
    x = FlippedBlock(name="flipped_block")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    randomize_statistics(model, seed=3)
    FlippedWeights.order = ("b", "a")
    return model
