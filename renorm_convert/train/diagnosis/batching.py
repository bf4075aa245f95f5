"""Which examples a diagnosis reads, and in which batches: the user's
batching (i.i.d., or K classes per batch, drawn exactly as `fine_tune`
draws its first batches) and the same examples shuffled into i.i.d.
batches of the same size, so that every mode is compared on the same
images."""

import dataclasses

import numpy as np

from renorm_convert.data import (Split, adapt, check_batching,
                                 model_image_shape, num_label_classes)
from renorm_convert.data.batches import TrainingBatches
from renorm_convert.errors import RenormConvertError


@dataclasses.dataclass
class Examples:
    """The images (adapted to the model) and labels of `count` batches of
    `batch_size`, in the user's order: batch i is rows
    [i * batch_size, (i + 1) * batch_size). `iid_order` lists the same
    rows shuffled; read in batches of `batch_size` they are i.i.d.
    batches of the same examples."""

    x: np.ndarray
    y: np.ndarray
    batch_size: int
    iid_order: np.ndarray

    @property
    def count(self):
        return len(self.y) // self.batch_size

    def user_batch(self, i):
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part]

    def iid_rows(self, i):
        return self.iid_order[i * self.batch_size:(i + 1) * self.batch_size]

    def iid_batch(self, i):
        return self.x[self.iid_rows(i)]


def as_split(data):
    """`data` as a `Split`: a Split as it is, or (images, labels) arrays
    the model takes as they are."""
    if isinstance(data, Split):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        x, y = (np.asarray(a) for a in data)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or len(x) != len(y) or not len(y):
            raise RenormConvertError(
                "{arg}: expected (images, labels) with images of shape (N, "
                "H, W[, C]) and N labels; got "
                f"{x.shape} and {y.shape}.", "data", "arrays", quote=False)
        return Split(x, y, x[:0], y[:0], num_label_classes(y), "arrays",
                     value_range=255.0, scaling="raw")
    raise RenormConvertError(
        "{arg}: expected a renorm_convert.data.Split (e.g. "
        "rc.data.load_source('fashion-mnist')) or (images, labels) arrays.",
        "data", type(data).__name__, quote=False)


def draw(split, model, batch_size, *, non_iid_classes, microbatch_size,
         count, seed):
    """The `Examples` of the first `count` training batches a run with
    these settings would take (batches beyond one pass over the data run
    on into the next, as training does)."""
    if not len(split.y_train):
        raise RenormConvertError("the training data is empty.")
    check_batching(len(split.y_train), batch_size, non_iid_classes,
                   split.num_classes, microbatch_size)
    shape = model_image_shape(model)
    batches = TrainingBatches(split, shape, batch_size,
                              non_iid_classes=non_iid_classes, seed=seed)
    rows = np.concatenate([batches.indices(step) for step in range(count)])
    x = adapt(split.x_train[rows], shape, split.value_range, split.scaling)
    order = np.random.default_rng([seed, 29]).permutation(len(rows))
    return Examples(x, np.asarray(split.y_train[rows]), int(batch_size),
                    order)
