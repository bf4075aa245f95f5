"""Nothing lost: bad input refused up front without a trace on disk, and
runs killed (SIGKILL) at chosen moments finish, when rerun, as if never
interrupted. The kills come from RENORM_CONVERT_TEST_KILL_AT, a hook at
fixed points of the code, not from timing."""

import hashlib
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import renorm_convert as rc
from renorm_convert.cli import main
from renorm_convert.export import run_onnx


def _tiny_model():
    return rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax")], name="tiny"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder as a user has it: a converted model, its data and a file of
    their own."""
    root = tmp_path_factory.mktemp("work")
    keras.utils.set_random_seed(0)
    _tiny_model().save(root / "model.keras")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (96, 8, 8), np.uint8),
             y=rng.integers(0, 3, 96))
    (root / "notes.txt").write_text("mine")
    return root


def _snapshot(root):
    """Every file under `root` (hidden ones too) with its sha256."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "link"
                continue
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(
                    f.read()).hexdigest()
    return found


def _refused(capsys, root, argv, match):
    before = _snapshot(root)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if not l.startswith("[renorm")]
    assert code == 2, (argv, out, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    assert match in lines[0], (argv, lines[0])
    assert _snapshot(root) == before, argv  # nothing written, inputs intact


def _npz(root, name, **arrays):
    path = root / name
    np.savez(path, **arrays)
    return path


def test_finetune_refuses_bad_input_up_front(work, capsys, tmp_path):
    m, d = work / "model.keras", work / "data.npz"
    out = tmp_path / "out.keras"
    base = ["finetune", m, "-o", out, "--data", f"npz:{d}", "--epochs", "1",
            "--batch-size", "16"]
    for flag, value, match in [
            ("--non-iid", "-2", "--non-iid: expected an integer >= 1"),
            ("--head", "0", "--head: expected an integer >= 1"),
            ("--head", "-1", "--head: expected an integer >= 1"),
            ("--seed", "-1", "--seed: expected an integer >= 0"),
            ("--lr", "-1", "--lr: expected a number > 0.0"),
            ("--lr", "nan", "--lr: expected a finite number"),
            ("--lr", "inf", "--lr: expected a finite number"),
            ("--train-size", "-5", "--train-size: expected an integer >= 1"),
            ("--epochs", "0", "--epochs: expected an integer >= 1"),
            ("--momentum", "1", "--momentum: expected a number < 1.0"),
            ("--tensorboard", work / "notes.txt", "is a file, not a directory"),
            ("--plot", m, "is the input file"),
            ("--plot", d, "is the input file"),
            ("--grad-report", m, "is the input file"),
            ("--plot", work / "sub" / ".." / "model.keras", "is the input file"),
            ("--plot", tmp_path / "missing" / "p.png", "does not exist"),
            ("--plot", out, "would write the same place"),
            ("--checkpoint-dir", work, "holds the input"),
            ("--checkpoint-dir", m, "is a file, not a directory"),
            ("--tensorboard", tmp_path / "tb", None)]:
        if match is None:  # a checkpoint directory holding the TensorBoard one
            argv = base + [flag, value, "--checkpoint-dir", tmp_path]
            match = "would write the same place"
        else:
            argv = base + [flag, value]
        _refused(capsys, work, argv, match)
    assert not out.exists()
    assert not (tmp_path / "tb").exists()


def test_finetune_refuses_bad_outputs_and_links(work, capsys, tmp_path):
    m, d = work / "model.keras", work / "data.npz"
    data = ["--data", f"npz:{d}", "--batch-size", "16"]
    (tmp_path / "adir.keras").mkdir()
    symlink = tmp_path / "sym.keras"
    symlink.symlink_to(m)
    hard = tmp_path / "hard.keras"
    os.link(m, hard)
    others = tmp_path / "others"
    others.mkdir()
    (others / "theirs.txt").write_text("not ours")
    for argv, match in [
            (["finetune", m, "-o", tmp_path / "adir.keras"] + data,
             "is a directory"),
            (["finetune", m, "-o", symlink] + data, "is the input file"),
            (["finetune", hard, "-o", m] + data, "is the input file"),
            (["finetune", m, "-o", tmp_path / "o.keras", "--checkpoint-dir",
              others] + data, "not renorm-convert checkpoints")]:
        _refused(capsys, work, argv, match)
        _refused(capsys, tmp_path, argv, match)


def test_finetune_refuses_bad_data(work, capsys, tmp_path):
    m = work / "model.keras"
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 8, 8), np.uint8)
    nan_x = x.astype("float32")
    nan_x[3, 2, 1] = np.nan
    cases = [
        (_npz(tmp_path, "strings.npz", x=x, y=np.array(["cat"] * 40)),
         "integer class labels"),
        (_npz(tmp_path, "empty.npz", x=x[:0], y=np.zeros(0, "int64")),
         "holds no examples"),
        (_npz(tmp_path, "nan.npz", x=nan_x, y=rng.integers(0, 3, 40)),
         "NaN or infinite pixel values (the first at index (3, 2, 1))"),
    ]
    zero = tmp_path / "zero.npz"
    zero.write_bytes(b"")
    cases.append((zero, "not a readable .npz file"))
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        png = tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()
        (images / label / "ok.png").write_bytes(png)
    bad = images / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    cases.append((images, f"{bad}: not a readable image"))
    for source, match in cases:
        _refused(capsys, tmp_path, ["finetune", m, "-o", tmp_path / "o.keras",
                                    "--data", str(source), "--batch-size",
                                    "8"], match)


