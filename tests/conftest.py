"""Deterministic, quiet test settings shared by every test module, on the
Keras backend KERAS_BACKEND selects.

Tests that need TensorFlow (export, tf.distribute, Keras 2 TF-op files,
tf_keras as a peer) are marked `tensorflow` and skipped on the other
backends; the modules that are TensorFlow-only throughout are not collected
there at all, so an import of TensorFlow anywhere else fails the run.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

def _default_backend():
    """KERAS_BACKEND, else TensorFlow, else the backend this venv has."""
    import importlib.util

    for name in ("tensorflow", "jax", "torch"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "tensorflow"


BACKEND = os.environ.setdefault("KERAS_BACKEND", _default_backend())

# Modules that are TensorFlow-only throughout: Keras 2 files with TF-op
# layers and tf2onnx's own patches (graph kinds), the oneDNN kernel
# workaround, the CPU-kind probes, the int8 study and the zoo's exports
# (kept on one backend for CI's time), the README's commands, tf.distribute
# workers. ONNX export itself is tested on every backend that exports
# (test_export.py).
TENSORFLOW_ONLY = ["test_graph_kinds.py",
                   "test_onednn.py", "test_platform.py", "test_quantize.py",
                   "test_readme.py", "test_zoo.py", "multiworker_worker.py"]
collect_ignore = [] if BACKEND == "tensorflow" else TENSORFLOW_ONLY

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPU devices, so tf.distribute.MirroredStrategy can be
    # tested on one CPU; this must happen before TensorFlow initializes its
    # devices.
    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass

import keras  # noqa: E402

from renorm_convert._internal import backend as _backend  # noqa: E402

# The package's own probe: a channels-first Conv2D tried once.
CHANNELS_FIRST_RUNS = _backend.channels_first_runs()


def pytest_collection_modifyitems(config, items):
    skip_cf = pytest.mark.skip(
        reason="TensorFlow cannot run channels-first Conv2D on this CPU "
               "(oneDNN is off); test_channels_first_with_onednn reruns this "
               "with TF_ENABLE_ONEDNN_OPTS=1")
    skip_tf = pytest.mark.skip(reason=f"needs TensorFlow; the backend is "
                                      f"{BACKEND}")
    for item in items:
        if item.get_closest_marker("channels_first") and not \
                CHANNELS_FIRST_RUNS:
            item.add_marker(skip_cf)
        if item.get_closest_marker("tensorflow") and BACKEND != "tensorflow":
            item.add_marker(skip_tf)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same seeds and a clean Keras session."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over two logical CPUs for the whole session: two
    strategies in one process reuse collective-op instance keys, and the
    second one's all-reduces then collide with the first's."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    assert len(devices) == 2, "two logical CPU devices are set up above"
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def fashion():
    from renorm_convert import data

    if not os.path.isdir(data.FASHION_MNIST_DIR) and not os.environ.get("CI"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed "
                    "(`sudo apt-get install dataset-fashion-mnist`)")
    return data.load_fashion_mnist()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits, as a Split (NumPy: shared freely)."""
    from renorm_convert import data

    return data.load_digits()
