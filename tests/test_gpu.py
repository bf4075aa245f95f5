"""The GPU path on every Keras backend (TensorFlow, JAX, PyTorch): the layer
against Keras's renorm and NumPy on the GPU, under mixed precision and the
backend's compiler; fine-tuning on the GPU against the same run on the CPU;
mixed precision keeping the statistics in float32; the clipping bounds and
the schedule changing under a compiled step without a retrace.

Every test here is marked `gpu` and skips where the backend sees no GPU
(`renorm_convert._internal.backend.has_gpu()`). Their logic runs on a CPU too, at
small sizes, with RENORM_CONVERT_GPU_TESTS_ON_CPU=1 (the GPU-versus-CPU
comparisons then compare the CPU with itself):

    RENORM_CONVERT_GPU_TESTS_ON_CPU=1 KERAS_BACKEND=jax pytest -m gpu tests/test_gpu.py

`scripts/gpu-check.sh` runs them on a GPU machine for JAX and PyTorch.
"""

import contextlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert._internal import backend as _backend
from helpers import compiled_training_call, numpy, weights_snapshot
from test_layers import (D_MAX, R_MAX, _inputs, _np_microbatch, _pair,
                         _peer, _random_state)
from test_schedule import ScheduledFit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
GPU = _backend.has_gpu()
ON_CPU = os.environ.get("RENORM_CONVERT_GPU_TESTS_ON_CPU") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not GPU and not ON_CPU,
        reason=f"needs a GPU: Keras's {BACKEND} backend sees none "
               "(RENORM_CONVERT_GPU_TESTS_ON_CPU=1 runs these tests' logic "
               "on the CPU at small sizes)"),
]

# Full size on a GPU; small enough for a CPU check of the logic.
RESNET_SIZE, RESNET_BATCH = (96, 32) if GPU else (32, 4)

# float16 carries about 3 decimal digits, bfloat16 about 2: outputs and
# input gradients are compared at that precision, the float32 statistics
# tightly.
TOLERANCES = {"float32": (1e-4, 1e-4), "mixed_float16": (1e-2, 2e-2),
              "mixed_bfloat16": (5e-2, 1e-1)}
POLICIES = list(TOLERANCES)


def _on(variable):
    """'gpu' or 'cpu': where a Keras variable's value lives."""
    value = variable.value
    if BACKEND == "jax":
        (device,) = value.devices()
        return "gpu" if device.platform != "cpu" else "cpu"
    if BACKEND == "torch":
        return "gpu" if value.device.type == "cuda" else "cpu"
    return "gpu" if "GPU" in value.device.upper() else "cpu"


def _skip_torch_jit(jit):
    if BACKEND == "torch" and jit:
        pytest.skip("Keras trains PyTorch eagerly by default (jit_compile="
                    "'auto' is False there); torch.compile is checked by "
                    "test_clipping_changes_without_recompiling")


@contextlib.contextmanager
def _full_float32():
    """float32 matrix products and convolutions at full precision: GPUs
    compute them in TensorFloat-32 by default (10 mantissa bits), which a
    comparison with the CPU would see."""
    if BACKEND == "jax":
        import jax

        before = jax.config.jax_default_matmul_precision
        jax.config.update("jax_default_matmul_precision", "highest")
        try:
            yield
        finally:
            jax.config.update("jax_default_matmul_precision", before)
    elif BACKEND == "torch":
        import torch

        before = (torch.backends.cudnn.allow_tf32,
                  torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            (torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32) = before
    else:
        import tensorflow as tf

        before = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(before)


def _train_step_function(layer, jit):
    """f(x, w) -> (y, [d loss / d x, d loss / d each trainable variable])
    as float32 NumPy, for one training call of `layer` alone under the loss
    sum(float32(y) * w), its statistics updated; through the backend's
    compiler with `jit` (TensorFlow: XLA; JAX: jax.jit), eagerly
    otherwise."""
    as32 = lambda t: np.asarray(numpy(keras.ops.cast(t, "float32")))  # noqa
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit)
        def step(x, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, "float32") * w)
            return y, tape.gradient(
                loss, [x] + [v.value for v in layer.trainable_variables])

        def f(x, w):
            y, grads = step(tf.cast(x, layer.compute_dtype), tf.constant(w))
            return as32(y), [as32(g) for g in grads]

        return f
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def loss(x, trainable, non_trainable, w):
            y, updated = layer.stateless_call(trainable, non_trainable, x,
                                              training=True)
            return (y.astype("float32") * w).sum(), (y, updated)

        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        grad = jax.jit(grad) if jit else grad

        def f(x, w):
            (_, (y, updated)), (gx, gv) = grad(
                jnp.asarray(x, layer.compute_dtype),
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables],
                jnp.asarray(w))
            for v, value in zip(layer.non_trainable_variables, updated):
                v.assign(value)
            return as32(y), [as32(gx)] + [as32(g) for g in gv]

        return f
    import torch

    def f(x, w):
        xt = keras.ops.convert_to_tensor(x, layer.compute_dtype)
        xt.requires_grad_(True)
        for v in layer.trainable_variables:
            v.value.grad = None
        y = layer(xt, training=True)
        (y.float() * keras.ops.convert_to_tensor(w)).sum().backward()
        return as32(y), [as32(xt.grad)] + [
            as32(v.value.grad) for v in layer.trainable_variables]

    return f


