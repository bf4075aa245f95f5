"""Model builders and checks shared by the test modules."""

import os

import keras
import numpy as np

import renorm_convert as rc
from renorm_convert import data

TESTS = os.path.dirname(os.path.abspath(__file__))


def subprocess_env(drop=(), **extra):
    """The environment a test's child process runs in: this one, quiet,
    with the tests folder importable, without the variables named in
    `drop` (or starting with one ending in "_"), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not any(k == d or (d.endswith("_") and k.startswith(d))
                      for d in drop)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        [TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def randomize_statistics(model, seed=0):
    """Random gamma, beta and moving statistics in every normalization layer,
    so that parity checks compare something (fresh layers are identities)."""

    rng = np.random.default_rng(seed)
    for layer in rc.iter_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for v in layer.variables:
            name = v.path.split("/")[-1]
            if name in ("r_max", "d_max"):
                continue  # the bounds, not statistics
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


def sample_inputs(model, batch=2, seed=0, uniform=None):
    """Seeded random inputs of the model's shapes: standard normal, or
    uniform in `uniform` (low, high); an array, a list for several
    inputs."""
    rng = np.random.default_rng(seed)
    xs = [(rng.normal(size=(batch,) + tuple(t.shape[1:])) if uniform is None
           else rng.uniform(*uniform, (batch,) + tuple(t.shape[1:])))
          .astype("float32") for t in model.inputs]
    return xs[0] if len(xs) == 1 else xs


def as_list(y):
    return [numpy(t) for t in y] if isinstance(y, (list, tuple)) else [
        numpy(y)]


def max_rel_diff(a, b):
    """Max abs difference relative to the output scale, over all outputs."""
    worst = 0.0
    for x, y in zip(as_list(a), as_list(b)):
        scale = max(float(np.abs(x).max()), 1e-6)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


def weights_snapshot(model):
    return {v.path: numpy(v) for v in model.weights}


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


# --- backend-neutral training steps of one layer -----------------------------

def numpy(value):
    """Any backend's tensor or a Keras variable as NumPy."""
    import keras

    if isinstance(value, (np.ndarray, np.generic, float, int, list)):
        return np.asarray(value)
    if isinstance(value, keras.Variable):
        return np.asarray(keras.ops.convert_to_numpy(value))
    return np.asarray(keras.ops.convert_to_numpy(
        keras.ops.stop_gradient(value)))


def layer_step(layer, x, w):
    """One training-mode call of `layer` on `x` with the loss sum(y * w):
    (y, [d loss / d x, d loss / d each trainable variable]) as NumPy; the
    layer's statistics are updated as a training step updates them."""
    import keras

    backend = keras.backend.backend()
    x = np.asarray(x, "float32")
    w = np.asarray(w, "float32")
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * w)
        grads = tape.gradient(loss, [xt] + [v.value for v in
                                            layer.trainable_variables])
        return y.numpy(), [g.numpy() for g in grads]
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(x_, values):
            y_, updated = layer.stateless_call(values, non_trainable, x_,
                                               training=True)
            return (y_ * w).sum(), (y_, updated)

        (_, (y, updated)), grads = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(x, trainable)
        for v, value in zip(layer.non_trainable_variables, updated):
            v.assign(value)
        return np.asarray(y), [np.asarray(grads[0])] + [
            np.asarray(g) for g in grads[1]]
    import torch

    xt = torch.tensor(x, requires_grad=True)
    for v in layer.trainable_variables:
        v.value.grad = None
    y = layer(xt, training=True)
    (y * torch.tensor(w)).sum().backward()
    grads = [xt.grad.numpy()] + [v.value.grad.detach().numpy()
                                 for v in layer.trainable_variables]
    return y.detach().numpy(), grads


