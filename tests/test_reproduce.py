"""The paper's experiments repeat exactly under a seed; their plots. On every
backend."""

import dataclasses
import json
import subprocess
import sys

import pytest

from helpers import numpy

RUN = """
import json, sys
from renorm_convert.train import reproduce
from renorm_convert.train.determinism import deterministic
config = reproduce.Config("non-iid", steps=40, seeds=1, eval_every=20,
                          eval_size=300, data="digits", batch_size=20)
with deterministic():
    result = reproduce.run(config, progress=lambda message: None)
print(json.dumps([[c["val_accuracy"], c["val_accuracy_batch_statistics"],
                   c["r_max"], c["d_max"]] for c in result["curves"]]))
"""


def _run():
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_runs_in_separate_processes_are_identical():
    first, second = _run(), _run()
    assert len(first) == 4  # two evaluations, two arms
    assert first == second
    accuracies = [row[0] for row in first]
    # The curves are learning, not constant.
    assert len(set(accuracies)) > 1
    # Batch norm is held at r_max 1, d_max 0; renorm's schedule relaxed them.
    (bn_r, bn_d), (rn_r, rn_d) = first[1][2:], first[3][2:]
    assert (bn_r, bn_d) == (1.0, 0.0) and rn_r > 1.0 and rn_d > 0.0


def _synthetic_result(data="fashion-mnist"):
    from renorm_convert.train import reproduce

    config = reproduce.Config("non-iid", steps=300, seeds=2, eval_every=100,
                              data=data)
    curves = [{"seed": seed, "variant": variant, "step": step,
               "val_accuracy": 0.5 + 0.1 * step / 300 + 0.02 * seed
               + (0.05 if variant == "batch renorm" else 0.0),
               "r_max": 1.0, "d_max": 0.0}
              for seed in range(2) for variant in ("batch norm", "batch renorm")
              for step in (100, 200, 300)]
    return {"config": dataclasses.asdict(config), "curves": curves,
            "paper": reproduce.PAPER["non-iid"]}


@pytest.mark.parametrize("data", ["fashion-mnist",
                                  "/a/rather/long/path/to/an/image_folder/"
                                  "with_a_long_name_and_no_spaces_in_it"])
def test_plot_is_a_png_with_title_inside_labels_and_paper_lines(data, tmp_path):
    import matplotlib.pyplot as plt

    from renorm_convert.train import reporting
    from renorm_convert.train import reproduce

    result = _synthetic_result(data)
    written = reporting.write_experiment(result, str(tmp_path / "non_iid"))
    assert written == [str(tmp_path / f"non_iid{s}")
                       for s in (".csv", ".json", ".png")]
    png = (tmp_path / "non_iid.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    rows = (tmp_path / "non_iid.csv").read_text().splitlines()
    assert len(rows) == 1 + len(result["curves"])

    fig = reporting.experiment_figure(result)
    try:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = ax.title.get_window_extent(renderer)
        figure = fig.bbox
        assert title.x0 >= figure.x0 and title.x1 <= figure.x1, (title, figure)
        assert title.y0 >= figure.y0 and title.y1 <= figure.y1, (title, figure)
        assert ax.get_xlabel() == "training step"
        assert "accuracy" in ax.get_ylabel()
        paper = reproduce.PAPER["non-iid"]
        dashed = sorted(line.get_ydata()[0] for line in ax.get_lines()
                        if line.get_linestyle() == "--")
        assert dashed == sorted([paper["batch norm"], paper["batch renorm"]])
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("paper" in t and "67.0" in t and "ImageNet" in t
                   for t in labels), labels
    finally:
        plt.close(fig)


def test_training_mode_accuracy_uses_batch_statistics_and_restores_them():
    import keras
    import numpy as np

    import renorm_convert as rc
    from renorm_convert.train.reproduce import training_mode_accuracy

    model = rc.convert(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3),
        keras.layers.BatchNormalization(), keras.layers.Dense(2)]),
        r_max=1.0, d_max=0.0)
    before = [numpy(v).copy() for v in model.weights]
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (64, 4)).astype("float32")
    y = rng.integers(0, 2, 64)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    got = training_mode_accuracy(model, batches)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(numpy(v), b, err_msg=v.path)
    # The same, computed with NumPy: batch norm with each batch's moments.
    dense1, bn, dense2 = model.layers
    correct = 0
    outputs = []
    for part, labels in batches:
        h = part @ numpy(dense1.kernel) + numpy(dense1.bias)
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.epsilon) * \
            numpy(bn.gamma) + numpy(bn.beta)
        out = h @ numpy(dense2.kernel) + numpy(dense2.bias)
        outputs.append(out)
        correct += int((out.argmax(-1) == labels).sum())
    assert got == correct / 64
    # With the moving statistics (inference) it would differ: the inputs
    # are far from the fresh layer's mean 0, variance 1.
    inference = np.concatenate([numpy(model(p, training=False)).argmax(-1)
                                for p, _ in batches])
    assert (inference != np.concatenate(outputs).argmax(-1)).any()


@pytest.mark.slow  # two arms, each compiled: 20-60 s under JAX
def test_both_arms_train_through_fine_tune(monkeypatch):
    """The experiments have no training loop of their own: batch norm is
    fine_tune with the bounds held at 1 / 0 (no schedule), batch renorm is
    fine_tune with the schedule; what fine_tune returns is what is
    reported."""
    from renorm_convert.train import finetune
    from renorm_convert.train import reproduce
    from renorm_convert.data.batches import TrainingBatches

    calls = []

    def recording(model, train, **kwargs):
        result = finetune.fine_tune(model, train, **kwargs)
        layers = reproduce.renorm_layers(result.model)
        calls.append((train, kwargs, layers[0].r_max, layers[0].d_max,
                      len(result.steps), result.model is model))
        return result

    monkeypatch.setattr(reproduce, "fine_tune", recording)
    config = reproduce.Config("non-iid", steps=20, seeds=1, eval_every=10,
                              eval_size=100, data="digits", batch_size=20)
    result = reproduce.run(config)
    assert [c[1]["schedule"] for c in calls] == [None, "auto"]
    for train, kwargs, *_, trained_in_place in calls:
        assert isinstance(train, TrainingBatches)
        assert (train.non_iid_classes, train.batch_size,
                train.steps_per_epoch) == (2, 20, 10)
        assert kwargs["inplace"] is True and kwargs["epochs"] == 2
        assert trained_in_place
    (_, _, bn_r, bn_d, bn_steps, _), (_, _, rn_r, rn_d, rn_steps, _) = calls
    assert (bn_r, bn_d) == (1.0, 0.0) and bn_steps == rn_steps == 20
    assert rn_r > 1.0 and rn_d > 0.0  # the schedule relaxed the bounds
    assert [c["r_max"] for c in result["curves"]][-1] == rn_r
    assert [c["step"] for c in result["curves"]] == [10, 20, 10, 20]
