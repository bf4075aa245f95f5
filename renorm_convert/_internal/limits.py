"""Bounds that the command line checks while it parses its arguments, before
TensorFlow loads: this module imports nothing heavy."""

from renorm_convert.errors import RenormConvertError

# tf2onnx 1.17 converts these opsets and onnxruntime runs what it writes;
# below 9, tf2onnx leaves variables as graph inputs (measured).
MIN_OPSET, MAX_OPSET = 9, 18

# `reproduce`'s network and run length per experiment when none is given.
# Figure 3 (non-iid): chosen by the rule stated in benchmarks/figure3.py
# before its study ran (the deepest network at the longest studied run
# length whose default run fits 15 minutes on 2 CPU cores); see README.
REPRODUCE_DEFAULTS = {
    "microbatch": {"model": "cnn", "steps": 1500},
    "non-iid": {"model": "cnn-deep", "steps": 3000},
}
# `reproduce`'s networks (arguments of reproduce.small_cnn), shallowest
# first: --model NAME.
REPRODUCE_MODELS = {
    # Three blocks of one convolution, no normalized head: the plain CNN.
    "cnn-plain": dict(blocks=3, convs_per_block=1, dense_head=False),
    # Two blocks of two convolutions and a batch-normalized dense head.
    "cnn": dict(blocks=2, convs_per_block=2, dense_head=True),
    "cnn-wide": dict(blocks=2, convs_per_block=2, dense_head=True, width=32),
    # Three blocks of two convolutions and a batch-normalized dense head.
    "cnn-deep": dict(blocks=3, convs_per_block=2, dense_head=True),
}


def configured_backend():
    """The backend set for Keras (KERAS_BACKEND, then keras.json under
    KERAS_HOME or ~/.keras), read as Keras reads it without importing it;
    None when nothing sets one."""
    import json
    import os

    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend") or None
    except (OSError, ValueError, AttributeError):
        return None


def keras_backend():
    """The backend Keras will load: the configured one, else TensorFlow
    (Keras's default)."""
    return configured_backend() or "tensorflow"


def choose_backend():
    """Where KERAS_BACKEND is not set and the backend keras.json names (or
    Keras's default, TensorFlow; Keras writes that file itself on its first
    import) is not installed, sets KERAS_BACKEND for this process to the one
    that is (TensorFlow, JAX, then PyTorch), as installing one backend means;
    returns it, or None when nothing was chosen."""
    import importlib.util
    import os

    if os.environ.get("KERAS_BACKEND") or importlib.util.find_spec(
            _MODULE.get(keras_backend(), keras_backend())):
        return None
    for name in ("tensorflow", "jax", "torch"):
        if importlib.util.find_spec(_MODULE[name]):
            os.environ["KERAS_BACKEND"] = name
            return name
    return None


# Backend name -> the package that provides it.
_MODULE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


# Strategy name -> (the backend it needs, what it is).
STRATEGIES = {
    "mirrored": ("tensorflow", "tf.distribute.MirroredStrategy over the "
                 "local GPUs"),
    "multi-worker": ("tensorflow", "tf.distribute.MultiWorkerMirroredStrategy"
                     " across the machines TF_CONFIG describes"),
    "data-parallel": ("jax", "keras.distribution.DataParallel over every "
                      "device (several processes with "
                      "KERAS_DISTRIBUTION_NUM_PROCESSES)"),
}




def check_strategy_name(name, backend):
    """Refuses a strategy name this backend cannot run (before any work)."""
    if name is None:
        return
    if name not in STRATEGIES:
        raise RenormConvertError("{arg}: use None or one of "
                            + ", ".join(STRATEGIES) + ".", "strategy", name)
    needed = STRATEGIES[name][0]
    if needed != backend:
        fits = [n for n, (b, _) in STRATEGIES.items() if b == backend]
        raise RenormConvertError(
            f"{{arg}} runs on Keras's {needed} backend, not {backend} "
            f"(KERAS_BACKEND={needed}); on {backend}: "
            + (", ".join(fits) if fits else "one device only") + ".",
            "strategy", name)
