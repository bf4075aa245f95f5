"""What differs between Keras's backends and cannot be said in `keras.ops`:
which backend runs, whether a GPU is there, whether channels-first
convolutions run here, the per-channel arithmetic of a training call at
the cost of the backend's own functions, gradients outside `fit`, the
optimizer's step, and a model's statistics kept while it runs in training
mode."""

import contextlib
import functools
import types

import keras
import numpy as np

from renorm_convert.errors import BackendError


def name():
    return keras.backend.backend()


def channels_first_runs():
    """Whether the backend can run a channels-first convolution here. On
    CPUs without AVX-512 TensorFlow turns oneDNN off by default, and its
    own CPU kernels then take only NHWC; JAX and PyTorch run either."""
    if name() != "tensorflow" or has_gpu():
        return True
    import tensorflow as tf

    try:
        tf.nn.conv2d(tf.zeros((1, 1, 3, 3)), tf.zeros((1, 1, 1, 1)), 1,
                     "VALID", data_format="NCHW")
        return True
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False


def check_runs_here(model):
    """Refuses, before it runs, a model this backend cannot run on this
    machine: channels-first convolutions on a TensorFlow CPU without
    oneDNN."""
    from renorm_convert._internal.keras_hooks import flatten_layers

    if any(getattr(layer, "data_format", None) == "channels_first"
           for layer in flatten_layers(model)) and not channels_first_runs():
        raise BackendError(
            f"model '{model.name}' has channels_first layers, which "
            "TensorFlow cannot run on this CPU while oneDNN is off (its "
            "default on CPUs without AVX-512); set TF_ENABLE_ONEDNN_OPTS=1 "
            "in the environment, run on a GPU, or use KERAS_BACKEND=jax "
            "or torch.")


def has_gpu():
    """Whether the backend computes on a GPU."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def device_names():
    """Names of the accelerators the backend sees (empty on a CPU)."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.config.experimental.get_device_details(d).get(
            "device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i)
                for i in range(torch.cuda.device_count())]
    return []


@functools.cache
def channel_ops():
    """sqrt, maximum (a tensor and a Python float), clip, add and relu for
    the small per-channel tensors of a training call (r, d, the statistics'
    updates): `keras.ops`, but on PyTorch torch's own functions.

    Why: on eager PyTorch each `keras.ops` call converts its operands, and
    Keras's conversion calls `.to(device)` on every tensor even when it is
    there: about 5 µs an operation, as much as the arithmetic on a vector
    of channels, and half of what a renorm training call adds to batch
    normalization. The torch functions are the kernels `keras.ops` ends in,
    so every number stays the same (tests/test_layer_ops.py checks Keras's
    renorm bit for bit). On TensorFlow `ops.add` stays: per microbatch
    group it is a BiasAdd, whose gradient sums in its own order."""
    if name() == "torch":
        import torch

        return types.SimpleNamespace(
            sqrt=torch.sqrt, maximum=torch.clamp_min, clip=torch.clip,
            add=torch.add, relu=torch.relu)
    ops = keras.ops
    return types.SimpleNamespace(sqrt=ops.sqrt, maximum=ops.maximum,
                                 clip=ops.clip, add=ops.add, relu=ops.relu)


def optimizer_step(model):
    """The optimizer's step count (its `iterations`) as a Python int."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


@contextlib.contextmanager
def statistics_kept(model):
    """Within the block `model` may run in training mode (which moves its
    normalization statistics); every non-trainable variable is put back on
    leaving, whatever happens."""
    variables = list(model.non_trainable_variables)
    saved = [keras.ops.convert_to_numpy(v) for v in variables]
    try:
        yield
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)


def gradients(model, x, y, loss):
    """[(variable, gradient as NumPy or None)] of `loss(y, model(x,
    training=True))` for every trainable variable of `model`, on one batch,
    outside `fit`. The model's statistics are not changed."""
    variables = list(model.trainable_variables)
    with statistics_kept(model):
        grads = _GRADIENTS[name()](model, variables, x, y, loss)
    return [(v, None if g is None else np.asarray(g))
            for v, g in zip(variables, grads)]


def _tf_gradients(model, variables, x, y, loss):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True))
    return [None if g is None else g.numpy()
            for g in tape.gradient(value, [v.value for v in variables])]


def _jax_gradients(model, variables, x, y, loss):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def compute(values):
        pred, _ = model.stateless_call(values, non_trainable, x,
                                       training=True)
        return loss(y, pred)

    return [np.asarray(g) for g in jax.grad(compute)(trainable)]


def _torch_gradients(model, variables, x, y, loss):
    import torch

    for v in variables:
        v.value.grad = None
    with torch.enable_grad():
        value = loss(y, model(x, training=True))
        value.backward()
    grads = [None if v.value.grad is None else
             v.value.grad.detach().cpu().numpy() for v in variables]
    for v in variables:
        v.value.grad = None
    return grads


_GRADIENTS = {"tensorflow": _tf_gradients, "jax": _jax_gradients,
              "torch": _torch_gradients}