def test_convert_revert_export_demo_refuse_bad_input(work, capsys, tmp_path):
    m = work / "model.keras"
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "dir.keras").mkdir()
    # demo writes converted.keras (and more) into --out.
    (tmp_path / "converted.keras").write_bytes(m.read_bytes())
    for argv, match in [
            (["convert", m, "-o", tmp_path / "c.keras", "--r-max", "inf"],
             "--r-max: expected a finite number"),
            (["convert", m, "-o", tmp_path / "c.keras", "--microbatch", "0"],
             "--microbatch: expected an integer >= 1"),
            (["convert", m, "-o", tmp_path / "dir.keras"], "is a directory"),
            (["revert", m, "-o", work / "x" / ".." / "model.keras"],
             "is the input file"),
            (["export", m, "-o", tmp_path / "m.onnx", "--opset", "0"],
             "expected an integer >= 9"),
            (["export", m, "-o", tmp_path / "m.onnx", "--opset", "3"],
             "expected an integer >= 9"),
            (["export", m, "-o", tmp_path / "m.onnx", "--opset", "99"],
             "expected an opset from 9 to 18"),
            (["export", m, "-o", tmp_path / "dir.onnx"], "is a directory"),
            (["demo", "--model", tmp_path / "converted.keras", "--out",
              tmp_path], "is the input file"),
            (["demo", "--out", m], "is a file, not a directory"),
            (["demo", "--lr", "0"], "--lr: expected a number > 0.0")]:
        _refused(capsys, work, argv, match)
        _refused(capsys, tmp_path, argv, match)


# --- kills ------------------------------------------------------------------------

