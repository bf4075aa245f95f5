"""The paper's experiments repeat exactly under a seed; their plots."""

import dataclasses
import json
import subprocess
import sys

import pytest

RUN = """
import json, sys
from renorm_convert import reproduce
config = reproduce.Config("non-iid", steps=40, seeds=1, eval_every=20,
                          eval_size=300, data="digits", batch_size=20)
result = reproduce.run(config, progress=lambda message: None)
print(json.dumps([c["val_accuracy"] for c in result["curves"]]))
"""


def _run():
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_runs_in_separate_processes_are_identical():
    first, second = _run(), _run()
    assert len(first) == 4  # two evaluations, two arms
    assert first == second
    # The curves are learning, not constant.
    assert len(set(first)) > 1


def _synthetic_result(data="fashion-mnist"):
    from renorm_convert import reproduce

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

    from renorm_convert import reporting, reproduce

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
    import tensorflow as tf

    import renorm_convert as rc
    from renorm_convert.reproduce import training_mode_accuracy

    model = rc.convert(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3),
        keras.layers.BatchNormalization(), keras.layers.Dense(2)]),
        r_max=1.0, d_max=0.0)
    before = [v.numpy().copy() for v in model.weights]
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (64, 4)).astype("float32")
    y = rng.integers(0, 2, 64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    got = training_mode_accuracy(model, ds)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # The same, computed with NumPy: batch norm with each batch's moments.
    dense1, bn, dense2 = model.layers
    correct = 0
    for part, labels in ((x[:32], y[:32]), (x[32:], y[32:])):
        h = part @ dense1.kernel.numpy() + dense1.bias.numpy()
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.epsilon) * \
            bn.gamma.numpy() + bn.beta.numpy()
        out = h @ dense2.kernel.numpy() + dense2.bias.numpy()
        correct += int((out.argmax(-1) == labels).sum())
    assert got == correct / 64


def test_both_arms_train_through_fine_tune(monkeypatch):
    """The experiments have no training loop of their own: batch norm is
    fine_tune with the bounds held at 1 / 0 (no schedule), batch renorm is
    fine_tune with the schedule; what fine_tune returns is what is
    reported."""
    from renorm_convert import finetune, reproduce

    calls = []

    def recording(model, train, **kwargs):
        history = finetune.fine_tune(model, train, **kwargs)
        layers = reproduce.renorm_layers(history.trained_model)
        calls.append((kwargs, layers[0].r_max, layers[0].d_max,
                      len(history.steps)))
        return history

    monkeypatch.setattr(reproduce, "fine_tune", recording)
    config = reproduce.Config("non-iid", steps=40, seeds=1, eval_every=20,
                              eval_size=100, data="digits", batch_size=20,
                              deterministic=False)
    result = reproduce.run(config)
    assert [c[0]["schedule"] for c in calls] == [None, "auto"]
    assert all(c[0]["non_iid_classes"] == 2 and c[0]["copy"] is False
               and c[0]["steps_per_epoch"] == 20 and c[0]["epochs"] == 2
               for c in calls)
    (bn_kwargs, bn_r, bn_d, bn_steps), (_, rn_r, rn_d, rn_steps) = calls
    assert (bn_r, bn_d) == (1.0, 0.0) and bn_steps == rn_steps == 40
    assert rn_r > 1.0 and rn_d > 0.0  # the schedule relaxed the bounds
    assert [c["r_max"] for c in result["curves"]][-1] == rn_r
