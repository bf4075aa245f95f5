"""The Keras callbacks `fine_tune` composes, each usable in a plain
`model.fit` on every backend:

* `StepLog`: loss, metrics and the clipping bounds at every step;
* `ValidationCurve`: accuracy on a fixed validation subset from step 0 (the
  model as given) and a few times an epoch;
* `NanGuard`: stops at the first non-finite loss and puts back the last good
  weights and optimizer state;
* `Checkpoint`: a resumable checkpoint at the end of every epoch
  (`renorm_convert.train.checkpoint` says what is on disk);
* `GradientReport`: mean |gradient| of normalization parameters against the
  other weights, on one batch, before training;
* `RunRecords`: the run's history (CSV per epoch and per step, JSON) and
  its plot, written when training ends.

Example:
>>> model.fit(batches, epochs=3, callbacks=[
...     rc.RenormSchedule.for_run(3 * len(batches)),
...     rc.callbacks.NanGuard(), rc.callbacks.RunRecords("runs/h")])
"""

import json
import math

import keras
import numpy as np

from renorm_convert._internal import backend as _backend
from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.backend import optimizer_step
from renorm_convert.evaluation import accuracy
from renorm_convert.io import write_atomically
from renorm_convert.layers import is_normalization
from renorm_convert.train import checkpoint as checkpoint_lib
from renorm_convert.train import distribute


