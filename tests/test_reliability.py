"""Nothing lost, on every backend: bad input refused up front without a
trace on disk; runs killed (SIGKILL) at chosen moments finish, when rerun,
as if never interrupted; a NaN loss keeps the last good state; a checkpoint
directory is held by one run at a time. The kills strike at chosen calls
into Keras, onnxruntime and the OS (tests/faults.py wraps them from the
outside), not at random times. Only the ONNX export parts need
TensorFlow."""

import hashlib
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (Record, assert_same_weights, numpy, subprocess_env,
                     tiny_model, tiny_split)
from renorm_convert.train.checkpoint import RenormConvertError
from renorm_convert.cli import main


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder as a user has it: a converted model, its data and a file of
    their own."""
    root = tmp_path_factory.mktemp("work")
    keras.utils.set_random_seed(0)
    tiny_model().save(root / "model.keras")
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


def _error_lines(err):
    return [line for line in err.splitlines()
            if not line.startswith("[renorm")]


def _refused(capsys, root, argv, match):
    before = _snapshot(root)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = _error_lines(err)
    assert code == 2, (argv, out, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    assert match in lines[0], (argv, lines[0])
    assert _snapshot(root) == before, argv  # nothing written, inputs intact
    return lines[0], err


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
            ("--non-iid", "5", "--non-iid 5: the batch size 16 must be a "
                               "multiple of it"),
            ("--microbatch", "17", "--microbatch 17: must be between 1 and "
                                   "the batch size 16"),
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


def _png(array):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_finetune_refuses_bad_data(work, capsys, tmp_path):
    m = work / "model.keras"
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 8, 8), np.uint8)
    nan_x = x.astype("float32")
    nan_x[3, 2, 1] = np.nan
    cases = [
        (_npz(tmp_path, "strings.npz", x=x, y=np.array(["cat"] * 40)),
         "`y` must hold class labels (0, 1, ...) or one-hot rows"),
        (_npz(tmp_path, "fractions.npz", x=x, y=np.full(40, 0.5)),
         "`y` must hold integer class labels"),
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
        (images / label / "ok.png").write_bytes(
            _png(np.zeros((8, 8), np.uint8)))
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

FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "faults.py")


def _cli(*argv, kill_at=None, kill_signal="SIGKILL", cwd=None):
    """The command line in a new process; `kill_at` names the moment
    (tests/faults.py) at which it is sent `kill_signal`."""
    command = [sys.executable, "-m", "renorm_convert.cli"]
    if kill_at:
        command = [sys.executable, FAULTS, kill_at, kill_signal, "--"]
    return subprocess.run(
        command + [str(a) for a in argv], capture_output=True, text=True,
        env=subprocess_env(), timeout=300, cwd=cwd)


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
    assert_same_weights(first, second)
    assert int(numpy(first.optimizer.iterations)) == int(
        numpy(second.optimizer.iterations)) == 3 * 4
    for x, y in zip(first.optimizer.variables, second.optimizer.variables):
        np.testing.assert_array_equal(numpy(x), numpy(y), err_msg=x.path)


def _temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]


@pytest.mark.slow
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
    # The killed run's lock was left behind, its process gone: taken over.
    assert "left by process " in again.stderr, again.stderr
    _assert_same_model(out, uninterrupted)
    assert not ckpt.exists()  # ours, emptied, removed after -o was written
    epochs = (tmp_path / "tuned.history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in epochs[1:]] == ["1", "2", "3"]
    straight = (uninterrupted.parent / "tuned.history.csv").read_text()
    assert (tmp_path / "tuned.history.csv").read_text() == straight
    assert _snapshot(work) == inputs


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.tensorflow
def test_killed_during_export_verification_leaves_nothing(work, tmp_path):
    from onnx_helpers import run_onnx

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
                               numpy(model(x, training=False)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_during_the_final_save_of_convert(tmp_path):
    keras.utils.set_random_seed(0)
    plain = tmp_path / "plain.keras"
    rc.revert(tiny_model()).save(plain)
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
    assert rc.renorm_layers(converted)[0].r_max == 2.0
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(numpy(converted(x)), numpy(original(x)))


@pytest.mark.slow
def test_sigterm_during_the_final_save_cleans_up(tmp_path):
    keras.utils.set_random_seed(0)
    plain = tmp_path / "plain.keras"
    rc.revert(tiny_model()).save(plain)
    out = tmp_path / "c.keras"
    result = _cli("convert", plain, "-o", out, kill_at="before-rename",
                  kill_signal="SIGTERM")
    assert result.returncode == 143, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "terminated" in lines[0], result.stderr
    assert os.listdir(tmp_path) == ["plain.keras"]


@pytest.mark.tensorflow
def test_export_check_failing_leaves_nothing(work, tmp_path, monkeypatch):
    from renorm_convert.onnx import export

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


# --- the library: checkpoints, resume and the NaN guard ----------------------------


# --- one run at a time: the lock, across processes ---------------------------------

HOLD = """
import sys
from renorm_convert.train import checkpoint
directory = checkpoint.claim(sys.argv[1])
with checkpoint.hold(directory):
    print("held", flush=True)
    if sys.argv[2] == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: no release
    sys.stdin.read()  # until the test closes our stdin
