"""The GPU path: mixed precision, XLA, microbatches under XLA, fine-tuning
ResNet50 at full size, and the schedule under a compiled train step.

Every test here is marked `gpu` and skips where TensorFlow sees no GPU. Their
logic runs on a CPU too, at small sizes, with
RENORM_CONVERT_GPU_TESTS_ON_CPU=1 (slow: XLA compiles on the CPU):

    RENORM_CONVERT_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import renorm_convert as rc
from helpers import weights_snapshot
from test_layers import D_MAX, R_MAX, _inputs, _pair, _random_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = tf.config.list_physical_devices("GPU")
ON_CPU = os.environ.get("RENORM_CONVERT_GPU_TESTS_ON_CPU") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not GPUS and not ON_CPU,
        reason="needs a GPU: tf.config.list_physical_devices('GPU') is "
               "empty (RENORM_CONVERT_GPU_TESTS_ON_CPU=1 runs these tests' "
               "logic on the CPU at small sizes)"),
]

# Full size on a GPU; small enough for a CPU check of the logic.
RESNET_SIZE, RESNET_BATCH = (224, 64) if GPUS else (32, 4)

# float16 carries about 3 decimal digits: outputs and input gradients in
# float16 are compared at that precision, the float32 statistics tightly.
TOLERANCES = {"float32": (1e-4, 1e-4), "mixed_float16": (1e-2, 2e-2)}


def _assert_all_close(these, those, rtol, atol):
    """Outputs and gradients, compared in float32."""
    for a, b in zip(these, those):
        np.testing.assert_allclose(tf.cast(a, "float32"),
                                   tf.cast(b, "float32"), rtol=rtol,
                                   atol=atol)


def _train_step_function(layer, jit_compile):
    """One training step of `layer` alone: its output, and the gradients
    of `sum(y * w)` with respect to the input and the layer's weights."""

    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * w)
        return y, tape.gradient(loss, [x] + layer.trainable_variables)

    return tf.function(step, jit_compile=jit_compile)


@pytest.mark.parametrize("policy,jit_compile", [
    ("mixed_float16", False),
    ("float32", True),
    ("mixed_float16", True),
])
@pytest.mark.parametrize("shape,axis", [((16, 8, 8, 6), -1),
                                        ((16, 6, 8, 8), 1)])
def test_matches_keras_renorm(policy, jit_compile, shape, axis):
    """Same weights, training mode: outputs, gradients and every updated
    statistic as Keras's own `BatchNormalization(renorm=True)`."""
    keras.mixed_precision.set_global_policy(policy)
    ours, peer = _pair(shape, axis)
    assert ours.compute_dtype == peer.compute_dtype
    steps = [_train_step_function(layer, jit_compile) for layer in (ours, peer)]
    w = tf.constant(_inputs(shape, seed=9))
    rtol, atol = TOLERANCES[policy]
    for i in range(4):
        x = tf.cast(_inputs(shape, seed=i), ours.compute_dtype)
        (y1, g1), (y2, g2) = steps[0](x, w), steps[1](x, w)
        assert y1.dtype == y2.dtype == ours.compute_dtype
        _assert_all_close([y1, *g1], [y2, *g2], rtol, atol)
    for a, b in zip(ours.variables, peer.variables):
        assert a.dtype == b.dtype == "float32"
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=a.path)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("shape,axis,signature", [
    ((16, 8, 8, 6), -1, None),            # whole groups of 4
    ((18, 8, 8, 6), -1, None),            # 4 x 4 + 2: a ragged last group
    ((16, 6, 8, 8), 1, None),             # channels first
    ((18, 8, 8, 6), -1, "unknown batch"),  # as in fit: tf.cond on the size
])
def test_microbatches_under_xla_match_without(policy, shape, axis, signature):
    keras.mixed_precision.set_global_policy(policy)
    layers = []
    for _ in range(2):
        layer = rc.BatchRenormalization(axis=axis, microbatch_size=4,
                                        r_max=R_MAX, d_max=D_MAX)
        layer.build(shape)
        _random_state(layer, np.random.default_rng(7))
        layers.append(layer)
    plain = _train_step_function(layers[0], jit_compile=False)
    compiled = _train_step_function(layers[1], jit_compile=True)
    if signature:
        spec = [tf.TensorSpec((None,) + shape[1:], layers[1].compute_dtype),
                tf.TensorSpec((None,) + shape[1:], "float32")]
        compiled = compiled.get_concrete_function(*spec)
    w = tf.constant(_inputs(shape, seed=9))
    rtol, atol = TOLERANCES[policy]
    for i in range(3):
        x = tf.cast(_inputs(shape, seed=i), layers[0].compute_dtype)
        (y1, g1), (y2, g2) = plain(x, w), compiled(x, w)
        _assert_all_close([y1, *g1], [y2, *g2], rtol, atol)
    for a, b in zip(layers[0].variables, layers[1].variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=a.path)


