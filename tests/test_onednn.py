"""Fine-tuning models with strided 1x1 projection shortcuts on CPU.

TensorFlow 2.21's oneDNN kernel for the weight gradient of a 1x1 Conv2D with
stride 2 was seen to corrupt the heap on AVX-512 machines once the input is
about 56x56 or larger (a segfault, or "malloc(): corrupted top size"), which
kills the process; it does on the AVX-512 machines here. `fine_tune`
therefore computes such convolutions as a subsampling followed by a stride-1
convolution on CPUs (`convert.subsample_strided_pointwise`).

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
from renorm_convert.convert import (restore_strided_pointwise,
                                    subsample_strided_pointwise)

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
    history = rc.fine_tune(model, train, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss), loss
    print(f"size {size}: {len(history.steps)} steps, loss {loss:.4f}",
          flush=True)
print("done")
"""


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


@pytest.mark.parametrize("size,strides,padding", [
    (16, 2, "valid"), (15, 2, "same"), (17, 3, "valid"), (16, (2, 1), "same"),
])
def test_subsampled_strided_pointwise_is_exact(size, strides, padding):
    """The workaround computes the same outputs and gradients as the
    strided 1x1 convolution (compared below the size that crashes)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(4, 1, strides=strides, padding=padding)(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    data = tf.constant(np.random.default_rng(0).normal(
        size=(2, size, size, 3)).astype("float32"))

    def run():
        with tf.GradientTape() as tape:
            y = model(data)
            loss = tf.reduce_sum(y * y)
        return y.numpy(), [g.numpy() for g in
                           tape.gradient(loss, model.trainable_variables)]

    config = model.get_config()
    y0, g0 = run()
    assert subsample_strided_pointwise(model) == 1
    assert subsample_strided_pointwise(model) == 0  # once only
    y1, g1 = run()
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert model.get_config() == config
    assert restore_strided_pointwise(model) == 1
    assert restore_strided_pointwise(model) == 0
    np.testing.assert_allclose(run()[0], y0, rtol=1e-6, atol=1e-6)


def test_fine_tune_returns_the_plain_convolution():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, strides=2)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = rc.convert(keras.Model(inputs, keras.layers.Dense(2)(x)))
    rng = np.random.default_rng(0)
    train = tf.data.Dataset.from_tensor_slices((
        rng.normal(size=(8, 8, 8, 3)).astype("float32"),
        rng.integers(0, 2, 8))).batch(4)
    trained = rc.fine_tune(model, train, verbose=0).trained_model
    assert not any("convolution_op" in layer.__dict__
                   for layer in trained._flatten_layers())
