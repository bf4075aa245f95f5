"""Data parallelism under JAX (`keras.distribution`): over two devices of one
process and over two processes of one job, fine-tuning a converted model
ends where one device ends on the same global batches: under JAX the batch
moments of BatchRenormalization are those of the global batch, not of each
device's part. JAX only; the runs are in distribute_run.py, each
distributed one a distribute_worker.py process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import subprocess_env

pytestmark = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "jax",
    reason="keras.distribution runs on the JAX backend (KERAS_BACKEND=jax)")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distribute_worker.py")
# Closeness of two runs of the same arithmetic in another order (sums over
# the batch split across devices) after 4 steps of Adam.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The model file every run starts from, and two runs of it here on one
    device: as it is (the reference), and with each half of every batch
    normalized with its own moments (what per-device moments would give)."""
    import keras

    import distribute_run

    root = tmp_path_factory.mktemp("distribute")
    keras.utils.set_random_seed(0)
    path = root / "model.keras"
    distribute_run.model().save(path)
    model = keras.models.load_model(path)
    reference = distribute_run.train(model)
    halves = distribute_run.train(model, microbatch=distribute_run.BATCH // 2)
    variables = list(reference.model.weights) + list(
        reference.model.optimizer.variables)
    return {"root": root, "model": path,
            "names": [v.path for v in variables],
            "reference": distribute_run.state(reference.model),
            "losses": [s["loss"] for s in reference.steps],
            "halves": distribute_run.state(halves.model)}


def _env(**extra):
    return subprocess_env(drop=("KERAS_DISTRIBUTION_", "XLA_FLAGS"),
                          KERAS_BACKEND="jax", **extra)


def _assert_matches_reference(runs, got):
    names, reference = runs["names"], runs["reference"]
    assert sorted(reference, key=int) == sorted(
        (k for k in got.files if k.isdigit()), key=int)
    for key, want in reference.items():
        np.testing.assert_allclose(got[key], want, rtol=RTOL, atol=ATOL,
                                   err_msg=names[int(key)])
    np.testing.assert_allclose(got["losses"], runs["losses"], rtol=RTOL)


def _assert_moments_matter(runs):
    """Per-device moments would have ended far from the reference: the
    comparison above can tell the two apart."""
    names, reference, halves = runs["names"], runs["reference"], runs[
        "halves"]
    for key, want in reference.items():
        if names[int(key)].endswith(("moving_variance", "renorm_stddev")):
            assert np.abs(halves[key] - want).max() > 100 * ATOL, names[
                int(key)]


def _run_worker(*args, env):
    child = subprocess.run([sys.executable, WORKER, *map(str, args)],
                           capture_output=True, text=True, env=env,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return child


@pytest.mark.slow
def test_data_parallel_over_two_devices_equals_one_device(runs):
    out = runs["root"] / "two_devices.npz"
    _run_worker(runs["model"], out, env=_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    got = np.load(out)
    assert int(got["devices"]) == 2 and int(got["processes"]) == 1
    # Every weight and optimizer variable is on both devices, and every
    # batch was split between them: 16 training, 32 validation examples.
    assert got["placed"].tolist() == [2]
    assert {tuple(b) for b in got["batches"].tolist()} == {(16, 16, 2),
                                                           (32, 32, 2)}
    _assert_matches_reference(runs, got)
    _assert_moments_matter(runs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_one_job_agree_with_one_process(runs):
    """Two processes on 127.0.0.1 joined through KERAS_DISTRIBUTION_*
    (`keras.distribution.initialize`), one CPU device each: each feeds its
    half of every batch, both end with the same state, and that is the
    state of one process training on the whole batches."""
    import keras

    import distribute_run
    from renorm_convert import data
    from renorm_convert.train import checkpoint

    root = runs["root"]
    outs = [root / f"process{i}.npz" for i in range(2)]
    ckpt = root / "ckpt"
    port = _free_port()
    children = [subprocess.Popen(
        [sys.executable, WORKER, str(runs["model"]), str(outs[i]), str(ckpt)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                 KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                 KERAS_DISTRIBUTION_PROCESS_ID=str(i))) for i in range(2)]
    logs = []
    try:
        for child in children:
            logs.append(child.communicate(timeout=300)[0])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    detail = "\n".join(log[-2000:] for log in logs)
    assert [c.returncode for c in children] == [0, 0], detail
    first, second = (np.load(o) for o in outs)
    for got, index in ((first, 0), (second, 1)):
        assert int(got["processes"]) == 2 and int(got["process"]) == index
        assert int(got["devices"]) == 2  # the job's, one in each process
        assert bool(got["chief"]) == (index == 0)
        assert got["placed"].tolist() == [2]
        # Each process fed 8 of the 16 examples of every training batch
        # (and the whole validation set: 2 x 32).
        assert {tuple(b) for b in got["batches"].tolist()} == {(16, 8, 2),
                                                               (64, 32, 2)}
    # Their halves are those of the batches one process trains on.
    split = data.load_digits().subset(train=256, val=32, seed=0)
    whole = data.training_batches(
        split, keras.models.load_model(runs["model"]), distribute_run.BATCH,
        non_iid_classes=2, seed=0, steps_per_epoch=distribute_run.STEPS)
    steps = distribute_run.EPOCHS * distribute_run.STEPS
    assert first["read_steps"].tolist() == second["read_steps"].tolist() == \
        list(range(steps))
    for step in range(steps):
        np.testing.assert_array_equal(
            np.concatenate([first["read"][step], second["read"][step]]),
            whole.indices(step), err_msg=f"step {step}")
    for key in runs["reference"]:
        np.testing.assert_array_equal(first[key], second[key],
                                      err_msg=runs["names"][int(key)])
    _assert_matches_reference(runs, first)
    _assert_moments_matter(runs)
    # The chief checkpoints into the directory, the other process into its
    # own sub-directory.
    for folder in (ckpt, ckpt / "worker-1"):
        names = set(os.listdir(folder))
        assert {checkpoint.MARKER, "epoch-0002.json",
                "epoch-0002.weights.h5"} <= names, names
        assert checkpoint.live_holder(folder) is None
    checkpoint.remove(ckpt)
    assert not ckpt.exists()


def test_data_parallel_strategy_and_a_job_joined_too_late(monkeypatch):
    import jax
    import keras

    from renorm_convert.train import distribute

    # In this process: one device, no job.
    strategy = distribute.make_strategy("data-parallel")
    assert isinstance(strategy, keras.distribution.DataParallel)
    assert distribute.is_keras_distribution(strategy)
    assert distribute.make_strategy(strategy) is strategy
    assert strategy.device_mesh.devices.size == len(jax.devices())
    assert distribute.is_chief() and distribute.process_count() == 1
    # The backend has started here (jax.devices() above): joining a job
    # now cannot work, and the error says what to do instead.
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "127.0.0.1:9")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    with pytest.raises(distribute.RenormConvertError,
                       match="cannot join the JAX job now .*at the start of "
                             "the program"):
        distribute.data_parallel()
