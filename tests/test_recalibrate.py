"""recalibrate: statistics re-estimated as exact averages of batch moments,
against a NumPy reference."""

import logging
import re

import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert import data
from renorm_convert.errors import RenormConvertError
from helpers import numpy, randomize_statistics
from onnx_helpers import run_onnx


def mlp():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1", epsilon=1e-3)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    inner = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, name="d2"),
                              keras.layers.BatchNormalization(name="bn2")],
                             name="inner")
    return keras.Model(inputs, inner(x))


def numpy_reference(model, batches):
    """Per-layer mean of batch means and of batch (biased) variances, with
    each normalization applied with its batch's own moments."""
    d1, bn1 = model.get_layer("d1"), model.get_layer("bn1")
    inner = model.get_layer("inner")
    d2, bn2 = inner.get_layer("d2"), inner.get_layer("bn2")

    def norm(h, bn):
        m, v = h.mean(0), h.var(0)
        y = (h - m) / np.sqrt(v + bn.epsilon) * numpy(bn.gamma) + \
            numpy(bn.beta)
        return y, m, v

    stats = {"bn1": [[], []], "bn2": [[], []]}
    for x in batches:
        x = x.astype(np.float64)
        h = x @ numpy(d1.kernel) + numpy(d1.bias)
        y, m, v = norm(h, bn1)
        stats["bn1"][0].append(m), stats["bn1"][1].append(v)
        h = np.maximum(y, 0) @ numpy(d2.kernel) + numpy(d2.bias)
        _, m, v = norm(h, bn2)
        stats["bn2"][0].append(m), stats["bn2"][1].append(v)
    return {k: (np.mean(a, 0), np.mean(b, 0)) for k, (a, b) in stats.items()}


@pytest.mark.parametrize("converted", [False, "frozen", "renorm",
                                       "microbatches"])
