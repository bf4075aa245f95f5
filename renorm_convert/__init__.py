"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away.

`convert`, `revert` and `fold` are functions here; their modules stay
importable as `renorm_convert.convert` and `renorm_convert.fold`.
"""

from renorm_convert._logs import filtered_stderr

with filtered_stderr():
    import tensorflow  # noqa: F401  (its native start-up logs, filtered)

# Importing these registers BatchRenormalization and ChannelAffine with
# Keras, so that saved models load after `import renorm_convert`.
from renorm_convert import data, export, graph, io, schedule  # noqa: E402
from renorm_convert.convert import ConversionError, convert, revert  # noqa: E402
from renorm_convert.export import ExportError, ExportReport, export_onnx  # noqa: E402
from renorm_convert.finetune import (FineTuneError, NonFiniteLoss,  # noqa: E402
                                     fine_tune)
from renorm_convert.fold import ChannelAffine, fold  # noqa: E402
from renorm_convert.graph import GraphError, model_graph  # noqa: E402
from renorm_convert.layers import BatchRenormalization  # noqa: E402
from renorm_convert.schedule import RenormSchedule  # noqa: E402

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
    "convert",
    "data",
    "export_onnx",
    "fine_tune",
    "fold",
    "model_graph",
    "revert",
]
__version__ = "0.1.0"
