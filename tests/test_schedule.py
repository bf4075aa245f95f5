"""RenormSchedule: the paper's relaxation, applied to nested models, logged,
and seen by every backend's compiled training step."""

import csv

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import numpy


def test_paper_schedule_values():
    s = rc.RenormSchedule()
    assert s.values_at(0) == (1.0, 0.0)
    assert s.values_at(5000) == (1.0, 0.0)
    # Linear ramps, computed by hand from the paper's end points.
    r, d = s.values_at(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000)
    assert d == pytest.approx(5 * 10000 / 20000)
    assert s.values_at(25000)[1] == 5.0
    assert s.values_at(40000) == (3.0, 5.0)
    assert s.values_at(10 ** 6) == (3.0, 5.0)


def test_scale_and_for_run():
    scaled = rc.RenormSchedule(scale=0.01)
    full = rc.RenormSchedule()
    for step in (0, 30, 50, 120, 250, 399, 400, 1000):
        assert scaled.values_at(step) == pytest.approx(
            full.values_at(step * 100))
    run = rc.RenormSchedule.for_run(1000)
    assert run.values_at(100) == (1.0, 0.0)
    assert run.values_at(250)[1] == 5.0
    assert run.values_at(350) == (3.0, 5.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"r_max": 0.5}, "r_max=0.5"),
    ({"d_max": -2}, "d_max=-2"),
    ({"warmup_steps": 100, "r_max_steps": 50}, "r_max_steps=50"),
    ({"scale": 0}, "scale=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rc.RenormSchedule(**kwargs)


def _nested_model():
    inner_in = keras.Input((8,))
    h = keras.layers.Dense(8)(inner_in)
    h = rc.BatchRenormalization(name="inner_bn")(h)
    inner = keras.Model(inner_in, h, name="inner")
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8)(inputs)
    x = rc.BatchRenormalization(name="outer_bn")(x)
    x = inner(x)
    seq = keras.Sequential([keras.layers.Dense(8),
                            rc.BatchRenormalization(name="seq_bn")], name="seq")
    x = seq(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_callback_updates_nested_layers_and_logs(tmp_path):
    model = _nested_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 2, 64)
    schedule = rc.RenormSchedule(warmup_steps=2, r_max=2.0, r_max_steps=6,
                                 d_max=1.0, d_max_steps=4)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((logs["r_max"], logs["d_max"]))

    csv_path = tmp_path / "log.csv"
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[schedule, Spy(),
                                   keras.callbacks.CSVLogger(str(csv_path))])
    layers = rc.renorm_layers(model)
    assert sorted(l.name for l in layers) == ["inner_bn", "outer_bn", "seq_bn"]
    # The value used at step k is the schedule at iteration k (0-based).
    expected = [schedule.values_at(k) for k in range(16)]
    np.testing.assert_allclose(seen, expected)
    for layer in layers:
        assert (layer.r_max, layer.d_max) == (2.0, 1.0)
    assert history.history["r_max"] == [2.0, 2.0]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["d_max"]) == 1.0


def test_step_comes_from_optimizer_so_resume_continues():
    model = _nested_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.zeros((16, 4), "float32")
    y = np.zeros(16, "int64")
    schedule = rc.RenormSchedule(warmup_steps=0, r_max=3.0, r_max_steps=100,
                                 d_max=0.0, d_max_steps=0)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(50)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[schedule])
    # One step was taken at iteration 50.
    assert rc.renorm_layers(model)[0].r_max == pytest.approx(2.0)


class _Counting(rc.BatchRenormalization):
    """Counts how often its Python `call` runs: once per trace under a
    compiler, once per step eagerly."""

    calls = 0

    def call(self, inputs, training=None, mask=None):
        _Counting.calls += 1
        return super().call(inputs, training=training, mask=mask)


