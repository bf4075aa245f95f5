"""Batches of data as `keras.utils.PyDataset`s, computed with NumPy: `fit`
takes them on TensorFlow, JAX and PyTorch alike, in the same order under a
seed. `TrainingBatches.as_tf_dataset()` gives the same batches as
`tf.data`, for `tf.distribute` strategies.

This is the one module of `renorm_convert.data` that imports Keras; it
reads a `Split` (sources) and never the other way round.
"""

import keras
import numpy as np

from renorm_convert.data.images import adapt, model_image_shape
from renorm_convert.data.sampling import check_batching, epoch_indices
from renorm_convert.errors import RenormConvertError, check_integer


def training_batches(split, model, batch_size=32, *, non_iid_classes=None,
                     seed=0, steps_per_epoch=None):
    """`TrainingBatches` of the training part of `split`, adapted to
    `model`'s image input."""
    return TrainingBatches(split, model_image_shape(model), batch_size,
                           non_iid_classes=non_iid_classes, seed=seed,
                           steps_per_epoch=steps_per_epoch)


def evaluation_batches(split, model, batch_size=256, count=None):
    """`EvaluationBatches` of the (first `count`) validation examples of
    `split`, adapted to `model`'s image input."""
    return EvaluationBatches(split.x_val[:count], split.y_val[:count],
                             model_image_shape(model), batch_size,
                             split.value_range, split.scaling)


class TrainingBatches(keras.utils.PyDataset):
    """Training batches of a `Split` for one model, as a
    `keras.utils.PyDataset`: images adapted to `shape`, whole batches only
    (a static batch size), in an order fixed by `seed`.

    An epoch is one pass over the data, or `steps_per_epoch` batches with
    the data running on across epochs. `epoch` is the epoch the next batch
    belongs to: `fit` advances it, and a resumed run sets it to where it
    stopped, so a run interrupted and resumed sees the same batches as one
    that was not. `shard(index, count)` gives process `index` of `count`
    its part of every batch (several processes of one JAX job).
    """

    def __init__(self, split, shape, batch_size=32, *, non_iid_classes=None,
                 seed=0, steps_per_epoch=None, shard=None):
        super().__init__(workers=1, use_multiprocessing=False)
        check_batching(len(split.y_train), batch_size, non_iid_classes,
                       split.num_classes)
        steps_per_epoch = check_integer(steps_per_epoch, "steps_per_epoch",
                                        none="for whole passes")
        self.split = split
        self.shape = tuple(shape)
        self.batch_size = int(batch_size)
        self.non_iid_classes = non_iid_classes
        self.seed = seed
        self.per_pass = len(split.y_train) // self.batch_size
        self.steps_per_epoch = steps_per_epoch or self.per_pass
        self.epoch = 0
        self._shard = shard or (0, 1)
        self._orders = {}

    def shard(self, index, count):
        """The same batches, each cut to process `index`'s part of
        `count` equal parts (the batch size must divide)."""
        if self.batch_size % count:
            raise RenormConvertError(
                f"{{arg}}: must be a multiple of the {count} "
                "processes.",
                "batch_size", self.batch_size)
        return TrainingBatches(self.split, self.shape, self.batch_size,
                               non_iid_classes=self.non_iid_classes,
                               seed=self.seed,
                               steps_per_epoch=self.steps_per_epoch,
                               shard=(index, count))

    @property
    def num_batches(self):
        return self.steps_per_epoch

    def __len__(self):
        return self.num_batches

    def _order(self, data_pass):
        order = self._orders.get(data_pass)
        if order is None:
            if len(self._orders) > 2:
                self._orders.clear()
            order = epoch_indices(self.split.y_train, self.batch_size,
                                  seed=self.seed, epoch=data_pass,
                                  non_iid_classes=self.non_iid_classes)
            self._orders[data_pass] = order
        return order

    def indices(self, step):
        """The example indices of the run's `step`-th batch (from 0)."""
        data_pass, position = divmod(step, self.per_pass)
        start = position * self.batch_size
        index = self._order(data_pass)[start:start + self.batch_size]
        part, parts = self._shard
        size = self.batch_size // parts
        return index[part * size:(part + 1) * size]

    def batch_at(self, step):
        """(images, labels) of the run's `step`-th batch."""
        index = self.indices(step)
        split = self.split
        x = adapt(split.x_train[index], self.shape, split.value_range,
                  split.scaling)
        return x, np.asarray(split.y_train[index])

    def __getitem__(self, i):
        return self.batch_at(self.epoch * self.steps_per_epoch + int(i))

    def on_epoch_end(self):
        self.epoch += 1

    def as_tf_dataset(self, epochs):
        """The batches of epochs `self.epoch` .. `epochs - 1` as one
        `tf.data.Dataset` (for tf.distribute strategies)."""
        import tensorflow as tf

        first = self.epoch * self.steps_per_epoch
        steps = range(first, epochs * self.steps_per_epoch)
        x0, y0 = self.batch_at(first)
        signature = (tf.TensorSpec(x0.shape, tf.float32),
                     tf.TensorSpec(y0.shape, tf.as_dtype(y0.dtype)))
        return tf.data.Dataset.from_generator(
            lambda: (self.batch_at(s) for s in steps),
            output_signature=signature).prefetch(2)


class EvaluationBatches(keras.utils.PyDataset):
    """Images and labels in order, adapted to `shape`, in batches of
    `batch_size` (the last one smaller), as a `keras.utils.PyDataset`."""

    def __init__(self, x, y, shape, batch_size=256, value_range=255.0,
                 scaling="unit"):
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y = x, np.asarray(y)
        self.shape = tuple(shape)
        self.batch_size = int(batch_size)
        self.value_range = value_range
        self.scaling = scaling

    @property
    def num_batches(self):
        return -(-len(self.y) // self.batch_size)

    def __len__(self):
        return self.num_batches

    def __getitem__(self, i):
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return (adapt(self.x[part], self.shape, self.value_range,
                      self.scaling), self.y[part])

    def __iter__(self):
        for i in range(self.num_batches):
            yield self[i]


class ArrayBatches(keras.utils.PyDataset):
    """Arrays a model takes as they are (`x`, or a list of arrays for
    several inputs) with their labels, in batches of `batch_size`
    (reshuffled every epoch under `seed`; `shuffle=False` keeps their
    order), as a `keras.utils.PyDataset`; whole batches only."""

    def __init__(self, x, y, batch_size=32, *, seed=0, shuffle=True):
        super().__init__(workers=1, use_multiprocessing=False)
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        self.xs = [np.asarray(a) for a in xs]
        self.y = np.asarray(y)
        self.several = isinstance(x, (list, tuple))
        if any(len(a) != len(self.y) for a in self.xs):
            raise RenormConvertError(
                f"{{arg}}: {len(self.y)} labels for inputs of "
                f"{[len(a) for a in self.xs]} examples.", "y",
                f"array of {len(self.y)}", quote=False)
        check_batching(len(self.y), batch_size)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.per_pass = len(self.y) // self.batch_size

    @property
    def num_batches(self):
        return self.per_pass

    def __len__(self):
        return self.num_batches

    def __getitem__(self, i):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(
            len(self.y)) if self.shuffle else np.arange(len(self.y)))
        index = order[i * self.batch_size:(i + 1) * self.batch_size]
        xs = [a[index] for a in self.xs]
        # A tuple: TensorFlow's `fit` turns a PyDataset into tf.data, whose
        # signature takes tuples, not lists.
        return (tuple(xs) if self.several else xs[0]), self.y[index]

    def on_epoch_end(self):
        self.epoch += 1
