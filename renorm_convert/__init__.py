"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away.

`convert`, `revert` and `fold` are functions here; their modules stay
importable as `renorm_convert.convert` and `renorm_convert.fold`.
"""

import os
import sys


def _load():
    """Imports TensorFlow and every module of the API. Importing them
    registers BatchRenormalization and ChannelAffine with Keras, so that
    saved models load after `import renorm_convert`."""
    from renorm_convert._logs import filtered_stderr

    import importlib

    with filtered_stderr():
        import tensorflow  # noqa: F401  (its native start-up logs, filtered)

    for module in ("data", "export", "graph", "io", "schedule"):
        importlib.import_module(f"renorm_convert.{module}")
    from renorm_convert.convert import (ConversionError, convert, copy_model,
                                        freeze_all_but_normalization, recast,
                                        replace_head, revert, unfreeze)
    from renorm_convert.export import (ExportError, ExportReport, export_onnx,
                                       quantize_onnx)
    from renorm_convert.finetune import (FineTuneError, NonFiniteLoss,
                                         accuracy, fine_tune, recalibrate)
    from renorm_convert.fold import ChannelAffine, fold
    from renorm_convert.graph import GraphError, iter_layers, model_graph
    from renorm_convert.layers import BatchRenormalization
    from renorm_convert.schedule import RenormSchedule

    globals().update({name: value for name, value in locals().items()
                      if name in __all__})


def _run_as_command():
    """True while the `renorm-convert` command (or `python -m
    renorm_convert.cli`) imports this package: it parses its arguments
    before TensorFlow loads, so `--help` and usage errors answer at once,
    and calls `_load()` itself for a command that runs."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) in ("renorm-convert", "-m")


__all__ = [
    "BatchRenormalization",
    "ChannelAffine",
    "ConversionError",
    "ExportError",
    "ExportReport",
    "FineTuneError",
    "GraphError",
    "NonFiniteLoss",
    "RenormSchedule",
    "accuracy",
    "convert",
    "copy_model",
    "data",
    "export_onnx",
    "fine_tune",
    "fold",
    "freeze_all_but_normalization",
    "iter_layers",
    "model_graph",
    "quantize_onnx",
    "recalibrate",
    "recast",
    "replace_head",
    "revert",
    "unfreeze",
]
__version__ = "0.1.0"

if _run_as_command():
    def __getattr__(name):
        if name in __all__:
            _load()
            return globals()[name]
        raise AttributeError(f"module 'renorm_convert' has no attribute "
                             f"{name!r}")
else:
    _load()
