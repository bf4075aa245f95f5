"""Channels-first models on CPUs where TensorFlow cannot run them."""

import os
import subprocess
import sys

import keras
import pytest

from conftest import CHANNELS_FIRST_RUNS
from renorm_convert import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn,
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(CHANNELS_FIRST_RUNS, reason="the channels-first tests "
                    "ran in this process")
def test_channels_first_with_onednn():
    """Where oneDNN is off by default, the channels-first cases still run,
    with oneDNN turned on as the user message advises."""
    # Only the modules that have channels-first cases: another module's
    # collection error is that module's failure, not this one's.
    tests = os.path.join(ROOT, "tests")
    modules = sorted(
        os.path.join("tests", name) for name in os.listdir(tests)
        if name.startswith("test_") and name.endswith(".py")
        and "mark.channels_first" in open(os.path.join(tests, name)).read())
    assert modules, "no module marks a test channels_first"
    result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-m", "channels_first", *modules], onednn="1")
    if "skipped" in result.stdout and " passed" not in result.stdout:
        pytest.skip("channels-first Conv2D cannot run on this CPU even with "
                    "oneDNN on")
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
def test_channels_first_refusal_is_one_clear_line(tmp_path):
    """With oneDNN off no channels-first Conv2D runs on a CPU: the CLI says
    so and how to fix it, instead of TensorFlow's UnimplementedError."""
    inputs = keras.Input((3, 8, 8))
    x = keras.layers.Conv2D(4, 3, data_format="channels_first")(inputs)
    x = keras.layers.BatchNormalization(axis=1)(x)
    path = tmp_path / "cf.keras"
    keras.Model(inputs, x).save(path)
    out = tmp_path / "out.keras"
    result = _run(["-m", "renorm_convert.cli", "convert", str(path), "-o",
                   str(out)], onednn="0")
    if result.returncode == 0:
        pytest.skip("this machine runs channels-first Conv2D without oneDNN "
                    "(a GPU, or a TensorFlow build that can)")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == cli.EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert "channels_first" in lines[-1]
    assert "TF_ENABLE_ONEDNN_OPTS=1" in lines[-1]
    assert not out.exists()