def _assert_all_close(these, those, rtol, atol):
    for a, b in zip(these, those):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# --- the layer on the device -------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape,axis", [((16, 8, 8, 6), -1),
                                        ((16, 6, 8, 8), 1)])
def test_matches_keras_renorm(policy, jit, shape, axis):
    """Same weights, training mode, on the GPU: outputs, gradients and
    every updated statistic as Keras's own `BatchNormalization(renorm=True)`
    under the same policy and compiler; statistics stay float32."""
    _skip_torch_jit(jit)
    keras.mixed_precision.set_global_policy(policy)
    ours, peer = _pair(shape, axis)
    assert ours.compute_dtype == peer.compute_dtype == (
        keras.mixed_precision.global_policy().compute_dtype)
    if GPU:
        assert {_on(v) for v in ours.variables} == {"gpu"}
    steps = [_train_step_function(layer, jit) for layer in (ours, peer)]
    w = _inputs(shape, seed=9)
    rtol, atol = TOLERANCES[policy]
    for i in range(4):
        x = _inputs(shape, seed=i)
        (y1, g1), (y2, g2) = steps[0](x, w), steps[1](x, w)
        assert np.isfinite(y1).all()
        _assert_all_close([y1, *g1], [y2, *g2], rtol, atol)
    state = [v for v in ours.variables
             if v.path.split("/")[-1] not in ("r_max", "d_max")]
    for a, b in zip(state, peer.variables):
        assert a.dtype == b.dtype == "float32"
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5,
                                   atol=1e-5 if policy == "float32" else 1e-3,
                                   err_msg=a.path)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("shape,axis", [
    ((16, 8, 8, 6), -1),   # whole groups of 4
    ((18, 8, 8, 6), -1),   # 4 x 4 + 2: a ragged last group
    ((16, 6, 8, 8), 1),    # channels first
])
def test_microbatches_match_numpy(policy, shape, axis):
    """Microbatches of 4 on the GPU, compiled (TensorFlow: XLA; JAX:
    jax.jit; PyTorch: eager): outputs and statistics as NumPy's float64
    reference."""
    keras.mixed_precision.set_global_policy(policy)
    layer = rc.BatchRenormalization(axis=axis, microbatch_size=4,
                                    r_max=R_MAX, d_max=D_MAX, momentum=0.9,
                                    renorm_momentum=0.8)
    layer.build(shape)
    _random_state(layer, np.random.default_rng(7))
    x = _inputs(shape, seed=4)
    # NumPy sees what the layer sees: the input rounded to its dtype.
    seen = numpy(keras.ops.cast(keras.ops.cast(x, layer.compute_dtype),
                                "float32"))
    expected, state = _np_microbatch(seen, layer, 4, axis)
    y, grads = _train_step_function(layer, jit=BACKEND != "torch")(
        x, _inputs(shape, seed=9))
    rtol, atol = TOLERANCES[policy]
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)
    assert all(np.isfinite(g).all() for g in grads)
    for name, value in state.items():
        variable = getattr(layer, name)
        assert variable.dtype == "float32"
        np.testing.assert_allclose(numpy(variable), value, rtol=1e-4,
                                   atol=1e-4, err_msg=name)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_clipping_changes_without_recompiling(policy):
    """The bounds are variables the compiled step reads (TensorFlow: XLA;
    JAX: jax.jit; PyTorch: torch.compile, counted by its graph captures):
    after set_clipping the same compiled step computes with the new bounds,
    as Keras's renorm layer built with them does."""
    keras.mixed_precision.set_global_policy(policy)
    x = _inputs((32, 4, 4, 8))
    layer = rc.BatchRenormalization(r_max=1.0, d_max=0.0)
    layer.build(x.shape)
    _random_state(layer, np.random.default_rng(2))
    snapshot = [numpy(v) for v in layer.variables]
    f, traces = compiled_training_call(layer, jit=True)
    f(x)  # warm-up: Keras's first-call bookkeeping can cost a capture
    outputs, counts = [], []
    bounds = [(1.0, 0.0), (R_MAX, D_MAX), (1.2, 0.1)]
    for r, d in bounds:
        for v, s in zip(layer.variables, snapshot):
            v.assign(s)
        layer.set_clipping(r_max=r, d_max=d)
        outputs.append(numpy(keras.ops.cast(f(x), "float32")))
        counts.append(traces())
    assert counts[0] >= 1 and counts[-1] == counts[0], counts
    rtol, atol = TOLERANCES[policy]
    for (r, d), y in zip(bounds, outputs):
        peer = _peer(x.shape, snapshot, r, d)
        expected = numpy(keras.ops.cast(peer(x, training=True), "float32"))
        np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-1


