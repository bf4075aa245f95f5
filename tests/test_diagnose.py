"""`diagnose`: r, d, drift and the headline score against NumPy on a tiny
model, the batches it reads, the model left as it was, refusals, and the
command (every backend)."""

import json

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import numpy, weights_snapshot
from renorm_convert.cli import main
from renorm_convert.train.diagnosis import batching, core, measures, verdict

EPS = 1e-3


def _tiny_model(seed=0):
    """Images (6, 6, 2) -> BatchNormalization -> global average pooling ->
    Dense softmax over 3 classes, with known random weights and
    statistics: the normalization reads the images themselves, so NumPy
    can follow every number."""
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.BatchNormalization(epsilon=EPS, name="bn"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax", name="head")],
        name="tiny")
    rng = np.random.default_rng(seed)
    bn, head = model.get_layer("bn"), model.get_layer("head")
    bn.gamma.assign(rng.uniform(0.5, 2.0, 2).astype("float32"))
    bn.beta.assign(rng.uniform(-1, 1, 2).astype("float32"))
    bn.moving_mean.assign(np.array([0.3, -0.2], "float32"))
    bn.moving_variance.assign(np.array([0.8, 1.5], "float32"))
    head.kernel.assign(rng.normal(0, 2, (2, 3)).astype("float32"))
    head.bias.assign(rng.normal(0, 0.5, 3).astype("float32"))
    return model


