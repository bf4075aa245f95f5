"""Fine-tuning models with strided 1x1 projection shortcuts on CPU.

TensorFlow 2.21's oneDNN kernel for the weight gradient of a 1x1 Conv2D with
stride 2 was seen to corrupt the heap on AVX-512 machines once the input is
about 56x56 or larger (a segfault, or "malloc(): corrupted top size"), which
kills the process; it does on the AVX-512 machines here. `fine_tune`
therefore computes such convolutions as a subsampling followed by a stride-1
convolution on CPUs, for the duration of training only
(`surgery.strided_pointwise_subsampled`, a context manager).

The training runs in a subprocess, so that a crash fails the test with its
exit status and stderr instead of taking pytest down; it runs once with
TensorFlow's default oneDNN setting and once with oneDNN forced on (the
set-up of the report).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import renorm_convert as rc
from renorm_convert.transform.surgery import strided_pointwise_subsampled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = r"""
import numpy as np
import keras
import tensorflow as tf
import renorm_convert as rc

tf.config.threading.set_intra_op_parallelism_threads(2)


def resnet_style(size):
    # ResNet's downsampling blocks: a strided 3x3 path and a strided 1x1
    # projection shortcut, both batch-normalized.
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for filters in (16, 32):
        shortcut = keras.layers.Conv2D(filters, 1, strides=2,
                                       use_bias=False)(x)
        shortcut = keras.layers.BatchNormalization()(shortcut)
        y = keras.layers.Conv2D(filters, 3, strides=2, padding="same",
                                use_bias=False)(x)
        y = keras.layers.BatchNormalization()(y)
        x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


rng = np.random.default_rng(0)
for size in (64, 96):
    keras.utils.set_random_seed(0)
    model = rc.convert(resnet_style(size))
    x = rng.normal(size=(24, size, size, 3)).astype("float32")
    y = rng.integers(0, 4, size=24).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    result = rc.fine_tune(model, train, epochs=1, verbose=0)
    loss = result.history["loss"][-1]
    assert np.isfinite(loss), loss
    print(f"size {size}: {len(result.steps)} steps, loss {loss:.4f}",
          flush=True)
