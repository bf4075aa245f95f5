"""Resumable training state on disk that never touches anything else.

A checkpoint directory is ours only when we created it, or when it holds
nothing but files of ours; a marker file says so. We write and delete only
our own names in it (never `rmtree`), each checkpoint through a temporary
file and a rename, and keep the previous one until the new one is complete.
Every checkpoint's metadata records the size and sha256 of its weights, so a
damaged one is found and the one before it used instead.

Layout:
    DIR/.renorm-convert-checkpoint      the marker
    DIR/epoch-0003.weights.h5           model and optimizer variables
    DIR/epoch-0003.json                 epoch, step, sha256, size, history
    DIR/worker-N/                       a non-chief worker's own checkpoints
"""

import hashlib
import json
import os
import re

import keras

from renorm_convert.io import UsageError, kill_point, write_atomically
from renorm_convert import io as _io

MARKER = ".renorm-convert-checkpoint"
KEEP = 2
_OURS = re.compile(r"^(epoch-\d+\.(weights\.h5|json)|worker-\d+|"
                   + re.escape(MARKER) + r"|" + _io.TEMP_PATTERN + r")$")
_META = re.compile(r"^epoch-(\d+)\.json$")


class CheckpointError(UsageError):
    """A checkpoint directory that is not ours, or not usable."""


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(directory):
    """Refuses, without writing anything, a `directory` that is a file or
    holds anything we did not write."""
    directory = str(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(
            f"checkpoint_dir={directory}: is a file; give a directory (a new "
            "or empty one) for checkpoints.")
    if not os.path.isdir(directory) or is_ours(directory):
        return
    foreign = sorted(n for n in os.listdir(directory) if not _OURS.match(n))
    if foreign:
        raise CheckpointError(
            f"checkpoint_dir={directory}: holds files that are not "
            f"renorm-convert checkpoints ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give a new or empty "
            "directory (nothing in it was changed).")


def claim(directory):
    """Makes `directory` ours (creating it if needed); refuses a file, or a
    directory holding anything we did not write."""
    directory = str(directory)
    check(directory)
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, MARKER)
    if not os.path.exists(marker):
        write_atomically(marker, json.dumps(
            {"written_by": "renorm-convert", "format": 1}).encode())
    return directory


def is_ours(directory):
    return os.path.isfile(os.path.join(str(directory), MARKER))


class State:
    """A checkpoint found on disk: `epoch` and `step` done, the weights'
    path, and the history of the epochs before it."""

    def __init__(self, directory, meta):
        self.directory = directory
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        self.weights = os.path.join(directory, meta["weights"])
        self.history = meta.get("history", {})
        self.steps = meta.get("steps", [])
        self.extra = meta.get("extra", {})


def _entries(directory):
    found = []
    for name in os.listdir(directory):
        match = _META.match(name)
        if match:
            found.append((int(match.group(1)), name))
    return sorted(found, reverse=True)


def latest(directory):
    """The newest complete, undamaged checkpoint in `directory` (or None),
    and a list of notes on the damaged ones skipped."""
    notes = []
    if not directory or not os.path.isdir(directory):
        return None, notes
    for epoch, name in _entries(directory):
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                meta = json.load(f)
            weights = os.path.join(directory, meta["weights"])
            size = os.path.getsize(weights)
            if size != meta["size"] or _sha256(weights) != meta["sha256"]:
                raise ValueError("its weights file does not match its "
                                 "recorded size and sha256")
            return State(directory, meta), notes
        except (OSError, ValueError, KeyError, TypeError) as e:
            notes.append(f"the checkpoint of epoch {epoch} in {directory} is "
                         f"damaged ({type(e).__name__}: {e}); skipped")
    return None, notes


def write(directory, model, *, epoch, step, history, steps, extra=None):
    """Writes the checkpoint of `epoch` atomically, then removes the ones
    older than the previous (and any of later epochs)."""
    base = f"epoch-{epoch:04d}"
    weights = os.path.join(directory, base + ".weights.h5")
    record = {}

    def save(tmp):
        model.save_weights(tmp)
        kill_point("checkpoint-write")
        record["size"] = os.path.getsize(tmp)
        record["sha256"] = _sha256(tmp)

    # Keras insists on the .weights.h5 suffix for the temporary file too.
    _io.replace_atomically(weights, save, suffix=".weights.h5")
    meta = {"epoch": int(epoch), "step": int(step),
            "weights": os.path.basename(weights), **record,
            "history": history, "steps": steps, "extra": extra or {}}
    write_atomically(os.path.join(directory, base + ".json"),
                     json.dumps(meta).encode())
    # Later epochs than this one are left from a run that went past here
    # and whose checkpoints were found damaged: stale now.
    entries = _entries(directory)
    for old_epoch, _ in entries:
        if old_epoch > epoch:
            _remove_checkpoint(directory, old_epoch)
    for old_epoch, _ in [e for e in entries if e[0] <= epoch][KEEP:]:
        _remove_checkpoint(directory, old_epoch)


def _remove_checkpoint(directory, epoch):
    base = os.path.join(directory, f"epoch-{epoch:04d}")
    # Metadata first: a weights file without it is never used.
    for path in (base + ".json", base + ".weights.h5"):
        if os.path.exists(path):
            os.unlink(path)


def remove(directory):
    """Deletes our checkpoints, the marker and our temporary files (of
    workers too), then the directory if that leaves it empty. Anything
    else in it stays."""
    directory = str(directory)
    if not is_ours(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("worker-") and os.path.isdir(path):
            remove(path)
    for epoch, _ in _entries(directory):
        _remove_checkpoint(directory, epoch)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _OURS.match(name) and name != MARKER and os.path.isfile(path) and (
                name.endswith((".json", ".weights.h5")) or
                re.match(_io.TEMP_PATTERN, name)):
            os.unlink(path)
    os.unlink(os.path.join(directory, MARKER))
    try:
        os.rmdir(directory)
    except OSError:
        pass  # something of someone else's is in it: leave it


class Checkpoint(keras.callbacks.Callback):
    """Writes a checkpoint at the end of every epoch (model and optimizer
    variables, the history so far, and `extra()`'s dict)."""

    def __init__(self, directory, *, history_so_far, steps_log,
                 extra=lambda: {}, skip=lambda: False):
        super().__init__()
        self._skip = skip
        self.directory = directory
        self._history = {k: list(v) for k, v in history_so_far.items()}
        self._steps_log = steps_log
        self._extra = extra

    def on_epoch_end(self, epoch, logs=None):
        if self._skip():
            return  # e.g. the epoch ended early on a NaN loss
        for key, value in (logs or {}).items():
            self._history.setdefault(key, []).append(float(value))
        write(self.directory, self.model, epoch=epoch + 1,
              step=int(self.model.optimizer.iterations.numpy()),
              history=self._history, steps=self._steps_log.steps,
              extra=self._extra())
