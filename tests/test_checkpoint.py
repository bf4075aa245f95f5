"""Checkpoints of fine_tune on every backend: a directory is ours or
refused, the previous checkpoint is kept until the next is whole, damaged
ones are skipped, and a resumed run ends where an uninterrupted one does,
bit for bit. (Kills from outside, and the lock across processes:
tests/test_reliability.py.)"""

import logging
import os

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (Record, assert_same_weights, digits_cnn, numpy,
                     optimizer_step, tiny_model, tiny_split, weights)
from renorm_convert.errors import RenormConvertError


def test_fine_tune_never_takes_a_directory_it_did_not_make(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    model = tiny_model()
    split = tiny_split(np.random.default_rng(0))
    record = Record()
    with pytest.raises(RenormConvertError, match="not renorm-convert checkpoints"):
        rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=1,
                     checkpoint_dir=folder, callbacks=[record], verbose=0)
    assert not record.began
    assert os.listdir(folder) == ["mine.txt"]
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(RenormConvertError, match="is a file"):
        rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=1,
                     checkpoint_dir=file, callbacks=[record], verbose=0)
    assert not record.began and file.read_text() == "x"


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """A run stopped after epoch 1 and run again on its checkpoint
    directory ends exactly where one run straight through ends: weights,
    optimizer state, the per-epoch and per-step history."""
    keras.utils.set_random_seed(0)
    model = tiny_model()
    initial = [numpy(v) for v in model.weights]
    split = tiny_split(np.random.default_rng(0))

    def run(directory, *callbacks):
        return rc.fine_tune(model, rc.data.training_batches(split, model, 16),
                            epochs=3, checkpoint_dir=directory,
                            callbacks=list(callbacks), verbose=0)

    straight = run(tmp_path / "straight")
    assert straight.resumed_from is None and optimizer_step(straight.model) == 12
    stopped = run(tmp_path / "ckpt", Record(stop_after=1))
    assert optimizer_step(stopped.model) == 4
    assert sorted(n for n in os.listdir(tmp_path / "ckpt")
                  if n.startswith("epoch-")) == ["epoch-0001.json",
                                                 "epoch-0001.weights.h5"]
    resumed = run(tmp_path / "ckpt")
    assert resumed.resumed_from == (1, 4)
    assert_same_weights(resumed.model, straight.model)
    for x, y in zip(resumed.model.optimizer.variables,
                    straight.model.optimizer.variables):
        np.testing.assert_array_equal(numpy(x), numpy(y), err_msg=x.path)
    assert resumed.history == straight.history
    assert len(resumed.history["loss"]) == 3
    assert resumed.steps == straight.steps and len(resumed.steps) == 12
    assert resumed.final_bounds == straight.final_bounds
    # The input model was not touched by any of the runs.
    for v, value in zip(model.weights, initial):
        np.testing.assert_array_equal(numpy(v), value, err_msg=v.path)
    # A run of the same directory with other settings is refused.
    with pytest.raises(rc.RenormConvertError, match="does not fit this run"):
        rc.fine_tune(model, rc.data.training_batches(split, model, 32), epochs=3,
                     checkpoint_dir=tmp_path / "ckpt", verbose=0)


def test_checkpoints_keep_the_previous_and_skip_damaged_ones(tmp_path):
    from renorm_convert.train import checkpoint

    model = tiny_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    folder = checkpoint.claim(tmp_path / "ckpt")
    for epoch in (1, 2, 3):
        checkpoint.write(folder, model, epoch=epoch, step=4 * epoch,
                         history={"loss": [1.0] * epoch}, steps=[])
    names = sorted(n for n in os.listdir(folder) if n.startswith("epoch-"))
    assert names == ["epoch-0002.json", "epoch-0002.weights.h5",
                     "epoch-0003.json", "epoch-0003.weights.h5"]
    (tmp_path / "ckpt" / "epoch-0003.weights.h5").write_bytes(b"\0" * 96)
    (tmp_path / "ckpt" / "epoch-0002.json").write_text('{"epoch": 2')
    state, notes = checkpoint.latest(folder)
    assert state is None and len(notes) == 2
    assert "epoch 3" in notes[0] and "damaged" in notes[0]
    # Starting over, the damaged later ones go once a new one is written.
    checkpoint.write(folder, model, epoch=1, step=4, history={}, steps=[])
    state, notes = checkpoint.latest(folder)
    assert (state.epoch, state.step, notes) == (1, 4, [])
    assert sorted(n for n in os.listdir(folder) if n.startswith("epoch-")) == [
        "epoch-0001.json", "epoch-0001.weights.h5"]
    (tmp_path / "ckpt" / "theirs.txt").write_text("x")
    checkpoint.remove(folder)
    assert os.listdir(folder) == ["theirs.txt"]


def test_resume_after_interruption_ends_at_the_same_step(digits, tmp_path,
                                                         caplog):
    model = rc.convert(digits_cnn())
    part = digits.subset(train=320, val=0)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise KeyboardInterrupt("killed after one epoch")

    def run(**kwargs):
        return rc.fine_tune(model, rc.data.training_batches(part, model, 32, seed=4),
                            epochs=2, verbose=0, **kwargs)

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_dir=ckpt, callbacks=[Interrupt()])
    assert os.path.exists(os.path.join(ckpt, "epoch-0001.json"))
    with caplog.at_level(logging.INFO, logger="renorm_convert"):
        resumed = run(checkpoint_dir=ckpt)
    straight = run()
    assert (f"resuming from epoch 1, step 10 (checkpoint in {ckpt})"
            in caplog.messages)
    assert resumed.resumed_from == (1, 10) and straight.resumed_from is None
    assert resumed.checkpoint_dir == ckpt
    # The history covers the whole run, epoch 1 from the checkpoint.
    assert len(resumed.history["loss"]) == 2
    assert [s["step"] for s in resumed.steps] == list(range(1, 21))
    np.testing.assert_allclose(resumed.history["loss"],
                               straight.history["loss"], rtol=1e-5)
    iterations = [int(numpy(r.model.optimizer.iterations))
                  for r in (resumed, straight)]
    assert iterations == [20, 20]
    # Same data in the same order and the same optimizer state: the same
    # weights, to float round-off.
    for a, b in zip(weights(resumed.model), weights(straight.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    rc.checkpoint.remove(ckpt)
    assert not os.path.exists(ckpt)