def _cli(*argv, kill_at=None, kill_signal="SIGKILL", cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RENORM_CONVERT_TEST_KILL_AT", None)
    if kill_at:
        env["RENORM_CONVERT_TEST_KILL_AT"] = kill_at
        env["RENORM_CONVERT_TEST_KILL_SIGNAL"] = kill_signal
    return subprocess.run(
        [sys.executable, "-m", "renorm_convert.cli"] + [str(a) for a in argv],
        capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def _finetune_args(work, out, *extra):
    return ["finetune", work / "model.keras", "-o", out, "--data",
            f"npz:{work / 'data.npz'}", "--epochs", "3", "--batch-size", "16",
            "--quiet-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "tuned.keras"
    result = _cli(*_finetune_args(work, out))
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_model(a, b):
    first, second = keras.models.load_model(a), keras.models.load_model(b)
    assert len(first.weights) == len(second.weights)
    for x, y in zip(first.weights, second.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)
    assert int(first.optimizer.iterations.numpy()) == int(
        second.optimizer.iterations.numpy())


def _temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]


def test_killed_while_writing_a_checkpoint_resumes(work, uninterrupted,
                                                   tmp_path):
    inputs = _snapshot(work)
    out, ckpt = tmp_path / "tuned.keras", tmp_path / "ckpt"
    argv = _finetune_args(work, out, "--checkpoint-dir", ckpt)
    killed = _cli(*argv, kill_at="checkpoint-write:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    assert _temporaries(ckpt)  # the half-written checkpoint of epoch 2
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("epoch-")) == [
        "epoch-0001.json", "epoch-0001.weights.h5"]
    again = _cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "resuming from epoch 1, step 4" in again.stderr
    _assert_same_model(out, uninterrupted)
    assert not ckpt.exists()  # ours, emptied, removed after -o was written
    epochs = (tmp_path / "tuned.history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in epochs[1:]] == ["1", "2", "3"]
    straight = (uninterrupted.parent / "tuned.history.csv").read_text()
    assert (tmp_path / "tuned.history.csv").read_text() == straight
    assert _snapshot(work) == inputs


def test_killed_after_training_resumes_past_a_damaged_checkpoint(
        work, uninterrupted, tmp_path):
    out, ckpt = tmp_path / "tuned.keras", tmp_path / "ckpt"
    argv = _finetune_args(work, out, "--checkpoint-dir", ckpt)
    killed = _cli(*argv, kill_at="after-training")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    # The checkpoint outlives training until -o is written; damage the
    # newest: the rerun must notice and use the one before.
    newest = ckpt / "epoch-0003.weights.h5"
    newest.write_bytes(newest.read_bytes()[:96])
    (ckpt / "theirs.txt").write_text("put here later by someone else")
    again = _cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "checkpoint of epoch 3" in again.stderr and "damaged" in again.stderr
    assert "resuming from epoch 2, step 8" in again.stderr
    _assert_same_model(out, uninterrupted)
    # Only our files were deleted.
    assert os.listdir(ckpt) == ["theirs.txt"]


def test_killed_during_export_verification_leaves_nothing(work, tmp_path):
    out = tmp_path / "m.onnx"
    killed = _cli("export", work / "model.keras", "-o", out,
                  kill_at="export-verify")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    assert len(_temporaries(tmp_path)) == 1  # unverified, never renamed
    again = _cli("export", work / "model.keras", "-o", out)
    assert again.returncode == 0, again.stderr
    assert _temporaries(tmp_path) == []  # the stale one is gone too
    model = keras.models.load_model(work / "model.keras")
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(run_onnx(str(out), [x])[0],
                               np.asarray(model(x, training=False)),
                               rtol=1e-5, atol=1e-6)


def test_killed_during_the_final_save_of_convert(tmp_path):
    keras.utils.set_random_seed(0)
    plain = tmp_path / "plain.keras"
    rc.revert(_tiny_model()).save(plain)
    out = tmp_path / "c.keras"
    (tmp_path / "theirs.txt").write_text("someone else's")
    killed = _cli("convert", plain, "-o", out, "--r-max", "2",
                  kill_at="before-rename")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and len(_temporaries(tmp_path)) == 1
    # A rerun removes the temporary file of ours and nothing else.
    assert main(["convert", str(plain), "-o", str(out), "--r-max", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["c.keras", "plain.keras",
                                            "theirs.txt"]
    original = keras.models.load_model(plain)
    converted = keras.models.load_model(out)
    assert rc.schedule.renorm_layers(converted)[0].r_max == 2.0
    x = np.ones((2, 8, 8, 1), "float32")
    np.testing.assert_array_equal(converted(x), original(x))


def test_sigterm_during_the_final_save_cleans_up(tmp_path):
    keras.utils.set_random_seed(0)
    plain = tmp_path / "plain.keras"
    rc.revert(_tiny_model()).save(plain)
    out = tmp_path / "c.keras"
    result = _cli("convert", plain, "-o", out, kill_at="before-rename",
                  kill_signal="SIGTERM")
    assert result.returncode == 143, result.stderr
    lines = [l for l in result.stderr.splitlines()
             if not l.startswith("[renorm")]
    assert len(lines) == 1 and "terminated" in lines[0], result.stderr
    assert os.listdir(tmp_path) == ["plain.keras"]


def test_export_check_failing_leaves_nothing(work, tmp_path, monkeypatch):
    from renorm_convert import export

    def broken(path, inputs, optimize=True):
        raise RuntimeError(f"cannot load {path}")

    monkeypatch.setattr(export, "run_onnx", broken)
    out = tmp_path / "m.onnx"
    model = keras.models.load_model(work / "model.keras")
    with pytest.raises(rc.ExportError, match="nothing was written") as info:
        rc.export_onnx(model, out)
    assert str(out) in str(info.value) and ".tmp-" not in str(info.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    for opset in (0, 3, 99, True):
        with pytest.raises(rc.ExportError, match="from 9 to 18"):
            rc.export_onnx(model, out, opset=opset)
    assert os.listdir(tmp_path) == []


def _tiny_split(rng):
    return rc.data.Split(rng.integers(0, 256, (64, 8, 8, 1), np.uint8),
                         rng.integers(0, 3, 64),
                         rng.integers(0, 256, (16, 8, 8, 1), np.uint8),
                         rng.integers(0, 3, 16), 3, "tiny")


def test_fine_tune_never_takes_a_directory_it_did_not_make(tmp_path):
    from renorm_convert.checkpoint import CheckpointError

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    split = _tiny_split(np.random.default_rng(0))
    with pytest.raises(CheckpointError, match="not renorm-convert checkpoints"):
        rc.fine_tune(_tiny_model(), split, epochs=1, batch_size=16,
                     checkpoint_dir=folder, verbose=0)
    assert os.listdir(folder) == ["mine.txt"]


def test_a_record_that_cannot_be_written_does_not_cost_the_model(tmp_path):
    split = _tiny_split(np.random.default_rng(0))
    plot = tmp_path / "gone" / "curves.png"
    history = rc.fine_tune(_tiny_model(), split, epochs=1, batch_size=16,
                           plot=plot, history_path=tmp_path / "h",
                           verbose=0)
    assert list(history.artifact_errors) == [str(plot)]
    assert str(plot) in history.artifact_errors[str(plot)]
    assert ".tmp-" not in history.artifact_errors[str(plot)]
    assert (tmp_path / "h.csv").exists()
    assert int(history.trained_model.optimizer.iterations.numpy()) == 4


def test_nan_loss_with_adam_saves_no_nan_optimizer_state(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    rng = np.random.default_rng(0)
    split = _tiny_split(rng)
    with pytest.raises(rc.NonFiniteLoss, match="optimizer state") as info:
        rc.fine_tune(model, split, epochs=2, batch_size=16, optimizer="adam",
                     learning_rate=1e30, verbose=0)
    kept = info.value.model
    for v in list(kept.weights) + list(kept.optimizer.variables):
        assert np.isfinite(v.numpy()).all(), v.path
    path = tmp_path / "kept.keras"
    kept.save(path)
    again = keras.models.load_model(path)
    again.optimizer.learning_rate.assign(1e-3)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    again.train_on_batch(x, rng.integers(0, 3, 16))
    assert all(np.isfinite(v.numpy()).all() for v in again.weights)


def test_checkpoints_keep_the_previous_and_skip_damaged_ones(tmp_path):
    from renorm_convert import checkpoint

    model = _tiny_model()
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
