"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away.

`import renorm_convert` is light: each name below loads its module (and
Keras, with its backend) on first use, so the command line parses its
arguments before any backend loads. The layers saved models refer to
(`BatchRenormalization`, `ChannelAffine`, ...) are registered with Keras as
soon as Keras is imported, before or after this package, so
`keras.models.load_model` finds them after `import renorm_convert`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

# Public name -> the module that defines it, by stage. Transforms come in
# pairs, a plan (what would change) beside the transform (a new model).
_API = {
    # the layer and its schedule
    "BatchRenormalization": "layers",
    "renorm_layers": "layers",
    "RenormSchedule": "train.schedule",
    # the model as a graph, and the transforms (every backend)
    "model_graph": "transform.graph",
    "iter_layers": "transform.graph",
    "convert": "transform.conversion",
    "convert_plan": "transform.conversion",
    "revert": "transform.conversion",
    "revert_plan": "transform.conversion",
    "ConversionPlan": "transform.conversion",
    "copy_model": "transform.conversion",
    "recast": "transform.conversion",
    "configure": "transform.surgery",
    "replace_head": "transform.surgery",
    "freeze_all_but_normalization": "transform.surgery",
    "unfreeze": "transform.surgery",
    "fold": "transform.folding",
    "fold_plan": "transform.folding",
    "FoldPlan": "transform.folding",
    "ChannelAffine": "transform.folding",
    "recalibrate": "transform.recalibration",
    # training and measuring
    "fine_tune": "train.finetune",
    "FineTuneResult": "train.finetune",
    "accuracy": "evaluation",
    "diagnose": "train.diagnosis",
    "Diagnosis": "train.diagnosis",
    # ONNX
    "export_onnx": "onnx.export",
    "ExportReport": "onnx.export",
    "quantize_onnx": "onnx.quantization",
    # files
    "load": "io",
    # errors
    "RenormConvertError": "errors",
    "BackendError": "errors",
    "ExportError": "errors",
    "NonFiniteLoss": "errors",
}
# Modules reachable as attributes (`rc.data.load_source(...)`), by name.
_MODULES = {
    "data": "data", "io": "io", "evaluation": "evaluation",
    "transform": "transform", "train": "train", "onnx": "onnx",
    "reference": "reference",
    "callbacks": "train.callbacks", "checkpoint": "train.checkpoint",
    "distribute": "train.distribute", "reporting": "train.reporting",
    "reproduce": "train.reproduce", "schedule": "train.schedule",
    "folding": "transform.folding", "graph": "transform.graph",
    "surgery": "transform.surgery",
}
# Modules whose import registers the classes saved files name.
_REGISTERING = ("layers", "train.schedule", "transform.blocks",
                "transform.folding", "io.keras2")

__all__ = sorted(_API) + sorted(_MODULES)


def __getattr__(name):
    if name in _API:
        module = _load(_API[name])
        register()
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _MODULES:
        module = _load(_MODULES[name])
        if "keras" in sys.modules:  # a light module (data) loads no Keras
            register()
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(name):
    """Imports one of our modules; the first that loads Keras does so
    without the backend's native start-up lines on stderr."""
    if "keras" in sys.modules:
        return importlib.import_module(f"{__name__}.{name}")
    from renorm_convert._internal.logs import quiet_start

    with quiet_start():
        return importlib.import_module(f"{__name__}.{name}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_MODULES))


def register():
    """Imports the modules whose classes saved models refer to, which
    registers them with Keras (this imports Keras and its backend)."""
    for module in _REGISTERING:
        importlib.import_module(f"{__name__}.{module}")


def _importing_ourselves():
    """Whether one of this package's modules is being imported right now
    (then it imported Keras, and registering would import it again half
    made; the first public name used registers instead)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(f"{__name__}.") and getattr(
                getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Finds `keras` as the import system would, and has `register()` run
    once Keras's own module has executed; removes itself at the first
    import of Keras."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if not _importing_ourselves():
            register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


if "keras" in sys.modules and not _importing_ourselves():
    register()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
