"""The paper's Figure 2 (microbatches) and Figure 3 (non-i.i.d. batches) at
small scale on Fashion-MNIST: batch norm versus batch renorm trained from the
same initialisation, several seeds, validation accuracy (on i.i.d. test data)
against training steps.

Batch norm here is `BatchRenormalization` held at r_max = 1, d_max = 0, which
computes exactly batch norm (per microbatch when microbatches are used, as the
paper's baseline does); batch renorm follows `RenormSchedule.for_run`.
"""

import dataclasses
import io as _io
import json
import time

import keras
import numpy as np

from renorm_convert import data as data_lib
from renorm_convert.convert import convert
from renorm_convert.finetune import top1
from renorm_convert.io import write_atomically
from renorm_convert.schedule import RenormSchedule, renorm_layers

# The paper's numbers (ImageNet, Inception-v2 style network), for reference.
PAPER = {
    "microbatch": {"batch norm": 74.2, "batch renorm": 76.5,
                   "setup": "microbatches of 4 in batches of 32"},
    "non-iid": {"batch norm": 67.0, "batch renorm": 78.6,
                "setup": "batches of 32 made of 16 classes x 2 examples"},
}


@dataclasses.dataclass
class Config:
    experiment: str  # "microbatch" or "non-iid"
    steps: int = 1500
    seeds: int = 3
    batch_size: int = 32
    microbatch: int = 2
    classes_per_batch: int = 2
    eval_every: int = 150
    eval_size: int = 2000
    learning_rate: float = 1e-3
    momentum: float = 0.9
    model: str = "cnn"
    data: str = "fashion-mnist"
    # TensorFlow's deterministic kernels: two runs with the same config give
    # the same numbers (on the same machine and instruction set).
    deterministic: bool = True


def small_cnn(shape, num_classes, width=16, blocks=2, convs_per_block=2,
              dense_head=True, name="small_cnn"):
    """`blocks` blocks of `convs_per_block` batch-normalized convolutions
    (3x3, widths doubling from `width`) each followed by max pooling; then
    a batch-normalized dense layer of 64 (`dense_head`, where the paper's
    effects show most) or global average pooling, and the logits."""
    inputs = keras.Input(shape)
    x = inputs
    for block in range(blocks):
        filters = width * 2 ** block
        for i in range(convs_per_block):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"b{block}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"b{block}_bn{i}")(x)
            x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    if dense_head:
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(64, use_bias=False, name="fc")(x)
        x = keras.layers.BatchNormalization(name="fc_bn")(x)
        x = keras.layers.ReLU()(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# The experiments' architectures, shallowest first: --model NAME.
MODELS = {
    # Three blocks of one convolution, no normalized head: the plain CNN.
    "cnn-plain": dict(blocks=3, convs_per_block=1, dense_head=False),
    # Two blocks of two convolutions and a batch-normalized dense head.
    "cnn": dict(blocks=2, convs_per_block=2, dense_head=True),
    "cnn-wide": dict(blocks=2, convs_per_block=2, dense_head=True, width=32),
    # Three blocks of two convolutions and a batch-normalized dense head.
    "cnn-deep": dict(blocks=3, convs_per_block=2, dense_head=True),
}


def _model(config, shape, num_classes):
    if config.model not in MODELS:
        raise ValueError(f"model={config.model!r}: use one of "
                         f"{', '.join(MODELS)} (or load your own through "
                         "the Python API).")
    return small_cnn(shape, num_classes, name=config.model.replace("-", "_"),
                     **MODELS[config.model])


def training_mode_accuracy(model, dataset):
    """Top-1 accuracy on `dataset` (i.i.d. batches of (images, labels)) with
    every normalization layer using the batch's own statistics, as in
    training: the paper's mechanism is that batch norm trained on
    non-i.i.d. batches works this way and fails with its moving averages.
    The model's statistics are put back afterwards."""
    saved = [v.numpy() for v in model.non_trainable_variables]
    try:
        return top1(model, dataset, training=True)
    finally:
        for v, value in zip(model.non_trainable_variables, saved):
            v.assign(value)


class _Curve(keras.callbacks.Callback):
    def __init__(self, eval_ds):
        super().__init__()
        self.points = []
        self._eval_ds = eval_ds

    def on_epoch_end(self, epoch, logs=None):
        self.points.append((int(self.model.optimizer.iterations.numpy()),
                            float(logs["val_accuracy"]),
                            training_mode_accuracy(self.model,
                                                   self._eval_ds)))


def _train(model, split, config, renorm, seed, eval_ds):
    shape = data_lib.model_image_shape(model)
    non_iid = config.classes_per_batch if config.experiment == "non-iid" \
        else None
    epochs_needed = -(-config.steps * config.batch_size // len(split.y_train))
    train_ds, _ = data_lib.training_dataset(
        split, shape, config.batch_size, epochs=max(epochs_needed, 1),
        seed=seed, non_iid_classes=non_iid)
    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(0.75 * config.steps)],
        [config.learning_rate, config.learning_rate * 0.1])
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    curve = _Curve(eval_ds)
    callbacks = [curve]
    if renorm:
        callbacks.insert(0, RenormSchedule.for_run(config.steps))
    model.fit(train_ds, steps_per_epoch=config.eval_every,
              epochs=config.steps // config.eval_every,
              validation_data=eval_ds, callbacks=callbacks, verbose=0,
              shuffle=False)
    return curve.points


