"""The callbacks fine_tune composes, each usable in a plain model.fit, on
every backend: the NaN guard keeps the last good state (never NaN optimizer
moments), the validation curve starts at the model as given, the gradient
report is the analytic gradient, run records that cannot be written do not
cost the model."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (assert_same_weights, bias_gradient, digits_cnn, numpy,
                     numpy_accuracy, optimizer_step, tiny_model, tiny_split,
                     weights)
from renorm_convert.data.batches import TrainingBatches
from renorm_convert.train import callbacks



class _Poisoned(TrainingBatches):
    """The same batches, with a NaN pixel in the run's step `at` (from 0)."""

    at = None

    def batch_at(self, step):
        x, y = super().batch_at(step)
        if step == self.at:
            x = x.copy()
            x[0, 0, 0, 0] = np.nan
        return x, y


def _poisoned(model, split, at):
    batches = _Poisoned(split, (8, 8, 1), 16, seed=0)
    batches.at = at
    return batches


def test_a_record_that_cannot_be_written_does_not_cost_the_model(tmp_path):
    model = tiny_model()
    split = tiny_split(np.random.default_rng(0))
    plot = tmp_path / "gone" / "curves.png"
    records = rc.callbacks.RunRecords(tmp_path / "h", plot=plot)
    result = rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=1,
                          callbacks=[records], verbose=0)
    assert list(records.errors) == [str(plot)]
    assert str(plot) in records.errors[str(plot)]
    assert ".tmp-" not in records.errors[str(plot)]
    rows = (tmp_path / "h.steps.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # a header, then each of the 4 steps
    assert (tmp_path / "h.csv").exists() and not plot.parent.exists()
    assert optimizer_step(result.model) == 4 == len(result.steps)


def test_nan_loss_with_adam_saves_no_nan_optimizer_state(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    initial = [numpy(v) for v in model.weights]
    rng = np.random.default_rng(0)
    split = tiny_split(rng)
    with pytest.raises(rc.NonFiniteLoss, match="optimizer state") as info:
        rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=2,
                     optimizer="adam", learning_rate=1e30, verbose=0)
    kept = info.value.model
    for v in list(kept.weights) + list(kept.optimizer.variables):
        assert np.isfinite(numpy(v)).all(), v.path
    # It failed in the first epoch: the state the run started with.
    assert "the run started with" in str(info.value)
    assert optimizer_step(kept) == 0
    for v, value in zip(kept.weights, initial):
        np.testing.assert_array_equal(numpy(v), value, err_msg=v.path)
    assert info.value.result.steps  # the steps until then are reported
    assert not np.isfinite(info.value.result.steps[-1]["loss"])
    path = tmp_path / "kept.keras"
    kept.save(path)
    again = keras.models.load_model(path)
    again.optimizer.learning_rate.assign(1e-3)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    again.train_on_batch(x, rng.integers(0, 3, 16))
    assert all(np.isfinite(numpy(v)).all() for v in again.weights)


def test_nan_in_epoch_two_keeps_epoch_one_and_its_checkpoint(tmp_path):
    """A NaN at the first step of epoch 2: the model keeps exactly the state
    after epoch 1 (as a run of one epoch has it), no checkpoint of epoch 2
    is written, and a rerun on the directory resumes from epoch 1."""
    keras.utils.set_random_seed(0)
    model = tiny_model()
    split = tiny_split(np.random.default_rng(0))
    one = rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=1,
                       schedule=None, verbose=0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(rc.NonFiniteLoss, match="at step 5") as info:
        rc.fine_tune(model, _poisoned(model, split, at=4), epochs=2,
                     schedule=None, checkpoint_dir=ckpt, verbose=0)
    kept = info.value.model
    assert "after epoch 1" in str(info.value)
    assert optimizer_step(kept) == 4
    assert_same_weights(kept, one.model)
    for x, y in zip(kept.optimizer.variables, one.model.optimizer.variables):
        np.testing.assert_array_equal(numpy(x), numpy(y), err_msg=x.path)
    assert info.value.result.checkpoint_dir == str(ckpt)
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("epoch-")) == [
        "epoch-0001.json", "epoch-0001.weights.h5"]
    assert rc.checkpoint.live_holder(ckpt) is None  # released
    again = rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=2,
                         schedule=None, checkpoint_dir=ckpt, verbose=0)
    assert again.resumed_from == (1, 4) and optimizer_step(again.model) == 8
    assert all(np.isfinite(numpy(v)).all() for v in again.model.weights)
    rc.checkpoint.remove(ckpt)
    assert not ckpt.exists()


