"""fine_tune and the surgery it is chained with, on small real slices of
Fashion-MNIST and digits, on every backend. Each test checks the run against
a reference: NumPy maths (the loss, the gradient of the classifier's bias,
an optimizer step, per-group moments) or a run that must agree with it."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert import data
from renorm_convert.train import callbacks
from renorm_convert.data.batches import TrainingBatches
from helpers import (bias_gradient, conv_classifier, digits_cnn, numpy,
                     numpy_accuracy, small_cnn, weights)

BACKEND = keras.backend.backend()


@pytest.fixture
def small(fashion):
    return fashion.subset(train=1024, val=500, seed=1)


def start_outputs(model, x):
    """The model's training-mode outputs on `x` at step 0 of a run with the
    schedule (r_max = 1, d_max = 0: batch norm), on a copy."""
    probe = rc.configure(model, r_max=1.0, d_max=0.0)
    return numpy(probe(x, training=True)).astype(np.float64)


def cross_entropy(outputs, y, from_logits=False):
    """Mean categorical cross-entropy, labels as ids or rows (NumPy)."""
    if from_logits:
        z = outputs - outputs.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    else:
        log_p = np.log(np.clip(outputs / outputs.sum(-1, keepdims=True),
                               1e-7, 1 - 1e-7))
    rows = np.eye(outputs.shape[-1])[y] if np.ndim(y) == 1 else y
    return float(-(rows * log_p).sum(-1).mean())


# --- the whole recipe -------------------------------------------------------


def test_fine_tune_runs_the_schedule_and_writes_the_records(digits,
                                                           tmp_path):
    part = digits.subset(train=640, val=128, seed=1)
    model = rc.convert(digits_cnn())
    configured = rc.configure(model, microbatch_size=4, momentum=0.9)
    batches = rc.data.training_batches(part, configured, 32, seed=0)
    records = callbacks.RunRecords(tmp_path / "h", plot=tmp_path / "c.png")
    result = rc.fine_tune(configured, batches, epochs=2, learning_rate=5e-3,
                          callbacks=[records], verbose=0)
    # The schedule of the run's 40 steps, computed here: r_max 1 -> 3 and
    # d_max 0 -> 5 linearly from step 4 (10 %) to 14 (35 %) / 10 (25 %);
    # row `step` holds the bounds of the optimizer step it logs (step - 1
    # before it).
    steps = result.steps
    assert [s["step"] for s in steps] == list(range(1, 41))
    at = np.array([s["step"] - 1 for s in steps], np.float64)
    np.testing.assert_allclose([s["r_max"] for s in steps],
                               np.interp(at, [4, 14], [1.0, 3.0]), atol=1e-6)
    np.testing.assert_allclose([s["d_max"] for s in steps],
                               np.interp(at, [4, 10], [0.0, 5.0]), atol=1e-6)
    assert result.final_bounds == (3.0, 5.0)
    layers = rc.renorm_layers(result.model)
    assert [(l.microbatch_size, l.momentum, l.r_max, l.d_max)
            for l in layers] == [(4, 0.9, 3.0, 5.0)] * 2
    # Neither the converted nor the configured model was touched.
    assert [l.microbatch_size for l in rc.renorm_layers(model)] == [None] * 2
    for a, b in zip(weights(configured), weights(rc.configure(model))):
        np.testing.assert_array_equal(a, b)
    # The records hold the run; its validation accuracy is the trained
    # model's, computed here.
    after = numpy_accuracy(result.model, part)
    assert result.history["val_accuracy"][-1] == pytest.approx(after,
                                                               abs=1e-6)
    saved = json.loads((tmp_path / "h.json").read_text())
    assert [s["step"] for s in saved["steps"]] == list(range(1, 41))
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert saved["epochs"][-1]["val_accuracy"] == pytest.approx(after,
                                                                abs=1e-6)
    assert (tmp_path / "h.csv").read_text().startswith("epoch,")
    assert len((tmp_path / "h.steps.csv").read_text().splitlines()) == 41
    for name in ("h.csv", "h.steps.csv"):  # LF line ends, both
        assert b"\r" not in (tmp_path / name).read_bytes()
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert records.errors == {}


def test_fine_tune_raises_accuracy_on_fashion_mnist(small):
    model = rc.configure(rc.convert(small_cnn()), microbatch_size=4,
                         momentum=0.9)
    before = numpy_accuracy(model, small)
    assert rc.accuracy(model, small) == pytest.approx(before, abs=1e-9)
    result = rc.fine_tune(model, rc.data.training_batches(small, model, 32), epochs=3,
                          learning_rate=5e-3, verbose=0)
    after = numpy_accuracy(result.model, small)
    assert rc.accuracy(result.model, small) == pytest.approx(after, abs=1e-9)
    first = dataclasses.replace(small, x_val=small.x_val[:100],
                                y_val=small.y_val[:100])
    assert rc.accuracy(result.model, small, count=100) == pytest.approx(
        numpy_accuracy(result.model, first), abs=1e-9)
    assert after > before + 0.2, (before, after)
    assert result.history["val_accuracy"][-1] == pytest.approx(after,
                                                               abs=1e-6)


@pytest.mark.parametrize("optimizer, jit", [
    ("sgd", "auto"),
    # torch.compile takes about 30 s on two CPU cores.
    pytest.param("rmsprop", True,
                 marks=[pytest.mark.slow] if BACKEND == "torch" else []),
    ("adam", False)])
def test_optimizer_and_learning_rate_make_the_first_step(digits, optimizer,
                                                         jit):
    """One step; the head's bias moves as the optimizer's update of the
    NumPy gradient says."""
    model = rc.convert(digits_cnn())
    batches = rc.data.training_batches(digits.subset(val=0), model, 32, seed=2)
    x, y = batches.batch_at(0)
    p = start_outputs(model, x)
    g = bias_gradient(p, y)
    lr = 0.05
    b0 = numpy(model.get_layer("head").bias).astype(np.float64)
    kwargs = {} if optimizer == "adam" else {"optimizer": optimizer}
    result = rc.fine_tune(model, batches, epochs=1, steps_per_epoch=1,
                          learning_rate=lr, jit_compile=jit, verbose=0,
                          **kwargs)
    assert type(result.model.optimizer).__name__.lower() == optimizer
    if optimizer == "sgd":
        expected = b0 - lr * g
    elif optimizer == "rmsprop":  # rho 0.9, epsilon 1e-7 under the root
        expected = b0 - lr * g / np.sqrt(0.1 * g * g + 1e-7)
    else:  # beta_1 0.9, beta_2 0.999, bias-corrected, epsilon 1e-7
        alpha = lr * np.sqrt(1 - 0.999) / (1 - 0.9)
        expected = b0 - alpha * (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-7)
    got = numpy(result.model.get_layer("head").bias)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    # The loss logged for the step is the NumPy cross-entropy.
    assert result.steps[0]["loss"] == pytest.approx(cross_entropy(p, y),
                                                    rel=1e-4)
    assert (result.steps[0]["r_max"], result.steps[0]["d_max"]) == (1.0, 0.0)


def test_logits_are_trained_from_logits_on_non_iid_batches(digits):
    """A head without softmax: the loss takes logits (NumPy's cross-entropy
    of the logits), and every batch `fit` sees holds exactly K classes."""
    seen = []

    class Recording(TrainingBatches):
        def batch_at(self, step):
            batch = super().batch_at(step)
            seen.append(batch[1])
            return batch

    model = rc.configure(rc.convert(digits_cnn(activation=None)),
                         microbatch_size=4, momentum=0.9)
    part = digits.subset(train=640, val=128)
    batches = Recording(part, (8, 8, 1), 32, non_iid_classes=2, seed=3)
    x, y = batches.batch_at(0)
    seen.clear()
    logits = start_outputs(model, x)
    result = rc.fine_tune(model, batches, epochs=2, optimizer="rmsprop",
                          learning_rate=3e-3, verbose=0)
    assert result.model.loss.get_config()["from_logits"]
    steps_per_epoch = 20
    assert len(result.steps) == 2 * steps_per_epoch
    assert result.steps[0]["loss"] == pytest.approx(
        cross_entropy(logits, y, from_logits=True), rel=1e-4)
    assert len(seen) >= 2 * steps_per_epoch
    for labels in seen:
        counts = np.bincount(labels, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [16, 16]
    # Inference accuracy (argmax of logits) as the history says.
    assert result.history["val_accuracy"][-1] == pytest.approx(
        numpy_accuracy(result.model, part), abs=1e-6)


def test_microbatch_moments_are_numpys_per_group_moments(digits):
    """With microbatches of 4, the layer normalizes each group with its own
    moments and r, d (NumPy below), and one training step moves the
    statistics by the average of the groups' moments."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization(name="bn", epsilon=1e-3)(inputs)
    x = keras.layers.Conv2D(4, 3, use_bias=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = rc.convert(keras.Model(inputs, keras.layers.Dense(
        10, activation="softmax")(x)))
    bn = model.get_layer("bn")
    bn.gamma.assign(np.array([1.7], "float32"))
    bn.beta.assign(np.array([-0.4], "float32"))
    bn.renorm_mean.assign(np.array([0.05], "float32"))
    bn.renorm_stddev.assign(np.array([0.25], "float32"))
    model = rc.configure(model, microbatch_size=4, momentum=0.8,
                         renorm_momentum=0.6, r_max=1.5, d_max=0.5)
    batches = rc.data.training_batches(digits, model, 16, seed=4)
    batch, _ = batches.batch_at(0)
    eps = 1e-3

    # NumPy: per group of 4, moments over examples, height and width.
    groups = batch.astype(np.float64).reshape(4, 4, 8, 8, 1)
    mu = groups.mean(axis=(1, 2, 3))  # (groups, channels)
    var = groups.var(axis=(1, 2, 3))
    std = np.sqrt(var + eps)
    r = np.clip(std / 0.25, 1 / 1.5, 1.5)
    d = np.clip((mu - 0.05) / 0.25, -0.5, 0.5)
    assert (r == 1.5).any() and (np.abs(d) == 0.5).any()  # clipping matters
    x_hat = (groups - mu[:, None, None, None]) / std[:, None, None, None]
    r, d = r[:, None, None, None], d[:, None, None, None]
    expected = 1.7 * (x_hat * r + d) - 0.4
    probe = rc.copy_model(model).get_layer("bn")
    got = numpy(probe(batch, training=True))
    np.testing.assert_allclose(got, expected.reshape(batch.shape), rtol=1e-4,
                               atol=1e-4)
    # The whole batch's moments would give another output.
    whole = (batch - batch.mean()) / np.sqrt(batch.var() + eps)
    assert np.abs(got - (1.7 * whole - 0.4)).max() > 0.1

    # One step of fine_tune (schedule off: the bounds above) moves the
    # statistics by the groups' average moments.
    result = rc.fine_tune(model, batches, epochs=1, steps_per_epoch=1,
                          schedule=None, validation=None, verbose=0)
    trained = result.model.get_layer("bn")
    mean, stddev = mu.mean(0), np.sqrt(var.mean(0) + eps)
    np.testing.assert_allclose(numpy(trained.renorm_mean),
                               0.6 * 0.05 + 0.4 * mean, rtol=1e-5)
    np.testing.assert_allclose(numpy(trained.renorm_stddev),
                               0.6 * 0.25 + 0.4 * stddev, rtol=1e-5)
    moving_std = 0.8 * numpy(bn.moving_stddev) + 0.2 * stddev
    np.testing.assert_allclose(numpy(trained.moving_mean),
                               0.8 * numpy(bn.moving_mean) + 0.2 * mean,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(numpy(trained.moving_stddev), moving_std,
                               rtol=1e-5)
    np.testing.assert_allclose(numpy(trained.moving_variance),
                               moving_std ** 2 - eps, rtol=1e-4)
    assert (trained.r_max, trained.d_max) == (1.5, 0.5)


def test_one_hot_labels_train_as_class_ids_do(digits):
    part = digits.subset(train=320, val=100, seed=0)
    hot = dataclasses.replace(
        part, y_train=np.eye(10, dtype=np.float32)[part.y_train],
        y_val=np.eye(10, dtype=np.float32)[part.y_val])
    model = rc.convert(digits_cnn())
    runs = [rc.fine_tune(model, rc.data.training_batches(split, model, 32, seed=5),
                         epochs=2, learning_rate=3e-3, verbose=0)
            for split in (part, hot)]
    assert isinstance(runs[0].model.loss,
                      keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(runs[1].model.loss, keras.losses.CategoricalCrossentropy)
    # The same batches, the same loss: the same run.
    np.testing.assert_allclose(runs[1].history["loss"],
                               runs[0].history["loss"], rtol=1e-5)
    np.testing.assert_allclose(runs[1].history["val_accuracy"],
                               runs[0].history["val_accuracy"], atol=1e-9)
    for a, b in zip(weights(runs[1].model), weights(runs[0].model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert runs[1].history["val_accuracy"][-1] == pytest.approx(
        numpy_accuracy(runs[1].model, hot), abs=1e-6)


def test_soft_labels_give_numpys_soft_cross_entropy(digits):
    part = digits.subset(train=64, val=0, seed=1)
    soft = np.full((64, 10), 0.05, np.float32)
    soft[np.arange(64), part.y_train] = 0.55
    split = dataclasses.replace(part, y_train=soft)
    model = rc.convert(digits_cnn())
    batches = rc.data.training_batches(split, model, 32, seed=0)
    x, y = batches.batch_at(0)
    np.testing.assert_array_equal(y, soft[data.epoch_indices(
        soft, 32, seed=0, epoch=0)[:32]])
    result = rc.fine_tune(model, batches, epochs=1, steps_per_epoch=1,
                          verbose=0)
    assert result.steps[0]["loss"] == pytest.approx(
        cross_entropy(start_outputs(model, x), y), rel=1e-4)


def test_arrays_train_a_model_of_two_inputs_as_numpy_says():
    """(x, y) arrays for a model with two inputs and no normalization: one
    SGD step on the whole batch is W - lr * X^T (softmax - one-hot) / N."""
    rng = np.random.default_rng(6)
    a = keras.Input((3,))
    b = keras.Input((2,))
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], keras.layers.Dense(
        4, activation="softmax", name="head")(joined))
    xa = rng.normal(size=(32, 3)).astype("float32")
    xb = rng.normal(size=(32, 2)).astype("float32")
    y = rng.integers(0, 4, 32)
    head = model.get_layer("head")
    w0, b0 = numpy(head.kernel), numpy(head.bias)
    x = np.concatenate([xa, xb], axis=1).astype(np.float64)
    z = x @ w0 + b0
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = (p - np.eye(4)[y]) / 32
    result = rc.fine_tune(model, ([xa, xb], y), epochs=1, optimizer="sgd",
                          learning_rate=0.5, verbose=0)
    assert result.steps_per_epoch == 1 and result.final_bounds is None
    trained = result.model.get_layer("head")
    np.testing.assert_allclose(numpy(trained.kernel), w0 - 0.5 * x.T @ delta,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(numpy(trained.bias), b0 - 0.5 * delta.sum(0),
                               rtol=1e-4, atol=1e-6)
    assert result.steps[0]["loss"] == pytest.approx(cross_entropy(p, y),
                                                    rel=1e-5)


# --- resuming, copies, epochs ------------------------------------------------


def test_steps_per_epoch_runs_the_data_on_across_epochs(digits):
    """Three epochs of 5 steps are the first 15 batches of the data, as one
    epoch of 15 steps is: the same weights at the end."""
    part = digits.subset(train=320, val=64, seed=0)  # 10 batches a pass
    model = rc.convert(digits_cnn())
    runs = [rc.fine_tune(model, rc.data.training_batches(part, model, 32, seed=3),
                         epochs=e, steps_per_epoch=s, schedule=None,
                         verbose=0)
            for e, s in ((3, 5), (1, 15))]
    assert [len(r.steps) for r in runs] == [15, 15]
    assert [r.steps_per_epoch for r in runs] == [5, 15]
    assert len(runs[0].history["loss"]) == 3
    for a, b in zip(weights(runs[0].model), weights(runs[1].model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # 15 steps are more than one pass: the second pass really ran, so 10
    # steps end elsewhere.
    ten = rc.fine_tune(model, rc.data.training_batches(part, model, 32, seed=3),
                       epochs=1, schedule=None, verbose=0)
    assert len(ten.steps) == 10
    assert not np.allclose(weights(ten.model)[0], weights(runs[1].model)[0])


def test_copy_false_trains_the_given_model(digits):
    part = digits.subset(train=64, val=32, seed=0)
    model = rc.convert(digits_cnn())
    before = weights(model)
    kept = rc.fine_tune(model, part, epochs=1, verbose=0)
    assert kept.model is not model
    for v, b in zip(weights(model), before):
        np.testing.assert_array_equal(v, b)
    owned = rc.fine_tune(model, part, epochs=1, verbose=0, inplace=True)
    assert owned.model is model
    assert not np.array_equal(weights(model)[0], before[0])
    # Same run, same result: the copy changes nothing but ownership.
    for a, b in zip(weights(kept.model), weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fine_tune_refuses_bad_arguments_naming_them(digits):
    model = rc.convert(digits_cnn())
    for kwargs, text in (
            ({"epochs": 0}, "epochs=0: expected an integer >= 1"),
            ({"steps_per_epoch": 0}, "steps_per_epoch=0: expected an "
                                     "integer >= 1, or None for whole "
                                     "passes"),
            ({"schedule": "paper"}, "schedule='paper': expected 'auto'"),
            ({"learning_rate": -1.0}, "learning_rate=-1.0: expected a "
                                      "positive number"),
            ({"optimizer": "nope"}, "optimizer='nope': use a Keras "
                                    "optimizer name")):
        with pytest.raises(rc.RenormConvertError) as info:
            rc.fine_tune(model, digits, verbose=0, **kwargs)
        assert str(info.value).startswith(text), str(info.value)
    with pytest.raises(rc.RenormConvertError, match="got list"):
        rc.fine_tune(model, [1, 2, 3], verbose=0)


# --- surgery chained with fine_tune ------------------------------------------


def test_labels_beyond_the_head_say_to_replace_it(digits):
    from renorm_convert.cli import one_line

    model = rc.convert(digits_cnn())
    four = rc.replace_head(model, 4)
    with pytest.raises(rc.RenormConvertError) as info:
        rc.fine_tune(four, digits, epochs=1, verbose=0)
    assert str(info.value) == (
        "labels go up to 9 but the model has 4 outputs; give it a new head "
        "first (rc.replace_head(model, 10)).")
    assert "(--head 10)" in one_line(info.value, "finetune")
    hot = dataclasses.replace(digits, y_train=np.eye(10)[digits.y_train])
    with pytest.raises(rc.RenormConvertError, match=r"rows of 10 classes but the "
                       r"model has 4 outputs.*replace_head\(model, 10\)"):
        rc.fine_tune(four, hot, epochs=1, verbose=0)


def test_new_head_norm_only_and_mixed_precision(digits):
    """replace_head -> freeze_all_but_normalization -> recast, then
    fine_tune: only gamma and beta move, in float32, computing in
    bfloat16."""
    model = rc.convert(digits_cnn())
    four = rc.replace_head(model, 4)
    ten = rc.replace_head(four, 10)
    frozen = rc.freeze_all_but_normalization(ten)
    mixed = rc.recast(frozen, "mixed_bfloat16")
    part = digits.subset(train=256, val=64)
    result = rc.fine_tune(mixed, part, epochs=1, learning_rate=1e-2,
                          verbose=0)
    trained = result.model
    assert trained.outputs[0].shape[-1] == 10
    trainable = {v.path.split("/")[-1] for v in trained.trainable_weights}
    assert trainable == {"gamma", "beta"}
    # What was frozen is what the models before training held, bit for bit;
    # gamma and beta moved.
    for layer in trained.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            original = ten.get_layer(layer.name)
            for a, b in zip(layer.weights, original.weights):
                np.testing.assert_array_equal(numpy(a), numpy(b))
    for layer in trained.layers:
        if isinstance(layer, keras.layers.Conv2D):
            np.testing.assert_array_equal(
                numpy(layer.kernel), numpy(model.get_layer(layer.name).kernel))
    norms = rc.renorm_layers(trained)
    assert len(norms) == 2
    assert not np.allclose(numpy(norms[0].gamma), numpy(
        rc.renorm_layers(ten)[0].gamma))
    assert all(n.compute_dtype == "bfloat16" for n in norms)
    assert all(v.dtype == "float32" for n in norms for v in n.variables)
    # bfloat16 computes what float32 computes, to bfloat16's precision.
    x = data.adapt(part.x_val[:16], (8, 8, 1), 16.0)
    full = rc.recast(trained, "float32")
    np.testing.assert_allclose(numpy(trained(x)).astype(np.float32),
                               numpy(full(x)), atol=3e-2)


def test_fine_tune_with_a_new_head_on_a_conv_classifier(digits):
    split = digits.subset(train=256, val=128, seed=3)
    model = rc.convert(conv_classifier(classes=4, shape=(8, 8, 1)))
    new = rc.replace_head(model, 10)
    result = rc.fine_tune(new, split, epochs=2, learning_rate=1e-2, verbose=0)
    trained = result.model
    assert trained.outputs[0].shape[-1] == 10
    assert trained.get_layer("classes_head10").filters == 10
    # The validation accuracy of the history is the trained model's,
    # computed here.
    assert result.history["val_accuracy"][-1] == pytest.approx(
        numpy_accuracy(trained, split), abs=1e-6)
    # It trained: the layers before the new head moved too.
    assert not np.allclose(numpy(trained.layers[1].kernel),
                           numpy(new.layers[1].kernel))


# --- TensorFlow only: tf.data, tf.distribute, TensorBoard --------------------


@pytest.mark.tensorflow
def test_tf_data_trains_as_our_batches_do(digits):
    import tensorflow as tf

    part = digits.subset(train=128, val=0)
    model = rc.convert(digits_cnn())
    ours = rc.data.training_batches(part, model, 32, seed=1)
    dataset = tf.data.Dataset.from_tensor_slices(tuple(
        np.stack(a) for a in zip(*[ours.batch_at(i) for i in range(4)])))
    runs = [rc.fine_tune(model, train, epochs=1, schedule=None, verbose=0)
            for train in (ours, dataset)]
    assert [r.steps_per_epoch for r in runs] == [4, 4]
    for a, b in zip(weights(runs[0].model), weights(runs[1].model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow
def test_mirrored_two_replicas_agree_with_one_device(digits, mirrored):
    model = rc.convert(digits_cnn(synchronized=True))
    part = digits.subset(train=256, val=64)
    result = rc.fine_tune(model, part, epochs=1, strategy=mirrored, verbose=0)
    trained = result.model
    assert int(numpy(trained.optimizer.iterations)) == 8
    checked = 0
    for v in trained.weights:
        values = getattr(v.value, "values", None)
        if values is None:
            continue
        first = values[0].numpy()
        for other in values[1:]:
            np.testing.assert_array_equal(first, other.numpy())
        checked += 1
    assert checked == len(trained.weights)
    # Synchronized moments and summed gradients: the run of one device on
    # the whole batches.
    single = rc.fine_tune(model, part, epochs=1, verbose=0)
    np.testing.assert_allclose(result.history["loss"],
                               single.history["loss"], rtol=1e-4)
    for a, b in zip(weights(trained), weights(single.model)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.tensorflow
def test_tensorboard_logs_the_run(digits, tmp_path):
    import tensorflow as tf

    model = rc.convert(digits_cnn())
    part = digits.subset(train=128, val=64)
    board = keras.callbacks.TensorBoard(str(tmp_path / "tb"))
    result = rc.fine_tune(model, part, epochs=2, callbacks=[board], verbose=0)
    logged = []
    for root, _, files in os.walk(tmp_path / "tb" / "train"):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(
                    os.path.join(root, name)):
                for value in event.summary.value:
                    if value.tag == "epoch_loss":
                        logged.append((event.step, float(tf.make_ndarray(
                            value.tensor))))
    assert [s for s, _ in sorted(logged)] == [0, 1]
    np.testing.assert_allclose([v for _, v in sorted(logged)],
                               result.history["loss"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.tensorflow
def test_multi_worker_two_processes(tmp_path):
    """Two workers on 127.0.0.1 in a private network namespace (the gRPC
    server listens on every interface), bounded in time."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -n` (a private network namespace)")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "multiworker_worker.py")
    outs = [tmp_path / f"w{i}.npz" for i in range(2)]
    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    py = sys.executable
    script = (
        "ip link set lo up && "
        f"({py} {worker} 0 23456 23457 {outs[0]} {ckpt} > {logs[0]} 2>&1 &)"
        f" && {py} {worker} 1 23456 23457 {outs[1]} {ckpt} > {logs[1]} 2>&1; "
        "for i in $(seq 60); do [ -f " + str(outs[0]) + " ] && break; "
        "sleep 1; done"
    )
    result = subprocess.run(["timeout", "300", "unshare", "-n", "bash", "-c",
                             script], capture_output=True, text=True)
    detail = "\n".join(l.read_text()[-2000:] for l in logs if l.exists())
    assert result.returncode == 0 and all(o.exists() for o in outs), \
        detail + result.stderr
    w0, w1 = (np.load(o) for o in outs)
    assert int(w0["steps"]) == int(w1["steps"]) == 2 * (256 // 32)
    names = [k for k in w0.files if k.startswith("arr_")]
    assert len(names) > 5
    for k in names:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    assert float(w0["loss"]) == float(w1["loss"])
    # The chief checkpoints into the directory, the other worker into its
    # own sub-directory; both are ours and kept until the caller removes
    # them.
    for folder in (ckpt, ckpt / "worker-1"):
        names = set(os.listdir(folder))
        assert {".renorm-convert-checkpoint", "epoch-0002.json",
                "epoch-0002.weights.h5"} <= names, names
    rc.checkpoint.remove(ckpt)
    assert not ckpt.exists()