def _tiny_data(n=96, seed=1):
    """(images, labels): three classes whose images differ in their mean,
    so that batches of one class have other statistics than the data's."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    means = np.array([[1.5, -1.5], [-1.5, 0.0], [0.0, 1.5]])
    x = rng.normal(0, 1, (n, 6, 6, 2)) + means[y][:, None, None, :]
    return x.astype("float32"), y.astype("int64")


def _groups(x, m):
    """Consecutive groups of m examples (a last smaller one)."""
    m = m or len(x)
    return [x[i:i + m] for i in range(0, len(x), m)]


def _reference(model, examples, microbatch, r_max, d_max):
    """Everything the diagnosis of `_tiny_model` reports, in NumPy."""
    bn, head = model.get_layer("bn"), model.get_layer("head")
    gamma, beta, mu, var = (numpy(v).astype(np.float64) for v in (
        bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    sigma = np.sqrt(var + EPS)
    kernel, bias = (numpy(v).astype(np.float64) for v in (head.kernel,
                                                           head.bias))
    x = examples.x.astype(np.float64)
    size, count = examples.batch_size, examples.count

    def classify(features, mean, stddev):
        z = (features - mean) / stddev * gamma + beta
        logits = z.mean(axis=(1, 2)) @ kernel + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    # The data's statistics: means over the i.i.d. batches of the batch
    # moments (what recalibrate sets).
    iid = [x[examples.iid_rows(i)] for i in range(count)]
    data_mu = np.mean([b.mean(axis=(0, 1, 2)) for b in iid], axis=0)
    data_var = np.mean([b.var(axis=(0, 1, 2)) for b in iid], axis=0)
    data_sigma = np.sqrt(data_var + EPS)
    r, d, r_data, d_data, batch_mode = [], [], [], [], []
    for i in range(count):
        outputs = []
        for g in _groups(x[i * size:(i + 1) * size], microbatch):
            g_mu, g_sigma = g.mean(axis=(0, 1, 2)), np.sqrt(
                g.var(axis=(0, 1, 2)) + EPS)
            r.append(g_sigma / sigma)
            d.append((g_mu - mu) / sigma)
            r_data.append(g_sigma / data_sigma)
            d_data.append((g_mu - data_mu) / data_sigma)
            outputs.append(classify(g, g_mu, g_sigma))
        batch_mode.append(np.concatenate(outputs))
    r, d = np.array(r), np.array(d)
    batch_mode = np.concatenate(batch_mode)
    recalibrated = classify(x, data_mu, data_sigma)
    return {
        "r": r, "d": d, "deviation": np.sqrt(
            np.mean(np.square(d_data)) + np.mean(np.log(r_data) ** 2)),
        "drift_mean": np.mean(np.abs(mu - data_mu) / data_sigma),
        "drift_stddev": np.mean(np.abs(sigma / data_sigma - 1)),
        "clipped_r": np.mean((r > r_max) | (r < 1 / r_max)),
        "clipped_d": np.mean(np.abs(d) > d_max),
        "batch_mode": batch_mode, "inference": classify(x, mu, sigma),
        "recalibrated": recalibrated,
        "score": np.mean(0.5 * np.abs(batch_mode - recalibrated).sum(1))}


@pytest.mark.parametrize("non_iid, microbatch", [
    (None, None), (3, 4), (None, 5)])  # 5: groups of 5, 5 and 2 in 12
def test_r_d_drift_and_score_match_numpy(non_iid, microbatch):
    model = _tiny_model()
    x, y = _tiny_data()
    settings = dict(batch_size=12, non_iid_classes=non_iid,
                    microbatch_size=microbatch, batches=5, seed=3,
                    r_max=1.1, d_max=0.3)
    result = rc.diagnose(model, (x, y), **settings)
    examples = batching.draw(batching.as_split((x, y)), model, 12,
                             non_iid_classes=non_iid,
                             microbatch_size=microbatch, count=5, seed=3)
    ref = _reference(model, examples, microbatch, 1.1, 0.3)
    (layer,) = result.layers
    assert layer.path == "bn" and layer.channels == 2
    for key in ("r", "d"):
        want = np.percentile(ref[key], [5, 50, 95])
        got = [getattr(layer, key)[k] for k in ("p5", "median", "p95")]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert layer.clipped == pytest.approx(
        {"r": ref["clipped_r"], "d": ref["clipped_d"]}, abs=1e-9)
    assert 0 < layer.clipped["r"] + layer.clipped["d"]  # the bounds bite
    assert layer.deviation == pytest.approx(ref["deviation"], rel=1e-4)
    assert layer.drift["mean"] == pytest.approx(ref["drift_mean"], rel=1e-4)
    assert layer.drift["stddev"] == pytest.approx(ref["drift_stddev"],
                                                  rel=1e-4)
    assert result.score == pytest.approx(ref["score"], rel=1e-4, abs=1e-6)
    for mode, key in (("training_batching", "batch_mode"),
                      ("inference", "inference"),
                      ("recalibrated", "recalibrated")):
        top1 = np.mean(ref[key].argmax(1) == examples.y)
        loss = -np.mean(np.log(ref[key][np.arange(len(examples.y)),
                                        examples.y]))
        assert result.modes[mode]["top1"] == pytest.approx(top1)
        assert result.modes[mode]["loss"] == pytest.approx(loss, rel=1e-4)
    # One normalization layer: alone it is the whole model's shift.
    rows = core.CONTRIBUTION_BATCHES * 12
    alone = np.mean(0.5 * np.abs(ref["batch_mode"][:rows]
                                 - ref["recalibrated"][:rows]).sum(1))
    assert layer.contribution == pytest.approx(alone, rel=1e-4, abs=1e-6)


def test_batches_are_those_training_takes():
    model = _tiny_model()
    split = batching.as_split(_tiny_data())
    examples = batching.draw(split, model, 12, non_iid_classes=3,
                             microbatch_size=None, count=4, seed=7)
    train = rc.data.training_batches(split, model, 12, non_iid_classes=3,
                                     seed=7)
    for i in range(4):
        np.testing.assert_array_equal(examples.user_batch(i), train[i][0])
    # The i.i.d. batches hold the same examples, shuffled.
    rows = np.sort(np.concatenate([examples.iid_rows(i) for i in range(4)]))
    np.testing.assert_array_equal(rows, np.arange(48))


@pytest.fixture(scope="module")
def trained_digits():
    """A small classifier of scikit-learn's digits trained for an epoch on
    i.i.d. batches (seconds), and the data."""
    keras.utils.set_random_seed(0)
    split = rc.data.load_source("digits")
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(32),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Dense(10, activation="softmax")])
    x, y = split.inputs_for(model, part="train")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return model, split


def test_non_iid_batches_deviate_more_and_change_the_verdict(trained_digits):
    model, split = trained_digits
    iid = rc.diagnose(model, split)
    skewed = rc.diagnose(model, split, non_iid_classes=1)
    for plain, other in zip(iid.layers, skewed.layers):
        assert other.deviation > 1.5 * plain.deviation
    assert skewed.score > 3 * iid.score
    assert (iid.verdict, skewed.verdict) == (verdict.FINE, verdict.HELPS)
    # The same examples in i.i.d. batches of the same size are fine, and
    # classify better in training mode than the skewed batches.
    assert skewed.iid_score < verdict.SHIFT_HELPS
    assert skewed.gaps["iid_minus_batching"] > 10


def test_the_model_is_not_changed():
    plain = _tiny_model()
    renormed = rc.convert(_tiny_model(), microbatch_size=4, momentum=0.9)
    for model in (plain, renormed):
        before = weights_snapshot(model)
        layer = model.get_layer("bn")
        settings = (type(layer), layer.momentum, layer.trainable,
                    getattr(layer, "microbatch_size", None))
        rc.diagnose(model, _tiny_data(), batch_size=12, batches=4,
                    microbatch_size=2, non_iid_classes=3)
        after = weights_snapshot(model)
        assert before.keys() == after.keys()
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])
        layer = model.get_layer("bn")
        assert settings == (type(layer), layer.momentum, layer.trainable,
                            getattr(layer, "microbatch_size", None))
        assert "call" not in vars(layer)


def test_too_few_batches_are_said_so():
    result = rc.diagnose(_tiny_model(), _tiny_data(), batch_size=12,
                         batches=2)
    assert result.verdict == verdict.TOO_FEW
    assert result.conclusion.startswith(verdict.TOO_FEW)
    assert any("2 batches, fewer than 4" in line
               for line in result.findings)
    # A score near the threshold with a wide spread needs more batches.
    assert verdict.stability(verdict.SHIFT_HELPS, 0.05, 8)[1] > 8
    assert verdict.stability(10 * verdict.SHIFT_HELPS + 1, 0.05, 8) is None


def test_a_model_without_normalization():
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(3)], name="flat")
    result = rc.diagnose(model, _tiny_data(), batch_size=12)
    assert not result.has_normalization
    assert result.verdict == verdict.NO_NORMALIZATION
    assert result.describe() == (
        "model 'flat': no normalization layer: nothing to diagnose.")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 200}, "batch_size=200: larger than the 96 training"),
    ({"non_iid_classes": 5}, "non_iid_classes=5: the batch size 12"),
    ({"batch_size": 12, "non_iid_classes": 4}, "the data has only 3 "),
    ({"microbatch_size": 13}, "microbatch_size=13: must be between 1 and"),
    ({"batches": 0}, "batches=0: expected an integer >= 1"),
    ({"data": [1, 2]}, "data=list: expected a renorm_convert.data.Split"),
])
def test_refusals_name_the_argument(kwargs, match):
    kwargs = {"batch_size": 12, "data": _tiny_data(), **kwargs}
    with pytest.raises(rc.RenormConvertError, match=match):
        rc.diagnose(_tiny_model(), **kwargs)


def test_labels_beyond_the_head_are_refused():
    x, y = _tiny_data()
    with pytest.raises(rc.RenormConvertError,
                       match="labels go up to 5 but the model has 3"):
        rc.diagnose(_tiny_model(), (x, y * 2 + 1), batch_size=12)


def test_output_measures_against_hand_computation():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    shifts = measures.output_shifts(np.log(p), np.log(q))
    np.testing.assert_allclose(shifts, [0.2, 0.0])
    log_p = measures.log_probabilities(np.log(p) + 3.0, probabilities=False)
    np.testing.assert_allclose(log_p, np.log(p))
    top1, loss = measures.top1_and_loss(np.log(p), np.array([1, 2]))
    assert top1 == 0.5 and loss == pytest.approx(
        -(np.log(0.2) + np.log(0.8)) / 2)
    dense = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert measures.top1_and_loss(np.log(p), dense)[1] == pytest.approx(loss)


def _digits_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")],
        name="digits_cnn")
    path = tmp_path / "m.keras"
    model.save(path)
    return path


def test_diagnose_command(tmp_path, capsys):
    path = _digits_model(tmp_path)
    code = main(["diagnose", str(path), "--data", "digits", "--non-iid",
                 "2", "--batch-size", "16", "--batches", "4", "--steps",
                 "2000", "--json", str(tmp_path / "d.json"), "--plot",
                 str(tmp_path / "d.png"), "--rows", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "diagnosis of 'digits_cnn': 4 batches of 16 (2 classes per " \
           "batch, no microbatches)" in out
    assert "\nconclusion: " in out
    assert "normalization layers, worst first (1 of 1)" in out
    assert "schedule: 200 steps at r_max 1, d_max 0" in out
    assert "pass 5 of 5" in err  # progress on the passes
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["settings"]["non_iid_classes"] == 2
    assert record["layers"][0]["path"] == "batch_normalization"
    assert set(record["modes"]) == {"inference", "training_batching",
                                    "training_iid", "recalibrated"}
    assert record["conclusion"] in out
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_command_refusals_and_no_normalization(tmp_path, capsys):
    path = _digits_model(tmp_path)
    for argv, match in (
            (["--non-iid", "3"], "--non-iid 3: the batch size 32"),
            (["--batch-size", "5000"], "--batch-size 5000: larger than"),
            (["--microbatch", "64"], "--microbatch 64: must be between"),
            (["--json", str(path)], "is the input file")):
        code = main(["diagnose", str(path), "--data", "digits", *argv])
        _, err = capsys.readouterr()
        lines = [l for l in err.splitlines() if not l.startswith("[renorm")]
        assert code == 2 and len(lines) == 1 and match in lines[0], err
    flat = tmp_path / "flat.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(10)], name="flat").save(flat)
    code = main(["diagnose", str(flat), "--data", "digits"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert out == "model 'flat': no normalization layer: nothing to " \
                  "diagnose.\n"
