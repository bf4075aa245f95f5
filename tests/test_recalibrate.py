"""recalibrate: statistics re-estimated as exact averages of batch moments,
against a NumPy reference."""

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import randomize_statistics


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
        y = (h - m) / np.sqrt(v + bn.epsilon) * np.asarray(bn.gamma) + \
            np.asarray(bn.beta)
        return y, m, v

    stats = {"bn1": [[], []], "bn2": [[], []]}
    for x in batches:
        x = x.astype(np.float64)
        h = x @ np.asarray(d1.kernel) + np.asarray(d1.bias)
        y, m, v = norm(h, bn1)
        stats["bn1"][0].append(m), stats["bn1"][1].append(v)
        h = np.maximum(y, 0) @ np.asarray(d2.kernel) + np.asarray(d2.bias)
        _, m, v = norm(h, bn2)
        stats["bn2"][0].append(m), stats["bn2"][1].append(v)
    return {k: (np.mean(a, 0), np.mean(b, 0)) for k, (a, b) in stats.items()}


@pytest.mark.parametrize("converted", [False, "frozen", "renorm",
                                       "microbatches"])
def test_statistics_are_exact_averages_of_batch_moments(converted):
    model = mlp()
    randomize_statistics(model, seed=4)
    for layer in ("bn1",):
        bn = model.get_layer(layer)
        bn.gamma.assign(np.linspace(0.5, 2, 5))
        bn.beta.assign(np.linspace(-1, 1, 5))
    if converted == "frozen":
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    elif converted:
        # Relaxed bounds and shifted renorm statistics would change the
        # forward if recalibration did not hold the layers at batch norm;
        # microbatches would change the moments measured.
        model = rc.convert(model, r_max=3.0, d_max=5.0,
                           microbatch_size=4 if converted == "microbatches"
                           else None)
        for layer in rc.schedule.renorm_layers(model):
            layer.renorm_mean.assign(layer.renorm_mean + 0.3)
            layer.renorm_stddev.assign(layer.renorm_stddev * 1.5)
    x = np.random.default_rng(0).normal(2.0, 3.0, (100, 6)).astype("float32")
    before = [v.numpy().copy() for v in model.weights]
    new = rc.recalibrate(model, x, batch_size=32, batches=3)
    # The input is untouched; the copy's weights other than statistics too.
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    expected = numpy_reference(model, [x[0:32], x[32:64], x[64:96]])
    assert new.recalibrated_batches == 3
    for name, layer in (("bn1", new.get_layer("bn1")),
                        ("bn2", new.get_layer("inner").get_layer("bn2"))):
        mean, variance = expected[name]
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance,
                                   rtol=1e-5, atol=1e-5)
        if converted in ("renorm", "microbatches"):
            std = np.sqrt(variance + layer.epsilon)
            np.testing.assert_allclose(layer.renorm_mean.numpy(), mean,
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(layer.renorm_stddev.numpy(), std,
                                       rtol=1e-5)
            np.testing.assert_allclose(layer.moving_stddev.numpy(), std,
                                       rtol=1e-5)
    # Its inference is the plain batch norm of the same statistics.
    if converted in ("renorm", "microbatches"):
        plain = rc.revert(new)
        np.testing.assert_allclose(new(x, training=False), plain(x),
                                   rtol=1e-5, atol=1e-5)


def test_recalibrate_needs_normalization():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(rc.FineTuneError, match="no normalization"):
        rc.recalibrate(model, np.zeros((4, 3), "float32"))


def test_cli_recalibrates_in_finetune_and_export(tmp_path, capsys):
    from renorm_convert.cli import main
    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax")]))
    path = tmp_path / "m.keras"
    model.save(path)
    out = tmp_path / "tuned.keras"
    code = main([str(a) for a in (
        "finetune", path, "-o", out, "--data", "digits", "--epochs", "1",
        "--train-size", "256", "--val-size", "64", "--recalibrate", "3",
        "--quiet-progress")])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "recalibrated the normalization statistics on 3 batches" in stdout
    tuned = keras.models.load_model(out)
    bn = tuned.get_layer("bn")
    np.testing.assert_allclose(bn.renorm_mean.numpy(),
                               bn.moving_mean.numpy())
    code = main([str(a) for a in (
        "export", out, "-o", tmp_path / "t.onnx", "--recalibrate", "2")])
    assert code == 2
    assert "--recalibrate needs --data" in capsys.readouterr().err
    code = main([str(a) for a in (
        "export", out, "-o", tmp_path / "t.onnx", "--data", "digits",
        "--recalibrate", "2")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "t.onnx").exists()
