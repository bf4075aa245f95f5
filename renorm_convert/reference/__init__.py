"""The reference models that ship inside the package: small Inception- and
ResNet-style Fashion-MNIST classifiers with batch normalization, trained by
`models/build.py` (see models/README.md). The demo starts from
`inception_fmnist`; both stand in for pretrained networks in the examples,
tests and benchmarks.

Example:
>>> keras.models.load_model(renorm_convert.reference.path("resnet_fmnist"))
"""

import importlib.resources

from renorm_convert.errors import RenormConvertError

NAMES = ("inception_fmnist", "resnet_fmnist")


def path(name="inception_fmnist"):
    """The path of the reference model `name` (one of `NAMES`)."""
    if name not in NAMES:
        raise RenormConvertError("{arg}: use one of " + ", ".join(NAMES)
                                 + ".", "name", name)
    return str(importlib.resources.files(__name__).joinpath(f"{name}.keras"))