print("done")
"""


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [None, "1"], ids=["default", "onednn_on"])
def test_strided_1x1_projection_trains_on_cpu(onednn):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    result = subprocess.run([sys.executable, "-c", TRAIN], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"training crashed (exit status {result.returncode}; a negative "
        f"status is a signal, -11 a segfault, -6 an abort); see the oneDNN "
        f"strided 1x1 Conv2D fact in shared/DESIGN.md:\n"
        f"{result.stderr[-3000:]}")
    assert "size 64: 3 steps" in result.stdout, result.stdout
    assert "size 96: 3 steps" in result.stdout, result.stdout
    assert result.stdout.strip().endswith("done"), result.stdout


def _patched(model):
    return [layer.name for layer in rc.iter_layers(model)
            if "convolution_op" in layer.__dict__]


def _strided_model(size, strides, padding):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv3")(inputs)
    x = keras.layers.Conv2D(4, 1, strides=strides, padding=padding,
                            name="pointwise")(x)
    return keras.Model(inputs, keras.layers.Flatten()(x))


@pytest.mark.parametrize("size,strides,padding", [
    (16, 2, "valid"), (15, 2, "same"), (17, 3, "valid"), (16, (2, 1), "same"),
])
def test_subsampled_strided_pointwise_is_exact(size, strides, padding):
    """Inside the block the strided 1x1 convolution computes NumPy's
    x[:, ::s, ::t] @ kernel + bias, with the gradients of TensorFlow's own
    strided convolution (compared below the size that crashes); on leaving
    the layer is as it was."""
    model = _strided_model(size, strides, padding)
    data = tf.constant(np.random.default_rng(0).normal(
        size=(2, size, size, 3)).astype("float32"))
    conv3 = keras.Model(model.inputs[0], model.get_layer("conv3").output)
    pointwise = model.get_layer("pointwise")
    s, t = (strides, strides) if isinstance(strides, int) else strides
    features = conv3(data).numpy()[:, ::s, ::t]
    expected = (features @ pointwise.kernel.numpy()[0, 0]
                + pointwise.bias.numpy()).reshape(2, -1)

    def run():
        with tf.GradientTape() as tape:
            y = model(data)
            loss = tf.reduce_sum(y * y)
        return y.numpy(), [g.numpy() for g in
                           tape.gradient(loss, model.trainable_variables)]

    config = model.get_config()
    y0, g0 = run()
    np.testing.assert_allclose(y0, expected, rtol=1e-4, atol=1e-4)
    with strided_pointwise_subsampled(model) as changed:
        assert changed == 1 and _patched(model) == ["pointwise"]
        with strided_pointwise_subsampled(model) as again:
            assert again == 0  # already subsampled: left alone
        assert _patched(model) == ["pointwise"]  # the inner block undid nothing
        y1, g1 = run()
        assert model.get_config() == config
    np.testing.assert_allclose(y1, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert _patched(model) == []
    np.testing.assert_array_equal(run()[0], y0)


def test_subsampling_is_undone_after_an_exception():
    inputs = keras.Input((8, 8, 3))
    inner = keras.Model(inputs, keras.layers.Conv2D(
        4, 1, strides=2, name="inner_pointwise")(inputs), name="inner")
    outer_in = keras.Input((8, 8, 3))
    x = inner(outer_in)
    x = keras.layers.Conv2D(4, 1, strides=(1, 2), name="outer_pointwise")(x)
    x = keras.layers.Conv2D(4, 1, name="stride_one")(x)  # not strided
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                            name="three")(x)  # not 1x1
    model = keras.Model(outer_in, x)
    with pytest.raises(RuntimeError, match="inside"):
        with strided_pointwise_subsampled(model) as changed:
            assert changed == 2  # the nested model's layer too
            assert sorted(_patched(model)) == ["inner_pointwise",
                                               "outer_pointwise"]
            raise RuntimeError("inside")
    assert _patched(model) == []


def _projection_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, strides=2, name="projection")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return rc.convert(keras.Model(inputs, keras.layers.Dense(2)(x)))


def _train_data():
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices((
        rng.normal(size=(8, 8, 8, 3)).astype("float32"),
        rng.integers(0, 2, 8))).batch(4)


class _Watch(keras.callbacks.Callback):
    """Records, at each batch, which layers are subsampled; raises at the
    batch `fail_at`."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.seen, self.fail_at = [], fail_at

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(_patched(self.model))
        self.trained = self.model
        if batch == self.fail_at:
            raise RuntimeError("stopped inside fit")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="the workaround is for CPUs only")
def test_fine_tune_subsamples_during_training_only():
    model = _projection_model()
    watch = _Watch()
    result = rc.fine_tune(model, _train_data(), verbose=0, callbacks=[watch])
    assert watch.seen == [["projection"]] * 2
    assert len(result.steps) == 2 and np.isfinite(result.history["loss"][-1])
    assert _patched(result.model) == [] and _patched(model) == []
    # The trained model computes the plain strided convolution: NumPy's
    # x[:, ::2, ::2] @ kernel + bias.
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    projection = result.model.get_layer("projection")
    head = keras.Model(result.model.inputs[0], projection.output)
    np.testing.assert_allclose(
        head(x).numpy(), x[:, ::2, ::2] @ projection.kernel.numpy()[0, 0]
        + projection.bias.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="the workaround is for CPUs only")
def test_fine_tune_undoes_the_subsampling_after_an_exception():
    model = _projection_model()
    watch = _Watch(fail_at=1)
    with pytest.raises(RuntimeError, match="stopped inside fit"):
        rc.fine_tune(model, _train_data(), verbose=0, callbacks=[watch])
    assert watch.seen == [["projection"]] * 2
    assert _patched(watch.trained) == [] and _patched(model) == []