def test_statistics_are_exact_averages_of_batch_moments(converted, caplog):
    model = mlp()
    randomize_statistics(model, seed=4)
    for layer in ("bn1",):
        bn = model.get_layer(layer)
        bn.gamma.assign(np.linspace(0.5, 2, 5))
        bn.beta.assign(np.linspace(-1, 1, 5))
    if converted == "frozen":
        for layer in rc.iter_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    elif converted:
        # Relaxed bounds and shifted renorm statistics would change the
        # forward if recalibration did not hold the layers at batch norm;
        # microbatches would change the moments measured.
        model = rc.convert(model, r_max=3.0, d_max=5.0,
                           microbatch_size=4 if converted == "microbatches"
                           else None)
        for layer in rc.renorm_layers(model):
            layer.renorm_mean.assign(layer.renorm_mean + 0.3)
            layer.renorm_stddev.assign(layer.renorm_stddev * 1.5)
    x = np.random.default_rng(0).normal(2.0, 3.0, (100, 6)).astype("float32")
    before = [numpy(v).copy() for v in model.weights]
    with caplog.at_level(logging.INFO, logger="renorm_convert"):
        new = rc.recalibrate(model, x, batch_size=32, batches=3)
    used = int(re.search(r"on (\d+) batches", caplog.text).group(1))
    # The input is untouched.
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(numpy(v), b)
    expected = numpy_reference(model, [x[0:32], x[32:64], x[64:96]])
    assert used == 3
    # The copy's weights other than statistics are the input's; its
    # settings too (bounds, microbatches, momenta, trainable).
    for a, b in zip(new.weights, model.weights):
        if a.path.split("/")[-1] in ("gamma", "beta", "kernel", "bias",
                                     "r_max", "d_max"):
            np.testing.assert_array_equal(numpy(a), numpy(b))
    for a, b in zip(rc.iter_layers(new), rc.iter_layers(model)):
        if isinstance(a, keras.layers.BatchNormalization):
            assert a.get_config() == b.get_config()
            assert a.trainable == b.trainable
    for name, layer in (("bn1", new.get_layer("bn1")),
                        ("bn2", new.get_layer("inner").get_layer("bn2"))):
        mean, variance = expected[name]
        np.testing.assert_allclose(numpy(layer.moving_mean), mean,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(numpy(layer.moving_variance), variance,
                                   rtol=1e-5, atol=1e-5)
        if converted in ("renorm", "microbatches"):
            std = np.sqrt(variance + layer.epsilon)
            np.testing.assert_allclose(numpy(layer.renorm_mean), mean,
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(numpy(layer.renorm_stddev), std,
                                       rtol=1e-5)
            np.testing.assert_allclose(numpy(layer.moving_stddev), std,
                                       rtol=1e-5)
    # Its inference is the plain batch norm of the same statistics.
    if converted in ("renorm", "microbatches"):
        plain = rc.revert(new)
        np.testing.assert_allclose(numpy(new(x, training=False)),
                                   numpy(plain(x)), rtol=1e-5, atol=1e-5)



def test_recalibrate_refuses_what_it_cannot_measure():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(RenormConvertError, match="no normalization"):
        rc.recalibrate(model, np.zeros((4, 3), "float32"))
    with pytest.raises(RenormConvertError, match="batches=0: expected"):
        rc.recalibrate(mlp(), np.zeros((4, 6), "float32"), batches=0)
    with pytest.raises(RenormConvertError, match="holds no batch"):
        rc.recalibrate(mlp(), [])


def first_layer_bn_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.Flatten()(x)
    return rc.convert(keras.Model(inputs, keras.layers.Dense(
        10, activation="softmax")(x)))


def test_a_split_gives_its_training_images_in_training_order(caplog):
    """With a Split, the batches are the adapted training images in the
    order training reads them: NumPy's moments of those batches."""
    digits = data.load_digits()
    model = first_layer_bn_model()
    with caplog.at_level(logging.INFO, logger="renorm_convert"):
        new = rc.recalibrate(model, digits, batches=4, batch_size=50)
    used = int(re.search(r"on (\d+) batches", caplog.text).group(1))
    assert used == 4
    order = data.epoch_indices(digits.y_train, 50, seed=0, epoch=0)
    images = digits.x_train[order[:200]].astype(np.float64) / 16.0
    groups = images.reshape(4, 50 * 8 * 8)
    bn = new.get_layer("bn")
    np.testing.assert_allclose(numpy(bn.moving_mean), [groups.mean(1).mean()],
                               rtol=1e-5)
    np.testing.assert_allclose(numpy(bn.moving_variance),
                               [groups.var(1).mean()], rtol=1e-5)
    # The same batches as arrays, as a PyDataset or as (x, y) pairs give
    # the same statistics.
    x = images.reshape(200, 8, 8, 1).astype("float32")
    batches = rc.data.training_batches(digits, model, 50)
    pairs = ((x[i:i + 50], np.zeros(50)) for i in range(0, 200, 50))
    for source, kwargs in ((x, {"batch_size": 50}), (batches, {}),
                           (pairs, {})):
        other = rc.recalibrate(model, source, batches=4, **kwargs)
        np.testing.assert_allclose(numpy(other.get_layer("bn").moving_mean),
                                   numpy(bn.moving_mean), rtol=1e-5)
        np.testing.assert_allclose(
            numpy(other.get_layer("bn").moving_variance),
            numpy(bn.moving_variance), rtol=1e-5)


def conv_model():
    return rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax")]))


def test_cli_finetune_recalibrates_on_its_training_batches(tmp_path, capsys):
    from renorm_convert.cli import main

    path = tmp_path / "m.keras"
    conv_model().save(path)
    out = tmp_path / "tuned.keras"
    code = main([str(a) for a in (
        "finetune", path, "-o", out, "--data", "digits", "--epochs", "1",
        "--train-size", "256", "--val-size", "64", "--recalibrate", "3",
        "--quiet-progress")])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "recalibrated the normalization statistics on 3 batches" in err
    tuned = keras.models.load_model(out)
    bn = tuned.get_layer("bn")
    # NumPy's moments of the convolution's outputs on the first 3 training
    # batches of 32 (the command's data, seed and batch size), averaged.
    split = data.load_digits().subset(train=256, val=64, seed=0)
    order = data.epoch_indices(split.y_train, 32, seed=0, epoch=0)
    features = keras.Model(tuned.inputs, tuned.get_layer("conv").output)
    means, variances = [], []
    for i in range(3):
        x = (split.x_train[order[32 * i:32 * (i + 1)]] / 16.0).astype(
            "float32")
        h = numpy(features(x)).astype(np.float64)
        means.append(h.mean(axis=(0, 1, 2)))
        variances.append(h.var(axis=(0, 1, 2)))
    np.testing.assert_allclose(numpy(bn.moving_mean), np.mean(means, 0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(numpy(bn.moving_variance),
                               np.mean(variances, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(numpy(bn.renorm_mean), numpy(bn.moving_mean))
    np.testing.assert_allclose(numpy(bn.renorm_stddev), np.sqrt(
        numpy(bn.moving_variance) + bn.epsilon), rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="export runs on TensorFlow and PyTorch")
def test_cli_export_recalibrates_what_it_exports(tmp_path, capsys):
    from renorm_convert.cli import main

    path = tmp_path / "m.keras"
    model = conv_model()
    model.save(path)
    onnx_path = tmp_path / "t.onnx"
    code = main([str(a) for a in (
        "export", path, "-o", onnx_path, "--recalibrate", "2")])
    assert code == 2
    assert "--recalibrate needs --data" in capsys.readouterr().err
    assert not onnx_path.exists()
    code = main([str(a) for a in (
        "export", path, "-o", onnx_path, "--data", "digits",
        "--recalibrate", "2")])
    assert code == 0, capsys.readouterr().err
    # The ONNX model computes what the model recalibrated on the same two
    # batches computes, not what the file held.
    digits = data.load_digits()
    expected = rc.recalibrate(model, digits, batches=2)
    x = (digits.x_val[:16] / 16.0).astype("float32")
    got = run_onnx(onnx_path, x, optimize=True)[0]
    np.testing.assert_allclose(got, numpy(expected(x)), rtol=1e-4, atol=1e-5)
    assert np.abs(got - numpy(model(x))).max() > 1e-3
