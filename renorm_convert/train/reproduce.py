"""The paper's Figure 2 (microbatches) and Figure 3 (non-i.i.d. batches) at
small scale on Fashion-MNIST: batch norm versus batch renorm trained from the
same initialisation, several seeds, validation accuracy (on i.i.d. test data)
against training steps.

Batch norm here is `BatchRenormalization` held at r_max = 1, d_max = 0, which
computes exactly batch norm (per microbatch when microbatches are used, as the
paper's baseline does); batch renorm follows `RenormSchedule.for_run`. Both
arms train through `fine_tune`, the one training path.
"""

import dataclasses
import time

import keras
import numpy as np

from renorm_convert import data as data_lib
from renorm_convert._internal.backend import optimizer_step, statistics_kept
from renorm_convert._internal.limits import (REPRODUCE_DEFAULTS,
                                             REPRODUCE_MODELS)
from renorm_convert.data.batches import evaluation_batches, training_batches
from renorm_convert.errors import RenormConvertError
from renorm_convert.evaluation import accuracy
from renorm_convert.layers import renorm_layers
from renorm_convert.train.finetune import fine_tune
from renorm_convert.transform.conversion import convert

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
    steps: int = None  # None: the experiment's default (REPRODUCE_DEFAULTS)
    seeds: int = 3
    batch_size: int = 32
    microbatch: int = 2
    classes_per_batch: int = 2
    eval_every: int = 150
    eval_size: int = 2000
    learning_rate: float = 1e-3
    momentum: float = 0.9
    model: str = None  # None: the experiment's default
    data: str = "fashion-mnist"

    def __post_init__(self):
        if self.experiment not in REPRODUCE_DEFAULTS:
            raise RenormConvertError(
                "{arg}: use one of " + ", ".join(REPRODUCE_DEFAULTS) + ".",
                "experiment", self.experiment)
        for name, value in REPRODUCE_DEFAULTS[self.experiment].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


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


# The experiments' networks, shallowest first: --model NAME.
MODELS = REPRODUCE_MODELS


def _model(config, shape, num_classes):
    if config.model not in MODELS:
        raise RenormConvertError(
            "{arg}: use one of " + ", ".join(MODELS) + " (or load your own "
            "through the Python API).", "model", config.model)
    return small_cnn(shape, num_classes, name=config.model.replace("-", "_"),
                     **MODELS[config.model])


def training_mode_accuracy(model, dataset):
    """Top-1 accuracy on `dataset` (i.i.d. batches of (images, labels)) with
    every normalization layer using the batch's own statistics, as in
    training: the paper's mechanism is that batch norm trained on
    non-i.i.d. batches works this way and fails with its moving averages.
    The model's statistics are put back afterwards."""
    with statistics_kept(model):
        return accuracy(model, dataset, training=True)


class _Curve(keras.callbacks.Callback):
    """At the end of every evaluation period: the step, the accuracy in
    inference mode (Keras's validation, from the logs) and in training mode
    on the same i.i.d. batches."""

    def __init__(self, eval_ds):
        super().__init__()
        self.points = []
        self._eval_ds = eval_ds

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        self.points.append((
            optimizer_step(model),
            float(logs["val_accuracy"]),
            training_mode_accuracy(model, self._eval_ds)))


def _train(model, split, config, renorm, seed, eval_ds):
    """Trains `model` (owned here) through `fine_tune`: batch renorm with
    the schedule scaled to the run, batch norm with the bounds held where
    `convert` put them (r_max 1, d_max 0). Returns the curve's points."""
    curve = _Curve(eval_ds)
    learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(0.75 * config.steps)],
        [config.learning_rate, config.learning_rate * 0.1])
    batches = training_batches(split, 
        model, config.batch_size,
        non_iid_classes=(config.classes_per_batch
                         if config.experiment == "non-iid" else None),
        seed=seed, steps_per_epoch=config.eval_every)
    fine_tune(model, batches, validation=eval_ds,
              epochs=config.steps // config.eval_every, optimizer="adam",
              learning_rate=learning_rate,
              schedule="auto" if renorm else None,
              callbacks=[curve], verbose=0, inplace=True)
    return curve.points


def run(config, progress=None):
    """Runs the experiment; returns {"curves": [...], "final": {...},
    "config": ..., "paper": ...}. `progress`, if given, is called with a
    line of text after every arm of every seed. Each seed's arms start from
    `keras.utils.set_random_seed(seed)`; run it inside
    `renorm_convert.train.determinism.deterministic()` for results that repeat
    exactly."""
    for name in ("steps", "seeds", "eval_every", "batch_size", "eval_size"):
        if getattr(config, name) < 1:
            raise RenormConvertError("{arg}: must be >= 1.", name,
                                     getattr(config, name))
    if config.steps < config.eval_every:
        raise RenormConvertError(
            f"{{arg}}: must be at least eval_every={config.eval_every} (the "
            "first evaluation comes after eval_every steps).", "steps",
            config.steps)
    split = data_lib.load_source(config.data)
    split = split.subset(val=config.eval_size, seed=0)
    shape = (28, 28, 1) if split.x_train.shape[1:] == (28, 28, 1) else tuple(
        split.x_train.shape[1:])
    microbatch = config.microbatch if config.experiment == "microbatch" \
        else None
    curves = []
    for seed in range(config.seeds):
        keras.utils.set_random_seed(seed)
        initial = _model(config, shape, split.num_classes)
        eval_ds = evaluation_batches(split, initial, batch_size=500)
        for variant, renorm in (("batch norm", False), ("batch renorm", True)):
            keras.utils.set_random_seed(seed)
            model = convert(initial, r_max=1.0, d_max=0.0,
                            microbatch_size=microbatch,
                            momentum=config.momentum,
                            renorm_momentum=config.momentum)
            start = time.perf_counter()
            points = _train(model, split, config, renorm, seed, eval_ds)
            if progress is not None:
                progress(f"seed {seed} {variant}: validation accuracy "
                         f"{100 * points[-1][1]:.2f}% "
                         f"({time.perf_counter() - start:.0f} s)")
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
