"""Fine-tuning models with strided 1x1 projection shortcuts on CPU.

TensorFlow 2.21's oneDNN kernel for the weight gradient of a 1x1 Conv2D with
stride 2 was seen to corrupt the heap on AVX-512 machines once the input is
about 56x56 or larger (a segfault, or "malloc(): corrupted top size"), which
kills the process. The training runs in a subprocess, so that such a crash
fails this test with its exit status and stderr instead of taking pytest
down; it runs once with TensorFlow's default oneDNN setting and once with
oneDNN forced on (the set-up of the report).
"""

import os
import subprocess
import sys

import pytest

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
