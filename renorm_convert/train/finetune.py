"""fine_tune: train a (converted) model with the renorm schedule, on any
Keras backend, resumably.

It is a short recipe in Keras's own shape: the caller chains the model
surgery (`replace_head`, `freeze_all_but_normalization`, `configure`,
`recast`) and brings the data (`Split.training_batches`, arrays, a
`PyDataset` or `tf.data`); `compile` gets the optimizer, the loss that fits
the labels and `jit_compile`; `fit` gets the data, the epochs and the
callbacks: the schedule (`RenormSchedule`), the per-step log, the NaN guard
and checkpoints (`renorm_convert.train.callbacks`), and the caller's own.
"""

import contextlib
import dataclasses
import logging
import math
import os
import warnings

import keras
import numpy as np

from renorm_convert._internal import backend as _backend
from renorm_convert.data import Split, is_dense
from renorm_convert.data.batches import (ArrayBatches, TrainingBatches,
                                         evaluation_batches, training_batches)
from renorm_convert.errors import (NonFiniteLoss, RenormConvertError,
                                   check_integer)
from renorm_convert.evaluation import check_labels_fit, outputs_probabilities
from renorm_convert.layers import renorm_layers
from renorm_convert.train import checkpoint as checkpoint_lib
from renorm_convert.train import distribute
from renorm_convert.train.callbacks import Checkpoint, NanGuard, StepLog
from renorm_convert.train.schedule import RenormSchedule
from renorm_convert.transform.conversion import copy_model
from renorm_convert.transform.surgery import strided_pointwise_subsampled

_log = logging.getLogger("renorm_convert")






@dataclasses.dataclass
class FineTuneResult:
    """What `fine_tune` returns.

    Attributes:
        model: The model trained (a copy of the input unless `inplace=True`).
        history: {metric: [one value per epoch]} over the whole run (a
            resumed run includes the epochs before the checkpoint).
        steps: [{"step", "epoch", "loss", ..., "r_max", "d_max"}], one per
            training step of the whole run.
        steps_per_epoch: Training steps in an epoch.
        resumed_from: (epoch, step) of the checkpoint the run resumed
            from, or None.
        checkpoint_dir: Where its checkpoints are (kept: remove them with
            `renorm_convert.train.checkpoint.remove` once the model is saved).
    """

    model: object
    history: dict
    steps: list
    steps_per_epoch: int
    resumed_from: tuple = None
    checkpoint_dir: str = None

    @property
    def final_bounds(self):
        """(r_max, d_max) at the last step, or None without renorm."""
        if not self.steps or "r_max" not in self.steps[-1]:
            return None
        return self.steps[-1]["r_max"], self.steps[-1]["d_max"]


def _optimizer(name, learning_rate):
    if isinstance(name, keras.optimizers.Optimizer):
        return name
    if isinstance(learning_rate,
                  keras.optimizers.schedules.LearningRateSchedule):
        pass
    elif (isinstance(learning_rate, bool) or not isinstance(
            learning_rate, (int, float, np.floating, np.integer))
          or not math.isfinite(learning_rate) or learning_rate <= 0):
        raise RenormConvertError(
            "{arg}: expected a positive number or a "
            "keras.optimizers.schedules.LearningRateSchedule.",
            "learning_rate", learning_rate)
    try:
        optimizer = keras.optimizers.get(name)
    except ValueError:
        raise RenormConvertError(
            "{arg}: use a Keras optimizer name such as rmsprop (the "
            "paper's), adam, sgd or adamw.", "optimizer", name) from None
    config = optimizer.get_config()
    config["learning_rate"] = learning_rate
    return type(optimizer)(**{k: v for k, v in config.items()
                              if k != "name"})


