"""fine_tune: train a converted model with the renorm schedule, microbatches,
non-i.i.d. batches, mixed precision, XLA, tf.distribute, and resume."""

import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from renorm_convert import checkpoint as checkpoint_lib
from renorm_convert import data as data_lib
from renorm_convert import distribute
from renorm_convert import _keras_internals as internals
from renorm_convert.convert import (copy_model, is_normalization, recast,
                                    restore_strided_pointwise, set_trainable,
                                    subsample_strided_pointwise,
                                    with_new_head)
from renorm_convert.io import kill_point, write_atomically
from renorm_convert.reporting import plot_history, write_history
from renorm_convert.schedule import RenormSchedule, renorm_layers

_log = logging.getLogger("renorm_convert")

PRECISIONS = {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16",
              "mixed_float16": "mixed_float16",
              "mixed_bfloat16": "mixed_bfloat16"}


class FineTuneError(ValueError):
    """Bad fine-tuning arguments: the message says what and how to fix it."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; `model` holds the last good weights."""

    def __init__(self, message, model, history):
        super().__init__(message)
        self.model = model
        self.history = history


def _output_is_probability(model):
    layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or (
        getattr(activation, "__name__", "") == "softmax")


def gradient_report(model, x, y, loss):
    """Mean absolute gradient of normalization parameters and of the other
    weights, per layer type, on one batch (as in the "Yet Another Batch
    Norm Analysis" report)."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        value = loss(y, pred)
    grads = tape.gradient(value, variables)
    owner = {}
    for layer in internals.flatten_layers(model):
        for v in layer.trainable_variables:
            owner.setdefault(id(v), layer)
    sums = {}
    for v, g in zip(variables, grads):
        if g is None:
            continue
        layer = owner.get(id(v))
        kind = type(layer).__name__ if layer is not None else "?"
        group = "normalization" if is_normalization(layer) else "other"
        key = (group, kind, v.path.split("/")[-1])
        s = sums.setdefault(key, [0.0, 0])
        s[0] += float(tf.reduce_sum(tf.abs(tf.cast(g, tf.float32))))
        s[1] += int(np.prod(g.shape))
    rows = [{"group": k[0], "layer_type": k[1], "weight": k[2],
             "mean_abs_grad": total / max(n, 1), "count": n}
            for k, (total, n) in sorted(sums.items())]
    by_group = {}
    for r in rows:
        t = by_group.setdefault(r["group"], [0.0, 0])
        t[0] += r["mean_abs_grad"] * r["count"]
        t[1] += r["count"]
    summary = {g: t[0] / max(t[1], 1) for g, t in by_group.items()}
    return {"rows": rows, "summary": summary}


class StepLog(keras.callbacks.Callback):
    """Records loss, metrics and the clipping bounds at every step."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        row = {"step": int(self.model.optimizer.iterations.numpy()),
               "epoch": self.epoch}
        row.update({k: float(v) for k, v in (logs or {}).items()
                    if np.ndim(v) == 0})
        self.steps.append(row)


class ValidationCurve(keras.callbacks.Callback):
    """Accuracy in inference mode on a fixed validation subset (its first
    `size` examples) at step 0, the model as given, and at `per_epoch`
    evenly spaced steps of every epoch: a short run's curve then shows where
    it started and how it moved, which per-epoch values cannot."""

    def __init__(self, dataset, steps_per_epoch, per_epoch=4, size=512):
        super().__init__()
        self.points = []
        self._batches = []
        count = 0
        for x, y in dataset:
            self._batches.append((x, y))
            count += int(np.shape(y)[0])
            if count >= size:
                break
        self.size = count
        self._marks = {max(1, round(k * steps_per_epoch / per_epoch))
                       for k in range(1, per_epoch + 1)}
        self._steps_per_epoch = steps_per_epoch

    def _record(self):
        self.points.append({
            "step": int(self.model.optimizer.iterations.numpy()),
            "val_accuracy": top1(self.model, self._batches)})

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if (step - 1) % self._steps_per_epoch + 1 in self._marks:
            self._record()


class NanGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss and puts back the weights and the
    optimizer state (Adam's moments, the step count) of the last epoch that
    ended well, or of the start: saving NaN moments would make the next
    step of whoever loads the model NaN everywhere."""

    def __init__(self):
        super().__init__()
        self.tripped_at = None
        self._good = None
        self.good_epoch = None

    def _variables(self):
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        return list(self.model.variables) + list(optimizer.variables)

    def on_train_begin(self, logs=None):
        self._good = [v.numpy() for v in self._variables()]

    def on_epoch_end(self, epoch, logs=None):
        if self.tripped_at is None:
            self._good = [v.numpy() for v in self._variables()]
            self.good_epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.tripped_at = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True
            for v, value in zip(self._variables(), self._good):
                v.assign(value)


def _prepare_model(model, *, copy, head, train_only, microbatch_size,
                   precision, momentum, strategy):
    if precision is not None:
        if precision not in PRECISIONS:
            raise FineTuneError(f"mixed_precision={precision!r}: use 'float16' "
                                "or 'bfloat16'.")
        model = recast(model, PRECISIONS[precision])
    elif copy or strategy is not None:
        # Under a strategy the variables must be created inside its scope.
        model = copy_model(model)
    if head is not None:
        try:
            model = with_new_head(model, int(head))
        except ValueError as e:
            raise FineTuneError(f"head={head}: {e}") from None
    if microbatch_size is not None:
        for layer in renorm_layers(model):
            layer.microbatch_size = int(microbatch_size)
    if momentum is not None:
        if not 0.0 <= float(momentum) < 1.0:
            raise FineTuneError(f"momentum={momentum}: expected a value in "
                                "[0, 1).")
        for layer in internals.flatten_layers(model):
            if is_normalization(layer):
                layer.momentum = float(momentum)
                layer.renorm_momentum = float(momentum)
    if train_only == "norm":
        if set_trainable(model, is_normalization) == 0:
            raise FineTuneError("train_only='norm': the model has no "
                                "normalization layer.")
    elif train_only is not None:
        raise FineTuneError(f"train_only={train_only!r}: only 'norm' is "
                            "supported.")
    if not distribute.has_gpu():
        # The oneDNN strided 1x1 weight gradient crashes the process on
        # AVX-512 CPUs (see subsample_strided_pointwise); undone after fit.
        subsample_strided_pointwise(model)
    return model


def _optimizer(name, learning_rate):
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        pass
    elif (isinstance(learning_rate, bool) or not isinstance(
            learning_rate, (int, float, np.floating, np.integer))
          or not math.isfinite(learning_rate) or learning_rate <= 0):
        raise FineTuneError(
            f"learning_rate={learning_rate!r}: expected a positive number or "
            "a keras.optimizers.schedules.LearningRateSchedule.")
    try:
        optimizer = keras.optimizers.get(name)
    except ValueError:
        raise FineTuneError(
            f"optimizer={name!r}: use a Keras optimizer name such as "
            "rmsprop (the paper's), adam, sgd or adamw.") from None
    config = optimizer.get_config()
    config["learning_rate"] = learning_rate
    return type(optimizer)(**{k: v for k, v in config.items()
                              if k != "name"})


def fine_tune(model, train, *, validation=None, epochs=1, batch_size=32,
              optimizer="adam", learning_rate=1e-3, head=None,
              train_only=None, schedule="auto", microbatch_size=None,
              momentum=None,
              non_iid_classes=None, scaling="unit", mixed_precision=None,
              jit_compile=False, strategy=None, checkpoint_dir=None,
              history_path=None, plot=None, tensorboard_dir=None,
              gradient_report_path=None, callbacks=(), seed=0,
              verbose="auto", progress=None, copy=True, steps_per_epoch=None,
              validation_curve=4):
    """Fine-tunes a (converted) model; returns Keras's History.

    Args:
        model: A Keras model, usually from `convert`. It is not modified
            (unless `copy=False`): the model trained is a copy, at
            `history.trained_model`.
        train: A `data.Split` (its validation part is used unless
            `validation` is given), or a `tf.data.Dataset` of batches.
        validation: A `data.Split` or `tf.data.Dataset`, or None.
        epochs, batch_size: As in `fit` (batch_size for Splits).
        steps_per_epoch: Epochs of this many steps instead of one pass over
            the data each; the data then runs on across epochs (an epoch is
            then simply how often validation and checkpoints happen).
        optimizer, learning_rate: A Keras optimizer name (e.g. "rmsprop", as
            in the paper, or "adam") and its learning rate: a number or a
            `keras.optimizers.schedules.LearningRateSchedule`.
        head: Replace the last Dense layer by one with this many classes.
        train_only: "norm" trains only the normalization parameters.
        schedule: "auto" (`RenormSchedule.for_run` over this run's steps), a
            `RenormSchedule`, or None (keep the layers' r_max / d_max).
        microbatch_size: Set on every BatchRenormalization layer.
        momentum: Set as `momentum` and `renorm_momentum` of every
            normalization layer. Keras's 0.99 lags behind fast optimizers on
            short runs (a few thousand steps or fewer) and can make renorm
            unstable there; 0.9 suits them.
        non_iid_classes: K: each batch holds K classes, batch_size / K
            examples each (the paper's Figure 3).
        scaling: How images are scaled ("unit", "symmetric", "raw").
        mixed_precision: "float16" or "bfloat16" (statistics stay float32).
        jit_compile: Compile the train step with XLA.
        strategy: None, "mirrored", "multi-worker" or a tf.distribute
            strategy.
        checkpoint_dir: Write a checkpoint (weights, optimizer state, the
            history so far) here at the end of every epoch, and resume from
            the newest undamaged one. The directory must be new, empty or
            one of ours; only our own files in it are ever written or
            deleted. It is kept after training: call
            `renorm_convert.checkpoint.remove(checkpoint_dir)` once the
            trained model is saved (a run that finds all its epochs done
            trains nothing and returns the checkpoint's model).
        history_path: Write the history as PATH.csv (per epoch),
            PATH.steps.csv (per step) and PATH.json.
        plot: Write a PNG of the curves here.
        tensorboard_dir: Write TensorBoard logs here.
        gradient_report_path: Write the gradient diagnostics (JSON) here.
        callbacks: More Keras callbacks.
        seed: Seeds weights of new layers, data order and dropout.
        progress: Called with a line of text when the run resumes from a
            checkpoint or skips a damaged one (default: logged).
        copy: False trains `model` itself, for callers that own it (no
            copy of the weights is made unless mixed precision or a
            strategy needs one); `history.trained_model` is the model
            trained either way.
        validation_curve: Evaluations per epoch for
            `history.validation_curve` (0: none).

    Returns:
        Keras's History over the whole run (a resumed run includes the
        epochs before the checkpoint, with their true numbers), with
        `trained_model`, `steps` (per-step log), `validation_curve`
        (accuracy on the first 512 validation examples at step 0 and four
        times an epoch: [{"step", "val_accuracy"}]), `gradient_report`,
        `resumed_from` ((epoch, step) or None) and `artifact_errors`
        (output path -> why it could not be written; the model is still
        returned).

    Raises:
        NonFiniteLoss: the loss became NaN / inf; the exception holds the
            model with the last good weights and optimizer state.
    """
    distribute.use_gpu_memory_growth()
    keras.utils.set_random_seed(seed)
    try:
        strategy = distribute.make_strategy(strategy)
    except distribute.StrategyError as e:
        raise FineTuneError(str(e)) from None
    if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, (int, np.integer))
            or steps_per_epoch < 1):
        raise FineTuneError(f"steps_per_epoch={steps_per_epoch!r}: expected "
                            "a positive integer, or None for whole passes.")
    scope = distribute.scope(strategy)
    with scope:
        model = _prepare_model(model, copy=copy, head=head,
                               train_only=train_only,
                               microbatch_size=microbatch_size,
                               precision=mixed_precision, momentum=momentum,
                               strategy=strategy)
        train_ds, steps, val_ds, sample = _datasets(
            model, train, validation, batch_size=batch_size, epochs=epochs,
            seed=seed, non_iid_classes=non_iid_classes, scaling=scaling,
            head=head, steps_per_epoch=steps_per_epoch)
        probabilities = _output_is_probability(model)
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=not probabilities)
        model.compile(optimizer=_optimizer(optimizer, learning_rate),
                      loss=loss, metrics=["accuracy"],
                      jit_compile=bool(jit_compile))
    say = progress or _log.info
    multi_worker = distribute.is_multi_worker(strategy)
    chief = not multi_worker or distribute.is_chief()
    if multi_worker:
        distribute.patch_for_multi_worker(model, strategy, sample)
        if checkpoint_dir and not chief:
            # Workers must not write over the chief's checkpoints.
            checkpoint_dir = os.path.join(
                checkpoint_dir, f"worker-{distribute.worker_index()}")
    resume = None
    if checkpoint_dir:
        checkpoint_dir = checkpoint_lib.claim(checkpoint_dir)
        resume, notes = checkpoint_lib.latest(checkpoint_dir)
        for note in notes:
            say(note)
        if resume is not None:
            if resume.epoch > epochs or resume.step != resume.epoch * steps:
                raise FineTuneError(
                    f"checkpoint_dir={checkpoint_dir}: holds a checkpoint of "
                    f"epoch {resume.epoch} (step {resume.step}) that does not "
                    f"fit this run ({epochs} epochs of {steps} steps); use "
                    "the same settings, or another directory.")
            with scope:
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                model.load_weights(resume.weights)
            say(f"resuming from epoch {resume.epoch}, step {resume.step} "
                f"(checkpoint in {checkpoint_dir})")
    done = resume.epoch if resume is not None else 0
    if done:
        train_ds = train_ds.skip(done * steps)
    total = steps * epochs
    if schedule == "auto":
        schedule = RenormSchedule.for_run(max(total, 1))
    all_callbacks = []
    if schedule is not None and renorm_layers(model):
        all_callbacks.append(schedule)
    step_log, guard = StepLog(), NanGuard()
    if resume is not None:
        step_log.steps = list(resume.steps)
    all_callbacks += [step_log, guard]
    curve = None
    if val_ds is not None and not multi_worker and validation_curve:
        curve = ValidationCurve(val_ds, steps, per_epoch=int(validation_curve))
        all_callbacks.append(curve)
    if checkpoint_dir:
        all_callbacks.append(checkpoint_lib.Checkpoint(
            checkpoint_dir, history_so_far=resume.history if resume else {},
            steps_log=step_log, skip=lambda: guard.tripped_at is not None))
    if tensorboard_dir:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise FineTuneError(
                "TensorBoard logs need the tensorboard package: pip install "
                "'renorm_convert[tensorboard]' (or tensorboard).")
        all_callbacks.append(keras.callbacks.TensorBoard(str(tensorboard_dir)))
    all_callbacks += list(callbacks)
    report = None
    if gradient_report_path:
        report = gradient_report(model, sample[0], sample[1], loss)
        if chief:
            write_atomically(gradient_report_path,
                             json.dumps(report, indent=2).encode())
    if done < epochs:
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                            initial_epoch=done, steps_per_epoch=steps,
                            callbacks=all_callbacks, verbose=verbose,
                            shuffle=False)
    else:  # every epoch was done before an interruption
        history = keras.callbacks.History()
        history.set_model(model)
        history.history, history.epoch = {}, []
    kill_point("after-training")
    if resume is not None:
        merged = {k: list(v) for k, v in resume.history.items()}
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        history.history = merged
        history.epoch = list(range(len(merged.get("loss", []))))
    restore_strided_pointwise(model)
    history.trained_model = model
    history.steps = step_log.steps
    history.validation_curve = curve.points if curve is not None else []
    history.validation_curve_size = curve.size if curve is not None else 0
    history.gradient_report = report
    history.resumed_from = (resume.epoch, resume.step) if resume else None
    history.checkpoint_dir = checkpoint_dir
    history.artifact_errors = {}
    if history_path and chief:
        _write_artifact(history.artifact_errors, str(history_path),
                        write_history, history, history_path)
    if plot and chief:
        _write_artifact(history.artifact_errors, str(plot), plot_history,
                        history, plot)
    if guard.tripped_at is not None:
        kept = (f"the weights and optimizer state after epoch "
                f"{guard.good_epoch}" if guard.good_epoch else
                "the weights and optimizer state the run started with")
        raise NonFiniteLoss(
            f"the loss became NaN or infinite at step {guard.tripped_at}; "
            f"training stopped and the model keeps {kept}. Lower the learning "
            "rate, or lengthen the schedule's warm-up.", model, history)
    return history


def _write_artifact(errors, name, write, *args):
    """Writes one run record; a failure is noted, not raised, so that the
    trained model is still returned (and saved by the caller)."""
    try:
        write(*args)
    except (OSError, ValueError, RuntimeError) as e:
        errors[name] = " ".join(str(e).split())


def resumed_epochs(checkpoint_dir):
    """Epochs already done by an interrupted run checkpointed in
    `checkpoint_dir` (its newest undamaged checkpoint), else 0."""
    if not checkpoint_dir:
        return 0
    state, _ = checkpoint_lib.latest(str(checkpoint_dir))
    return state.epoch if state is not None else 0


def _datasets(model, train, validation, *, batch_size, epochs, seed,
              non_iid_classes, scaling, head, steps_per_epoch):
    """(training batches for the whole run, steps per epoch, validation
    batches or None, one training batch)."""
    if isinstance(train, tf.data.Dataset):
        sample = next(iter(train))
        if steps_per_epoch is not None:
            return train.repeat(), steps_per_epoch, validation, sample
        steps = int(train.cardinality().numpy())
        if steps < 1:
            raise FineTuneError(
                "train: the dataset must have a known, finite number of "
                "batches, or give steps_per_epoch.")
        return train.repeat(epochs), steps, validation, sample
    if not isinstance(train, data_lib.Split):
        raise FineTuneError(
            "train must be a renorm_convert.data.Split or a tf.data.Dataset; "
            f"got {type(train).__name__}.")
    shape = data_lib.model_image_shape(model)
    outputs = int(model.outputs[0].shape[-1])
    classes = train.num_classes if head is None else int(head)
    if not len(train.y_train):
        raise FineTuneError("the training data is empty.")
    top = int(max(train.y_train.max(),
                  train.y_val.max() if len(train.y_val) else 0))
    if top >= outputs:
        raise FineTuneError(
            f"labels go up to {top}"
            f" but the model has {outputs} outputs; pass head={classes} to "
            "replace the classification head.")
    passes = epochs
    if steps_per_epoch is not None:
        data_lib.check_batching(train, batch_size, non_iid_classes)
        per_pass = len(train.y_train) // batch_size
        passes = -(-epochs * steps_per_epoch // per_pass)
    train_ds, steps = data_lib.training_dataset(
        train, shape, batch_size, epochs=passes, seed=seed,
        non_iid_classes=non_iid_classes, scaling=scaling)
    if steps_per_epoch is not None:
        steps = steps_per_epoch
    val = validation if validation is not None else train
    val_ds = val if isinstance(val, tf.data.Dataset) else (
        data_lib.evaluation_dataset(val, shape, scaling=scaling)
        if len(val.y_val) else None)
    sample = next(iter(train_ds))
    return train_ds, steps, val_ds, sample


def recalibrate(model, data, *, batches=None, batch_size=32,
                scaling="unit"):
    """A copy of `model` whose normalization statistics are the exact
    averages of the batch moments over `data` ("precise BN"), computed with
    the model's final weights, instead of the exponential averages that lag
    behind a short fine-tune.

    Every normalization layer (at any depth) is measured in the same
    forward passes: each records the mean and variance of its input batch
    and normalizes it with them (its own training-mode forward; batch
    renorm held at r = 1, d = 0, i.e. batch norm), so each layer's
    statistics are the population moments of its input when every layer
    before it normalizes with population moments too, which is what
    inference then does. Statistics are held still meanwhile, no weight is
    updated, dropout is off.

    Batch renorm trains the following layers on inputs normalized by its
    moving averages; where those lag (momentum 0.99 on a short run), the
    network has adapted to them, and recalibration can cost accuracy
    (benchmarks/recalibrate.py measures it). It serves batch-norm-trained
    models and runs whose weights moved after the statistics settled. Afterwards `moving_mean` is the mean
    of the batch means and `moving_variance` the mean of the batch
    variances; a BatchRenormalization layer gets `renorm_mean =
    moving_mean` and `moving_stddev = renorm_stddev = sqrt(moving_variance
    + epsilon)`, so all its statistics agree.

    Args:
        model: A Keras model with BatchNormalization / BatchRenormalization
            layers. It is not modified.
        data: Input batches: an array (or list of arrays) of model inputs,
            a `data.Split` (its training images, adapted to the model as
            `fine_tune` adapts them), or a `tf.data.Dataset` of inputs or
            (inputs, labels).
        batches: Use this many batches (default: all).
        batch_size: Batch size for arrays and Splits.
        scaling: Pixel scaling for a Split ("unit", "symmetric", "raw").

    Returns:
        The recalibrated copy.
    """
    copy = copy_model(model)
    norms = [layer for layer in internals.flatten_layers(copy)
             if is_normalization(layer)]
    if not norms:
        raise FineTuneError(f"model '{model.name}' has no normalization "
                            "layer to recalibrate.")
    sums = {id(layer): [0.0, 0.0] for layer in norms}
    seen = 0

    def measuring(layer):
        original = layer.call

        def call(inputs, training=None, **kwargs):
            x = tf.cast(inputs, tf.float32)
            axis = layer.axis if layer.axis >= 0 else len(x.shape) + layer.axis
            mean, variance = tf.nn.moments(
                x, [i for i in range(len(x.shape)) if i != axis])
            total = sums[id(layer)]
            total[0] = total[0] + mean.numpy().astype(np.float64)
            total[1] = total[1] + variance.numpy().astype(np.float64)
            # The layer's own training-mode forward, held at batch norm
            # (renorm bounds 1 / 0: r = 1, d = 0) and with its statistics
            # held still (momentum 1); they are replaced at the end.
            return original(inputs, training=True, **kwargs)
        return call

    momenta, bounds, trainable = {}, {}, {}
    for layer in norms:
        momenta[id(layer)] = (layer.momentum,
                              getattr(layer, "renorm_momentum", None))
        layer.momentum = 1.0
        if momenta[id(layer)][1] is not None:
            layer.renorm_momentum = 1.0
        if hasattr(layer, "set_clipping"):
            bounds[id(layer)] = (layer.r_max, layer.d_max,
                                 layer.microbatch_size)
            layer.set_clipping(r_max=1.0, d_max=0.0)
            layer.microbatch_size = None  # whole batches: population moments
        trainable[id(layer)] = layer.trainable
        layer.trainable = True  # a frozen one would normalize as in inference
        layer.call = measuring(layer)
    try:
        for x in _input_batches(copy, data, batch_size, scaling):
            if batches is not None and seen >= batches:
                break
            copy(x, training=False)
            seen += 1
    finally:
        for layer in norms:
            del layer.call  # the class's own again
            layer.momentum, renorm_momentum = momenta[id(layer)]
            if renorm_momentum is not None:
                layer.renorm_momentum = renorm_momentum
            layer.trainable = trainable[id(layer)]
            if id(layer) in bounds:
                r_max, d_max, layer.microbatch_size = bounds[id(layer)]
                layer.set_clipping(r_max=r_max, d_max=d_max)
    if not seen:
        raise FineTuneError("recalibrate: the data holds no batch.")
    for layer in norms:
        mean, variance = (t / seen for t in sums[id(layer)])
        values = {"moving_mean": mean, "moving_variance": variance}
        if hasattr(layer, "renorm_mean"):
            std = np.sqrt(variance + layer.epsilon)
            values.update(renorm_mean=mean, renorm_stddev=std,
                          moving_stddev=std)
        for name, value in values.items():
            variable = getattr(layer, name)
            variable.assign(value.astype(variable.dtype))
    copy.recalibrated_batches = seen
    return copy


def _input_batches(model, data, batch_size, scaling):
    """Model-input batches from an array, list of arrays, Split or
    tf.data.Dataset."""
    if isinstance(data, tf.data.Dataset):
        for item in data:
            yield item[0] if isinstance(item, tuple) else item
        return
    if isinstance(data, data_lib.Split):
        shape = data_lib.model_image_shape(model)
        ds, _ = data_lib.training_dataset(data, shape, batch_size, epochs=1,
                                          scaling=scaling)
        for x, _ in ds:
            yield x
        return
    arrays = data if isinstance(data, (list, tuple)) else [data]
    arrays = [np.asarray(a) for a in arrays]
    for start in range(0, len(arrays[0]), batch_size):
        part = [a[start:start + batch_size] for a in arrays]
        yield part[0] if len(part) == 1 else part


def top1(model, batches, training=False):
    """Top-1 accuracy of `model` over (images, labels) batches; `training`
    as in a Keras call."""
    correct = total = 0
    for x, y in batches:
        pred = np.asarray(model(x, training=training))
        correct += int((pred.argmax(-1) == np.asarray(y).reshape(-1)).sum())
        total += len(pred)
    return correct / max(total, 1)


def accuracy(model, split, scaling="unit", batch_size=256):
    """Top-1 accuracy of `model` on the validation part of `split`."""
    shape = data_lib.model_image_shape(model)
    return top1(model, data_lib.evaluation_dataset(split, shape, batch_size,
                                                   scaling))


__all__ = ["fine_tune", "recalibrate", "FineTuneError", "NonFiniteLoss",
           "gradient_report", "accuracy", "top1"]
