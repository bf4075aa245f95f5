"""What several commands do the same way once the backend is loaded:
loading the model, registering custom layers, measuring parity."""

import importlib
import inspect

from renorm_convert.cli import progress
from renorm_convert.errors import RenormConvertError


def import_custom_objects(modules):
    """Imports each `module.path` (which registers its classes) and returns
    the Keras layers, losses and metrics it defines, by class name."""
    import keras

    objects = {}
    for name in modules or ():
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise RenormConvertError(
                f"--custom-objects {name}: cannot import it "
                f"({type(e).__name__}: {e}). Give an importable module path "
                "(on PYTHONPATH).") from None
        for attr, value in vars(module).items():
            if inspect.isclass(value) and issubclass(
                value, (keras.layers.Layer, keras.losses.Loss,
                        keras.metrics.Metric)):
                objects[attr] = value
                # Files name registered classes as "package>Class".
                objects[keras.saving.get_registered_name(value)] = value
    return objects


def load_model(args, path=None, runs=True):
    """The model the command works on; with `runs`, refused at once where
    this backend cannot run it (rather than failing midway)."""
    from renorm_convert._internal.backend import check_runs_here
    from renorm_convert.io import load

    if getattr(args, "unsafe", False):
        progress("warning: --unsafe: Python code in Lambda layers of the file "
                 "will run.")
    custom = import_custom_objects(getattr(args, "custom_objects", None))
    path = path or args.model
    progress(f"loading {path}")
    model = load(path, safe_mode=not getattr(args, "unsafe", False),
                 custom_objects=custom)
    if runs:
        check_runs_here(model)
    return model


def training_split(args):
    """The data of `--data` / `--scaling` / `--train-size` / `--val-size`
    under `--seed`, checked against `--batch-size`, `--non-iid` and
    `--microbatch`: what `finetune` trains on and `diagnose` measures."""
    from renorm_convert import data

    split = data.load_source(args.data).with_scaling(args.scaling).subset(
        train=args.train_size, val=args.val_size, seed=args.seed)
    data.check_batching(len(split.y_train), args.batch_size,
                        args.non_iid_classes, split.num_classes,
                        args.microbatch_size)
    return split


def parity(reference, other):
    """Max abs inference difference on random inputs, and relative to the
    output scale."""
    import keras
    import numpy as np

    from renorm_convert.evaluation import to_numpy
    from renorm_convert.onnx.export import sample_inputs

    xs = sample_inputs(reference, batch=4)
    xs = xs[0] if len(xs) == 1 else xs
    a = [to_numpy(t) for t in keras.tree.flatten(reference(xs,
                                                           training=False))]
    b = [to_numpy(t) for t in keras.tree.flatten(other(xs, training=False))]
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    scale = max(float(np.abs(x).max()) for x in a)
    return diff, diff / max(scale, 1e-12)


def check_model_path(path):
    """The input model exists and looks like a model file (no backend)."""
    from renorm_convert.io import check_model_file

    check_model_file(path)


def default_model_path():
    """The embedded reference model, shipped inside the package."""
    from renorm_convert import reference

    return reference.path("inception_fmnist")