@pytest.mark.parametrize("jit", [True, False])
def test_schedule_changes_bounds_every_step_without_retracing(jit):
    """RenormSchedule changes r_max / d_max at every step of `fit` on the
    GPU; the compiled train step is traced once, and gamma and beta end
    where NumPy's step-by-step run with the same bounds ends."""
    _skip_torch_jit(jit)
    run = ScheduledFit(jit)
    if GPU:
        assert {_on(v) for v in run.layer.variables} == {"gpu"}
    if jit or BACKEND == "tensorflow":  # TensorFlow: a tf.function either way
        assert run.calls <= 2, run.calls
    else:  # eager
        assert run.calls >= run.steps, run.calls
    run.check_against_numpy()


# --- fine-tuning on the device ------------------------------------------------

def _reference_model():
    return keras.models.load_model(
        os.path.join(ROOT, "renorm_convert", "reference", "resnet_fmnist.keras"))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, 28, 28, 1)).astype("float32"),
            rng.integers(0, 10, n).astype("int32"))


def _fine_tune(model, data, **kwargs):
    return rc.fine_tune(model, rc.batches.ArrayBatches(*data, batch_size=32,
                                                       shuffle=False),
                        epochs=1, optimizer="sgd", learning_rate=0.05,
                        verbose=0, **kwargs)


def test_fine_tune_on_gpu_matches_cpu():
    """The converted reference model fine-tuned for 4 steps on the GPU
    (full-precision float32, the backend's default compiler) ends where the
    same run on the CPU ends: every weight and statistic within 2% of how
    far it moved (and 1e-5)."""
    converted = rc.convert(_reference_model())
    data = _images(4 * 32)
    before = weights_snapshot(converted)
    with _full_float32():
        on_gpu = _fine_tune(converted, data).model
        with keras.device("cpu"):  # PyTorch: "cpu:0" breaks its gradients
            on_cpu = _fine_tune(converted, data).model
            cpu = weights_snapshot(on_cpu)
    gpu = weights_snapshot(on_gpu)
    if GPU:
        assert {_on(v) for v in on_gpu.weights} == {"gpu"}
    assert {_on(v) for v in on_cpu.weights} == {"cpu"}
    assert set(gpu) == set(cpu) == set(before)
    moved = 0
    for path in before:
        change = np.abs(cpu[path] - before[path]).max()
        moved += change > 0
        np.testing.assert_allclose(gpu[path], cpu[path], rtol=0,
                                   atol=2e-2 * change + 1e-5, err_msg=path)
    assert moved > len(before) // 2, (moved, len(before))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fine_tune_mixed_precision_on_gpu(policy):
    """The converted reference model, recast to `policy`, fine-tunes on the
    GPU: finite loss near the float32 run's, the normalization layers
    compute in float16 / bfloat16 and their statistics stay float32 and
    move."""
    converted = rc.convert(_reference_model())
    data = _images(6 * 32)
    before = weights_snapshot(converted)
    result = _fine_tune(rc.recast(converted, policy), data)
    reference = _fine_tune(converted, data)
    loss = np.asarray(result.history["loss"])
    assert np.isfinite(loss).all(), result.history
    np.testing.assert_allclose(loss, reference.history["loss"], rtol=5e-2)
    layers = rc.renorm_layers(result.model)
    assert len(layers) == 9
    compute = policy.split("_")[1]
    assert all(l.compute_dtype == compute for l in layers)
    assert all(v.dtype == "float32" for l in layers for v in l.variables)
    after = weights_snapshot(result.model)
    for l in layers:
        for v in l.variables:
            assert np.isfinite(after[v.path]).all(), v.path
            if v.path.endswith(("moving_mean", "renorm_stddev")):
                assert np.abs(after[v.path] - before[v.path]).max() > 0, \
                    v.path
        if GPU:
            assert {_on(v) for v in l.variables} == {"gpu"}


