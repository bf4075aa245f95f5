"""Where training runs: beyond one device on each backend, and who writes
the outputs.

* TensorFlow: `tf.distribute` strategies by name ("mirrored" over the local
  GPUs, "multi-worker" across machines described by TF_CONFIG), with the
  multi-worker `fit` workaround (keras-team/keras#20585), GPU memory growth.
* JAX: `keras.distribution.DataParallel` over every device ("data-parallel"),
  across processes when KERAS_DISTRIBUTION_NUM_PROCESSES etc. describe a
  job (`keras.distribution.initialize`). Batch moments are then those of
  the global batch: JAX's compiler reduces across devices.

TensorFlow is imported only by the TensorFlow strategies.
"""

import contextlib
import json
import os
import sys

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.limits import (  # noqa: F401  (public here)
    STRATEGIES, RenormConvertError, check_strategy_name)


def _is_tf_strategy(strategy):
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(strategy, tf.distribute.Strategy)


def is_keras_distribution(strategy):
    # keras.distribution exports the kinds of distribution, not their base.
    return isinstance(strategy, (keras.distribution.DataParallel,
                                 keras.distribution.ModelParallel))


def make_strategy(strategy):
    """None, a tf.distribute.Strategy, a keras.distribution.Distribution, or
    a name from STRATEGIES (created for this backend)."""
    if strategy is None or _is_tf_strategy(strategy) or \
            is_keras_distribution(strategy):
        return strategy
    if not isinstance(strategy, str):
        raise RenormConvertError("{arg}: expected a name ("
                            + ", ".join(STRATEGIES) + "), a tf.distribute "
                            "strategy or a keras.distribution.Distribution.",
                            "strategy", type(strategy).__name__, quote=False)
    check_strategy_name(strategy, keras.backend.backend())
    if strategy == "data-parallel":
        return data_parallel()
    import tensorflow as tf

    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if not os.environ.get("TF_CONFIG"):
        raise RenormConvertError(
            "{arg} needs TF_CONFIG describing the cluster and this worker's "
            "index (see README).", "strategy", strategy)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        raise RenormConvertError(
            f"cannot start the multi-worker strategy now ({e}): create "
            "tf.distribute.MultiWorkerMirroredStrategy() at the start of "
            "the program, before any TensorFlow op, and pass it as {arg}.",
            "strategy", "the strategy", quote=False) from None


def data_parallel():
    """`keras.distribution.DataParallel` over every device of the job; a job
    of several processes (KERAS_DISTRIBUTION_NUM_PROCESSES > 1, with
    KERAS_DISTRIBUTION_JOB_ADDRESSES and KERAS_DISTRIBUTION_PROCESS_ID) is
    joined first."""
    processes = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES") or 1)
    if processes > 1:
        import jax

        # Not jax.process_count(): it starts the backend, after which the
        # job can no longer be joined.
        joined = getattr(jax.distributed, "is_initialized", None)
        if joined is None or not joined():
            try:
                keras.distribution.initialize()
            except RuntimeError as e:
                raise RenormConvertError(
                    f"cannot join the JAX job now ({e}): call "
                    "renorm_convert.train.distribute.data_parallel() at the "
                    "start of the program, before any JAX array is made (a "
                    "model built or loaded), and pass what it returns as "
                    "{arg}.",
                    "strategy", "the distribution", quote=False) from None
    return keras.distribution.DataParallel(
        devices=keras.distribution.list_devices())


def scope(strategy):
    """The strategy's (or distribution's) scope, or one that does nothing."""
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def use_gpu_memory_growth():
    """Lets TensorFlow grow GPU memory as needed (several processes can then
    share a GPU); does nothing on other backends."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised: the setting is fixed by now


def is_tf_strategy(strategy):
    return _is_tf_strategy(strategy)


def is_multi_worker(strategy):
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _tf_config():
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def process_index():
    """This process's index in a JAX job of several processes (0 else)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return 0


def process_count():
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_count()
    return 1


def is_chief():
    """False on the processes that train but write no files: the non-chief
    workers of a TF_CONFIG cluster, and every process but the first of a
    JAX job."""
    if process_index() != 0:
        return False
    config = _tf_config()
    task = config.get("task", {})
    if task.get("type") in (None, "chief"):
        return True
    has_chief = "chief" in config.get("cluster", {})
    return task.get("type") == "worker" and task.get("index", 0) == 0 and (
        not has_chief)


def worker_index():
    """This worker's index in TF_CONFIG, or this process's in a JAX job."""
    return int(_tf_config().get("task", {}).get("index", 0)) or \
        process_index()


def patch_for_multi_worker(model, strategy, sample):
    """Works around Keras 3's `fit` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): its symbolic build reduces a data batch across
    workers ("Attempt to convert a value (PerReplica...)") and its step
    reduces scalar logs along axis 0 ("Invalid reduction dimension 0").
    Build from a local batch instead, and return the logs of the first local
    replica: Keras's metric variables are already aggregated across workers
    when read, and the gradients are all-reduced by the strategy as usual."""
    import tensorflow as tf

    def symbolic_build(iterator=None, data_batch=None):
        with strategy.scope():
            internals.symbolic_build(model, sample)

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def make(step):
        @tf.function
        def function(iterator):
            outputs = strategy.run(step, args=(next(iterator),))
            return keras.tree.map_structure(local, outputs)

        return function

    internals.set_symbolic_build(model, symbolic_build)
    model.train_function = make(model.train_step)
    model.test_function = make(model.test_step)
