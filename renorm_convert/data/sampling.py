"""Which examples form each batch: i.i.d. or non-i.i.d. (the paper's
Figure 3), under a seed; and the batch settings a data set can meet.
NumPy only."""

import numpy as np

from renorm_convert.data.labels import class_ids
from renorm_convert.errors import RenormConvertError, check_integer


def epoch_indices(labels, batch_size, *, seed, epoch, non_iid_classes=None):
    """Example indices of one pass over the data, `len // batch_size` whole
    batches.

    i.i.d.: a random permutation. Non-i.i.d. (the paper's Figure 3): each
    batch is drawn from `non_iid_classes` (K) random classes with
    batch_size / K examples of each (one-hot or soft labels count as their
    most likely class). A class with fewer examples than that repeats some
    of them within the batch.
    """
    labels = class_ids(labels)
    rng = np.random.default_rng([seed, epoch])
    steps = len(labels) // batch_size
    if not non_iid_classes:
        return rng.permutation(len(labels))[: steps * batch_size]
    k = non_iid_classes
    per_class = batch_size // k
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    cursor = {c: 0 for c in classes}
    out = np.empty(steps * batch_size, np.int64)
    for step in range(steps):
        chosen = rng.choice(classes, size=k, replace=False)
        for j, c in enumerate(chosen):
            pool = pools[c]
            if cursor[c] + per_class > len(pool):
                pools[c] = pool = rng.permutation(pool)
                cursor[c] = 0
            start = step * batch_size + j * per_class
            take = np.arange(cursor[c], cursor[c] + per_class)
            out[start:start + per_class] = np.take(pool, take, mode="wrap")
            cursor[c] += per_class
    return out


def check_batching(num_examples, batch_size, non_iid_classes=None,
                   num_classes=None, microbatch_size=None):
    """Refuses batch settings the data cannot meet, naming the argument.
    `num_examples` / `num_classes` None: what can be told without the data
    (the command line checks that before any backend loads)."""
    check_integer(batch_size, "batch_size")
    if num_examples is not None and batch_size > num_examples:
        raise RenormConvertError(
            f"{{arg}}: larger than the {num_examples} training examples.",
            "batch_size", batch_size)
    if non_iid_classes:
        if batch_size % non_iid_classes:
            raise RenormConvertError(
                f"{{arg}}: the batch size {batch_size} must be a multiple "
                f"of it (batches of {non_iid_classes} classes with equally "
                "many examples each).", "non_iid_classes", non_iid_classes)
        if num_classes is not None and non_iid_classes > num_classes:
            raise RenormConvertError(
                f"{{arg}}: the data has only {num_classes} classes.",
                "non_iid_classes", non_iid_classes)
    if microbatch_size is not None and not 1 <= microbatch_size <= batch_size:
        raise RenormConvertError(
            f"{{arg}}: must be between 1 and the batch size {batch_size}.",
            "microbatch_size", microbatch_size)