def _training_data(model, train, steps_per_epoch):
    """(batches, steps per epoch, labels are one-hot / soft rows)."""
    if isinstance(train, Split):
        if not len(train.y_train):
            raise RenormConvertError("the training data is empty.")
        check_labels_fit(model, train)
        train = training_batches(train, model, steps_per_epoch=steps_per_epoch)
    if isinstance(train, TrainingBatches):
        check_labels_fit(model, train.split)
        if steps_per_epoch is not None and \
                steps_per_epoch != train.steps_per_epoch:
            train = TrainingBatches(
                train.split, train.shape, train.batch_size,
                non_iid_classes=train.non_iid_classes, seed=train.seed,
                steps_per_epoch=steps_per_epoch)
        return train, train.steps_per_epoch, is_dense(train.split.y_train)
    if isinstance(train, tuple) and len(train) == 2 and not hasattr(
            train, "element_spec"):
        train = ArrayBatches(*train)
    if isinstance(train, keras.utils.PyDataset):
        steps = train.num_batches
        if steps is None and steps_per_epoch is None:
            raise RenormConvertError(
                "train: the PyDataset is endless; give steps_per_epoch.")
        first = train[0]
        return (train, steps_per_epoch or steps,
                np.ndim(first[1]) == 2 and np.shape(first[1])[1] > 1)
    if hasattr(train, "element_spec"):  # a tf.data.Dataset
        spec = train.element_spec
        labels = spec[1] if isinstance(spec, tuple) else None
        dense = labels is not None and len(labels.shape) == 2 and (
            labels.shape[1] or 0) > 1
        if steps_per_epoch is not None:
            return train.repeat(), steps_per_epoch, dense
        steps = int(train.cardinality().numpy())
        if steps < 1:
            raise RenormConvertError(
                "train: the dataset must have a known, finite number of "
                "batches, or give steps_per_epoch.")
        return train, steps, dense
    raise RenormConvertError(
        "train must be a renorm_convert.data.Split, batches of it "
        "(training_batches(split, model)), an (x, y) pair of arrays, a "
        f"keras.utils.PyDataset or a tf.data.Dataset; got "
        f"{type(train).__name__}.")


def _validation_data(model, train, validation):
    if validation is None:
        split = train if isinstance(train, Split) else getattr(
            train, "split", None)
        if isinstance(split, Split) and len(split.y_val):
            return evaluation_batches(split, model)
        return None
    if isinstance(validation, Split):
        return evaluation_batches(validation, model) if len(
            validation.y_val) else None
    return validation