class StepLog(keras.callbacks.Callback):
    """Records loss, metrics and the clipping bounds at every step, in
    `steps` ([{"step", "epoch", "loss", ...}]); the step is the optimizer's
    count after the batch. `resumed(history, steps)` continues a log."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.epoch = 0
        self._epoch_start = 0

    def resumed(self, history, steps):
        self.steps = list(steps)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        # Read here, where every backend's state is attached to the model.
        self._epoch_start = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        row = {"step": self._epoch_start + batch + 1, "epoch": self.epoch}
        row.update({k: float(v) for k, v in (logs or {}).items()
                    if np.ndim(v) == 0})
        self.steps.append(row)


class ValidationCurve(keras.callbacks.Callback):
    """Accuracy in inference mode on a fixed validation subset (its first
    `size` examples) at step 0, the model as given, and at `per_epoch`
    evenly spaced steps of every epoch, in `points` ([{"step",
    "val_accuracy"}]): a short run's curve then shows where it started and
    how it moved, which per-epoch values cannot.

    Args:
        batches: (inputs, labels) batches, e.g. `split.evaluation_batches
            (model)`.
        steps_per_epoch: Training steps in an epoch.
        per_epoch: Evaluations per epoch.
        size: Examples of `batches` to use (the first ones).
    """

    def __init__(self, batches, steps_per_epoch, per_epoch=4, size=512):
        super().__init__()
        self.points = []
        self._batches = []
        count = 0
        for x, y in batches:
            self._batches.append((x, y))
            count += int(np.shape(y)[0])
            if count >= size:
                break
        self.size = count
        self._marks = {max(1, round(k * steps_per_epoch / per_epoch))
                       for k in range(1, per_epoch + 1)}
        self._steps_per_epoch = steps_per_epoch
        self._epoch_start = 0

    def resumed(self, history, steps):
        pass  # the curve covers the steps this process ran

    def _record(self, step):
        self.points.append({"step": step,
                            "val_accuracy": accuracy(self.model,
                                                     self._batches)})

    def on_train_begin(self, logs=None):
        self._record(optimizer_step(self.model))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch_start + batch + 1
        if (step - 1) % self._steps_per_epoch + 1 in self._marks:
            self._record(step)


class NanGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss and puts back the weights and the
    optimizer state (Adam's moments, the step count) of the last epoch that
    ended well, or of the start: saving NaN moments would make the next
    step of whoever loads the model NaN everywhere. `tripped_at` is the step
    of the bad loss (None while all is well), `good_epoch` the epoch whose
    state was kept (None: the start)."""

    def __init__(self):
        super().__init__()
        self.tripped_at = None
        self._good = None
        self.good_epoch = None
        self._epoch_start = 0

    def _variables(self):
        model = self.model
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        return list(model.variables) + list(optimizer.variables)

    def _snapshot(self):
        return [keras.ops.convert_to_numpy(v) for v in self._variables()]

    def on_train_begin(self, logs=None):
        self._good = self._snapshot()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = optimizer_step(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if self.tripped_at is None:
            snapshot = self._snapshot()
            if not all(np.isfinite(value).all() for value in snapshot):
                # A compiled step can report a finite loss from NaN weights
                # (XLA's CPU min / max, as in the loss's clipping, drop NaN
                # under JAX): the weights are checked too, once an epoch.
                self.tripped_at = optimizer_step(self.model)
                self.model.stop_training = True
                for v, value in zip(self._variables(), self._good):
                    v.assign(value)
                return
            self._good = snapshot
            self.good_epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.tripped_at = self._epoch_start + batch + 1
            model = self.model
            model.stop_training = True
            for v, value in zip(self._variables(), self._good):
                v.assign(value)


class Checkpoint(keras.callbacks.Callback):
    """Writes a checkpoint (model and optimizer variables, the history so
    far) at the end of every epoch into `directory`, which must be new,
    empty or one of ours, and which this run holds (a second run is
    refused). `Checkpoint.restore(model, directory)` resumes.

    Args:
        directory: The checkpoint directory.
        steps_log: A `StepLog` whose steps go into each checkpoint.
        history_so_far: The history of the epochs before a resumed run.
        skip: Called at each epoch's end; True writes nothing (e.g. the
            epoch ended early on a NaN loss).
    """

    def __init__(self, directory, *, steps_log=None, history_so_far=None,
                 skip=lambda: False):
        super().__init__()
        self.directory = checkpoint_lib.claim(directory)
        self._skip = skip
        self._history = {k: list(v) for k, v in (history_so_far or {}).items()}
        self._steps_log = steps_log

    def on_epoch_end(self, epoch, logs=None):
        if self._skip():
            return
        for key, value in (logs or {}).items():
            self._history.setdefault(key, []).append(float(value))
        model = self.model
        checkpoint_lib.write(self.directory, model, epoch=epoch + 1,
                             step=optimizer_step(model), history=self._history,
                             steps=self._steps_log.steps if self._steps_log
                             else [])

    @staticmethod
    def restore(model, directory, notes=None):
        """Loads the newest undamaged checkpoint in `directory` into the
        compiled `model` (weights and optimizer state); returns its
        `checkpoint.State` (`epoch`, `step`, `history`, `steps`), or None
        when there is none. Damaged ones skipped are described in
        `notes`."""
        state, found = checkpoint_lib.latest(str(directory))
        if notes is not None:
            notes.extend(found)
        if state is None:
            return None
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(state.weights)
        return state


class GradientReport(keras.callbacks.Callback):
    """Mean absolute gradient of normalization parameters and of the other
    weights, per layer type, on one batch `(x, y)` before training (as in
    the "Yet Another Batch Norm Analysis" report), in `report` ({"rows":
    [...], "summary": {"normalization": ..., "other": ...}}) and, when
    `path` is given, a JSON file."""

    def __init__(self, batch, path=None):
        super().__init__()
        self._batch = batch
        self.path = path
        self.report = None

    def on_train_begin(self, logs=None):
        model = self.model
        x, y = self._batch
        loss = model.loss if callable(model.loss) else keras.losses.get(
            model.loss)
        owner = {}
        for layer in internals.flatten_layers(model):
            for v in layer.trainable_variables:
                owner.setdefault(id(v), layer)
        sums = {}
        for v, g in _backend.gradients(model, x, y, loss):
            if g is None:
                continue
            layer = owner.get(id(v))
            kind = type(layer).__name__ if layer is not None else "?"
            group = "normalization" if is_normalization(layer) else "other"
            key = (group, kind, v.path.split("/")[-1])
            s = sums.setdefault(key, [0.0, 0])
            s[0] += float(np.abs(g.astype(np.float64)).sum())
            s[1] += int(g.size)
        rows = [{"group": k[0], "layer_type": k[1], "weight": k[2],
                 "mean_abs_grad": total / max(n, 1), "count": n}
                for k, (total, n) in sorted(sums.items())]
        by_group = {}
        for r in rows:
            t = by_group.setdefault(r["group"], [0.0, 0])
            t[0] += r["mean_abs_grad"] * r["count"]
            t[1] += r["count"]
        self.report = {"rows": rows, "summary": {
            g: t[0] / max(t[1], 1) for g, t in by_group.items()}}
        if self.path and distribute.is_chief():
            write_atomically(self.path,
                             json.dumps(self.report, indent=2).encode())


class RunRecords(keras.callbacks.Callback):
    """Writes the run's history when training ends: PATH.csv (per epoch),
    PATH.steps.csv (per step) and PATH.json, and a PNG of the curves at
    `plot`; on the chief only. A file that cannot be written is noted in
    `errors` ({path: why}), not raised, so that the trained model is still
    saved by the caller.

    Args:
        path: The records' prefix (".csv" / ".json" are stripped).
        plot: Where to write the PNG, or None.
        curve: A `ValidationCurve` of the same run, for the plot and JSON.
        title: The plot's title.
    """

    def __init__(self, path=None, plot=None, curve=None, title=None):
        super().__init__()
        self.path = path
        self.plot = plot
        self.curve = curve
        self.title = title
        self.errors = {}
        self._log = StepLog()
        self._prior = ({}, [])

    def resumed(self, history, steps):
        self._prior = (history, steps)
        self._log.resumed(history, steps)

    def set_model(self, model):
        super().set_model(model)
        self._log.set_model(model)

    def on_epoch_begin(self, epoch, logs=None):
        self._log.on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._log.on_train_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        history = getattr(self.model, "history", None)
        epochs = {k: list(v) for k, v in self._prior[0].items()}
        if history is not None:
            for key, values in history.history.items():
                epochs.setdefault(key, []).extend(values)
        self.write(epochs, self._log.steps)

    def write(self, epochs, steps):
        """Writes the records of a run whose per-epoch history is `epochs`
        ({metric: [per epoch]}) and per-step log `steps`."""
        from renorm_convert.train.reporting import plot_history, write_history

        if not distribute.is_chief():
            return
        curve = self.curve.points if self.curve is not None else []
        size = self.curve.size if self.curve is not None else 0
        if self.path:
            self._write(str(self.path), write_history, epochs, steps, curve,
                        self.path)
        if self.plot:
            self._write(str(self.plot), plot_history, epochs, steps, curve,
                        size, self.plot, self.title)

    def _write(self, name, write, *args):
        try:
            write(*args)
        except (OSError, ValueError, RuntimeError) as e:
            self.errors[name] = " ".join(str(e).split())