def _numpy_run(x, w, schedule, lr, steps, batch, gamma, beta, momentum):
    """SGD on gamma and beta of one renorm layer under the loss
    mean over the batch of sum(y * w), the bounds following `schedule`:
    NumPy, float64."""
    eps = 1e-3
    gamma, beta = gamma.astype(np.float64), beta.astype(np.float64)
    mu = np.zeros(x.shape[1])
    sigma = np.ones(x.shape[1]) * np.sqrt(1 + eps)
    for step in range(steps):
        xb = x[step * batch:(step + 1) * batch].astype(np.float64)
        wb = w[step * batch:(step + 1) * batch].astype(np.float64)
        r_max, d_max = schedule.values_at(step)
        mean, var = xb.mean(0), xb.var(0)
        std = np.sqrt(var + eps)
        r = np.clip(std / np.maximum(sigma, np.sqrt(eps)), 1 / r_max, r_max)
        d = np.clip((mean - mu) / np.maximum(sigma, np.sqrt(eps)), -d_max,
                    d_max)
        z = (xb - mean) / std * r + d
        gamma = gamma - lr * (wb * z).sum(0) / batch
        beta = beta - lr * wb.sum(0) / batch
        mu = mu * momentum + mean * (1 - momentum)
        sigma = sigma * momentum + std * (1 - momentum)
    return gamma, beta


class ScheduledFit:
    """One `fit` of a single renorm layer under a RenormSchedule that
    changes r_max and d_max at almost every step, with what NumPy's
    step-by-step run of the same bounds gives (shared with test_gpu)."""

    batch, steps, lr, momentum = 16, 12, 0.1, 0.8

    def __init__(self, jit):
        rng = np.random.default_rng(0)
        batch, steps = self.batch, self.steps
        self.x = (rng.normal(size=(batch * steps, 3)) * 3 + 1).astype(
            "float32")
        self.w = rng.normal(size=(batch * steps, 3)).astype("float32")
        inputs = keras.Input((3,))
        self.layer = layer = _Counting(momentum=self.momentum,
                                       renorm_momentum=self.momentum,
                                       name="bn")
        model = keras.Model(inputs, layer(inputs))
        layer.gamma.assign(np.array([1.0, 0.5, 2.0], "float32"))
        self.gamma0, self.beta0 = numpy(layer.gamma), numpy(layer.beta)
        model.compile(keras.optimizers.SGD(self.lr),
                      lambda y, p: keras.ops.sum(y * p, axis=-1),
                      jit_compile=jit)
        self.schedule = rc.RenormSchedule(warmup_steps=1, r_max=4.0,
                                          r_max_steps=11, d_max=3.0,
                                          d_max_steps=10)
        self.values = [self.schedule.values_at(k) for k in range(steps)]
        _Counting.calls = 0
        model.fit(self.x, self.w, batch_size=batch, epochs=1, shuffle=False,
                  verbose=0, callbacks=[self.schedule])
        self.calls = _Counting.calls

    def numpy_result(self, schedule=None):
        """(gamma, beta) of NumPy's run under `schedule` (this one's)."""
        return _numpy_run(self.x, self.w, schedule or self.schedule, self.lr,
                          self.steps, self.batch, self.gamma0, self.beta0,
                          self.momentum)

    def check_against_numpy(self):
        gamma, beta = self.numpy_result()
        np.testing.assert_allclose(numpy(self.layer.gamma), gamma,
                                   rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(numpy(self.layer.beta), beta, rtol=2e-4,
                                   atol=2e-5)
        assert (self.layer.r_max, self.layer.d_max) == self.values[-1]
        return gamma


@pytest.mark.parametrize("jit", [True, False])
def test_bounds_change_every_step_without_retracing(jit):
    """The schedule changes r_max and d_max at every step of `fit`; the
    compiled step is traced once (JAX and TensorFlow; PyTorch runs
    eagerly), and gamma and beta end where NumPy's step-by-step run with
    the same bounds ends: the new bounds reached every step."""
    if keras.backend.backend() == "torch" and jit:
        pytest.skip("Keras does not compile PyTorch steps by default")
    run = ScheduledFit(jit)
    assert len(set(run.values)) == run.steps - 1  # new bounds nearly each step
    if jit:
        assert run.calls <= 2, run.calls
    gamma = run.check_against_numpy()
    # Held at the first step's bounds instead, the result differs: the
    # test sees whether the bounds reached the compiled step.
    fixed = run.numpy_result(rc.RenormSchedule(
        warmup_steps=100, r_max_steps=100, d_max_steps=100))[0]
    assert np.abs(fixed - gamma).max() > 1e-3