def _loss(model, dense):
    from_logits = not outputs_probabilities(model)
    if dense:
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def fine_tune(model, train, *, validation=None, epochs=1,
              steps_per_epoch=None, optimizer="adam", learning_rate=1e-3,
              schedule="auto", callbacks=(), checkpoint_dir=None,
              jit_compile="auto", strategy=None, inplace=False, copy=None,
              verbose="auto"):
    """Fine-tunes a (converted) model; returns a `FineTuneResult`.

    Args:
        model: A Keras model, usually from `convert` (then `configure`,
            `replace_head`, `recast` as the run needs). It is not modified
            unless `inplace=True`.
        train: A `data.Split` (batches of 32 of its training part; its
            validation part validates), `training_batches(split, model,
            batch_size, non_iid_classes=, seed=)`, an (x, y) pair of arrays
            as the model takes them, a `keras.utils.PyDataset` or a
            `tf.data.Dataset` of (inputs, labels) batches. Labels are class
            ids, or one-hot / soft rows (the loss follows).
        validation: Batches (or a Split) to validate on after each epoch;
            None: the Split's own validation part, if any.
        epochs: Epochs to train (a resumed run trains the rest).
        steps_per_epoch: Epochs of this many steps instead of one pass over
            the data each; our batches then run on across epochs.
        optimizer, learning_rate: A Keras optimizer name (e.g. "rmsprop", as
            in the paper, or "adam") and its learning rate: a number or a
            `keras.optimizers.schedules.LearningRateSchedule`; or an
            optimizer instance.
        schedule: "auto" (`RenormSchedule.for_run` over this run's steps), a
            `RenormSchedule`, or None (keep the layers' r_max / d_max).
        callbacks: More Keras callbacks, e.g. `callbacks.ValidationCurve`,
            `callbacks.RunRecords`, `callbacks.GradientReport`, TensorBoard.
        checkpoint_dir: Write a checkpoint (weights, optimizer state, the
            history so far) here at the end of every epoch, and resume from
            the newest undamaged one. The directory must be new, empty or
            one of ours, and not held by another run; only our own files in
            it are ever written or deleted. It is kept after training:
            `renorm_convert.train.checkpoint.remove(checkpoint_dir)` once the
            trained model is saved.
        jit_compile: As in `compile`: "auto" (Keras's choice for the
            backend and device: eager on PyTorch, where torch.compile
            made a CPU training step 1.3-1.4x slower), True or False.
        strategy: None, a name from `distribute.STRATEGIES` ("mirrored",
            "multi-worker" on TensorFlow, "data-parallel" on JAX), a
            `tf.distribute.Strategy` or a `keras.distribution.Distribution`.
        inplace: True trains `model` itself, for callers that own it (no
            copy of the weights is made unless a strategy needs one), as
            every transform's `inplace` does.
        copy: Deprecated: `copy=False` is `inplace=True`.
        verbose: As in `fit`.

    Returns:
        A `FineTuneResult`.

    Raises:
        NonFiniteLoss: the loss became NaN / inf; the exception holds the
            model with the last good weights and optimizer state.
    """
    epochs = check_integer(epochs, "epochs")
    steps_per_epoch = check_integer(steps_per_epoch, "steps_per_epoch",
                                    none="for whole passes")
    if schedule not in ("auto", None) and not isinstance(schedule,
                                                         RenormSchedule):
        raise RenormConvertError("{arg}: expected 'auto', None or a "
                                 "RenormSchedule.", "schedule", schedule)
    if copy is not None:
        warnings.warn("fine_tune(copy=...) is deprecated: use inplace=",
                      DeprecationWarning, stacklevel=2)
        inplace = not copy
    distribute.use_gpu_memory_growth()
    strategy = distribute.make_strategy(strategy)
    with distribute.scope(strategy):
        if not inplace or strategy is not None:
            # Under a strategy the variables must be created in its scope.
            model = copy_model(model)
        train_data, steps, dense = _training_data(model, train,
                                                  steps_per_epoch)
        model.compile(optimizer=_optimizer(optimizer, learning_rate),
                      loss=_loss(model, dense), metrics=["accuracy"],
                      jit_compile=jit_compile)
    run = _Run(model=model, train=train_data,
               validation=_validation_data(model, train, validation),
               steps=steps, epochs=epochs, schedule=schedule,
               callbacks=list(callbacks), strategy=strategy, verbose=verbose)
    if checkpoint_dir is None:
        return _fit(run)
    run.multi_worker = distribute.is_multi_worker(strategy)
    if not distribute.is_chief():
        # Workers must not write over the chief's checkpoints.
        checkpoint_dir = os.path.join(
            checkpoint_dir, f"worker-{distribute.worker_index()}")
    run.directory = checkpoint_lib.claim(checkpoint_dir)
    notes = []
    with checkpoint_lib.hold(run.directory, notes):
        for note in notes:
            _log.info(note)
        return _fit(run)


@dataclasses.dataclass
class _Run:
    """One fine-tuning run as `fine_tune` resolved it: the compiled model,
    the batches `fit` reads (`train`, `validation`), `steps` per epoch, the
    schedule and callbacks, and where its checkpoints go."""

    model: object
    train: object
    validation: object
    steps: int
    epochs: int
    schedule: object
    callbacks: list
    strategy: object
    verbose: object
    directory: str = None
    multi_worker: bool = False


def _fit(run):
    resume = _resume(run)
    done = resume.epoch if resume is not None else 0
    _position_data(run, done)
    every, step_log, guard = _callbacks(run, resume, done)
    history = _train(run, every, done)
    merged = {k: list(v) for k, v in (resume.history if resume else
                                      {}).items()}
    for key, values in history.items():
        merged.setdefault(key, []).extend(values)
    result = FineTuneResult(
        model=run.model, history=merged, steps=step_log.steps,
        steps_per_epoch=run.steps,
        resumed_from=(resume.epoch, resume.step) if resume else None,
        checkpoint_dir=run.directory)
    if guard.tripped_at is not None:
        kept = (f"the weights and optimizer state after epoch "
                f"{guard.good_epoch}" if guard.good_epoch else
                "the weights and optimizer state the run started with")
        raise NonFiniteLoss(
            f"the loss became NaN or infinite at step {guard.tripped_at}; "
            f"training stopped and the model keeps {kept}. Lower the learning "
            "rate, or lengthen the schedule's warm-up.", run.model, result)
    return result