def compiled_training_call(layer, jit):
    """(f, traces): f(x) runs `layer` in training mode through the backend's
    compiler (TensorFlow: tf.function, XLA with `jit`; JAX: jax.jit of its
    stateless call; PyTorch: torch.compile with `jit`, eager otherwise),
    updating its statistics; traces() says how often it was traced or
    compiled."""
    import keras

    backend = keras.backend.backend()
    count = [0]
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit)
        def f(t):
            count[0] += 1
            return layer(t, training=True)

        return (lambda x: f(tf.constant(x)).numpy()), lambda: count[0]
    if backend == "jax":
        import jax

        def step(trainable, non_trainable, x):
            count[0] += 1
            return layer.stateless_call(trainable, non_trainable, x,
                                        training=True)

        compiled = jax.jit(step) if jit else step

        def f(x):
            y, updated = compiled([v.value for v in layer.trainable_variables],
                                  [v.value for v in
                                   layer.non_trainable_variables], x)
            for v, value in zip(layer.non_trainable_variables, updated):
                v.assign(value)
            return np.asarray(y)

        return f, (lambda: count[0]) if jit else (lambda: 1)
    import torch

    if not jit:
        return (lambda x: numpy(layer(x, training=True))), lambda: 1

    def counting(gm, example_inputs):
        count[0] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer(t, training=True),
                             backend=counting)
    # On the backend's device (a GPU where there is one), as Keras puts it.
    return (lambda x: numpy(compiled(keras.ops.convert_to_tensor(x)))), \
        lambda: count[0]


# --- small models and data the training tests share ---------------------

def small_cnn(num_classes=10, synchronized=False, shape=(28, 28, 1),
              activation="softmax"):
    inputs = keras.Input(shape)
    x = inputs
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(synchronized=synchronized)(x)
        x = keras.layers.ReLU()(x)
        if shape[0] > 8:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation=activation,
                                 name="head")(x)
    return keras.Model(inputs, outputs)


def digits_cnn(activation="softmax", synchronized=False):
    return small_cnn(shape=(8, 8, 1), activation=activation,
                     synchronized=synchronized)


def weights(model):
    return [numpy(v) for v in model.weights]


def numpy_accuracy(model, split):
    """Top-1 accuracy on the validation part, computed here."""
    x = data.adapt(split.x_val, data.model_image_shape(model),
                   split.value_range, split.scaling)
    pred = numpy(model.predict(x, batch_size=256, verbose=0))
    return float((pred.argmax(-1) == data.class_ids(split.y_val)).mean())


def conv_classifier(classes=4, shape=(12, 12, 3)):
    """A Keras 2 style classifier (SqueezeNet, mini-Xception): the classes
    come from a 1x1 Conv, then pooling and softmax."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Conv2D(classes, 1, name="classes")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Activation("softmax")(x),
                       name="model_1")


def tiny_model():
    return rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax")], name="tiny"))


def tiny_split(rng):
    return rc.data.Split(rng.integers(0, 256, (64, 8, 8, 1), np.uint8),
                         rng.integers(0, 3, 64),
                         rng.integers(0, 256, (16, 8, 8, 1), np.uint8),
                         rng.integers(0, 3, 16), 3, "tiny")


class Record(keras.callbacks.Callback):
    """Whether training began, and a stop after `stop_after` epochs."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.began = False
        self.stop_after = stop_after

    def on_train_begin(self, logs=None):
        self.began = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stop_after is not None and epoch + 1 >= self.stop_after:
            self.model.stop_training = True


def optimizer_step(model):
    return int(numpy(model.optimizer.iterations))


def assert_same_weights(first, second):
    assert [v.path for v in first.weights] == [v.path for v in second.weights]
    for x, y in zip(first.weights, second.weights):
        np.testing.assert_array_equal(numpy(x), numpy(y), err_msg=x.path)


def bias_gradient(probabilities, y):
    """d mean(cross-entropy) / d bias of a softmax Dense head: mean(p - y)."""
    rows = np.eye(probabilities.shape[-1])[y] if np.ndim(y) == 1 else y
    return (probabilities - rows).mean(0)
