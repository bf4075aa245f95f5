"""Real data sets that need no internet, adapted to a model's input, batched
i.i.d. or non-i.i.d. as in the paper, on every Keras backend.

The modules depend one way, NumPy first:

    labels, images  ->  sampling  ->  sources (`Split`, `load_source`)
                                  ->  batches (Keras `PyDataset`s of a Split)

Everything but `batches` is NumPy only: the command line checks sources and
batch settings before any backend loads, and `import renorm_convert.data`
loads no Keras. The batch names below (`training_batches`,
`evaluation_batches`, `TrainingBatches`, ...) load `batches`, and Keras with
it, when first used.

Example:
>>> split = rc.data.load_source("fashion-mnist").subset(train=4096, val=1000)
>>> batches = rc.data.training_batches(split, model, 32, non_iid_classes=2)
"""

import importlib

from renorm_convert.data.images import (SCALINGS, adapt, model_image_shape,
                                        resize_bilinear)
from renorm_convert.data.labels import (check_labels, class_ids, is_dense,
                                        num_label_classes)
from renorm_convert.data.sampling import check_batching, epoch_indices
from renorm_convert.data.sources import (FASHION_MNIST_DIR, IMAGE_SUFFIXES,
                                         Split, check_source, load_digits,
                                         load_fashion_mnist, load_image_folder,
                                         load_npz, load_source, source_path)

_BATCHES = ("training_batches", "evaluation_batches", "TrainingBatches",
            "EvaluationBatches", "ArrayBatches")

__all__ = [
    "FASHION_MNIST_DIR", "IMAGE_SUFFIXES", "SCALINGS", "Split", "adapt",
    "check_batching", "check_labels", "check_source", "class_ids",
    "epoch_indices", "is_dense", "load_digits", "load_fashion_mnist",
    "load_image_folder", "load_npz", "load_source", "model_image_shape",
    "num_label_classes", "resize_bilinear", "source_path",
    # batches (loaded on first use)
    "ArrayBatches", "EvaluationBatches", "TrainingBatches",
    "evaluation_batches", "training_batches",
]


def __getattr__(name):
    if name in _BATCHES:
        return getattr(importlib.import_module(f"{__name__}.batches"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
