"""Repeatable runs: deterministic kernels for the span of a block, on each
backend. Seeding is the caller's (`keras.utils.set_random_seed`)."""

import contextlib

import keras

from renorm_convert._internal import keras_hooks as internals


@contextlib.contextmanager
def deterministic():
    """Within the block, the backend computes with deterministic kernels:
    two runs with the same seeds give the same numbers on the same machine
    and instruction set. TensorFlow: op determinism; PyTorch:
    deterministic algorithms; JAX on the CPU is deterministic already
    (XLA's GPU kernels may not be: see README). Restored on leaving."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        was = internals.tf_op_determinism_enabled()
        tf.config.experimental.enable_op_determinism()
        try:
            yield
        finally:
            if not was:
                internals.disable_tf_op_determinism()
    elif backend == "torch":
        import torch

        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was)
    else:
        yield