"""


def _holder(directory, how="wait"):
    """A process holding `directory` (until its stdin closes), or, with
    how="die", one that took it and was killed holding it."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=subprocess_env())
    assert child.stdout.readline().strip() == "held"
    if how == "die":
        assert child.wait(timeout=60) == -signal.SIGKILL
    return child


def _release(child):
    child.stdin.close()
    assert child.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_held_checkpoint_directory_is_refused_before_training(
        work, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    child = _holder(ckpt)
    try:
        holder = rc.checkpoint.live_holder(ckpt)
        assert holder["pid"] == child.pid
        assert holder["host"] == socket.gethostname()
        out = tmp_path / "tuned.keras"
        line, err = _refused(capsys, tmp_path, _finetune_args(
            work, out, "--checkpoint-dir", ckpt), f"process {child.pid} on")
        assert "--checkpoint-dir" in line and "is in use by another run" in \
            line
        assert err.strip() == line  # refused before loading anything
        assert not out.exists()
        # The library refuses too, before training, whether it gets there
        # through the checks or straight to taking the lock.
        model = tiny_model()
        split = tiny_split(np.random.default_rng(0))
        record = Record()
        with pytest.raises(RenormConvertError, match=f"process {child.pid} "):
            rc.fine_tune(model, rc.data.training_batches(split, model, 16), epochs=1,
                         checkpoint_dir=ckpt, callbacks=[record], verbose=0)
        assert not record.began
        with pytest.raises(RenormConvertError, match=f"process {child.pid} "):
            with rc.checkpoint.hold(str(ckpt)):
                pass
        with pytest.raises(RenormConvertError, match=f"process {child.pid} "):
            rc.checkpoint.remove(ckpt)
        assert child.poll() is None
    finally:
        _release(child)
    # Released: the directory is free, and a run takes it.
    assert rc.checkpoint.live_holder(ckpt) is None
    rc.checkpoint.check(ckpt)
    code = main([str(a) for a in _finetune_args(
        work, out, "--epochs", "1", "--checkpoint-dir", ckpt)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "took over" not in err  # released properly, nothing to take over
    assert out.exists() and not ckpt.exists()


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_run_is_taken_over(work, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    dead = _holder(ckpt, how="die").pid
    lock = ckpt / rc.checkpoint.LOCK
    assert str(dead) in lock.read_text()  # left behind, naming the dead run
    assert rc.checkpoint.live_holder(ckpt) is None
    out = tmp_path / "tuned.keras"
    code = main([str(a) for a in _finetune_args(
        work, out, "--epochs", "1", "--checkpoint-dir", ckpt)])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if "took over" in line]
    assert notes == [f"[renorm-convert] took over the lock of {ckpt} left by "
                     f"process {dead} on {socket.gethostname()}, which no "
                     "longer runs"], err
    assert out.exists()
    assert not ckpt.exists()  # removed once -o was written, lock and all