def test_gradient_report_is_the_analytic_gradient(tmp_path):
    """On one batch before training: the head's bias gradient is
    mean(softmax - one-hot) (NumPy, from the model's training-mode outputs
    with its saved bounds and microbatches of 4), and a bias before a
    normalization in training mode gets none (the batch mean removes it)."""
    rng = np.random.default_rng(7)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="hidden")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    model = rc.configure(rc.convert(keras.Model(inputs, keras.layers.Dense(
        3, activation="softmax", name="head")(h))), microbatch_size=4)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, 32)
    grads = callbacks.GradientReport((x, y), tmp_path / "grads.json")
    rc.fine_tune(model, (x, y), epochs=1, steps_per_epoch=1,
                 callbacks=[grads], verbose=0)
    p = numpy(rc.copy_model(model)(x, training=True)).astype(np.float64)
    report = json.loads((tmp_path / "grads.json").read_text())
    assert report == json.loads(json.dumps(grads.report))
    rows = {(r["group"], r["layer_type"], r["weight"]): r
            for r in report["rows"]}
    assert set(rows) == {
        ("normalization", "BatchRenormalization", "gamma"),
        ("normalization", "BatchRenormalization", "beta"),
        ("other", "Dense", "kernel"), ("other", "Dense", "bias")}
    bias = rows["other", "Dense", "bias"]
    assert bias["count"] == 5 + 3
    assert bias["mean_abs_grad"] == pytest.approx(
        float(np.abs(bias_gradient(p, y)).sum()) / 8, rel=1e-4)
    assert report["summary"]["other"] > 0


def test_non_finite_loss_stops_and_keeps_the_last_good_model(digits):
    model = rc.convert(digits_cnn())
    start = weights(model)
    with pytest.raises(rc.NonFiniteLoss, match="NaN or infinite at step") \
            as info:
        rc.fine_tune(model, digits.subset(train=320), epochs=1,
                     optimizer="sgd", learning_rate=1e12, verbose=0)
    kept = info.value.model
    for a, b in zip(weights(kept), start):
        np.testing.assert_array_equal(a, b)
    # It stopped at the first non-finite loss, or (where a compiled step
    # reports a finite loss from NaN weights) at the end of the epoch.
    bad = info.value.result.steps
    losses = np.array([s["loss"] for s in bad])
    assert np.isfinite(losses[:-1]).all()
    assert not np.isfinite(losses[-1]) or len(bad) == 10


def test_validation_curve_starts_at_the_model_as_given(digits, tmp_path):
    model = rc.convert(digits_cnn())
    split = digits.subset(train=320, val=300)
    first = dataclasses.replace(split, x_val=split.x_val[:200],
                                y_val=split.y_val[:200])
    batches = rc.data.training_batches(split, model, 32)
    curve = callbacks.ValidationCurve(
        rc.data.evaluation_batches(split, model, batch_size=100),
        steps_per_epoch=len(batches), size=200)
    records = callbacks.RunRecords(plot=tmp_path / "p.png", curve=curve)
    result = rc.fine_tune(model, batches, epochs=2, callbacks=[curve, records],
                          verbose=0)
    points = curve.points
    assert [p["step"] for p in points] == [0, 2, 5, 8, 10, 12, 15, 18, 20]
    # Step 0 is the input model on the first 200 validation examples,
    # computed here independently.
    assert curve.size == 200
    assert points[0]["val_accuracy"] == pytest.approx(
        numpy_accuracy(model, first), abs=1e-9)
    # The last point is the trained model on the same examples.
    assert points[-1]["val_accuracy"] == pytest.approx(
        numpy_accuracy(result.model, first), abs=1e-9)
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert records.errors == {}