def _resume(run):
    """The checkpoint the run resumes from (loaded into the model), or
    None; refuses one that does not fit the run."""
    if run.directory is None:
        return None
    notes = []
    with distribute.scope(run.strategy):
        resume = Checkpoint.restore(run.model, run.directory, notes)
    for note in notes:
        _log.info(note)
    if resume is None:
        return None
    if resume.epoch > run.epochs or resume.step != resume.epoch * run.steps:
        raise RenormConvertError(
            f"holds a checkpoint of epoch {resume.epoch} (step "
            f"{resume.step}) that does not fit this run ({run.epochs} "
            f"epochs of {run.steps} steps); use the same settings, or "
            "another directory.", "checkpoint_dir", run.directory,
            quote=False)
    _log.info(f"resuming from epoch {resume.epoch}, step {resume.step} "
              f"(checkpoint in {run.directory})")
    return resume


def _position_data(run, done):
    """Puts the run's batches where epoch `done` begins, in the form its
    strategy reads (a process's part of each batch, tf.data)."""
    data, strategy = run.train, run.strategy
    if isinstance(data, TrainingBatches) and \
            distribute.is_keras_distribution(strategy) and \
            distribute.process_count() > 1:
        # Keras makes each global batch of every process's own part.
        data = data.shard(distribute.process_index(),
                          distribute.process_count())
        strategy.auto_shard_dataset = False  # done: Keras would refuse it
    if isinstance(data, (TrainingBatches, ArrayBatches)):
        data.epoch = done
    elif done and hasattr(data, "skip"):
        data = data.skip(done * run.steps)
    if distribute.is_tf_strategy(strategy) and isinstance(data,
                                                          TrainingBatches):
        data = data.as_tf_dataset(run.epochs)
    run.train = data


def _callbacks(run, resume, done):
    """(every callback of the run in order, its StepLog, its NanGuard)."""
    schedule = run.schedule
    if schedule == "auto":
        schedule = RenormSchedule.for_run(max(run.steps * run.epochs, 1))
    step_log, guard = StepLog(), NanGuard()
    every = [step_log, guard]
    if schedule is not None and renorm_layers(run.model):
        every.insert(0, schedule)
    if isinstance(run.train, (TrainingBatches, ArrayBatches)):
        every.insert(0, _StartAt(run.train, done))
    if run.directory is not None:
        every.append(Checkpoint(run.directory, steps_log=step_log,
                                history_so_far=resume.history if resume
                                else {},
                                skip=lambda: guard.tripped_at is not None))
    every += run.callbacks
    if resume is not None:
        for callback in every:
            if hasattr(callback, "resumed"):
                callback.resumed(resume.history, resume.steps)
    return every, step_log, guard


def _train(run, every, done):
    """`fit` from epoch `done`; the history of the epochs it ran."""
    model, strategy = run.model, run.strategy
    if run.multi_worker:
        sample = next(iter(run.train))
        distribute.patch_for_multi_worker(model, strategy, sample)
    workaround = (strided_pointwise_subsampled(model)
                  if _backend.name() == "tensorflow" and not _backend.has_gpu()
                  else contextlib.nullcontext())
    # Keras's JAX trainer reads the distribution when fit runs: fit in its
    # scope, or the batches are not split across the devices.
    where = distribute.scope(strategy) if distribute.is_keras_distribution(
        strategy) else contextlib.nullcontext()
    if done >= run.epochs:  # every epoch was done before an interruption
        return {}
    whole = isinstance(run.train, keras.utils.PyDataset) and \
        run.train.num_batches == run.steps
    with workaround, where:
        return model.fit(run.train, validation_data=run.validation,
                         epochs=run.epochs, initial_epoch=done,
                         steps_per_epoch=None if whole else run.steps,
                         callbacks=every, verbose=run.verbose,
                         shuffle=False).history


class _StartAt(keras.callbacks.Callback):
    """Puts our batches at epoch `epoch` when training begins: `fit` ends
    an epoch of its data (`on_epoch_end`) once before the first, after
    reading batches to build the model, which would skip a pass."""

    def __init__(self, batches, epoch):
        super().__init__()
        self._batches = batches
        self._epoch = epoch

    def on_train_begin(self, logs=None):
        self._batches.epoch = self._epoch