def test_fine_tune_resnet50_mixed_float16_xla():
    """A converted ResNet50 (224x224, batch 64 on a GPU) trains for a few
    steps under mixed precision and XLA: finite loss, weights and
    statistics move, statistics stay float32."""
    model = keras.applications.ResNet50(
        weights=None, input_shape=(RESNET_SIZE, RESNET_SIZE, 3), classes=10)
    converted = rc.convert(model)
    del model
    rng = np.random.default_rng(0)
    n = 3 * RESNET_BATCH
    x = rng.uniform(0, 1, (n, RESNET_SIZE, RESNET_SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(RESNET_BATCH)
    before = weights_snapshot(converted)
    history = rc.fine_tune(converted, train, epochs=1, learning_rate=1e-4,
                           mixed_precision="float16", jit_compile=True,
                           verbose=0)
    trained = history.trained_model
    assert trained.jit_compile
    assert len(history.steps) == 3
    assert np.isfinite(history.history["loss"]).all(), history.history
    layers = [l for l in trained._flatten_layers()
              if isinstance(l, rc.BatchRenormalization)]
    assert len(layers) == 53
    assert all(l.compute_dtype == "float16" for l in layers)
    assert all(v.dtype == "float32" for l in layers for v in l.variables)
    after = weights_snapshot(trained)
    assert set(after) == set(before)
    for name in ("conv1_conv/kernel", "predictions/kernel",
                 "conv1_bn/gamma", "conv1_bn/moving_mean",
                 "conv5_block3_3_bn/renorm_stddev"):
        (path,) = [p for p in before if p.endswith(name)]
        assert np.isfinite(after[path]).all(), path
        assert np.abs(after[path] - before[path]).max() > 0, path


SCHEDULE = r"""
import json, sys
import numpy as np
import keras
import tensorflow as tf
import renorm_convert as rc

precision = sys.argv[1] if sys.argv[1] != "none" else None
inputs = keras.Input((16, 16, 3))
x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
x = keras.layers.GlobalAveragePooling2D()(x)
model = rc.convert(keras.Model(inputs, keras.layers.Dense(4)(x)))


class Seen(keras.callbacks.Callback):
    # The bounds the layer held during each step, and the steps before
    # which Keras's train step was traced (its Python body runs once per
    # trace).
    def __init__(self):
        super().__init__()
        self.values, self.traces = [], []

    def on_train_begin(self, logs=None):
        step = self.model.train_step
        def counted(data):
            self.traces.append(len(self.values))
            return step(data)
        self.model.train_step = counted
        self.model.make_train_function(force=True)

    def on_train_batch_end(self, batch, logs=None):
        layer = [l for l in self.model._flatten_layers()
                 if isinstance(l, rc.BatchRenormalization)][0]
        self.values.append((layer.r_max, layer.d_max))


rng = np.random.default_rng(0)
data = tf.data.Dataset.from_tensor_slices((
    rng.normal(size=(48, 16, 16, 3)).astype("float32"),
    rng.integers(0, 4, 48).astype("int32"))).batch(8)
seen = Seen()
schedule = rc.RenormSchedule(warmup_steps=1, r_max=3.0, r_max_steps=5,
                             d_max=5.0, d_max_steps=4)
history = rc.fine_tune(model, data, epochs=1, schedule=schedule,
                       jit_compile=True, mixed_precision=precision,
                       callbacks=[seen], verbose=0)
print(json.dumps({"values": seen.values, "traces": seen.traces,
                  "loss": history.history["loss"]}))
"""


@pytest.mark.parametrize("precision", [None, "float16"])
def test_schedule_changes_bounds_without_recompiling(precision):
    """RenormSchedule changes r_max / d_max at every step of an
    XLA-compiled train step: no retrace, one XLA compilation. The
    compilations are counted from TensorFlow's own log, which needs a
    fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
               TF_CPP_VMODULE="device_compilation_profiler=1")
    result = subprocess.run(
        [sys.executable, "-c", SCHEDULE, precision or "none"], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    values = [tuple(v) for v in out["values"]]
    assert len(values) == 6
    assert len(set(values)) >= 4, values
    assert values[0] == (1.0, 0.0) and values[-1] == (3.0, 5.0), values
    assert np.isfinite(out["loss"]).all()
    # Traced before the first step only (TensorFlow traces twice there when
    # the first call creates the optimizer's variables), never again.
    assert out["traces"] and set(out["traces"]) == {0}, out
    compiled = re.findall(r"Compiled (\S+) (\d+) times", result.stderr)
    train = [name for name, _ in compiled if "step_on" in name]
    assert compiled, ("no XLA compilation logged; TensorFlow's log format "
                      "changed?\n" + result.stderr[-2000:])
    assert len(train) == 1, compiled
