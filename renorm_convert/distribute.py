"""Where training runs: GPU memory growth, tf.distribute strategies by name,
chief detection in a TF_CONFIG cluster, and the multi-worker `fit`
workaround."""

import json
import os

import keras
import tensorflow as tf

from renorm_convert import _keras_internals as internals


class StrategyError(ValueError):
    """A strategy that cannot be created: the message says why and what to
    do."""


def use_gpu_memory_growth():
    """Lets TensorFlow grow GPU memory as needed (several processes can then
    share a GPU); returns the GPUs found."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised: the setting is fixed by now
    return gpus


def has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def make_strategy(strategy):
    """None, a tf.distribute.Strategy, or "mirrored" / "multi-worker"."""
    if strategy is None or isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "multi-worker":
        if not os.environ.get("TF_CONFIG"):
            raise StrategyError(
                "strategy 'multi-worker' needs TF_CONFIG describing the "
                "cluster and this worker's index (see README).")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise StrategyError(
                f"cannot start the multi-worker strategy now ({e}): create "
                "tf.distribute.MultiWorkerMirroredStrategy() at the start of "
                "the program, before any TensorFlow op, and pass it as "
                "`strategy`.") from None
    raise StrategyError(f"strategy={strategy!r}: use None, 'mirrored' or "
                        "'multi-worker'.")


def scope(strategy):
    """The strategy's scope, or a scope that does nothing."""
    return strategy.scope() if strategy is not None else _NullScope()


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _tf_config():
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def is_chief():
    """False on the non-chief workers of a TF_CONFIG cluster: they train but
    write no files."""
    config = _tf_config()
    task = config.get("task", {})
    if task.get("type") in (None, "chief"):
        return True
    has_chief = "chief" in config.get("cluster", {})
    return task.get("type") == "worker" and task.get("index", 0) == 0 and (
        not has_chief)


def worker_index():
    """This worker's index in TF_CONFIG (0 without one)."""
    return int(_tf_config().get("task", {}).get("index", 0))


def patch_for_multi_worker(model, strategy, sample):
    """Works around Keras 3's `fit` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): its symbolic build reduces a data batch across
    workers ("Attempt to convert a value (PerReplica...)") and its step
    reduces scalar logs along axis 0 ("Invalid reduction dimension 0").
    Build from a local batch instead, and return the logs of the first local
    replica: Keras's metric variables are already aggregated across workers
    when read, and the gradients are all-reduced by the strategy as usual."""

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