def test_fine_tune_resnet50_mixed_float16():
    """A converted ResNet50 (96x96, batch 32 on a GPU) trains for a few
    steps under mixed_float16 with the backend's default compiler (XLA on
    TensorFlow and JAX, eager PyTorch): finite loss, weights and
    statistics move, statistics stay float32."""
    model = keras.applications.ResNet50(
        weights=None, input_shape=(RESNET_SIZE, RESNET_SIZE, 3), classes=10)
    converted = rc.recast(rc.convert(model), "mixed_float16")
    del model
    rng = np.random.default_rng(0)
    n = 3 * RESNET_BATCH
    x = rng.uniform(0, 1, (n, RESNET_SIZE, RESNET_SIZE, 3)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    before = weights_snapshot(converted)
    result = rc.fine_tune(converted, rc.batches.ArrayBatches(
        x, y, batch_size=RESNET_BATCH), epochs=1, learning_rate=1e-4,
        verbose=0)
    assert len(result.steps) == 3
    assert np.isfinite(result.history["loss"]).all(), result.history
    layers = rc.renorm_layers(result.model)
    assert len(layers) == 53
    assert all(l.compute_dtype == "float16" for l in layers)
    assert all(v.dtype == "float32" for l in layers for v in l.variables)
    after = weights_snapshot(result.model)
    assert set(after) == set(before)
    for name in ("conv1_conv/kernel", "predictions/kernel",
                 "conv1_bn/gamma", "conv1_bn/moving_mean",
                 "conv5_block3_3_bn/renorm_stddev"):
        (path,) = [p for p in before if p.endswith(name)]
        assert np.isfinite(after[path]).all(), path
        assert np.abs(after[path] - before[path]).max() > 0, path


# --- TensorFlow: one XLA compilation, counted from its own log ---------------

SCHEDULE = r"""
import json, sys
import numpy as np
import keras
import renorm_convert as rc

inputs = keras.Input((16, 16, 3))
x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
x = keras.layers.GlobalAveragePooling2D()(x)
model = rc.convert(keras.Model(inputs, keras.layers.Dense(4)(x)))
if sys.argv[1] != "float32":
    model = rc.recast(model, sys.argv[1])


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
        layer = rc.renorm_layers(self.model)[0]
        self.values.append((layer.r_max, layer.d_max))


rng = np.random.default_rng(0)
data = (rng.normal(size=(48, 16, 16, 3)).astype("float32"),
        rng.integers(0, 4, 48).astype("int32"))
seen = Seen()
schedule = rc.RenormSchedule(warmup_steps=1, r_max=3.0, r_max_steps=5,
                             d_max=5.0, d_max_steps=4)
result = rc.fine_tune(model, rc.batches.ArrayBatches(*data, batch_size=8),
                      epochs=1, schedule=schedule, jit_compile=True,
                      callbacks=[seen], verbose=0)
print(json.dumps({"values": seen.values, "traces": seen.traces,
                  "loss": result.history["loss"]}))
"""


@pytest.mark.tensorflow
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_tensorflow_schedule_compiles_train_step_once(policy):
    """On TensorFlow, RenormSchedule changes r_max / d_max at every step of
    an XLA-compiled train step: no retrace, one XLA compilation, counted
    from TensorFlow's own log (which needs a fresh process)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", KERAS_BACKEND=BACKEND,
               TF_CPP_VMODULE="device_compilation_profiler=1")
    result = subprocess.run(
        [sys.executable, "-c", SCHEDULE, policy], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
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