def run(config, progress=print):
    """Runs the experiment; returns {"curves": [...], "final": {...}}."""
    if config.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    split = data_lib.load_source(config.data)
    split = split.subset(val=config.eval_size, seed=0)
    shape = (28, 28, 1) if split.x_train.shape[1:] == (28, 28, 1) else tuple(
        split.x_train.shape[1:])
    eval_ds = data_lib.evaluation_dataset(split, shape, batch_size=500)
    microbatch = config.microbatch if config.experiment == "microbatch" \
        else None
    curves = []
    for seed in range(config.seeds):
        keras.utils.set_random_seed(seed)
        initial = _model(config, shape, split.num_classes)
        for variant, renorm in (("batch norm", False), ("batch renorm", True)):
            keras.utils.set_random_seed(seed)
            model = convert(initial, r_max=1.0, d_max=0.0,
                            microbatch_size=microbatch,
                            momentum=config.momentum,
                            renorm_momentum=config.momentum)
            start = time.perf_counter()
            points = _train(model, split, config, renorm, seed, eval_ds)
            final = points[-1][1]
            progress(f"seed {seed} {variant}: validation accuracy "
                     f"{100 * final:.2f}% ({time.perf_counter() - start:.0f} s)")
            layers = renorm_layers(model)
            curves += [{"seed": seed, "variant": variant, "step": s,
                        "val_accuracy": a,
                        "val_accuracy_batch_statistics": b,
                        "r_max": layers[0].r_max, "d_max": layers[0].d_max}
                       for s, a, b in points]
    final = {}
    for variant in ("batch norm", "batch renorm"):
        last = {}
        for c in curves:
            if c["variant"] == variant:
                last[c["seed"]] = c["val_accuracy"]
        values = np.array([last[s] for s in sorted(last)]) * 100
        final[variant] = {"mean": float(values.mean()),
                          "std": float(values.std()),
                          "per_seed": [float(v) for v in values]}
    bn = np.array(final["batch norm"]["per_seed"])
    rn = np.array(final["batch renorm"]["per_seed"])
    final["renorm minus norm, paired by seed"] = {
        "mean": float((rn - bn).mean()), "wins": int((rn > bn).sum()),
        "seeds": len(bn)}
    return {"config": dataclasses.asdict(config), "curves": curves,
            "final": final, "paper": PAPER[config.experiment]}


def write_outputs(result, prefix):
    """PREFIX.csv (curves), PREFIX.json (everything), PREFIX.png (plot)."""
    import csv

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(result["curves"][0]))
    writer.writeheader()
    writer.writerows(result["curves"])
    write_atomically(prefix + ".csv", buffer.getvalue().encode())
    write_atomically(prefix + ".json", json.dumps(result, indent=1).encode())
    write_atomically(prefix + ".png", _plot(result))
    return [prefix + s for s in (".csv", ".json", ".png")]


def _plot(result):
    """The curves of `result` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = _figure(result)
    out = _io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def _title(result):
    cfg = result["config"]
    what = (f"microbatches of {cfg['microbatch']}"
            if cfg["experiment"] == "microbatch" else
            f"non-i.i.d. batches: {cfg['classes_per_batch']} classes x "
            f"{cfg['batch_size'] // cfg['classes_per_batch']}")
    return [f"{cfg['data']}, model {cfg.get('model', 'cnn')}, batch "
            f"{cfg['batch_size']}, {what}",
            f"{cfg['steps']} steps; mean ± std over {cfg['seeds']} seeds"]


def _figure(result):
    """The matplotlib figure `_plot` renders: validation accuracy of both
    arms against steps, and the paper's final accuracies as dashed lines."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"batch norm": "tab:blue", "batch renorm": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for variant, colour in colours.items():
        rows = [c for c in result["curves"] if c["variant"] == variant]
        if not rows:
            continue
        steps = sorted({r["step"] for r in rows})
        acc = [np.array([r["val_accuracy"] for r in rows
                         if r["step"] == s]) * 100 for s in steps]
        mean = np.array([a.mean() for a in acc])
        std = np.array([a.std() for a in acc])
        ax.plot(steps, mean, color=colour, marker=".", label=f"{variant} (ours)")
        ax.fill_between(steps, mean - std, mean + std, color=colour,
                        alpha=0.2)
        if all("val_accuracy_batch_statistics" in r for r in rows):
            batch = [np.mean([r["val_accuracy_batch_statistics"] for r in rows
                              if r["step"] == s]) * 100 for s in steps]
            ax.plot(steps, batch, color=colour, linestyle=":",
                    label=f"{variant}, training mode (batch statistics)")
    paper = result.get("paper") or PAPER[result["config"]["experiment"]]
    for variant, colour in colours.items():
        if variant in paper:
            ax.axhline(paper[variant], color=colour, linestyle="--",
                       linewidth=1,
                       label=f"paper, {variant}: {paper[variant]:.1f} % "
                             "(ImageNet, final)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%); dotted: training mode\n"
                  "on i.i.d. test batches of 500")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    # Wrapped to the axes' width (a long dataset path or model name would
    # otherwise run off the figure's right edge).
    ax.set_title("\n".join(textwrap.fill(line, width=70)
                            for line in _title(result)), fontsize=10)
    fig.tight_layout()
    return fig
